"""Helpers for needled's bus tests: the daemon from the build tree on busfixture's private
system bus, written the way a client developer would use the contract (dbus-api.md,
dbus/org.needled1.xml).

    class TestX(NeedledTestCase):
        daemon_args = ['--simulate']          # per class: one daemon for all its tests
        def test_y(self):
            pen = self.add_pen(cartridge=('C-1', 12))
            ...

Waiting is always for a condition with a bounded timeout (scaled by timeout_multiplier()),
while the GLib main loop runs so that signals arrive.
"""

import hashlib
import os
import shutil
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import busfixture  # noqa: E402
from busfixture import timeout_multiplier  # noqa: E402,F401

import dbus  # noqa: E402
import dbus.mainloop.glib  # noqa: E402
from gi.repository import GLib  # noqa: E402

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

TELEMETRY_RECORD = struct.Struct('<HHIQQIIddddB7x')
assert TELEMETRY_RECORD.size == 72

LIMITS_TEMPLATE = '''version: 1
pen:
  speed_hz: {{min: 50, max: 150}}
  depth_tolerance_mm: 0.15
  warn_temperature_c: 41
  max_temperature_c: 43
  max_current_ma: 1200
  stall_speed_fraction: 0.7
  stall_time_ms: 250
  min_battery_percent: 20
  stop_battery_percent: 5
  heartbeat_timeout_ms: {heartbeat_timeout_ms}
session:
  max_duration_s: {max_duration_s}
  client_heartbeat_timeout_ms: {client_heartbeat_timeout_ms}
cartridge:
  single_use: true
  max_runtime_s: 3600
  allowed_needles: [12, 14, 16, 24, 36, 42]
areas:
  periorbital: {{max_depth_mm: 0.5}}
  forehead:    {{max_depth_mm: 0.75}}
  cheeks:      {{max_depth_mm: 1.5}}
  neck:        {{max_depth_mm: 1.0}}
  body:        {{max_depth_mm: 2.0, max_speed_hz: 140, max_duration_s: 1800}}
'''


VALGRIND = os.environ.get('NEEDLED_TEST_VALGRIND') == '1'
# The pen stops its own motor when the daemon is silent this long (pen.heartbeat_timeout_ms).
# Under valgrind on a busy machine the daemon can stall for longer than the shipped 500 ms,
# and the pens would rightly stop themselves in the middle of unrelated tests: there the
# limits files of the tests allow 10 s, the format's maximum.
PEN_HEARTBEAT_TIMEOUT_MS = 10000 if VALGRIND else 500


def limits_yaml(max_duration_s=2700, client_heartbeat_timeout_ms=0):
    """A valid limits file (a smaller copy of conf/limits.yaml) with the given values."""
    return LIMITS_TEMPLATE.format(max_duration_s=max_duration_s,
                                  client_heartbeat_timeout_ms=client_heartbeat_timeout_ms,
                                  heartbeat_timeout_ms=PEN_HEARTBEAT_TIMEOUT_MS)


def shipped_limits_yaml():
    """conf/limits.yaml, with the pen heartbeat timeout of PEN_HEARTBEAT_TIMEOUT_MS."""
    with open(source_path('conf', 'limits.yaml'), encoding='utf-8') as f:
        text = f.read()
    line = '  heartbeat_timeout_ms: 500\n'
    assert text.count(line) == 1, 'conf/limits.yaml changed: update shipped_limits_yaml()'
    return text.replace(line, f'  heartbeat_timeout_ms: {PEN_HEARTBEAT_TIMEOUT_MS}\n')


def profile_yaml(name='test-cheeks', indication='acne-scars', area='cheeks', depth_mm=1.0,
                 speed_hz=100, duration_s=600, needles=12, extra=''):
    """A treatment profile; every value is written as given (strings pass through)."""
    return (f'name: {name}\nindication: {indication}\narea: {area}\ndepth_mm: {depth_mm}\n'
            f'speed_hz: {speed_hz}\nduration_s: {duration_s}\nneedles: {needles}\n{extra}')


def sha256_file(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def source_path(*parts):
    return os.path.join(busfixture.source_root(), *parts)


def needled_binary():
    return os.path.join(busfixture.build_root(), 'daemon', 'needled')


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
                                              bus_name=busfixture.NEEDLED_NAME, path_keyword='path')

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


class NeedledTestCase(busfixture.BusTestCase):
    """One daemon per test class (started in setUpClass with daemon_args, a fresh state dir
    and limits_text/profiles_dir as chosen), polkit granting ALL_ACTIONS unless a test says
    otherwise."""

    daemon_args = ['--simulate']
    limits_text = None          # None: conf/limits.yaml (see shipped_limits_yaml); text: written to a temp file
    limits_missing = False      # True: --limits names a file that does not exist
    profiles_dir = None         # None: conf/profiles.d
    allowed_actions = ALL_ACTIONS
    daemon = None

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
        argv = [needled_binary()] + list(cls.daemon_args) + [
            '--limits', cls.limits_path, '--profiles', cls.profiles_path,
            '--state-dir', cls.state_dir] + list(extra_args)
        return cls.fixture.start_daemon(argv, env=env, timeout_s=20)

    @classmethod
    def tearDownClass(cls):
        status = None
        log = ''
        if cls.daemon is not None and getattr(cls, '_failed', False):
            sys.stderr.write(f'---- needled log ({cls.__name__}) ----\n{cls.daemon.log()[-20000:]}\n----\n')
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
        self.manager = self.bus.get_object(busfixture.NEEDLED_NAME, MANAGER_PATH)
        self._pens_added = []
        self.addCleanup(self._remove_pens)
        self.addCleanup(self._note_failure)

    def _note_failure(self):
        # A failed test makes tearDownClass print the daemon's log (meson keeps stderr).
        outcome = getattr(self, '_outcome', None)
        if outcome is not None and not getattr(outcome, 'success', True):
            type(self)._failed = True

    # ---- the daemon ----

    def assert_daemon_alive(self):
        daemon = type(self).daemon
        if daemon is not None and not daemon.running():
            self.fail(f'needled is not running (status {daemon.popen.returncode}):\n{daemon.log()[-6000:]}')

    def daemon_log(self):
        return type(self).daemon.log() if type(self).daemon else ''

    def ping(self, bus=None):
        """The daemon answers (org.freedesktop.DBus.Peer.Ping)."""
        obj = (bus or self.bus).get_object(busfixture.NEEDLED_NAME, MANAGER_PATH, introspect=False)
        obj.Ping(dbus_interface=PEER_IFACE, timeout=10 * timeout_multiplier())

    # ---- calls ----

    def call(self, path, iface, method, *args, bus=None, timeout=None, **kw):
        obj = (bus or self.bus).get_object(busfixture.NEEDLED_NAME, path, introspect=False)
        return getattr(obj, method)(*args, dbus_interface=iface,
                                    timeout=(timeout or 10) * timeout_multiplier(), **kw)

    def mgr(self, method, *args, **kw):
        return self.call(MANAGER_PATH, MANAGER_IFACE, method, *args, **kw)

    def sim(self, method, *args, **kw):
        return self.call(MANAGER_PATH, SIM_IFACE, method, *args, **kw)

    def pen_call(self, pen, method, *args, **kw):
        return self.call(pen, PEN_IFACE, method, *args, **kw)

    def get(self, path, iface, prop, bus=None):
        return unwrap(self.call(path, PROPS_IFACE, 'Get', iface, prop, bus=bus))

    def get_all(self, path, iface):
        return unwrap(self.call(path, PROPS_IFACE, 'GetAll', iface))

    def mprop(self, prop):
        return self.get(MANAGER_PATH, MANAGER_IFACE, prop)

    def pprop(self, pen, prop):
        return self.get(pen, PEN_IFACE, prop)

    def assertDBusError(self, name, func, *args, message_contains=None, **kw):
        """func(*args) fails with the D-Bus error name; returns its message."""
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

    # ---- pens ----

    def add_pen(self, cartridge=None, **options):
        """Simulator.AddPen(options); optionally inserts (id, needles). Removed after the test."""
        opts = dbus.Dictionary({}, signature='sv')
        for k, v in options.items():
            opts[k] = v
        path = str(self.sim('AddPen', opts))
        self._pens_added.append(path)
        if cartridge is not None:
            self.sim('InsertCartridge', dbus.ObjectPath(path), cartridge[0], dbus.UInt32(cartridge[1]))
        return path

    def _remove_pens(self):
        for path in self._pens_added:
            try:
                pens = self.mprop('Pens')
                if path in pens:
                    self.sim('RemovePen', dbus.ObjectPath(path))
            except dbus.exceptions.DBusException:
                pass

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
        return self.wait_pen_prop(pen, 'State', lambda v: v == state, timeout_s, f'State == {state}')

    def arm(self, pen, **profile):
        self.pen_call(pen, 'LoadProfileData', profile_yaml(**profile))
        self.assertEqual(self.pprop(pen, 'State'), 'armed')

    def start_session(self, pen, cartridge=None, bus=None, label=None, **profile):
        """Arms a profile and starts it; returns the session id."""
        self.pen_call(pen, 'LoadProfileData', profile_yaml(**profile), bus=bus)
        opts = dbus.Dictionary({}, signature='sv')
        if label is not None:
            opts['label'] = label
        sid = str(self.pen_call(pen, 'Start', opts, bus=bus))
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        return sid

    def snapshot(self, pen):
        """The pen's state-bearing properties, for 'bad input changes nothing' checks."""
        return {k: self.pprop(pen, k) for k in ('State', 'Fault', 'Profile', 'SessionId', 'DepthMm',
                                                  'SpeedHz')}

    def new_connection(self):
        """Another client: a second connection to the bus (closed after the test)."""
        conn = dbus.bus.BusConnection(self.fixture.address,
                                      mainloop=dbus.mainloop.glib.DBusGMainLoop())
        self.addCleanup(_close_quietly, conn)
        return conn


def _close_quietly(conn):
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing twice is fine
        pass


def main():
    import unittest
    busfixture.skip_unless_available()
    unittest.main(verbosity=2)
