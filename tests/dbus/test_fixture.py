#!/usr/bin/python3
"""The bus fixture the daemon's tests rely on: the polkit mock's controls do what they
say, daemons are waited for with a bounded timeout and fail early with their output,
and teardown leaves no process and no zombie behind."""

import os
import signal
import subprocess
import sys
import time
import unittest

import busfixture

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = [busfixture.PYTHON, os.path.join(HERE, 'policy_standin.py')]
ACTION = 'org.needled1.operate'


def children_of_self():
    """PIDs of this process's children, zombies included."""
    pids = set()
    for tid in os.listdir('/proc/self/task'):
        with open(f'/proc/self/task/{tid}/children', encoding='ascii') as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def comm(pid):
    try:
        with open(f'/proc/{pid}/comm', encoding='ascii') as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def pid_alive(pid):
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


class Polkit(busfixture.BusTestCase):
    def check(self, reply_handler=None, error_handler=None):
        import dbus
        authority = self.bus.get_object(busfixture.POLKIT_NAME, busfixture.POLKIT_PATH)
        subject = ('system-bus-name', {'name': dbus.String(self.bus.get_unique_name(), variant_level=1)})
        args = (subject, ACTION, dbus.Dictionary({}, signature='ss'), dbus.UInt32(1), '')
        kw = {'dbus_interface': 'org.freedesktop.PolicyKit1.Authority'}
        if reply_handler:
            kw.update(reply_handler=reply_handler, error_handler=error_handler)
        return authority.CheckAuthorization(*args, **kw)

    def test_denies_until_allowed(self):
        self.assertFalse(self.check()[0])
        self.polkit.set_allowed([ACTION])
        self.assertTrue(self.check()[0])
        self.polkit.set_allowed([])
        self.assertFalse(self.check()[0])
        self.polkit.allow_unknown(True)
        self.assertTrue(self.check()[0])

    def assert_fresh_then_leave_grants(self):
        """Whichever of the two tests below runs second sees the mock as reset after the first
        one left everything granted: neither depends on the order."""
        self.assertFalse(self.check()[0], 'a grant of an earlier test leaked into this one')
        self.polkit.allow_unknown(True)
        self.polkit.set_allowed([ACTION])
        self.assertTrue(self.check()[0])

    def test_reset_after_each_test_1(self):
        self.assert_fresh_then_leave_grants()

    def test_reset_after_each_test_2(self):
        self.assert_fresh_then_leave_grants()

    def test_delay(self):
        self.polkit.set_allowed([ACTION])
        self.polkit.set_delay(0.3)
        start = time.monotonic()
        self.assertTrue(self.check()[0])
        self.assertGreaterEqual(time.monotonic() - start, 0.3)

    def test_hang_and_release(self):
        from gi.repository import GLib
        self.polkit.set_allowed([ACTION])
        self.polkit.simulate_hang(True)
        replies = []
        self.check(lambda r: replies.append(bool(r[0])), lambda e: replies.append(e))
        ctx = GLib.MainContext.default()
        deadline = time.monotonic() + 5
        while not self.polkit.have_hanging_calls() and time.monotonic() < deadline:
            ctx.iteration(False)
            time.sleep(0.01)
        self.assertTrue(self.polkit.have_hanging_calls())
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            ctx.iteration(False)
        self.assertEqual(replies, [], 'answered while hanging')
        self.polkit.release_hanging_calls()
        deadline = time.monotonic() + 5
        while not replies and time.monotonic() < deadline:
            ctx.iteration(False)
            time.sleep(0.01)
        self.assertEqual(replies, [True])


class Processes(busfixture.BusTestCase):
    @classmethod
    def fixture_args(cls):
        return {'polkit': False}

    def test_daemon_started_and_stopped(self):
        proc = self.fixture.start_daemon(STANDIN, wrap=False)
        self.assertTrue(self.bus.name_has_owner('org.needled'))
        self.assertEqual(self.fixture.stop_process(proc), 0)
        self.assertFalse(pid_alive(proc.pid))
        self.assertNotIn(proc.pid, children_of_self())

    def test_daemon_exiting_early_fails_fast_with_its_output(self):
        start = time.monotonic()
        with self.assertRaises(busfixture.FixtureError) as cm:
            self.fixture.start_daemon([busfixture.PYTHON, '-c', 'import sys; print("no limits here"); sys.exit(4)'],
                                      timeout_s=30, wrap=False)
        self.assertLess(time.monotonic() - start, 10)
        self.assertIn('exited with status 4', str(cm.exception))
        self.assertIn('no limits here', str(cm.exception))

    def test_name_never_taken_times_out(self):
        start = time.monotonic()
        with self.assertRaises(busfixture.FixtureError) as cm:
            self.fixture.start_daemon(['sleep', '60'], timeout_s=0.5, wrap=False)
        self.assertIn('did not appear', str(cm.exception))
        self.assertLess(time.monotonic() - start, 0.5 * busfixture.timeout_multiplier() + 5)
        self.assertEqual(self.fixture.processes, [], 'the failed daemon is stopped')

    def test_sigterm_ignored_then_killed(self):
        proc = self.fixture.spawn([busfixture.PYTHON, '-c',
                                   'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
                                   'print("ready", flush=True); time.sleep(60)'])
        deadline = time.monotonic() + 10
        while 'ready' not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(self.fixture.stop_process(proc, timeout_s=0.3), -signal.SIGKILL)
        self.assertFalse(pid_alive(proc.pid))

    def test_grandchildren_reaped(self):
        fixture = busfixture.BusFixture(policy_files=[], polkit=False).start()
        proc = fixture.spawn(['sh', '-c', 'sleep 60 & echo $! ; exec sleep 60'])
        deadline = time.monotonic() + 10
        while not proc.log().strip() and time.monotonic() < deadline:
            time.sleep(0.02)
        grandchild = int(proc.log().split()[0])
        self.assertTrue(pid_alive(grandchild))
        fixture.stop()
        self.assertFalse(pid_alive(grandchild))
        self.assertFalse(os.path.exists(f'/proc/{grandchild}'), 'left as a zombie')
        self.assertEqual(children_of_self() & {proc.pid, grandchild}, set())

    def test_children_die_with_the_test(self):
        """A test that meson kills at its timeout (SIGTERM to the test's group, SIGKILL soon
        after) leaves none of the fixture's processes running: they live in groups of their
        own, and the kernel kills each when the test process dies."""
        script = ('import os, sys, time, busfixture; '
                  'p = busfixture.Process(["sleep", "60"], dict(os.environ), sys.argv[1]); '
                  'print(p.pid, flush=True); time.sleep(60)')
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        test = subprocess.Popen([busfixture.PYTHON, '-c', script, os.path.join(self.fixture.workdir, 'orphan.log')],
                                env=env, stdout=subprocess.PIPE)
        self.addCleanup(test.stdout.close)
        child = int(test.stdout.readline())
        # Popen returns once setpriv runs; it sets the parent-death signal, then execs sleep
        deadline = time.monotonic() + 10 * busfixture.timeout_multiplier()
        while comm(child) != 'sleep' and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(comm(child), 'sleep')
        test.kill()
        test.wait()
        # the child is this process's now (a subreaper): reaped here once it has died
        deadline = time.monotonic() + 10 * busfixture.timeout_multiplier()
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        alive = pid_alive(child)
        if alive:
            os.kill(child, signal.SIGKILL)
        try:
            os.waitpid(child, 0)
        except ChildProcessError:
            pass
        self.assertFalse(alive, 'the test process died and its child ran on')


if __name__ == '__main__':
    busfixture.skip_unless_available()
    unittest.main(verbosity=2)
