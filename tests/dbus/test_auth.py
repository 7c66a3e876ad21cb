#!/usr/bin/python3
"""Authorization of the running daemon against a polkit mock: denied and allowed per action,
Stop and the read-only methods needing nothing, a slow and a hanging polkit (bounded by
--polkit-timeout, other callers served meanwhile), unprivileged callers, and interactive
authorization (the caller's flag passed on; a challenge answered with
InteractiveAuthorizationRequired)."""

import os
import shutil
import subprocess

import dbus
from gi.repository import Gio, GLib

import busfixture
from needledtest import (ACCESS_DENIED, ALL_ACTIONS, CONFIGURE, MANAGER_IFACE, MANAGER_PATH,
                         OM_IFACE, OPERATE, PEN_IFACE, READ_HISTORY, AsyncCall, NeedledTestCase,
                         main, profile_yaml, pump, timeout_multiplier, unwrap, wait_until)

EMPTY_SV = dbus.Dictionary({}, signature='sv')
IAR = 'org.freedesktop.DBus.Error.InteractiveAuthorizationRequired'
HERE = os.path.dirname(os.path.abspath(__file__))
VALGRIND = os.environ.get('NEEDLED_TEST_VALGRIND') == '1'
# The 1 s; longer under valgrind, where the daemon itself runs ten times slower.
POLKIT_TIMEOUT_MS = 1000 * (5 if VALGRIND else 1)

# Every method guarded by org.needled1.operate, with arguments.
OPERATE_CALLS = [
    ('LoadProfile', ('acne-scars-cheeks',)),
    ('LoadProfileData', (profile_yaml(),)),
    ('Start', (EMPTY_SV,)),
    ('Pause', ()),
    ('Resume', ()),
    ('SetDepth', (1.0,)),
    ('SetSpeed', (100.0,)),
    ('Heartbeat', ()),
    ('ClearFault', ()),
]


def busctl(fixture, args, user=None, interactive=None):
    argv = ['busctl', '--system', '--timeout=30']
    if interactive is not None:
        argv.append(f'--allow-interactive-authorization={"yes" if interactive else "no"}')
    argv += args
    if user:
        argv = busfixture.unprivileged(argv, user, 'nogroup')
    return subprocess.run(argv, env=fixture.env(), capture_output=True, text=True,
                          timeout=60 * timeout_multiplier())


class AuthDenied(NeedledTestCase):
    allowed_actions = []

    def test_operate_methods_denied(self):
        pen = self.add_pen(cartridge=('AUTH-1', 12))
        before = self.snapshot(pen)
        for method, args in OPERATE_CALLS:
            with self.subTest(method=method):
                msg = self.assertDBusError(ACCESS_DENIED, self.pen_call, pen, method, *args)
                self.assertIn(OPERATE, msg)
        self.assertEqual(self.snapshot(pen), before)
        self.assertIn(CONFIGURE, self.assertDBusError(ACCESS_DENIED, self.mgr, 'ReloadLimits'))
        self.assertIn(READ_HISTORY, self.assertDBusError(ACCESS_DENIED, self.mgr, 'GetHistory', EMPTY_SV))
        # Even the right action for another method does not help.
        self.polkit.set_allowed([CONFIGURE, READ_HISTORY])
        self.assertDBusError(ACCESS_DENIED, self.pen_call, pen, 'LoadProfileData', profile_yaml())
        self.assertEqual(self.snapshot(pen), before)

    def test_what_needs_no_authorization(self):
        pen = self.add_pen(cartridge=('AUTH-2', 12))
        self.assertEqual(unwrap(self.mgr('ValidateProfile', profile_yaml())), [])
        self.assertTrue(unwrap(self.mgr('GetLimits')))
        self.assertTrue(unwrap(self.mgr('GetProfiles')))
        self.assertEqual(unwrap(self.mgr('GetCartridge', 'AUTH-2'))['state'], 'fresh')
        fd = self.pen_call(pen, 'OpenTelemetry')
        os.close(fd.take())
        self.get_all(pen, PEN_IFACE)
        self.get_all(MANAGER_PATH, MANAGER_IFACE)
        self.call(MANAGER_PATH, OM_IFACE, 'GetManagedObjects')
        self.pen_call(pen, 'Stop')

    def test_stop_needs_nothing_while_a_session_runs(self):
        pen = self.add_pen(cartridge=('AUTH-3', 12))
        self.polkit.set_allowed([OPERATE])
        sid = self.start_session(pen)
        self.polkit.set_allowed([])
        self.assertDBusError(ACCESS_DENIED, self.pen_call, pen, 'SetDepth', 0.5)
        self.assertDBusError(ACCESS_DENIED, self.pen_call, pen, 'Pause')
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        self.assertEqual(self.pprop(pen, 'DepthMm'), 1.0)
        other = self.new_connection()
        self.pen_call(pen, 'Stop', bus=other)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')

    def test_granting_operate(self):
        pen = self.add_pen(cartridge=('AUTH-4', 12))
        self.polkit.set_allowed([OPERATE])
        self.pen_call(pen, 'LoadProfile', 'acne-scars-cheeks')
        self.pen_call(pen, 'Start', EMPTY_SV)
        self.pen_call(pen, 'SetDepth', 1.0)
        self.pen_call(pen, 'SetSpeed', 110.0)
        self.pen_call(pen, 'Pause')
        self.pen_call(pen, 'Resume')
        self.pen_call(pen, 'Heartbeat')
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.assertDBusError(ACCESS_DENIED, self.mgr, 'ReloadLimits')
        self.assertDBusError(ACCESS_DENIED, self.mgr, 'GetHistory', EMPTY_SV)
        self.pen_call(pen, 'Stop')

    def test_unprivileged_caller(self):
        # Every method is open to unprivileged callers as far as sd-bus and the bus policy go;
        # polkit decides (no vtable entry lacks SD_BUS_VTABLE_UNPRIVILEGED).
        if not shutil.which('setpriv'):
            self.skipTest('setpriv missing')
        pen = self.add_pen(serial='NOBODY-1', cartridge=('AUTH-5', 12))
        r = busctl(self.fixture, ['call', 'org.needled', pen, PEN_IFACE, 'LoadProfileData', 's', profile_yaml()],
                   user='nobody', interactive=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn('Access denied', r.stderr)   # busctl prints AccessDenied so
        self.polkit.set_allowed(ALL_ACTIONS)
        for args in (['call', 'org.needled', pen, PEN_IFACE, 'LoadProfileData', 's', profile_yaml()],
                     ['call', 'org.needled', pen, PEN_IFACE, 'Start', 'a{sv}', '0'],
                     ['call', 'org.needled', MANAGER_PATH, MANAGER_IFACE, 'GetHistory', 'a{sv}', '0'],
                     ['call', 'org.needled', MANAGER_PATH, MANAGER_IFACE, 'ValidateProfile', 's', profile_yaml()],
                     ['call', 'org.needled', MANAGER_PATH, MANAGER_IFACE, 'GetProfiles'],
                     ['get-property', 'org.needled', pen, PEN_IFACE, 'State']):
            r = busctl(self.fixture, args, user='nobody', interactive=False)
            self.assertEqual(r.returncode, 0, f'{args[3:5]}: {r.stderr}')
        # The session belonged to busctl's connection, gone at once: client-vanished, and the
        # ledger names nobody as its owner.
        self.wait_state(pen, 'idle')
        hist = [h for h in unwrap(self.mgr('GetHistory', EMPTY_SV)) if h['pen'] == 'NOBODY-1']
        self.assertEqual([(h['owner_uid'], h['reason']) for h in hist], [(65534, 'client-vanished')])
        self.polkit.set_allowed([])
        r = busctl(self.fixture, ['call', 'org.needled', pen, PEN_IFACE, 'Stop'], user='nobody')
        self.assertEqual(r.returncode, 0, r.stderr)


class AuthSlowAndHanging(NeedledTestCase):
    daemon_args = ['--simulate', '--polkit-timeout', str(POLKIT_TIMEOUT_MS)]

    def test_slow_polkit(self):
        # A slow polkit (0.3 s, well within the daemon's polkit timeout) delays the answer, not
        # the daemon (another client is served meanwhile), and the call then succeeds.
        delay_s = 0.3
        pen = self.add_pen()
        self.polkit.set_delay(delay_s)
        obj = self.bus.get_object('org.needled', pen, introspect=False)
        call = AsyncCall(obj.LoadProfileData, profile_yaml(), dbus_interface=PEN_IFACE, timeout=60)
        self.ping(bus=self.new_connection())
        call.wait(10)
        self.assertIsNone(call.error, 'denied: polkit\'s answer came too late for the daemon')
        self.assertGreaterEqual(call.elapsed, delay_s, 'the answer came before polkit\'s')
        self.assertEqual(self.pprop(pen, 'State'), 'armed')

    def test_hanging_polkit(self):
        pen = self.add_pen(cartridge=('HANG-1', 12))
        before = self.snapshot(pen)
        self.polkit.simulate_hang(True)
        obj = self.bus.get_object('org.needled', pen, introspect=False)
        call = AsyncCall(obj.LoadProfileData, profile_yaml(), dbus_interface=PEN_IFACE, timeout=60)
        other = self.new_connection()
        other_obj = other.get_object('org.needled', pen, introspect=False)
        call2 = AsyncCall(other_obj.Start, EMPTY_SV, dbus_interface=PEN_IFACE, timeout=60)
        wait_until(self.polkit.have_hanging_calls, 5, 'the checks to reach polkit')
        # Meanwhile the daemon serves everyone else.
        self.ping()
        self.ping(bus=other)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.assertEqual(unwrap(self.mgr('ValidateProfile', profile_yaml())), [])
        self.pen_call(pen, 'Stop')
        self.assertFalse(call.done, 'the first call waits for polkit while others are answered')
        call.wait(10)
        call2.wait(10)
        for c in (call, call2):
            self.assertIsNotNone(c.error, 'a hanging polkit means denied')
            self.assertEqual(c.error.get_dbus_name(), ACCESS_DENIED)
            self.assertGreaterEqual(c.elapsed, POLKIT_TIMEOUT_MS / 1000 * 0.9)
            self.assertLess(c.elapsed, POLKIT_TIMEOUT_MS / 1000 + 2 * timeout_multiplier())
        self.assertEqual(self.snapshot(pen), before)
        # polkit's late "yes" changes nothing.
        self.polkit.set_allowed(ALL_ACTIONS)
        self.polkit.release_hanging_calls()
        pump(0.3)
        self.ping()
        self.assertEqual(self.snapshot(pen), before)
        # And once polkit answers again, so does the daemon.
        self.polkit.simulate_hang(False)
        self.arm(pen)


class AuthInteractive(NeedledTestCase):
    """A polkit that can answer with a challenge (tests/dbus/polkitd_challenge.py)."""

    @classmethod
    def fixture_args(cls):
        return {'polkit_template': os.path.join(HERE, 'polkitd_challenge.py')}

    def mock(self, method, *args):
        obj = self.bus.get_object(busfixture.POLKIT_NAME, busfixture.POLKIT_PATH)
        return getattr(obj, method)(*args, dbus_interface=busfixture.MOCK_IFACE)

    def setUp(self):
        super().setUp()
        self.mock('ClearChecks')
        self.addCleanup(self.mock, 'SetChallenge', dbus.Array([], signature='s'))

    def gio_call(self, path, method, yaml_text, interactive):
        """Pen.METHOD(yaml) through GDBus, which can set ALLOW_INTERACTIVE_AUTHORIZATION
        (dbus-python cannot). Returns None, or the D-Bus error name and message."""
        conn = Gio.DBusConnection.new_for_address_sync(
            self.fixture.address,
            Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
            None, None)
        self.addCleanup(conn.close_sync, None)
        flags = Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else Gio.DBusCallFlags.NONE
        try:
            conn.call_sync('org.needled', path, PEN_IFACE, method, GLib.Variant('(s)', (yaml_text,)), None,
                           flags, int(30000 * timeout_multiplier()), None)
            return None
        except GLib.Error as e:
            name = Gio.DBusError.get_remote_error(e)
            Gio.DBusError.strip_remote_error(e)
            return name, e.message

    def test_interaction_flag_passed_on(self):
        pen = self.add_pen(serial='INTER-1')
        self.assertIsNone(self.gio_call(pen, 'LoadProfileData', profile_yaml(), interactive=False))
        self.assertIsNone(self.gio_call(pen, 'LoadProfileData', profile_yaml(), interactive=True))
        self.pen_call(pen, 'LoadProfileData', profile_yaml())   # dbus-python: no interaction
        checks = [tuple(unwrap(c)) for c in self.mock('GetChecks')]
        self.assertEqual(checks, [(OPERATE, 0), (OPERATE, 1), (OPERATE, 0)])

    def test_challenge_without_interaction(self):
        # D-Bus specification: the caller did not allow interaction, and with it the call could
        # have been authorized: InteractiveAuthorizationRequired.
        pen = self.add_pen(serial='INTER-2')
        self.polkit.set_allowed([])
        self.mock('SetChallenge', [OPERATE])
        msg = self.assertDBusError(IAR, self.pen_call, pen, 'LoadProfileData', profile_yaml())
        self.assertIn('interactive', msg)
        self.assertEqual(self.gio_call(pen, 'LoadProfileData', profile_yaml(), interactive=False)[0], IAR)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        # Not a challenge: plain AccessDenied.
        self.mock('SetChallenge', dbus.Array([], signature='s'))
        self.assertDBusError(ACCESS_DENIED, self.pen_call, pen, 'LoadProfileData', profile_yaml())

    def test_challenge_with_interaction(self):
        # dbus/org.needled1.xml: InteractiveAuthorizationRequired "when the caller allowed
        # interactive authorization and polkit needs an authentication agent" (a challenge
        # remains although interaction was allowed: no agent could answer it).
        pen = self.add_pen(serial='INTER-3')
        self.polkit.set_allowed([])
        self.mock('SetChallenge', [OPERATE])
        error = self.gio_call(pen, 'LoadProfileData', profile_yaml(), interactive=True)
        self.assertIsNotNone(error)
        self.assertEqual(error[0], IAR, error[1])
        self.assertTrue(error[1].strip())
        self.assertEqual(self.pprop(pen, 'State'), 'idle')


if __name__ == '__main__':
    main()
