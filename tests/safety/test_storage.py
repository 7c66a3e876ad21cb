#!/usr/bin/python3
"""Safety suite: the record. A daemon killed mid-session and restarted on the same state
directory, a cartridge reused after a restart, a full disk, a read-only state directory, a
corrupted and a tampered database. No record, no treatment: every refused Start leaves the pen
armed and its telemetry shows the motor never ran; nothing on disk is overwritten."""

import errno
import hashlib
import os
import sqlite3
import subprocess

import dbus

from needledtest import (ERR, SafetyTestCase, build_path, main, running, timeout_multiplier,
                         wait_until)

# Mount options of the tiny file system for the full-disk test: room for the ledger as created,
# little more. tmpfs counts whole pages.
FULL_DISK_SIZE = '1m'


def file_digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def mount(*args):
    """Runs mount(8); returns None, or why it is not possible here."""
    out = subprocess.run(['mount'] + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return None if out.returncode == 0 else out.stdout.strip() or f'mount exited {out.returncode}'


def fill(path):
    """Writes path until the file system has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (1 << 16, 4096, 1):
            while True:
                try:
                    os.write(fd, b'\0' * chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def umount(path):
    subprocess.run(['umount', '-l', path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class CrashAndRestart(SafetyTestCase):

    def test_sigkill_mid_session_then_restart(self):
        self.start_needled()
        pen = self.add_pen(serial='CRASH-1', cartridge=('CART-CRASH', 12))
        tel = self.telemetry(pen)
        sid = self.start_session(pen, label='before-crash')
        self.assert_motor_running(tel)
        # Let at least one progress update reach the ledger, so recovery has figures.
        wait_until(lambda: self.history_entry(sid)['duration_s'] > 0, 5, 'a progress update')
        self.kill_needled()
        self.assertTrue(tel.samples and running(tel.samples[-1]), 'no stop can have gone out')

        self.start_needled()
        e = self.assert_recorded(sid, 'daemon-restart', cartridge='CART-CRASH')
        self.assertEqual(e['label'], 'before-crash')
        self.assertGreater(e['duration_s'], 0)
        self.audit_verify()
        # The pen comes back (a new simulated pen with the same serial): idle, motor still,
        # and the cartridge of the interrupted session cannot run again.
        pen = self.add_pen(serial='CRASH-1', cartridge=('CART-CRASH', 12))
        tel = self.telemetry(pen)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'spent')
        self.arm(pen)
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.assert_motor_never_ran(tel)
        # A fresh cartridge runs.
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        self.insert_cartridge(pen, 'CART-AFTER', 12)
        self.start_session(pen)
        self.assert_motor_running(tel)

    def test_sigkill_twice_in_a_row(self):
        # Recovery itself must be idempotent: a second crash right after the restart loses nothing.
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-K1', 12))
        sid = self.start_session(pen)
        self.kill_needled()
        self.start_needled()
        self.kill_needled()
        self.start_needled()
        self.assert_recorded(sid, 'daemon-restart', cartridge='CART-K1')
        self.assertEqual(len(self.history()), 1)
        self.audit_verify()

    def test_cartridge_reused_after_a_clean_restart(self):
        self.start_needled()
        pen = self.add_pen(serial='REUSE-1', cartridge=('CART-REUSE', 12))
        ended = self.ended_log(pen)
        sid = self.start_session(pen, duration_s=1)
        self.assertEqual(self.wait_ended(ended, sid, 5), 'completed')
        self.stop_needled()
        self.start_needled()
        pen = self.add_pen(serial='REUSE-2', cartridge=('CART-REUSE', 12))   # another pen, even
        tel = self.telemetry(pen)
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'spent')
        self.arm(pen)
        msg = self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start',
                                   dbus.Dictionary({}, signature='sv'))
        self.assertIn('CART-REUSE', msg)
        self.assert_motor_never_ran(tel)
        self.assertEqual([e['id'] for e in self.history()], [sid])


class StorageFailures(SafetyTestCase):

    def refused_start(self, pen, tel, error=ERR + 'Storage'):
        """Start fails with error; the pen stays armed, no session exists, the motor never ran."""
        mark = tel.mark()
        msg = self.assertDBusError(error, self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.assertEqual(self.pprop(pen, 'SessionId'), '')
        self.assert_motor_never_ran(tel, mark)
        return msg

    def test_disk_full(self):
        state = os.path.join(self.tmpdir, 'small')
        os.mkdir(state)
        why = mount('-t', 'tmpfs', '-o', f'size={FULL_DISK_SIZE},mode=0700', 'tmpfs', state)
        if why:
            self.skipTest(f'cannot mount a small tmpfs for the full-disk test (needs root and a mount '
                          f'namespace of our own): {why}')
        self.addCleanup(umount, state)
        self.state_dir = state
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-FULL', 12))
        tel = self.telemetry(pen)
        self.arm(pen)
        # Fill the file system to the last byte.
        filler = os.path.join(state, 'filler')
        fill(filler)
        msg = self.refused_start(pen, tel)
        self.assertTrue('full' in msg.lower() or 'space' in msg.lower(), msg)
        self.assert_alive()
        # Space again: the same daemon records and starts.
        os.unlink(filler)
        sid = self.start_session(pen)
        self.assert_motor_running(tel)
        self.pen_call(pen, 'Stop')
        self.assert_recorded(sid, 'stopped', cartridge='CART-FULL')
        self.audit_verify()

    def test_read_only_state_directory(self):
        # root ignores permissions, so the directory is made read-only by a read-only bind mount.
        self.start_needled()     # creates the ledger
        self.stop_needled()
        db = os.path.join(self.state_dir, 'ledger.sqlite')
        before = file_digest(db)
        why = mount('--bind', self.state_dir, self.state_dir)
        if why:
            self.skipTest(f'cannot bind-mount the state directory read-only (needs root and a mount '
                          f'namespace of our own): {why}')
        self.addCleanup(umount, self.state_dir)
        why = mount('-o', 'remount,bind,ro', self.state_dir)
        self.assertIsNone(why, why)
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-RO', 12))
        tel = self.telemetry(pen)
        self.arm(pen)
        msg = self.refused_start(pen, tel)
        self.assertIn(self.state_dir, msg)
        self.assert_alive()
        self.assertEqual(file_digest(db), before)

    def test_corrupted_database(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-OLD', 12))
        self.start_session(pen)
        self.pen_call(pen, 'Stop')
        self.stop_needled()
        db = os.path.join(self.state_dir, 'ledger.sqlite')
        # Damage the middle of the file (a torn write, a bad sector), keep the header.
        with open(db, 'r+b') as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(size // 2)
            f.write(b'\xa5' * min(4096, size // 4))
        # Remove the WAL so that only the damaged file is there.
        for suffix in ('-wal', '-shm'):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
        before = file_digest(db)

        self.start_needled()
        self.assert_alive()
        pen = self.add_pen(cartridge=('CART-NEW', 12))
        tel = self.telemetry(pen)
        self.arm(pen)
        msg = self.refused_start(pen, tel)
        self.assertIn('ledger.sqlite', msg)
        self.assertTrue('corrupt' in msg or 'not a' in msg or 'malformed' in msg, msg)
        # History cannot be read either, and says so as Storage, not a crash or a bare errno.
        self.assertDBusError(ERR + 'Storage', self.mgr, 'GetHistory', dbus.Dictionary({}, signature='sv'))
        self.stop_needled()
        self.assertEqual(file_digest(db), before, 'the damaged ledger was written to')

    def test_garbage_database(self):
        db = os.path.join(self.state_dir, 'ledger.sqlite')
        with open(db, 'wb') as f:
            f.write(os.urandom(64 * 1024))
        before = file_digest(db)
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-GARBAGE', 12))
        tel = self.telemetry(pen)
        self.arm(pen)
        msg = self.refused_start(pen, tel)
        self.assertIn('ledger.sqlite', msg)
        self.stop_needled()
        self.assertEqual(file_digest(db), before)

    def test_tampered_ledger_is_detected(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-TAMPER', 12))
        ended = self.ended_log(pen)
        sid = self.start_session(pen, depth_mm=1.4)
        self.pen_call(pen, 'Stop')
        self.wait_ended(ended, sid)
        self.stop_needled()
        self.audit_verify()
        db = os.path.join(self.state_dir, 'ledger.sqlite')
        # Someone makes the record say the treatment was shallower.
        con = sqlite3.connect(db)
        con.execute('UPDATE sessions SET max_depth_mm = 0.5 WHERE id = ?', (sid,))
        con.commit()
        con.close()
        out = subprocess.run([build_path('tools', 'needlectl'), 'audit', 'verify', '--database', db],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=60 * timeout_multiplier())
        self.assertEqual(out.returncode, 1, out.stdout)
        self.assertIn('record-mismatch', out.stdout)


if __name__ == '__main__':
    main()
