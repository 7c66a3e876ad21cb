"""Helpers for needled's safety suite (tests/safety): one daemon per test, started and killed
as a test needs (same state directory across restarts), limits written per test, and the pen's
own telemetry read from an OpenTelemetry socket so that a test sees what the MOTOR does (status
bit 0 "motor running", measured speed), not what the daemon says about it.

    class TestX(SafetyTestCase):
        def test_y(self):
            self.start_needled(limits=limits_text(max_current_ma=1000))
            pen = self.add_pen(cartridge=('C-1', 12))
            tel = self.telemetry(pen)
            sid = self.start_session(pen)
            ...
            self.assert_motor_stops(tel, ...)

Builds on tests/dbus/busfixture.py (private policy-enforcing system bus, dbusmock polkitd,
process handling) and the generic helpers of tests/dbus/needled_testlib.py (wait_until,
SignalLog, unwrap). Every wait is for a condition, bounded, scaled by timeout_multiplier().
"""

import collections
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), 'dbus'))

import busfixture  # noqa: E402
from busfixture import timeout_multiplier  # noqa: E402

import dbus  # noqa: E402
import dbus.mainloop.glib  # noqa: E402
from gi.repository import GLib  # noqa: E402
from needled_testlib import SignalLog, pump, unwrap, wait_until  # noqa: E402,F401

MANAGER_PATH = '/org/needled'
MANAGER_IFACE = 'org.needled1.Manager'
PEN_IFACE = 'org.needled1.Pen'
SIM_IFACE = 'org.needled1.Simulator'
PROPS_IFACE = 'org.freedesktop.DBus.Properties'
ERR = 'org.needled1.Error.'
ALL_ACTIONS = ['org.needled1.operate', 'org.needled1.configure', 'org.needled1.read-history']
EMPTY_SV = dbus.Dictionary({}, signature='sv')

# docs/telemetry.md, record version 1.
RECORD = struct.Struct('<HHIQQIIddddB7x')
FLAG_MOTOR_RUNNING = 1 << 0
FLAG_CARTRIDGE_PRESENT = 1 << 1
FLAG_WATCHDOG_ARMED = 1 << 2
# docs/protocol.md fault bits, as bits 8-15 of the record's flags.
PEN_FAULT_BITS = {
    'over-temperature': 0x01 << 8,
    'motor-stall': 0x02 << 8,
    'over-current': 0x04 << 8,
    'depth-deviation': 0x08 << 8,
    'watchdog-expired': 0x10 << 8,
    'low-battery': 0x20 << 8,
}
# The simulated pen's measured speed below this counts as "not moving" (its noise is well below).
STOPPED_SPEED_HZ = 5.0
# Device time after the motor start before a test injects anything: past the pen's spin-up
# (speed lag 80 ms) and the daemon's depth settling window (150 ms, daemon/pen.c).
SETTLED_MS = 250

Sample = collections.namedtuple('Sample', 'seq device_us host_us dropped flags depth_mm speed_hz '
                                          'current_ma temperature_c battery')


def valgrind():
    return os.environ.get('NEEDLED_TEST_VALGRIND') == '1'


def sanitized():
    return os.environ.get('NEEDLED_TEST_SANITIZED') == '1'


def build_path(*parts):
    return os.path.join(busfixture.build_root(), *parts)


def source_path(*parts):
    return os.path.join(busfixture.source_root(), *parts)


# ---- limits and profiles -----------------------------------------------------------------------

DEFAULT_LIMITS = {
    'speed_min_hz': 50, 'speed_max_hz': 150,
    'depth_tolerance_mm': 0.15,
    'warn_temperature_c': 41, 'max_temperature_c': 43,
    'max_current_ma': 1200,
    'stall_speed_fraction': 0.7, 'stall_time_ms': 250,
    'min_battery_percent': 20, 'stop_battery_percent': 5,
    'heartbeat_timeout_ms': 500,
    'max_duration_s': 2700, 'client_heartbeat_timeout_ms': 0,
    'single_use': True, 'max_runtime_s': 3600,
    'allowed_needles': [12, 14, 16, 24, 36, 42],
    'areas': {
        'periorbital': {'max_depth_mm': 0.5},
        'forehead': {'max_depth_mm': 0.75},
        'cheeks': {'max_depth_mm': 1.5},
        'neck': {'max_depth_mm': 1.0},
        'body': {'max_depth_mm': 2.0, 'max_speed_hz': 150, 'max_duration_s': 1800},
    },
}


def limits_text(**overrides):
    """A limits file (formats.md) with every field of DEFAULT_LIMITS, overridden as given."""
    v = dict(DEFAULT_LIMITS)
    for key in overrides:
        if key not in v:
            raise KeyError(f'no limits field {key}')
    v.update(overrides)

    def area(a):
        return '{' + ', '.join(f'{k}: {val}' for k, val in a.items()) + '}'
    areas = ''.join(f'  {name}: {area(a)}\n' for name, a in v['areas'].items())
    return (f'version: 1\n'
            f'pen:\n'
            f'  speed_hz: {{min: {v["speed_min_hz"]}, max: {v["speed_max_hz"]}}}\n'
            f'  depth_tolerance_mm: {v["depth_tolerance_mm"]}\n'
            f'  warn_temperature_c: {v["warn_temperature_c"]}\n'
            f'  max_temperature_c: {v["max_temperature_c"]}\n'
            f'  max_current_ma: {v["max_current_ma"]}\n'
            f'  stall_speed_fraction: {v["stall_speed_fraction"]}\n'
            f'  stall_time_ms: {v["stall_time_ms"]}\n'
            f'  min_battery_percent: {v["min_battery_percent"]}\n'
            f'  stop_battery_percent: {v["stop_battery_percent"]}\n'
            f'  heartbeat_timeout_ms: {v["heartbeat_timeout_ms"]}\n'
            f'session:\n'
            f'  max_duration_s: {v["max_duration_s"]}\n'
            f'  client_heartbeat_timeout_ms: {v["client_heartbeat_timeout_ms"]}\n'
            f'cartridge:\n'
            f'  single_use: {"true" if v["single_use"] else "false"}\n'
            f'  max_runtime_s: {v["max_runtime_s"]}\n'
            f'  allowed_needles: [{", ".join(str(n) for n in v["allowed_needles"])}]\n'
            f'areas:\n{areas}')


def profile_text(name='safety-cheeks', indication='acne-scars', area='cheeks', depth_mm=1.0,
                 speed_hz=100, duration_s=600, needles=12):
    """A treatment profile (formats.md)."""
    return (f'name: {name}\nindication: {indication}\narea: {area}\ndepth_mm: {depth_mm}\n'
            f'speed_hz: {speed_hz}\nduration_s: {duration_s}\nneedles: {needles}\n')


# ---- telemetry from the pen ----------------------------------------------------------------------

class Telemetry:
    """The pen's samples from an OpenTelemetry socket, read from the GLib main loop."""

    def __init__(self, unix_fd):
        self.sock = socket.socket(fileno=unix_fd.take())
        self.sock.setblocking(False)
        self.samples = []
        self.eof = False
        self.malformed = 0
        self._watch = GLib.io_add_watch(self.sock.fileno(), GLib.PRIORITY_DEFAULT,
                                        GLib.IO_IN | GLib.IO_HUP, self._readable)

    def _readable(self, fd, cond):
        while True:
            try:
                data = self.sock.recv(256)
            except BlockingIOError:
                return True
            except OSError:
                data = b''
            if not data:
                self.eof = True
                self._watch = None
                return False
            if len(data) < RECORD.size or data[0] != 1:
                self.malformed += 1
                continue
            f = RECORD.unpack_from(data)
            self.samples.append(Sample(f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11]))

    def close(self):
        if self._watch is not None:
            GLib.source_remove(self._watch)
            self._watch = None
        self.sock.close()

    def mark(self):
        """An index into samples: 'from now on'."""
        return len(self.samples)

    def first(self, predicate, start=0):
        """Index of the first sample from start on for which predicate holds, else None."""
        for i in range(start, len(self.samples)):
            if predicate(self.samples[i]):
                return i
        return None

    def wait_first(self, predicate, timeout_s, what, start=0):
        """Waits for a sample matching predicate (from start on); returns its index."""
        found = [None]

        def check():
            found[0] = self.first(predicate, start)
            return found[0] is not None
        wait_until(check, timeout_s, what)
        return found[0]


def running(s):
    return bool(s.flags & FLAG_MOTOR_RUNNING)


# ---- the test case ---------------------------------------------------------------------------------

class SafetyTestCase(busfixture.BusTestCase):
    """One bus and polkit mock per class; one needled per test (or several in a row, over the same
    state directory), every polkit action granted."""

    def setUp(self):
        super().setUp()
        self.polkit.set_allowed(ALL_ACTIONS)
        self.tmpdir = tempfile.mkdtemp(prefix='needled-safety-')
        self.addCleanup(shutil.rmtree, self.tmpdir, True)
        self.state_dir = os.path.join(self.tmpdir, 'state')
        os.mkdir(self.state_dir, 0o700)
        self.limits_path = os.path.join(self.tmpdir, 'limits.yaml')
        self.profiles_dir = source_path('conf', 'profiles.d')
        self.daemon = None
        self.sessions = []          # every session id Start returned in this test
        # Before the processes are stopped (cleanups run last-in first-out).
        self.addCleanup(self._check_daemon_at_end)

    # ---- the daemon ----

    def write_limits(self, text):
        tmp = self.limits_path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, self.limits_path)

    def start_needled(self, limits=None, state_dir=None, extra_args=(), simulate=True):
        """Starts needled on this test's bus; limits: text of the limits file (None: keep the
        file written before, or the defaults if none was)."""
        if limits is not None or not os.path.exists(self.limits_path):
            self.write_limits(limits if limits is not None else limits_text())
        argv = [build_path('daemon', 'needled')] + (['--simulate'] if simulate else []) + [
            '--limits', self.limits_path, '--profiles', self.profiles_dir,
            '--state-dir', state_dir or self.state_dir] + list(extra_args)
        self.daemon = self.fixture.start_daemon(argv, timeout_s=20)
        self.manager = self.bus.get_object(busfixture.NEEDLED_NAME, MANAGER_PATH, introspect=False)
        return self.daemon

    def kill_needled(self):
        """SIGKILL: the daemon dies mid-whatever, as on a crash or an OOM kill."""
        proc = self.daemon
        self.daemon = None
        proc.signal(signal.SIGKILL)
        status = proc.wait(10 * timeout_multiplier())
        self.fixture.stop_process(proc)
        self.assertEqual(status, -signal.SIGKILL)
        self._wait_name_gone()

    def stop_needled(self):
        """SIGTERM; the daemon must exit 0 (99 under valgrind means memory errors)."""
        proc = self.daemon
        self.daemon = None
        log = proc.log()
        status = self.fixture.stop_process(proc, timeout_s=10)
        self.assertEqual(status, 0, f'needled exited with {status}:\n{log[-4000:]}')
        self._wait_name_gone()

    def _wait_name_gone(self):
        conn = self.bus
        wait_until(lambda: not conn.name_has_owner(busfixture.NEEDLED_NAME), 10, 'org.needled released')

    def _check_daemon_at_end(self):
        if self.daemon is not None:
            alive = self.daemon.running()
            log = self.daemon.log()
            status = None if not alive else self.fixture.stop_process(self.daemon, timeout_s=10)
            self.daemon = None
            if not alive:
                raise AssertionError(f'needled died during the test:\n{log[-6000:]}')
            if status != 0:
                raise AssertionError(f'needled exited with status {status} on SIGTERM:\n{log[-6000:]}')

    def daemon_log(self):
        return self.daemon.log() if self.daemon else ''

    def assert_alive(self):
        self.assertTrue(self.daemon is not None and self.daemon.running(),
                        f'needled is not running:\n{self.daemon_log()[-4000:]}')
        self.mgr('GetLimits')  # answers

    # ---- calls ----

    def call(self, path, iface, method, *args, bus=None, timeout=10, **kw):
        obj = (bus or self.bus).get_object(busfixture.NEEDLED_NAME, path, introspect=False)
        return getattr(obj, method)(*args, dbus_interface=iface, timeout=timeout * timeout_multiplier(), **kw)

    def mgr(self, method, *args, **kw):
        return self.call(MANAGER_PATH, MANAGER_IFACE, method, *args, **kw)

    def sim(self, method, *args, **kw):
        return self.call(MANAGER_PATH, SIM_IFACE, method, *args, **kw)

    def pen_call(self, pen, method, *args, **kw):
        return self.call(pen, PEN_IFACE, method, *args, **kw)

    def prop(self, pen, name, bus=None):
        return unwrap(self.call(pen, PROPS_IFACE, 'Get', PEN_IFACE, name, bus=bus))

    def mprop(self, name):
        return unwrap(self.call(MANAGER_PATH, PROPS_IFACE, 'Get', MANAGER_IFACE, name))

    def assertDBusError(self, name, func, *args, contains=None, **kw):
        with self.assertRaises(dbus.exceptions.DBusException, msg=f'expected {name}') as cm:
            func(*args, **kw)
        msg = cm.exception.get_dbus_message() or ''
        self.assertEqual(cm.exception.get_dbus_name(), name, msg)
        self.assertTrue(msg.strip(), f'{name} without a message')
        for part in ([contains] if isinstance(contains, str) else (contains or [])):
            self.assertIn(part, msg)
        return msg

    def new_connection(self):
        conn = dbus.bus.BusConnection(self.fixture.address, mainloop=dbus.mainloop.glib.DBusGMainLoop())
        self.addCleanup(_close_quietly, conn)
        return conn

    # ---- pens and sessions ----

    def add_pen(self, cartridge=None, **options):
        opts = dbus.Dictionary({}, signature='sv')
        for k, v in options.items():
            opts[k] = dbus.UInt32(v) if isinstance(v, int) else v
        pen = str(self.sim('AddPen', opts))
        if cartridge:
            self.insert_cartridge(pen, *cartridge)
        return pen

    def insert_cartridge(self, pen, cid, needles=12):
        self.sim('InsertCartridge', dbus.ObjectPath(pen), cid, dbus.UInt32(needles))

    def telemetry(self, pen, bus=None):
        tel = Telemetry(self.pen_call(pen, 'OpenTelemetry', bus=bus))
        self.addCleanup(tel.close)
        return tel

    def arm(self, pen, bus=None, **profile):
        self.pen_call(pen, 'LoadProfileData', profile_text(**profile), bus=bus)

    def start_session(self, pen, bus=None, label='', **profile):
        """Arms a profile (profile_text(**profile)) and starts it; returns the session id."""
        self.arm(pen, bus=bus, **profile)
        sid = str(self.pen_call(pen, 'Start', dbus.Dictionary({'label': label}, signature='sv'), bus=bus))
        self.sessions.append(sid)
        self.assertEqual(self.prop(pen, 'State'), 'running')
        return sid

    def wait_state(self, pen, state, timeout_s=5):
        last = [None]

        def check():
            last[0] = (self.prop(pen, 'State'), self.prop(pen, 'Fault'))
            return last[0][0] == state
        try:
            wait_until(check, timeout_s, f'State {state}')
        except AssertionError as e:
            raise AssertionError(f'{e}; last (State, Fault) {last[0]}\n{self.daemon_log()[-3000:]}') from None

    def ended_log(self, pen=None):
        return SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)

    def wait_ended(self, log, sid, timeout_s=5):
        """Waits for SessionEnded(sid, reason); returns the reason."""
        item = log.wait_for(lambda i: i[1][0] == sid, timeout_s, f'SessionEnded({sid})')
        return item[1][1]

    # ---- the ledger, through the contract ----

    def history(self, **filt):
        f = dbus.Dictionary({}, signature='sv')
        for k, v in filt.items():
            f[k] = dbus.UInt32(v) if k == 'limit' else v
        return unwrap(self.mgr('GetHistory', f))

    def history_entry(self, sid):
        for e in self.history():
            if e['id'] == sid:
                return e
        self.fail(f'session {sid} is not in GetHistory')

    def cartridge(self, cid):
        return unwrap(self.mgr('GetCartridge', cid))

    def assert_recorded(self, sid, reason, cartridge=None, spent=True):
        """GetHistory has sid ended with reason; GetCartridge says spent (single use)."""
        e = self.history_entry(sid)
        self.assertEqual(e['reason'], reason, e)
        self.assertGreater(e['end'], 0, e)
        self.assertGreaterEqual(e['end'], e['start'], e)
        if cartridge is not None:
            self.assertEqual(e['cartridge'], cartridge)
            if spent:
                self.assertEqual(self.cartridge(cartridge)['state'], 'spent')
        return e

    def audit_verify(self, state_dir=None):
        """needlectl audit verify (offline, read-only) on the ledger; returns its output."""
        db = os.path.join(state_dir or self.state_dir, 'ledger.sqlite')
        out = subprocess.run([build_path('tools', 'needlectl'), 'audit', 'verify', '--database', db],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=60 * timeout_multiplier())
        self.assertEqual(out.returncode, 0, f'audit verify failed: {out.stdout}')
        return out.stdout

    # ---- the motor, seen from the pen ----

    def assert_motor_running(self, tel, timeout_s=3, steady_ms=SETTLED_MS):
        """The pen's telemetry shows the motor running, and has for steady_ms of device time
        (past the spin-up and the daemon's depth settling time, so that what a test injects next
        meets a pen in steady state). Returns the index of the first running sample."""
        start = tel.mark()
        i = tel.wait_first(lambda s: running(s) and s.speed_hz > STOPPED_SPEED_HZ, timeout_s,
                           'telemetry showing the motor running', start)
        t0 = tel.samples[i].device_us
        j = tel.wait_first(lambda s: s.device_us >= t0 + steady_ms * 1000, timeout_s,
                           f'{steady_ms} ms of running', i)
        self.assertTrue(all(running(s) for s in tel.samples[i:j + 1]), 'the motor stopped by itself')
        return i

    def assert_motor_stops(self, tel, start, timeout_s=3, within_ms=None, pen_fault=None):
        """The pen's telemetry shows the motor stopped (status bit 0 clear) after sample index
        start, then the needles coming to rest (measured speed below STOPPED_SPEED_HZ) and the
        motor staying off. within_ms: the stop sample's device time is at most this far after
        sample start's. pen_fault: the stop came before the pen's own backstop for this fault
        latched (so the daemon's stop command did it). Returns the stop sample's index."""
        i = tel.wait_first(lambda s: not running(s), timeout_s,
                           'telemetry showing the motor stopped', start)
        stop = tel.samples[i]
        if within_ms is not None:
            self.assertLessEqual(stop.device_us - tel.samples[start].device_us, within_ms * 1000,
                                 f'motor stopped {(stop.device_us - tel.samples[start].device_us) / 1000} ms '
                                 f'after the faulty sample')
        if pen_fault is not None:
            self.assertEqual(stop.flags & PEN_FAULT_BITS[pen_fault], 0,
                             f'the pen latched its own {pen_fault} before the motor stopped: the daemon '
                             f'did not stop it first (flags {stop.flags:#x})')
        tel.wait_first(lambda s: s.speed_hz < STOPPED_SPEED_HZ, 3, 'the needles at rest', i)
        # And it stays off.
        later = tel.mark()
        tel.wait_first(lambda s: True, 2, 'more telemetry', later)
        self.assertEqual([s.seq for s in tel.samples[i:] if running(s)], [],
                         'the motor ran again after it stopped')
        return i

    def assert_motor_never_ran(self, tel, start=0, settle_samples=50):
        """At least settle_samples more samples came, and none since start shows the motor
        running or the needles speeding up (a motor still coming to rest is not running)."""
        target = len(tel.samples) + settle_samples
        wait_until(lambda: len(tel.samples) >= target, 5, f'{settle_samples} more samples')
        window = tel.samples[start:]
        self.assertTrue(window, 'no telemetry')
        ceiling = max(STOPPED_SPEED_HZ, window[0].speed_hz + 1.0)
        moving = [s for s in window if running(s) or s.speed_hz > ceiling]
        self.assertEqual(moving[:3], [], f'the motor ran ({len(moving)} samples)')


def _close_quietly(conn):
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing twice is fine
        pass


def main():
    import unittest
    busfixture.skip_unless_available()
    unittest.main(verbosity=2)
