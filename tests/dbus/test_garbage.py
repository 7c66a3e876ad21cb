#!/usr/bin/python3
"""Garbage from clients: wrong argument types, NaN/inf/negative/huge numbers, oversized and
hostile strings, unknown and mistyped dictionary entries, writes to read-only properties,
too many telemetry readers. Each gets a clear error, leaves the pen's state (State, Fault,
Profile, SessionId, set points) unchanged, and the daemon alive and answering."""

import os
import sys

import dbus

from needledtest import (ERR, INVALID_ARGS, MANAGER_IFACE, MANAGER_PATH, PEN_IFACE, PROPS_IFACE,
                         SIM_IFACE, NeedledTestCase, main, profile_yaml, source_path, unwrap)

EMPTY_SV = dbus.Dictionary({}, signature='sv')
MIB = 1024 * 1024
# Errors sd-bus gives for a call whose signature does not match the method's.
SIGNATURE_ERRORS = (INVALID_ARGS, 'org.freedesktop.DBus.Error.UnknownMethod')
HUGE_DOUBLES = [1e308, -1e308, sys.float_info.max, -sys.float_info.max, -sys.float_info.min, -0.0001, -1.0, 1e9]


class Garbage(NeedledTestCase):
    cartridges = 0

    def setUp(self):
        super().setUp()
        type(self).cartridges += 1   # single use: a fresh cartridge for each test's session
        self.pen = self.add_pen(cartridge=(f'GARBAGE-{self.cartridges}', 12))
        self.session = self.start_session(self.pen, label='garbage')
        self.before = self.snapshot(self.pen)
        self.addCleanup(self.pen_call, self.pen, 'Stop')

    def assertUnchanged(self):
        self.assert_daemon_alive()
        self.ping()
        self.assertEqual(self.snapshot(self.pen), self.before)

    def raw_call(self, path, iface, method, signature, *args):
        obj = self.bus.get_object('org.needled', path, introspect=False)
        return getattr(obj, method)(*args, dbus_interface=iface, signature=signature)

    def test_wrong_argument_types(self):
        pen = self.pen
        cases = [
            (pen, PEN_IFACE, 'SetDepth', 's', ('deep',)),
            (pen, PEN_IFACE, 'SetDepth', 'i', (1,)),
            (pen, PEN_IFACE, 'SetDepth', '', ()),
            (pen, PEN_IFACE, 'SetDepth', 'dd', (1.0, 1.0)),
            (pen, PEN_IFACE, 'SetSpeed', 'u', (100,)),
            (pen, PEN_IFACE, 'LoadProfile', 'i', (42,)),
            (pen, PEN_IFACE, 'LoadProfileData', 'ay', (b'name: x',)),
            (pen, PEN_IFACE, 'Start', 's', ('now',)),
            (pen, PEN_IFACE, 'Start', 'a{ss}', ({'label': 'x'},)),
            (pen, PEN_IFACE, 'Stop', 's', ('please',)),
            (pen, PEN_IFACE, 'Pause', 'b', (True,)),
            (MANAGER_PATH, MANAGER_IFACE, 'ValidateProfile', 'i', (1,)),
            (MANAGER_PATH, MANAGER_IFACE, 'ValidateProfile', 'ss', ('a', 'b')),
            (MANAGER_PATH, MANAGER_IFACE, 'GetHistory', 's', ('all',)),
            (MANAGER_PATH, MANAGER_IFACE, 'GetHistory', 'a{ss}', ({'pen': 'x'},)),
            (MANAGER_PATH, MANAGER_IFACE, 'GetCartridge', 'u', (1,)),
            (MANAGER_PATH, MANAGER_IFACE, 'ReloadLimits', 's', ('now',)),
            (MANAGER_PATH, SIM_IFACE, 'InsertCartridge', 'ssu', (pen, 'X', 12)),
            (MANAGER_PATH, SIM_IFACE, 'SetBattery', 'oi', (pen, -5)),
            (MANAGER_PATH, SIM_IFACE, 'InjectFault', 'o', (pen,)),
            (MANAGER_PATH, SIM_IFACE, 'AddPen', 'a{ss}', ({'serial': 'X'},)),
            (MANAGER_PATH, SIM_IFACE, 'RemovePen', 's', (pen,)),
        ]
        for path, iface, method, sig, args in cases:
            with self.subTest(method=method, signature=sig):
                with self.assertRaises(dbus.exceptions.DBusException) as cm:
                    self.raw_call(path, iface, method, sig, *args)
                self.assertIn(cm.exception.get_dbus_name(), SIGNATURE_ERRORS, cm.exception.get_dbus_message())
        self.assertUnchanged()
        self.assertIn(pen, self.mprop('Pens'))

    def test_non_finite_and_huge_set_points(self):
        for method in ('SetDepth', 'SetSpeed'):
            for value in (float('nan'), float('inf'), float('-inf'), -float('nan')):
                with self.subTest(method=method, value=value):
                    self.assertDBusError(INVALID_ARGS, self.pen_call, self.pen, method, value)
            for value in HUGE_DOUBLES:
                with self.subTest(method=method, value=value):
                    self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, self.pen, method, value)
        self.assertUnchanged()

    def test_huge_strings(self):
        big = profile_yaml(extra='notes: "' + 'x' * MIB + '"\n')
        msg = self.assertDBusError(INVALID_ARGS, self.mgr, 'ValidateProfile', big)
        self.assertLess(len(msg), 2000, 'the message does not echo the text')
        # Over the contract's 64 KiB bound, even when the YAML would be valid.
        over = profile_yaml(extra='notes: "' + 'x' * (64 * 1024) + '"\n')
        self.assertDBusError(INVALID_ARGS, self.mgr, 'ValidateProfile', over)
        # Arguments are checked before state: oversized is InvalidArgs even while running.
        self.assertDBusError(INVALID_ARGS, self.pen_call, self.pen, 'LoadProfileData', big)
        self.pen_call(self.pen, 'Stop')
        idle = self.snapshot(self.pen)
        for text in (big, over, 'x' * MIB, '#' * MIB, '[' * (64 * 1024 - 1)):
            with self.subTest(size=len(text)):
                with self.assertRaises(dbus.exceptions.DBusException) as cm:
                    self.pen_call(self.pen, 'LoadProfileData', text)
                self.assertIn(cm.exception.get_dbus_name(), (INVALID_ARGS, ERR + 'InvalidProfile'))
                self.assertLess(len(cm.exception.get_dbus_message()), 4000)
                self.assertEqual(self.snapshot(self.pen), idle)
        for name in ('x' * MIB, 'a/../../etc/passwd', '.', '..', '\x01\x02'):
            with self.subTest(profile_name=name[:20]):
                with self.assertRaises(dbus.exceptions.DBusException) as cm:
                    self.pen_call(self.pen, 'LoadProfile', name)
                self.assertIn(cm.exception.get_dbus_name(), (INVALID_ARGS, ERR + 'UnknownProfile'))
        self.assertDBusError(INVALID_ARGS, self.mgr, 'GetCartridge', 'x' * MIB)
        self.assertEqual(self.snapshot(self.pen), idle)
        self.ping()

    def test_hostile_yaml(self):
        with open(source_path('tests', 'data', 'profile-alias-bomb.yaml'), encoding='utf-8') as f:
            bomb = f.read()
        for text in (bomb, '[' * 10000, '{a: ' * 5000, '&a [*a]', 'name: !!python/object:os.system x\n',
                     '\ufeffname: x\n', 'name: "\\u0000"\n', '%YAML 9.9\n---\nname: x\n', '--- 1\n--- 2\n'):
            with self.subTest(text=text[:30]):
                got = unwrap(self.mgr('ValidateProfile', text))
                self.assertTrue(got, 'a violation, not valid')
                for field, code, message in got:
                    self.assertRegex(code, r'^[a-z]+(-[a-z]+)*$')
                    self.assertLess(len(message), 4000)
        self.assertUnchanged()

    def test_start_options(self):
        self.pen_call(self.pen, 'Stop')
        # setUp's session used its cartridge up: a fresh one.
        self.sim('EjectCartridge', dbus.ObjectPath(self.pen))
        self.sim('InsertCartridge', dbus.ObjectPath(self.pen), f'GARBAGE-{self.cartridges}-B', dbus.UInt32(12))
        self.pen_call(self.pen, 'LoadProfileData', profile_yaml())
        armed = self.snapshot(self.pen)
        bad = [
            {'lable': 'typo'},
            {'label': dbus.UInt32(5)},
            {'label': dbus.Array(['a'], signature='s')},
            {'label': 'x' * 129},            # the contract's bound: 128 bytes
            {'label': 'x' * MIB},
            {'label': 'line\nbreak'},
            {'label': 'bell\x07'},
            {'label': 'esc\x1b[31m'},
            {'label': 'del\x7f'},
            {'': 'empty key'},
            {'x' * 10000: 'huge key'},
        ]
        for options in bad:
            with self.subTest(options=repr(options)[:50]):
                msg = self.assertDBusError(INVALID_ARGS, self.pen_call, self.pen, 'Start',
                                           dbus.Dictionary(options, signature='sv'))
                self.assertLess(len(msg), 1000)
                self.assertEqual(self.snapshot(self.pen), armed)
        self.assertEqual(self.pprop(self.pen, 'Cartridge')['state'], 'fresh', 'a refused start used nothing up')
        # The longest label the contract allows, in UTF-8.
        label = 'é' * 64
        self.assertEqual(len(label.encode()), 128)
        sid = str(self.pen_call(self.pen, 'Start', dbus.Dictionary({'label': label}, signature='sv')))
        self.assertEqual(self.pprop(self.pen, 'SessionId'), sid)
        self.polkit.set_allowed(['org.needled1.read-history'])
        h = [h for h in unwrap(self.mgr('GetHistory', EMPTY_SV)) if h['id'] == sid][0]
        self.assertEqual(h['label'], label)

    def test_history_filters(self):
        for bad in ({'pen': dbus.Array([], signature='s')}, {'since': dbus.Int64(-1)}, {'limit': dbus.UInt64(2**32)},
                    {'limit': -1}, {'since': 1.5}, {'x' * 10000: 1}, {'pen': 'ok', 'bogus': True}):
            with self.subTest(filter=repr(bad)[:50]):
                self.assertDBusError(INVALID_ARGS, self.mgr, 'GetHistory', dbus.Dictionary(bad, signature='sv'))
        self.assertUnchanged()

    def test_read_only_properties(self):
        for iface, path, prop, value in ((PEN_IFACE, self.pen, 'State', 'idle'),
                                         (PEN_IFACE, self.pen, 'DepthMm', 2.5),
                                         (PEN_IFACE, self.pen, 'SessionId', ''),
                                         (MANAGER_IFACE, MANAGER_PATH, 'LimitsState', 'ok'),
                                         (PEN_IFACE, self.pen, 'NoSuchProperty', 1)):
            with self.subTest(prop=prop):
                with self.assertRaises(dbus.exceptions.DBusException):
                    self.call(path, PROPS_IFACE, 'Set', iface, prop, value)
        with self.assertRaises(dbus.exceptions.DBusException):
            self.call(self.pen, PROPS_IFACE, 'Get', 'org.needled1.NoSuchInterface', 'State')
        with self.assertRaises(dbus.exceptions.DBusException):
            self.call(self.pen, PEN_IFACE, 'SelfDestruct')
        self.assertUnchanged()

    def test_too_many_telemetry_readers(self):
        fds = []
        try:
            for _ in range(64):
                fds.append(self.pen_call(self.pen, 'OpenTelemetry').take())
            self.assertDBusError('org.freedesktop.DBus.Error.LimitsExceeded', self.pen_call, self.pen,
                                 'OpenTelemetry')
        finally:
            for fd in fds:
                os.close(fd)
        self.assertUnchanged()
        # The closed readers are forgotten: a new one can be opened.
        self.ping()
        os.close(self.pen_call(self.pen, 'OpenTelemetry').take())


if __name__ == '__main__':
    main()
