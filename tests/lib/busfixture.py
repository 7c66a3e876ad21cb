"""A private, policy-enforcing system bus with a mock polkit, for needled's bus tests.

    from busfixture import BusFixture, BusTestCase

    class TestSomething(BusTestCase):          # one bus + polkit mock per class
        def test_x(self):
            self.polkit.set_allowed(['org.needled1.operate'])
            daemon = self.fixture.start_daemon([needled, '--simulate'])
            manager = self.bus.get_object('org.needled', '/org/needled')
            ...
            xml = self.fixture.introspect('/org/needled')   # for introspect_compare

What it builds, per fixture:
- dbus-daemon with <type>system</type>, EXTERNAL authentication, a socket in a temporary
  directory, no activation, and the policy of the real system bus: the <policy> elements
  of the installed /usr/share/dbus-1/system.conf (read at run time, so "deny method calls
  and name ownership unless allowed" holds exactly as in production), then every policy
  file under test (by default the built dbus/org.needled.conf, unmodified), then a
  test-only policy generated here. The production file is never weakened: the test-only
  policy only lets root own org.freedesktop.PolicyKit1 (the mock runs as root, where
  Debian allows only user polkitd) and, unless told otherwise, org.needled (the daemon
  under test runs as root, where production allows only the daemon's user).
- python-dbusmock's polkitd template on that bus (PolkitMock), which denies everything
  until told otherwise; or another template (polkit_template: a name or a .py path) that
  offers the same mock controls, e.g. tests/dbus/polkitd_challenge.py.
- Processes started with start_daemon() or spawn(): each in its own process group, its
  output in a log file, stopped with SIGTERM then SIGKILL and always waited for (PID 1
  does not reap orphans here). Each, and the bus, is killed by the kernel if the test
  process dies first (meson's timeout: setpriv --pdeathsig). The test process makes itself
  a child subreaper, so the rest of a stopped process's group (children of a wrapper) is
  reaped too; other children of the test process are never touched.

Environment read: NEEDLED_BUILD_ROOT, NEEDLED_SOURCE_ROOT, NEEDLED_DBUS_POLICY (the policy
file under test), NEEDLED_TEST_VALGRIND=1 (daemons run under valgrind, errors make their
exit status 99), NEEDLED_TEST_SANITIZED=1 (longer timeouts), NEEDLED_DAEMON_WRAPPER (a
command prefix of your own, e.g. "strace -f -o /tmp/t").

Needs Debian packages: dbus (dbus-daemon), python3-dbus, python3-dbusmock, python3-gi
(the GLib main loop of dbus-python), util-linux (setpriv: every process it starts).
"""

import ctypes
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import xml.etree.ElementTree as ET

try:
    # Imported here, before unittest turns warnings on: gi's importer otherwise prints an
    # ImportWarning at the first use of gi.repository in a test.
    from gi.repository import GLib  # noqa: F401
except ImportError:
    pass  # reported by missing_requirements()

PYTHON = '/usr/bin/python3'
SYSTEM_CONF = '/usr/share/dbus-1/system.conf'
POLKIT_NAME = 'org.freedesktop.PolicyKit1'
POLKIT_PATH = '/org/freedesktop/PolicyKit1/Authority'
MOCK_IFACE = 'org.freedesktop.DBus.Mock'
NEEDLED_NAME = 'org.needled'
EXIT_SKIP = 77

_HERE = os.path.dirname(os.path.abspath(__file__))
_PR_SET_CHILD_SUBREAPER = 36


class FixtureError(Exception):
    """The bus, the mock or a process under test could not be started."""


def source_root():
    """The source tree (NEEDLED_SOURCE_ROOT, else two levels above this file)."""
    return os.environ.get('NEEDLED_SOURCE_ROOT') or os.path.dirname(os.path.dirname(_HERE))


def build_root():
    """The build tree (NEEDLED_BUILD_ROOT, required outside meson test)."""
    root = os.environ.get('NEEDLED_BUILD_ROOT')
    if not root:
        raise FixtureError('NEEDLED_BUILD_ROOT is not set (run through meson test)')
    return root


def production_policy():
    """Path of the system bus policy under test: the one the build generated."""
    return os.environ.get('NEEDLED_DBUS_POLICY') or os.path.join(build_root(), 'dbus', 'org.needled.conf')


def timeout_multiplier():
    """How much slower processes run under the current test setup."""
    if os.environ.get('NEEDLED_TEST_VALGRIND') == '1':
        return 10.0
    if os.environ.get('NEEDLED_TEST_SANITIZED') == '1':
        return 3.0
    return 1.0


def daemon_wrapper():
    """Command prefix for daemons under test: NEEDLED_DAEMON_WRAPPER, or valgrind under the
    valgrind setup, else nothing."""
    custom = os.environ.get('NEEDLED_DAEMON_WRAPPER')
    if custom:
        return shlex.split(custom)
    if os.environ.get('NEEDLED_TEST_VALGRIND') == '1':
        if not shutil.which('valgrind'):
            raise FixtureError('NEEDLED_TEST_VALGRIND=1 but valgrind is not installed')
        # the valgrind setup's own wrapper (meson.build): one set of options
        return [os.path.join(source_root(), 'tests', 'valgrind-wrap')]
    return []


def missing_requirements():
    """Returns a list of what this machine lacks to run bus tests (empty: all there)."""
    missing = []
    if not shutil.which('dbus-daemon'):
        missing.append('dbus-daemon (package dbus)')
    if not os.path.exists(SYSTEM_CONF):
        missing.append(f'{SYSTEM_CONF} (package dbus)')
    for module, package in (('dbus', 'python3-dbus'), ('dbusmock', 'python3-dbusmock'),
                            ('gi', 'python3-gi')):
        try:
            __import__(module)
        except ImportError:
            missing.append(f'python module {module} (package {package})')
    if not shutil.which('setpriv'):  # every process: _dies_with_this_process(), unprivileged()
        missing.append('setpriv (package util-linux)')
    return missing


def skip_unless_available():
    """Exits with 77 (meson's skip) naming what is missing; call before unittest.main()."""
    missing = missing_requirements()
    if missing:
        print('skipping, missing: ' + ', '.join(missing))
        sys.exit(EXIT_SKIP)


def unprivileged(argv, user='nobody', group='nogroup'):
    """argv prefixed to run as an unprivileged user with no supplementary groups."""
    return ['setpriv', f'--reuid={user}', f'--regid={group}', '--clear-groups', '--'] + list(argv)


def _dies_with_this_process(argv):
    """argv run so that the kernel kills it (SIGKILL) when this process dies, however it dies.
    meson stops a test that overran its timeout with SIGTERM to the test's process group and
    SIGKILL half a second later; the fixture's children live in groups of their own and this
    process's teardown does not run, so they ran on: in a quiet run of the README test command a
    real-time daemon left so used most of a core until the run was stopped (docs/performance.md,
    twelfth session). setpriv sets the parent-death signal and execs argv, which keeps it; a
    child that changes its user (unprivileged()) loses it, and those are short-lived callers.
    The kernel sends the signal when the thread that started the child exits, not only the
    process: start fixture processes from the main thread, never from a worker thread that ends."""
    return ['setpriv', '--pdeathsig', 'KILL', '--'] + list(argv)


def _become_subreaper():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # best effort: only orphaned grandchildren would be affected


class Process:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, argv, env, log_path, name=None):
        self.argv = list(argv)
        self.name = name or os.path.basename(self.argv[0])
        self.log_path = log_path
        with open(log_path, 'wb') as log:
            self.popen = subprocess.Popen(_dies_with_this_process(self.argv), env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self.pid = self.popen.pid

    def running(self):
        return self.popen.poll() is None

    def log(self):
        """The process's output so far."""
        try:
            with open(self.log_path, encoding='utf-8', errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    def signal(self, signo):
        """Sends a signal to the process (not its group)."""
        if self.running():
            os.kill(self.pid, signo)

    def wait(self, timeout_s):
        """Waits for the exit status; None on timeout."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s=5.0):
        """SIGTERM to the process group, SIGKILL after timeout_s; returns the exit status
        (negative: killed by that signal). Whatever else is in the group is killed and,
        having been reparented to us (subreaper), reaped."""
        if self.running():
            self._killpg(signal.SIGTERM)
            if self.wait(timeout_s * timeout_multiplier()) is None:
                self._killpg(signal.SIGKILL)
                self.popen.wait()
        self._killpg(signal.SIGKILL)
        self._reap_group(timeout_s)
        return self.popen.returncode

    def _killpg(self, signo):
        try:
            os.killpg(self.pid, signo)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap_group(self, timeout_s):
        # Only members of this process's group other than the leader (which Popen reaps),
        # so that the exit status of any other child is left for its owner.
        deadline = time.monotonic() + timeout_s
        while True:
            for pid in _children():
                if pid != self.pid and _pgid(pid) == self.pid:
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                return
            if time.monotonic() >= deadline:
                return  # a member we cannot reap (not reparented to us): give up, bounded
            time.sleep(0.01)


def _children():
    """PIDs of this process's children (all threads)."""
    pids = set()
    try:
        for tid in os.listdir('/proc/self/task'):
            with open(f'/proc/self/task/{tid}/children', encoding='ascii') as f:
                pids.update(int(p) for p in f.read().split())
    except OSError:
        pass
    return pids


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _read_line(stream, timeout_s):
    deadline = time.monotonic() + timeout_s
    data = b''
    while not data.endswith(b'\n'):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
            return None
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            return None
        data += chunk
    return data.decode().strip()


TEST_POLICY = '''<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Generated by tests/lib/busfixture.py for one test bus. Never installed. -->
<busconfig>
  <policy user="root">
    <allow own="{polkit}"/>
{extra_owners}  </policy>
  <policy context="default">
    <allow send_destination="{polkit}"/>
  </policy>
</busconfig>
'''


class SystemBus:
    """A private dbus-daemon configured as a system bus, enforcing policy."""

    def __init__(self, workdir, policy_files, root_owns=(NEEDLED_NAME,)):
        self.workdir = workdir
        self.policy_files = list(policy_files)
        self.root_owns = list(root_owns)
        self.process = None
        self.address = None
        self.socket_path = os.path.join(workdir, 'system_bus_socket')

    def _write_config(self):
        policy_dir = os.path.join(self.workdir, 'policy.d')
        os.makedirs(policy_dir, exist_ok=True)  # exists when the bus is restarted
        for i, path in enumerate(self.policy_files):
            # Copied as they are: the bus reads exactly the bytes under test.
            shutil.copyfile(path, os.path.join(policy_dir, f'{i:02d}-{os.path.basename(path)}'))
        extra = ''.join(f'    <allow own="{name}"/>\n' for name in self.root_owns)
        with open(os.path.join(policy_dir, '99-test-only.conf'), 'w', encoding='utf-8') as f:
            f.write(TEST_POLICY.format(polkit=POLKIT_NAME, extra_owners=extra))

        system = ET.parse(SYSTEM_CONF).getroot()
        conf = ET.Element('busconfig')
        ET.SubElement(conf, 'type').text = 'system'
        ET.SubElement(conf, 'listen').text = f'unix:path={self.socket_path}'
        ET.SubElement(conf, 'auth').text = 'EXTERNAL'
        for elem in system:
            if elem.tag in ('policy', 'limit'):
                conf.append(elem)
        ET.SubElement(conf, 'includedir').text = policy_dir
        path = os.path.join(self.workdir, 'bus.conf')
        with open(path, 'wb') as f:
            f.write(b'<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"\n'
                    b' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n')
            f.write(ET.tostring(conf))
        return path

    def start(self, timeout_s=10.0):
        """Starts the bus; returns its address."""
        config = self._write_config()
        log_path = os.path.join(self.workdir, 'dbus-daemon.log')
        with open(log_path, 'wb') as log:
            popen = subprocess.Popen(_dies_with_this_process(['dbus-daemon', f'--config-file={config}', '--nofork',
                                                              '--nopidfile', '--print-address=1']),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=log, start_new_session=True)
        self.process = popen
        address = _read_line(popen.stdout, timeout_s * timeout_multiplier())
        if not address:
            self.stop()
            with open(log_path, encoding='utf-8', errors='replace') as f:
                raise FixtureError(f'dbus-daemon did not start: {f.read()}')
        # Unprivileged callers must reach the socket.
        os.chmod(self.socket_path, 0o666)
        self.address = address
        return address

    def log(self):
        with open(os.path.join(self.workdir, 'dbus-daemon.log'), encoding='utf-8', errors='replace') as f:
            return f.read()

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.process = None


class PolkitMock:
    """python-dbusmock's polkitd template on a bus: denies everything until told otherwise."""

    def __init__(self, fixture, template='polkitd'):
        self.fixture = fixture
        self.template = template
        self.process = None
        self._proxy = None

    def start(self, timeout_s=10.0):
        self.process = self.fixture.spawn([PYTHON, '-m', 'dbusmock', '--system', '--template', self.template],
                                          name='polkitd-mock')
        self.fixture.wait_for_name(POLKIT_NAME, timeout_s, self.process)
        self._proxy = self.fixture.connection().get_object(POLKIT_NAME, POLKIT_PATH)

    def _mock(self, method, *args):
        return getattr(self._proxy, method)(*args, dbus_interface=MOCK_IFACE)

    def set_allowed(self, actions):
        """Only these polkit actions are granted (plus any, with allow_unknown(True))."""
        import dbus
        self._mock('SetAllowed', dbus.Array(list(actions), signature='s'))

    def allow_unknown(self, allow):
        """Grant (True) or deny (False) actions not named in set_allowed()."""
        self._mock('AllowUnknown', bool(allow))

    def set_delay(self, seconds):
        """Each CheckAuthorization answers after this many seconds. The mock is blocked
        meanwhile: a test of a slow polkit, not of concurrency inside polkit."""
        self._mock('SetDelay', float(seconds))

    def simulate_hang(self, hang):
        """With True, CheckAuthorization never answers (until release_hanging_calls())."""
        self._mock('SimulateHang', bool(hang))

    def simulate_hang_actions(self, actions):
        """CheckAuthorization for these actions never answers (until released)."""
        import dbus
        self._mock('SimulateHangActions', dbus.Array(list(actions), signature='s'))

    def release_hanging_calls(self):
        """Answers every CheckAuthorization held back by a simulated hang."""
        self._mock('ReleaseHangingCalls')

    def have_hanging_calls(self):
        """True while a CheckAuthorization is held back."""
        return bool(self._mock('HaveHangingCalls'))

    def reset(self):
        """Back to the initial state: nothing allowed, no delay, no hang."""
        self.set_allowed([])
        self.allow_unknown(False)
        self.set_delay(0)
        self.simulate_hang(False)
        self.simulate_hang_actions([])
        if self.have_hanging_calls():
            self.release_hanging_calls()


class BusFixture:
    """A private system bus, a polkit mock, and the processes a test runs on them."""

    def __init__(self, policy_files=None, root_owns=(NEEDLED_NAME,), polkit=True, polkit_template='polkitd'):
        self.policy_files = [production_policy()] if policy_files is None else list(policy_files)
        self.root_owns = root_owns
        self.with_polkit = polkit
        self.polkit_template = polkit_template
        self.workdir = None
        self.bus = None
        self.polkit = None
        self.processes = []
        self._connection = None
        self._counter = 0

    def start(self):
        _become_subreaper()
        self.workdir = tempfile.mkdtemp(prefix='needled-bus-')
        # Unprivileged callers must traverse to the socket.
        os.chmod(self.workdir, 0o755)
        try:
            self.bus = SystemBus(self.workdir, self.policy_files, self.root_owns)
            self.bus.start()
            if self.with_polkit:
                self.polkit = PolkitMock(self, self.polkit_template)
                self.polkit.start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def address(self):
        return self.bus.address

    def env(self, extra=None):
        """Environment for a process on this bus as its system bus (and no session bus)."""
        env = dict(os.environ)
        env.pop('DBUS_SESSION_BUS_ADDRESS', None)
        env['DBUS_SYSTEM_BUS_ADDRESS'] = self.bus.address
        env['PYTHONDONTWRITEBYTECODE'] = '1'
        env.update(extra or {})
        return env

    def connection(self):
        """This process's (root's) connection to the bus, with a GLib main loop attached."""
        if self._connection is None:
            import dbus
            import dbus.mainloop.glib
            loop = dbus.mainloop.glib.DBusGMainLoop()
            self._connection = dbus.bus.BusConnection(self.bus.address, mainloop=loop)
        return self._connection

    def kill_bus(self):
        """SIGKILL to the bus daemon, as when it crashes: every connection to it is lost."""
        self.bus.process.kill()
        self.bus.process.wait()

    def restart_bus(self):
        """A new bus daemon at the same address after kill_bus(), with a new polkit mock and
        this process's connection renewed; processes that lost the old bus are left to the test."""
        if self.polkit is not None:
            self.stop_process(self.polkit.process)
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.bus.stop()
        self.bus.start()
        if self.polkit is not None:
            self.polkit.start()

    def spawn(self, argv, env=None, name=None):
        """Starts a process on this bus (env is added to env()); stopped by stop()."""
        self._counter += 1
        name = name or os.path.basename(argv[0])
        log_path = os.path.join(self.workdir, f'{self._counter:02d}-{name}.log')
        proc = Process(argv, self.env(env), log_path, name)
        self.processes.append(proc)
        return proc

    def wait_for_name(self, name, timeout_s=10.0, process=None):
        """Waits until name has an owner on the bus. Fails early, with the process's output,
        when process exits first; fails with FixtureError after timeout_s (scaled)."""
        conn = self.connection()
        deadline = time.monotonic() + timeout_s * timeout_multiplier()
        while True:
            if conn.name_has_owner(name):
                return
            if process is not None and not process.running():
                raise FixtureError(f'{process.name} exited with status {process.popen.returncode} '
                                   f'before owning {name}:\n{process.log()}')
            if time.monotonic() >= deadline:
                output = f':\n{process.log()}' if process is not None else ''
                raise FixtureError(f'{name} did not appear on the bus within {timeout_s} s{output}')
            time.sleep(0.02)

    def introspect(self, path, name=NEEDLED_NAME):
        """The introspection XML of an object, for introspect_compare.differences()."""
        obj = self.connection().get_object(name, path, introspect=False)
        return str(obj.Introspect(dbus_interface='org.freedesktop.DBus.Introspectable'))

    def start_daemon(self, argv, env=None, bus_name=NEEDLED_NAME, timeout_s=10.0, wrap=True):
        """Starts a daemon (under daemon_wrapper() when wrap) and waits for its bus name."""
        name = os.path.basename(argv[0])
        proc = self.spawn((daemon_wrapper() if wrap else []) + list(argv), env, name=name)
        try:
            self.wait_for_name(bus_name, timeout_s, proc)
        except FixtureError:
            self.stop_process(proc)
            raise
        return proc

    def stop_process(self, proc, timeout_s=5.0):
        """Stops one process started here; returns its exit status."""
        status = proc.stop(timeout_s)
        if proc in self.processes:
            self.processes.remove(proc)
        return status

    def stop(self):
        """Stops everything, newest first, and removes the temporary directory."""
        for proc in reversed(self.processes):
            proc.stop()
        self.processes = []
        self.polkit = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self.bus is not None:
            self.bus.stop()
            self.bus = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class BusTestCase(unittest.TestCase):
    """One BusFixture per test class; polkit reset and the test's processes stopped after
    each test. Override fixture_args() to choose policies."""

    fixture = None

    @classmethod
    def fixture_args(cls):
        return {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.fixture = BusFixture(**cls.fixture_args()).start()

    @classmethod
    def tearDownClass(cls):
        if cls.fixture is not None:
            cls.fixture.stop()
            cls.fixture = None
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.bus = self.fixture.connection()
        self.polkit = self.fixture.polkit
        self._baseline = list(self.fixture.processes)
        self.addCleanup(self._stop_test_processes)
        if self.polkit is not None:
            self.addCleanup(self.polkit.reset)

    def _stop_test_processes(self):
        for proc in [p for p in self.fixture.processes if p not in self._baseline]:
            self.fixture.stop_process(proc)
