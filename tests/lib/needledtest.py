"""The one helper library of needled's Python tests (dbus, safety, cli suites): the daemon from
the build tree on busfixture's private system bus (busfixture.py, next to this file), called the
way a client developer would use the contract (dbus-api.md, dbus/org.needled1.xml).

    class TestX(NeedledTestCase):             # one daemon per test class (bus tests)
        daemon_args = ['--simulate']
        def test_y(self):
            pen = self.add_pen(cartridge=('C-1', 12))
            ...

    class TestZ(SafetyTestCase):              # one daemon per test, started as the test needs
        def test_y(self):
            self.start_needled(limits=limits_text(max_current_ma=1000))
            pen = self.add_pen(cartridge=('C-1', 12))
            tel = self.telemetry(pen)         # the pen's own samples: what the MOTOR does
            sid = self.start_session(pen)
            ...
            self.assert_motor_stops(tel, ...)

Limits come from one fixture, tests/data/limits-test.yaml (limits_text() changes fields of it).
Waiting is always for a condition with a bounded timeout (scaled by timeout_multiplier()),
while the GLib main loop runs so that signals arrive. tests/run-python.sh puts this directory
on PYTHONPATH.
"""

import collections
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import busfixture  # noqa: E402
from busfixture import timeout_multiplier  # noqa: E402,F401

import dbus  # noqa: E402
import dbus.mainloop.glib  # noqa: E402
from gi.repository import GLib  # noqa: E402

# ---- the contract (lib/contract.h) ----------------------------------------------------------------

BUS_NAME = busfixture.NEEDLED_NAME
MANAGER_PATH = '/org/needled'
MANAGER_IFACE = 'org.needled1.Manager'
PEN_IFACE = 'org.needled1.Pen'
SIM_IFACE = 'org.needled1.Simulator'
PROPS_IFACE = 'org.freedesktop.DBus.Properties'
OM_IFACE = 'org.freedesktop.DBus.ObjectManager'
PEER_IFACE = 'org.freedesktop.DBus.Peer'
ERR = 'org.needled1.Error.'
ACCESS_DENIED = 'org.freedesktop.DBus.Error.AccessDenied'
INVALID_ARGS = 'org.freedesktop.DBus.Error.InvalidArgs'
UNKNOWN_OBJECT = 'org.freedesktop.DBus.Error.UnknownObject'
UNKNOWN_METHOD = 'org.freedesktop.DBus.Error.UnknownMethod'
UNKNOWN_INTERFACE = 'org.freedesktop.DBus.Error.UnknownInterface'
OPERATE = 'org.needled1.operate'
CONFIGURE = 'org.needled1.configure'
READ_HISTORY = 'org.needled1.read-history'
ALL_ACTIONS = [OPERATE, CONFIGURE, READ_HISTORY]
EMPTY_SV = dbus.Dictionary({}, signature='sv')
# The largest profile text (ND_PROFILE_TEXT_MAX; the XML says 64 KiB).
PROFILE_TEXT_MAX = 64 * 1024

# docs/telemetry.md, record version 1 (an oracle independent of lib/telemetry-record.c).
TELEMETRY_RECORD = struct.Struct('<HHIQQIIddddB7x')
assert TELEMETRY_RECORD.size == 72
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
# (speed lag 80 ms) and the daemon's depth settling window (150 ms).
SETTLED_MS = 250

Sample = collections.namedtuple('Sample', 'seq device_us host_us dropped flags depth_mm speed_hz '
                                          'current_ma temperature_c battery')


# ---- the setup the tests run in -------------------------------------------------------------------

def valgrind():
    return os.environ.get('NEEDLED_TEST_VALGRIND') == '1'


def sanitized():
    return os.environ.get('NEEDLED_TEST_SANITIZED') == '1'


VALGRIND = valgrind()
# The pen stops its own motor when the daemon is silent this long (pen.heartbeat_timeout_ms).
# Under valgrind on a busy machine the daemon can stall for longer than the shipped 500 ms,
# and the pens would rightly stop themselves in the middle of unrelated tests ("heartbeat-lost
# before the motor started"): there the limits files of the tests allow 10 s, the format's
# maximum, unless a test sets the field itself.
PEN_HEARTBEAT_TIMEOUT_MS = 10000 if VALGRIND else 500


# needled.service runs the daemon SCHED_FIFO at this priority, so that its interlocks act on a
# sample within a millisecond however busy the machine is. The safety suite times the daemon's
# stop against the pen's own backstops (20 ms for over-current), and a time-shared daemon on a
# loaded machine can miss its pens' 500 ms heartbeat: the tests run the daemon the same way
# where it may (root or RLIMIT_RTPRIO), except under valgrind (a valgrinded daemon can use a
# whole CPU, and real-time would starve the rest; those timings are not checked there).
DAEMON_RT_PRIORITY = 20
_realtime = []


def realtime_prefix(wrapped=True):
    """['chrt', '-f', '20'] when the daemon can run real-time as its unit runs it, else [].
    wrapped: the daemon runs under the setup's wrapper (valgrind there: never real-time); a
    daemon started with wrap=False runs natively and real-time in every setup."""
    if not _realtime:
        chrt = shutil.which('chrt')
        ok = (chrt is not None and not os.environ.get('NEEDLED_TEST_NO_REALTIME') and
              subprocess.run([chrt, '-f', str(DAEMON_RT_PRIORITY), 'true'],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0)
        _realtime.append([chrt, '-f', str(DAEMON_RT_PRIORITY)] if ok else [])
    return [] if wrapped and valgrind() else list(_realtime[0])


def source_path(*parts):
    return os.path.join(busfixture.source_root(), *parts)


def build_path(*parts):
    return os.path.join(busfixture.build_root(), *parts)


def needled_binary():
    return build_path('daemon', 'needled')


def sha256_file(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- limits and profiles --------------------------------------------------------------------------

LIMITS_FIXTURE = source_path('tests', 'data', 'limits-test.yaml')

# limits_text() keys of plain scalar fields, and the YAML key each one replaces (one line each).
_SCALAR_FIELDS = {
    'depth_tolerance_mm': '  depth_tolerance_mm', 'warn_temperature_c': '  warn_temperature_c',
    'max_temperature_c': '  max_temperature_c', 'max_current_ma': '  max_current_ma',
    'stall_speed_fraction': '  stall_speed_fraction', 'stall_time_ms': '  stall_time_ms',
    'min_battery_percent': '  min_battery_percent', 'stop_battery_percent': '  stop_battery_percent',
    'heartbeat_timeout_ms': '  heartbeat_timeout_ms', 'max_duration_s': '  max_duration_s',
    'client_heartbeat_timeout_ms': '  client_heartbeat_timeout_ms', 'max_runtime_s': '  max_runtime_s',
}


def limits_fixture_text():
    """tests/data/limits-test.yaml as it is."""
    with open(LIMITS_FIXTURE, encoding='utf-8') as f:
        return f.read()


def limits_fixture_areas():
    """The fixture's areas, name -> {max_depth_mm, ...}, in the file's order (for areas=)."""
    import yaml
    return yaml.safe_load(limits_fixture_text())['areas']


def _yaml_value(v):
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, (list, tuple)):
        return '[' + ', '.join(str(x) for x in v) + ']'
    return str(v)


def _set_line(text, key, value):
    pattern = re.compile('^' + re.escape(key) + r': [^\n#]*', re.M)
    text, n = pattern.subn(lambda _: f'{key}: {value}', text)
    if n != 1:
        raise KeyError(f'{key.strip()} is not once in {LIMITS_FIXTURE}')
    return text


def limits_text(**overrides):
    """The limits fixture with fields replaced: any of _SCALAR_FIELDS, speed_min_hz,
    speed_max_hz, single_use, allowed_needles, and areas (a dict name -> {max_depth_mm, ...}
    that replaces every area). Under valgrind the pen heartbeat timeout is
    PEN_HEARTBEAT_TIMEOUT_MS unless given."""
    if VALGRIND:
        overrides = {'heartbeat_timeout_ms': PEN_HEARTBEAT_TIMEOUT_MS, **overrides}
    text = limits_fixture_text()
    for key, value in overrides.items():
        if key in _SCALAR_FIELDS:
            text = _set_line(text, _SCALAR_FIELDS[key], _yaml_value(value))
        elif key in ('single_use', 'allowed_needles'):
            text = _set_line(text, '  ' + key, _yaml_value(value))
        elif key in ('speed_min_hz', 'speed_max_hz'):
            m = re.search(r'^  speed_hz: \{min: ([^,]+), max: ([^}]+)\}', text, re.M)
            lo, hi = m.group(1), m.group(2)
            lo, hi = (value, hi) if key == 'speed_min_hz' else (lo, value)
            text = _set_line(text, '  speed_hz', f'{{min: {lo}, max: {hi}}}')
        elif key == 'areas':
            head, sep, _ = text.partition('\nareas:\n')
            if not sep:
                raise KeyError(f'no areas in {LIMITS_FIXTURE}')
            lines = ''.join(f'  {name + ":":<12} {{' + ', '.join(f'{k}: {_yaml_value(v)}' for k, v in a.items())
                            + '}\n' for name, a in value.items())
            text = head + sep + lines
        else:
            raise KeyError(f'no limits field {key}')
    return text


def limits_yaml(**overrides):
    """The limits of the bus tests (limits_text)."""
    return limits_text(**overrides)


def shipped_limits_yaml():
    """conf/limits.yaml, with the pen heartbeat timeout of PEN_HEARTBEAT_TIMEOUT_MS."""
    with open(source_path('conf', 'limits.yaml'), encoding='utf-8') as f:
        text = f.read()
    line = '  heartbeat_timeout_ms: 500\n'
    assert text.count(line) == 1, 'conf/limits.yaml changed: update shipped_limits_yaml()'
    return text.replace(line, f'  heartbeat_timeout_ms: {PEN_HEARTBEAT_TIMEOUT_MS}\n')


def profile_yaml(name='test-cheeks', indication='acne-scars', area='cheeks', depth_mm=1.0,
                 speed_hz=100, duration_s=600, needles=12, extra=''):
    """A treatment profile (formats.md); every value is written as given (strings pass through)."""
    return (f'name: {name}\nindication: {indication}\narea: {area}\ndepth_mm: {depth_mm}\n'
            f'speed_hz: {speed_hz}\nduration_s: {duration_s}\nneedles: {needles}\n{extra}')


# ---- dbus-python values and the main loop ---------------------------------------------------------

def unwrap(value):
    """dbus-python values as plain Python values (nested)."""
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (dbus.Byte, dbus.Int16, dbus.Int32, dbus.Int64, dbus.UInt16,
                          dbus.UInt32, dbus.UInt64)):
        return int(value)
    if isinstance(value, dbus.Double):
        return float(value)
    if isinstance(value, (dbus.String, dbus.ObjectPath)):
        return str(value)
    if isinstance(value, dbus.Dictionary):
        return {unwrap(k): unwrap(v) for k, v in value.items()}
    if isinstance(value, (dbus.Array, list)):
        return [unwrap(v) for v in value]
    if isinstance(value, (dbus.Struct, tuple)):
        return tuple(unwrap(v) for v in value)
    return value


# Called on every turn of wait_until()/pump(): readers of sockets the main loop does not
# watch (see TelemetryReader in test_pen.py). Python callables handed to GLib (timeout_add,
# io_add_watch) leak a libffi closure each in this PyGObject, which valgrind reports as
# "definitely lost" when the test process runs under the valgrind setup: the loop below uses
# one ticker for the life of the process and no other GLib callback.
POLLERS = []
_ticker = []


def _iterate(block):
    if not _ticker:
        _ticker.append(GLib.timeout_add(10, lambda: True))   # wakes a blocking iteration
    ctx = GLib.MainContext.default()
    while ctx.pending():
        ctx.iteration(False)
    for poll in list(POLLERS):
        poll()
    if block:
        ctx.iteration(True)


def wait_until(predicate, timeout_s, what='condition'):
    """Runs the GLib main loop until predicate() is true; AssertionError after timeout_s
    (scaled). Returns predicate()'s value."""
    deadline = time.monotonic() + timeout_s * timeout_multiplier()
    while True:
        _iterate(False)
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f'timed out after {timeout_s} s (x{timeout_multiplier()}) '
                                 f'waiting for {what}')
        _iterate(True)


def pump(seconds):
    """Runs the main loop for a fixed time (only where a duration is the point: 'nothing
    happens for this long', or collecting a stream for a while)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _iterate(True)
    _iterate(False)


class AsyncCall:
    """A method call whose reply (or error) arrives through the main loop."""

    def __init__(self, method, *args, **kwargs):
        self.done = False
        self.reply = None
        self.error = None
        self.started = time.monotonic()
        self.finished = None
        method(*args, reply_handler=self._ok, error_handler=self._err, **kwargs)

    def _ok(self, *reply):
        self.reply = reply[0] if len(reply) == 1 else reply
        self.done = True
        self.finished = time.monotonic()

    def _err(self, error):
        self.error = error
        self.done = True
        self.finished = time.monotonic()

    def wait(self, timeout_s=10):
        wait_until(lambda: self.done, timeout_s, 'the reply to an asynchronous call')
        return self

    @property
    def elapsed(self):
        return (self.finished or time.monotonic()) - self.started


class SignalLog:
    """Records a signal's arguments (with the sender's path) while subscribed."""

    def __init__(self, bus, signal_name, interface, path=None):
        self.items = []
        self._match = bus.add_signal_receiver(self._record, signal_name=signal_name,
                                              dbus_interface=interface, path=path,
                                              bus_name=BUS_NAME, path_keyword='path')

    def _record(self, *args, path=None):
        self.items.append((str(path), unwrap(args)))

    def remove(self):
        self._match.remove()

    def wait_for(self, predicate, timeout_s, what):
        """Waits for a recorded item (path, args) for which predicate holds; returns it."""
        def find():
            for item in self.items:
                if predicate(item):
                    return item
            return None
        return wait_until(find, timeout_s, what)


# ---- telemetry from the pen -----------------------------------------------------------------------

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
            if len(data) < TELEMETRY_RECORD.size or data[0] != 1:
                self.malformed += 1
                continue
            f = TELEMETRY_RECORD.unpack_from(data)
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


# ---- what every test case does with the daemon ----------------------------------------------------

class DaemonTestCase(busfixture.BusTestCase):
    """Calls, properties, pens and sessions through the contract. The daemon is self.daemon (a
    busfixture process): per class in NeedledTestCase, per test in SafetyTestCase."""

    daemon = None

    def daemon_log(self):
        return self.daemon.log() if self.daemon else ''

    def ping(self, bus=None):
        """The daemon answers (org.freedesktop.DBus.Peer.Ping)."""
        obj = (bus or self.bus).get_object(BUS_NAME, MANAGER_PATH, introspect=False)
        obj.Ping(dbus_interface=PEER_IFACE, timeout=10 * timeout_multiplier())

    # ---- calls ----

    def call(self, path, iface, method, *args, bus=None, timeout=None, **kw):
        obj = (bus or self.bus).get_object(BUS_NAME, path, introspect=False)
        return getattr(obj, method)(*args, dbus_interface=iface,
                                    timeout=(timeout or 10) * timeout_multiplier(), **kw)

    def mgr(self, method, *args, **kw):
        return self.call(MANAGER_PATH, MANAGER_IFACE, method, *args, **kw)

    def sim(self, method, *args, **kw):
        return self.call(MANAGER_PATH, SIM_IFACE, method, *args, **kw)

    def pen_dropped(self, pen):
        """Samples the simulated pen itself dropped since power-on (Simulator.GetPenCounters): its
        queue overflows when the daemon does not read for half a second, as a starved daemon under
        valgrind on a busy machine may not. A gap in the telemetry up to this count is the pen's."""
        return int(unwrap(self.sim('GetPenCounters', dbus.ObjectPath(pen)))['samples_dropped'])

    def pen_call(self, pen, method, *args, **kw):
        return self.call(pen, PEN_IFACE, method, *args, **kw)

    def get(self, path, iface, prop, bus=None):
        return unwrap(self.call(path, PROPS_IFACE, 'Get', iface, prop, bus=bus))

    def get_all(self, path, iface):
        return unwrap(self.call(path, PROPS_IFACE, 'GetAll', iface))

    def mprop(self, prop):
        return self.get(MANAGER_PATH, MANAGER_IFACE, prop)

    def pprop(self, pen, prop, bus=None):
        return self.get(pen, PEN_IFACE, prop, bus=bus)

    def assertDBusError(self, name, func, *args, message_contains=None, **kw):
        """func(*args) fails with the D-Bus error name and a message; returns the message."""
        with self.assertRaises(dbus.exceptions.DBusException, msg=f'expected {name}') as cm:
            func(*args, **kw)
        got = cm.exception.get_dbus_name()
        msg = cm.exception.get_dbus_message() or ''
        self.assertEqual(got, name, f'error message: {msg}')
        self.assertTrue(msg.strip(), f'{name} comes with a message a person can act on')
        if message_contains is not None:
            for part in ([message_contains] if isinstance(message_contains, str) else message_contains):
                self.assertIn(part, msg)
        return msg

    def new_connection(self):
        """Another client: a second connection to the bus (closed after the test)."""
        conn = dbus.bus.BusConnection(self.fixture.address,
                                      mainloop=dbus.mainloop.glib.DBusGMainLoop())
        self.addCleanup(_close_quietly, conn)
        return conn

    # ---- pens ----

    def add_pen(self, cartridge=None, **options):
        """Simulator.AddPen(options) (plain ints travel as u); optionally inserts (id, needles).
        Removed after the test."""
        opts = dbus.Dictionary({}, signature='sv')
        for k, v in options.items():
            opts[k] = dbus.UInt32(v) if isinstance(v, int) and not isinstance(v, bool) else v
        path = str(self.sim('AddPen', opts))
        self._pens_added.append(path)
        if cartridge is not None:
            self.insert_cartridge(path, *cartridge)
        return path

    def insert_cartridge(self, pen, cid, needles=12):
        self.sim('InsertCartridge', dbus.ObjectPath(pen), cid, dbus.UInt32(needles))

    def _remove_pens(self):
        for path in self._pens_added:
            try:
                if self.daemon is not None and self.daemon.running() and path in self.mprop('Pens'):
                    self.sim('RemovePen', dbus.ObjectPath(path))
            except dbus.exceptions.DBusException:
                pass

    def setUp(self):
        super().setUp()
        self._pens_added = []
        self.sessions = []          # every session id start_session() returned in this test
        self.addCleanup(self._remove_pens)

    def wait_pen_prop(self, pen, prop, predicate, timeout_s=5, what=None):
        """Waits until predicate(Pen.prop) holds (polled with Get); returns the value."""
        last = []

        def check():
            value = self.pprop(pen, prop)
            last[:] = [value]
            return (value,) if predicate(value) else None
        try:
            return wait_until(check, timeout_s, what or f'{prop} of {pen}')[0]
        except AssertionError as e:
            raise AssertionError(f'{e}; last value {last[0] if last else None!r}') from None

    def wait_state(self, pen, state, timeout_s=5):
        """Waits for Pen.State; on timeout says the last State and Fault and the daemon's log."""
        last = [None]

        def check():
            last[0] = (self.pprop(pen, 'State'), self.pprop(pen, 'Fault'))
            return last[0][0] == state
        try:
            wait_until(check, timeout_s, f'State {state}')
        except AssertionError as e:
            raise AssertionError(f'{e}; last (State, Fault) {last[0]}\n{self.daemon_log()[-3000:]}') from None
        return state

    def telemetry(self, pen, bus=None):
        tel = Telemetry(self.pen_call(pen, 'OpenTelemetry', bus=bus))
        self.addCleanup(tel.close)
        return tel

    def arm(self, pen, bus=None, **profile):
        """Arms profile_yaml(**profile); the pen is then armed."""
        self.pen_call(pen, 'LoadProfileData', profile_yaml(**profile), bus=bus)
        self.assertEqual(self.pprop(pen, 'State', bus=bus), 'armed')

    def start_session(self, pen, bus=None, label=None, **profile):
        """Arms a profile (profile_yaml(**profile)) and starts it; returns the session id."""
        self.arm(pen, bus=bus, **profile)
        opts = dbus.Dictionary({}, signature='sv')
        if label is not None:
            opts['label'] = label
        sid = str(self.pen_call(pen, 'Start', opts, bus=bus))
        self.sessions.append(sid)
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        return sid

    def snapshot(self, pen):
        """The pen's state-bearing properties, for 'bad input changes nothing' checks."""
        return {k: self.pprop(pen, k) for k in ('State', 'Fault', 'Profile', 'SessionId', 'DepthMm',
                                                  'SpeedHz')}

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

    def first_running(self, tel, timeout_s=5):
        """Index of the first sample with the motor running. Waits for it: a reader behind the
        daemon (valgrind, a loaded machine: L15) may not have read it when a short session ends."""
        return tel.wait_first(running, timeout_s, 'telemetry showing the motor running')

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


def _test_failed(testcase):
    """Whether the running test has failed so far (for a cleanup). Python 3.11 reports an error
    to the result at once and leaves the outcome's success True; before 3.11 it is the other way
    round."""
    outcome = getattr(testcase, '_outcome', None)
    result = getattr(outcome, 'result', None)
    return not getattr(outcome, 'success', True) or (
        result is not None and any(t is testcase for t, _ in list(result.errors) + list(result.failures)))


class NeedledTestCase(DaemonTestCase):
    """Bus tests: one daemon per test class (started in setUpClass with daemon_args, a fresh
    state dir and limits_text/profiles_dir as chosen), polkit granting allowed_actions unless a
    test says otherwise."""

    daemon_args = ['--simulate']
    limits_text = None          # None: conf/limits.yaml (see shipped_limits_yaml); text: written to a temp file
    limits_missing = False      # True: --limits names a file that does not exist
    profiles_dir = None         # None: conf/profiles.d
    allowed_actions = ALL_ACTIONS

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmpdir = tempfile.mkdtemp(prefix='needled-test-')
        cls.state_dir = os.path.join(cls.tmpdir, 'state')
        os.mkdir(cls.state_dir)
        if cls.limits_missing:
            cls.limits_path = os.path.join(cls.tmpdir, 'no-such-limits.yaml')
        elif cls.limits_text is None and not VALGRIND:
            cls.limits_path = source_path('conf', 'limits.yaml')
        elif cls.limits_text is None:
            cls.limits_path = os.path.join(cls.tmpdir, 'limits.yaml')
            with open(cls.limits_path, 'w', encoding='utf-8') as f:
                f.write(shipped_limits_yaml())
        else:
            cls.limits_path = os.path.join(cls.tmpdir, 'limits.yaml')
            with open(cls.limits_path, 'w', encoding='utf-8') as f:
                f.write(cls.limits_text)
        cls.profiles_path = cls.profiles_dir or source_path('conf', 'profiles.d')
        try:
            cls.daemon = cls.start_needled()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def start_needled(cls, extra_args=(), env=None):
        argv = realtime_prefix() + [needled_binary()] + list(cls.daemon_args) + [
            '--limits', cls.limits_path, '--profiles', cls.profiles_path,
            '--state-dir', cls.state_dir] + list(extra_args)
        return cls.fixture.start_daemon(argv, env=env, timeout_s=20)

    @classmethod
    def tearDownClass(cls):
        status = None
        log = ''
        if cls.daemon is not None and getattr(cls, '_failed', False):
            sys.stderr.write(f'---- needled log ({cls.__name__}) ----\n{cls.daemon.log()[-20000:]}\n----\n')
            if cls.fixture is not None and cls.fixture.bus is not None:
                sys.stderr.write(f'---- dbus-daemon log ----\n{cls.fixture.bus.log()[-4000:]}\n----\n')
        if cls.daemon is not None and cls.fixture is not None:
            log = cls.daemon.log()
            status = cls.fixture.stop_process(cls.daemon)
            cls.daemon = None
        shutil.rmtree(getattr(cls, 'tmpdir', None) or '/nonexistent', ignore_errors=True)
        super().tearDownClass()
        # The daemon must exit cleanly on SIGTERM; under valgrind, 99 means memory errors.
        if status not in (None, 0):
            raise AssertionError(f'needled exited with status {status}:\n{log[-6000:]}')

    def setUp(self):
        super().setUp()
        if self.polkit is not None:
            self.polkit.set_allowed(self.allowed_actions)
        self.assert_daemon_alive()
        self.manager = self.bus.get_object(BUS_NAME, MANAGER_PATH)
        self.addCleanup(self._note_failure)

    def _note_failure(self):
        # A failed test makes tearDownClass print the daemon's log (meson keeps stderr).
        if _test_failed(self):
            type(self)._failed = True

    def assert_daemon_alive(self):
        daemon = type(self).daemon
        if daemon is not None and not daemon.running():
            self.fail(f'needled is not running (status {daemon.popen.returncode}):\n{daemon.log()[-6000:]}')


class SafetyTestCase(DaemonTestCase):
    """Safety tests: one bus and polkit mock per class; one needled per test (or several in a
    row, over the same state directory), started by the test with the limits it needs, every
    polkit action granted."""

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
        # Before the processes are stopped (cleanups run last-in first-out).
        self.addCleanup(self._check_daemon_at_end)
        self.addCleanup(self._log_on_failure)

    def _log_on_failure(self):
        # meson keeps stderr: a failed test shows what the daemon it started logged.
        if self.daemon is not None and _test_failed(self):
            sys.stderr.write(f'---- needled log ({self.id()}) ----\n{self.daemon.log()[-20000:]}\n----\n')

    def write_limits(self, text):
        tmp = self.limits_path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, self.limits_path)

    def start_needled(self, limits=None, state_dir=None, extra_args=(), simulate=True, env=None):
        """Starts needled on this test's bus; limits: text of the limits file (None: keep the
        file written before, or the fixture's if none was); env: added to its environment."""
        if limits is not None or not os.path.exists(self.limits_path):
            self.write_limits(limits if limits is not None else limits_text())
        argv = realtime_prefix() + [needled_binary()] + (['--simulate'] if simulate else []) + [
            '--limits', self.limits_path, '--profiles', self.profiles_dir,
            '--state-dir', state_dir or self.state_dir] + list(extra_args)
        self.daemon = self.fixture.start_daemon(argv, env=env, timeout_s=20)
        self.manager = self.bus.get_object(BUS_NAME, MANAGER_PATH, introspect=False)
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
        wait_until(lambda: not conn.name_has_owner(BUS_NAME), 10, 'org.needled released')

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

    def assert_alive(self):
        self.assertTrue(self.daemon is not None and self.daemon.running(),
                        f'needled is not running:\n{self.daemon_log()[-4000:]}')
        self.mgr('GetLimits')  # answers


def _close_quietly(conn):
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing twice is fine
        pass


def main():
    import unittest
    busfixture.skip_unless_available()
    unittest.main(verbosity=2)
