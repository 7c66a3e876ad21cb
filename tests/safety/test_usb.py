#!/usr/bin/python3
"""Safety suite on the libusb path: needled (the real binary, no --simulate) in its own process
under umockdev's preload, against pens emulated at the usbdevfs level that live in
umockdev-penbox, so that they outlive the daemon. The pen model is the ground truth: a test asks
the box whether the motor runs, which fault bits the firmware latched, and when the host last
fed the pen's watchdog.

Covered: the pen unplugged mid-session, the daemon SIGKILLed mid-session (the pen's watchdog
stops the motor; the restarted daemon records daemon-restart, spends the cartridge and stops a
pen it finds running), SIGTERM (the daemon's own stop, before the watchdog could act), a pen
that reboots behind the host's back (sequence resync), the cartridge pulled out mid-session, a
second pen with a serial already connected, a pen whose telemetry stops while it still answers,
and a pen that stops answering."""

import os
import socket
import time

import dbus

from needledtest import (ERR, SafetyTestCase, limits_text, main, realtime_prefix, timeout_multiplier,
                         valgrind, wait_until)

PENBOX = os.environ.get('NEEDLED_UMOCKDEV_PENBOX')
WATCHDOG_FAULT = 0x10   # docs/protocol.md: pen watchdog expired
# The pens' watchdog, from the limits (heartbeat_timeout_ms); longer under valgrind, where the
# daemon is slow enough to miss a 500 ms heartbeat on its own.
HEARTBEAT_MS = 500 * (6 if valgrind() else 1)
# Samples per second of the emulated pens: fewer under valgrind, where 1 kHz through umockdev's
# ioctl forwarding keeps the slowed daemon so busy that a control transfer can time out.
TELEMETRY_RATE_HZ = 200 if valgrind() else 1000


class PenBox:
    """The control socket of a running umockdev-penbox."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10 * timeout_multiplier())
        # The socket's file appears at bind(), before the box listens: on a loaded machine a
        # connect in between is refused. Retry until a deadline (scaled) rather than assume.
        deadline = time.monotonic() + 10 * timeout_multiplier()
        while True:
            try:
                self.sock.connect(path)
                return
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def cmd(self, *words):
        self.sock.send(' '.join(str(w) for w in words).encode())
        answer = self.sock.recv(4096).decode()
        if not answer.startswith('ok'):
            raise AssertionError(f'penbox {words}: {answer}')
        return answer[3:]

    def state(self, name):
        fields = dict(kv.split('=', 1) for kv in self.cmd('state', name).split())
        for k in ('identified', 'motor', 'watchdog_armed', 'telemetry', 'unplugged', 'watchdog_timeout_ms',
                  'next_sequence', 'last_heartbeat_us', 'now_us'):
            fields[k] = int(fields[k])
        fields['faults'] = int(fields['faults'], 16)
        for k in ('speed_hz', 'set_speed_hz', 'depth_mm', 'set_depth_mm', 'current_ma', 'temperature_c'):
            fields[k] = float(fields[k])
        return fields

    def close(self):
        try:
            self.sock.send(b'quit')
            self.sock.recv(64)
        except OSError:
            pass
        self.sock.close()


class UsbSafety(SafetyTestCase):

    @classmethod
    def setUpClass(cls):
        if not PENBOX:
            raise __import__('unittest').SkipTest('NEEDLED_UMOCKDEV_PENBOX is not set (umockdev missing?)')
        super().setUpClass()

    def setUp(self):
        super().setUp()
        ctl = os.path.join(self.tmpdir, 'penbox.sock')
        # Real-time, as needled is: the box is the pens' firmware, which runs on its own
        # microcontroller and is never starved by the host's load. Time-shared, on a loaded machine
        # (L13) a session here ended heartbeat-lost where the pen's restart was to end it
        # telemetry-corrupt; a box that answered late is the likely cause.
        self.box_proc = self.fixture.spawn(realtime_prefix(wrapped=False) + [PENBOX, ctl], name='penbox')
        wait_until(lambda: os.path.exists(ctl) or not self.box_proc.running(), 10, 'the penbox socket')
        self.assertTrue(self.box_proc.running(), self.box_proc.log())
        self.box = PenBox(ctl)
        self.addCleanup(self.box.close)
        # The daemon goes before the box: its preload library needs the testbed to exit cleanly.
        self.addCleanup(self._check_daemon_at_end)
        # A failed test prints the daemon's log, before the cleanup above stops it (L13's failure
        # printed none: SafetyTestCase's own cleanup for it runs after this one).
        self.addCleanup(self._log_on_failure)
        self.umockdev_dir = self.box.cmd('env').split('UMOCKDEV_DIR=', 1)[1]
        self.write_limits(limits_text(heartbeat_timeout_ms=HEARTBEAT_MS))

    def start_usb_needled(self):
        """needled without --simulate: it finds the box's pens through libusb."""
        asan = os.environ.get('ASAN_OPTIONS', '')
        env = {'LD_PRELOAD': 'libumockdev-preload.so.0', 'UMOCKDEV_DIR': self.umockdev_dir,
               # The preload library comes before ASan's runtime; harmless here (tests/usb).
               'ASAN_OPTIONS': (asan + ':' if asan else '') + 'verify_asan_link_order=0'}
        # started as every other safety test starts it (real-time, under the setup's wrapper)
        return self.start_needled(simulate=False, env=env)

    def wait_pen(self, serial, timeout_s=10):
        path = '/org/needled/pen/' + serial.replace('-', '_2d')
        wait_until(lambda: path in self.mprop('Pens') and self.pprop(path, 'State') is not None, timeout_s,
                   f'pen {serial} on the bus')
        return path

    def plug(self, name, serial=None, devnum=2, cartridge=None):
        self.box.cmd('plug', name, serial or name, devnum, TELEMETRY_RATE_HZ)
        if cartridge:
            self.box.cmd('insert', name, cartridge, 12)

    def wait_model(self, name, predicate, timeout_s, what):
        last = [None]

        def check():
            last[0] = self.box.state(name)
            return predicate(last[0])
        try:
            wait_until(check, timeout_s, what)
        except AssertionError as e:
            raise AssertionError(f'{e}; pen model: {last[0]}\n{self.daemon_log()[-3000:]}') from None
        return last[0]

    def running_session(self, name='USB-1', cartridge='CART-USB'):
        self.plug(name, cartridge=cartridge)
        self.start_usb_needled()
        pen = self.wait_pen(name)
        wait_until(lambda: self.pprop(pen, 'Cartridge')['id'] == cartridge, 5, 'the cartridge seen')
        ended = self.ended_log(pen)
        sid = self.start_session(pen)
        self.wait_model(name, lambda s: s['motor'] and s['speed_hz'] > 90, 5, 'the pen motor running')
        return pen, sid, ended

    def test_unplugged_mid_session(self):
        pen, sid, ended = self.running_session()
        self.box.cmd('unplug', 'USB-1')
        self.assertEqual(self.wait_ended(ended, sid), 'device-lost')
        # Nothing can reach an unplugged pen: its own watchdog stops the motor.
        st = self.wait_model('USB-1', lambda s: not s['motor'], 3 * HEARTBEAT_MS / 1000, 'the pen motor stopped')
        self.assertTrue(st['faults'] & WATCHDOG_FAULT, st)
        self.assertNotIn(pen, self.mprop('Pens'))
        self.assert_recorded(sid, 'device-lost', cartridge='CART-USB')
        self.audit_verify()

    def test_daemon_killed_mid_session(self):
        pen, sid, _ = self.running_session()
        killed_at = time.monotonic()
        self.kill_needled()
        # The host is gone: the pen's watchdog stops the motor within its timeout.
        st = self.wait_model('USB-1', lambda s: not s['motor'], 3 * HEARTBEAT_MS / 1000 + 1, 'the pen motor stopped')
        self.assertTrue(st['faults'] & WATCHDOG_FAULT, f'not stopped by the watchdog: {st}')
        self.assertLess(time.monotonic() - killed_at, (HEARTBEAT_MS / 1000 + 2) * timeout_multiplier())
        # The same pen (power-cycled), the same state directory.
        self.box.cmd('unplug', 'USB-1')
        self.box.cmd('free', 'USB-1')
        self.plug('USB-1b', serial='USB-1', devnum=3, cartridge='CART-USB')
        self.start_usb_needled()
        pen = self.wait_pen('USB-1')
        self.assert_recorded(sid, 'daemon-restart', cartridge='CART-USB')
        self.audit_verify()
        wait_until(lambda: self.pprop(pen, 'Cartridge')['state'] == 'spent', 5, 'the cartridge spent')
        self.pen_call(pen, 'LoadProfileData', 'name: again\nindication: acne-scars\narea: cheeks\n'
                      'depth_mm: 1.0\nspeed_hz: 100\nduration_s: 60\nneedles: 12\n')
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))
        self.assertFalse(self.box.state('USB-1b')['motor'])

    def test_restarted_daemon_stops_a_running_pen(self):
        # The daemon dies and is back before the pen's watchdog fires (here: a pen with a 10 s
        # watchdog, the motor left running by the host that died): the new daemon finds the motor
        # running and stops it first thing, and recovery closes the interrupted session.
        pen, sid, _ = self.running_session()
        self.kill_needled()
        # (The emulated pen serves one client per plug-in: it is power-cycled to the same state.)
        self.box.cmd('unplug', 'USB-1')
        self.box.cmd('free', 'USB-1')
        self.plug('USB-1b', serial='USB-1', devnum=3, cartridge='CART-USB')
        self.box.cmd('spin', 'USB-1b', 100, 10000)
        self.assertTrue(self.box.state('USB-1b')['motor'])
        self.start_usb_needled()
        st = self.wait_model('USB-1b', lambda s: not s['motor'], 3, 'the pen motor stopped by the new daemon')
        self.assertFalse(st['faults'] & WATCHDOG_FAULT, f'the watchdog, not the daemon, stopped it: {st}')
        self.assert_recorded(sid, 'daemon-restart', cartridge='CART-USB')
        pen = self.wait_pen('USB-1')
        self.assertEqual(self.pprop(pen, 'State'), 'idle')

    def test_sigterm_stops_the_motor_itself(self):
        pen, sid, _ = self.running_session()
        self.stop_needled()
        st = self.box.state('USB-1')
        self.assertFalse(st['motor'], st)
        # Stopped by the daemon's command: the watchdog has not expired (it would latch its bit).
        self.assertFalse(st['faults'] & WATCHDOG_FAULT, st)
        self.start_usb_needled()
        self.assert_recorded(sid, 'stopped', cartridge='CART-USB')

    def test_pen_reboots_mid_session(self):
        pen, sid, ended = self.running_session()
        # More than the duplicate window (1024 samples) into the session, the pen's count restarts.
        self.wait_model('USB-1', lambda s: s['next_sequence'] > 1600, 5, '1600 samples')
        self.box.cmd('reset-sequence', 'USB-1', 1500)
        self.assertEqual(self.wait_ended(ended, sid), 'fault:telemetry-corrupt')
        self.assertEqual(self.pprop(pen, 'Fault'), 'telemetry-corrupt')
        st = self.wait_model('USB-1', lambda s: not s['motor'], 2, 'the pen motor stopped')
        self.assertFalse(st['faults'] & WATCHDOG_FAULT, st)
        self.assert_recorded(sid, 'fault:telemetry-corrupt', cartridge='CART-USB')

    def test_cartridge_pulled_mid_session(self):
        pen, sid, ended = self.running_session()
        self.box.cmd('eject', 'USB-1')
        self.assertEqual(self.wait_ended(ended, sid), 'fault:cartridge-removed')
        self.assertEqual(self.pprop(pen, 'Fault'), 'cartridge-removed')
        self.assertFalse(self.box.state('USB-1')['motor'])
        self.assert_recorded(sid, 'fault:cartridge-removed', cartridge='CART-USB')
        # Put back in: spent.
        self.box.cmd('insert', 'USB-1', 'CART-USB', 12)
        wait_until(lambda: self.pprop(pen, 'Cartridge')['state'] == 'spent', 5, 'the cartridge spent')

    def test_duplicate_serial_refused(self):
        # Two pens report the same serial (a cloned or misconfigured handpiece). One is served,
        # the other refused and never driven. (Both are plugged before the daemon starts: umockdev
        # does not deliver a hotplug "add" to another process.)
        self.plug('A', serial='USB-1', devnum=2, cartridge='CART-A')
        self.plug('B', serial='USB-1', devnum=3, cartridge='CART-B')
        self.start_usb_needled()
        pen = self.wait_pen('USB-1')
        wait_until(lambda: 'refused' in self.daemon_log(), 5, 'the refusal logged')
        self.assertEqual(self.mprop('Pens'), [pen])
        cart = self.pprop(pen, 'Cartridge')['id']
        served, refused = ('A', 'B') if cart == 'CART-A' else ('B', 'A')
        ended = self.ended_log(pen)
        sid = self.start_session(pen)
        self.wait_model(served, lambda s: s['motor'], 3, 'the served pen running')
        # The refused one: identified once, then left alone (no heartbeat keeps coming).
        st = self.box.state(refused)
        self.assertTrue(st['identified'])
        self.assertFalse(st['motor'])
        self.wait_model(refused, lambda s: not s['watchdog_armed'], 3 * HEARTBEAT_MS / 1000, 'its watchdog idle')
        self.assertFalse(self.box.state(refused)['motor'])
        self.assertEqual(self.pprop(pen, 'State'), 'running', self.daemon_log()[-3000:])
        self.assertEqual(ended.items, [])
        self.pen_call(pen, 'Stop')
        self.assertEqual(self.wait_ended(ended, sid), 'stopped')

    def test_telemetry_stops_while_the_pen_answers(self):
        # A telemetry gap longer than the heartbeat timeout is a fault of its own; the pen still
        # takes commands, so the daemon's stop reaches it (the watchdog never has to act).
        pen, sid, ended = self.running_session()
        self.box.cmd('mute', 'USB-1')
        self.assertEqual(self.wait_ended(ended, sid, 5 + HEARTBEAT_MS / 1000), 'fault:heartbeat-lost')
        st = self.wait_model('USB-1', lambda s: not s['motor'], 2, 'the pen motor stopped')
        self.assertFalse(st['faults'] & WATCHDOG_FAULT, f'stopped by the watchdog, not the daemon: {st}')
        self.assertTrue(st['watchdog_armed'], 'the daemon stopped heartbeating')
        self.assert_recorded(sid, 'fault:heartbeat-lost', cartridge='CART-USB')

    def test_pen_stops_answering(self):
        pen, sid, ended = self.running_session()
        self.box.cmd('fault', 'USB-1', 'unresponsive')
        self.assertEqual(self.wait_ended(ended, sid, 5 + HEARTBEAT_MS / 1000), 'fault:heartbeat-lost')
        st = self.wait_model('USB-1', lambda s: not s['motor'], 3 * HEARTBEAT_MS / 1000, 'the pen motor stopped')
        self.assertTrue(st['faults'] & WATCHDOG_FAULT, st)
        self.assert_recorded(sid, 'fault:heartbeat-lost', cartridge='CART-USB')


if __name__ == '__main__':
    main()
