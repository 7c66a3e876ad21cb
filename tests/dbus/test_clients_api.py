#!/usr/bin/python3
"""The API as real client stacks use it (issue 14): integers of any D-Bus integer type, pens found
by serial, removed pens answering UnknownPen, the Manager in GetManagedObjects, telemetry only to
watchers, the telemetry pipe."""

import dbus

from needled_testlib import (ERR, INVALID_ARGS, MANAGER_IFACE, MANAGER_PATH, NeedledTestCase, main, unwrap)

SIGNED_AND_UNSIGNED = [dbus.Byte, dbus.Int16, dbus.UInt16, dbus.Int32, dbus.UInt32, dbus.Int64, dbus.UInt64]


def opts(**kw):
    return dbus.Dictionary(kw, signature='sv')


class LiberalIntegers(NeedledTestCase):

    def test_add_pen_takes_every_integer_type(self):
        for n, kind in enumerate(SIGNED_AND_UNSIGNED):
            with self.subTest(type=kind.__name__):
                pen = self.add_pen(serial=f'INT-{n}', battery_percent=kind(60), telemetry_rate_hz=kind(200))
                self.assertEqual(self.pprop(pen, 'TelemetryRateHz'), 200)
                self.assertLessEqual(self.pprop(pen, 'BatteryPercent'), 60)

    def test_out_of_range_is_the_same_clear_error_for_every_type(self):
        before = self.mprop('Pens')
        for kind, value in [(dbus.Int32, -1), (dbus.Int64, -(2**40)), (dbus.Int16, 101), (dbus.UInt64, 2**63),
                            (dbus.Byte, 101), (dbus.UInt32, 101)]:
            with self.subTest(type=kind.__name__, value=value):
                self.assertDBusError(INVALID_ARGS, self.sim, 'AddPen', opts(battery_percent=kind(value)),
                                     message_contains=['battery_percent', f'is {value}', '0 to 100'])
        self.assertDBusError(INVALID_ARGS, self.sim, 'AddPen', opts(battery_percent=dbus.Double(50.0)),
                             message_contains='must be an integer')
        self.assertDBusError(INVALID_ARGS, self.sim, 'AddPen', opts(telemetry_rate_hz=dbus.Int32(0)),
                             message_contains='is 0; 1 to 1000')
        self.assertEqual(self.mprop('Pens'), before)

    def test_history_filter_takes_every_integer_type(self):
        for kind in SIGNED_AND_UNSIGNED:
            with self.subTest(type=kind.__name__):
                self.mgr('GetHistory', opts(limit=kind(5), since=kind(0)))
        self.assertDBusError(INVALID_ARGS, self.mgr, 'GetHistory', opts(limit=dbus.Int32(-5)),
                             message_contains=['limit', 'is -5'])
        self.assertDBusError(INVALID_ARGS, self.mgr, 'GetHistory', opts(limit=dbus.UInt64(2**32)),
                             message_contains=['limit', 'is 4294967296', '0 to 4294967295'])
        self.assertDBusError(INVALID_ARGS, self.mgr, 'GetHistory', opts(since='yesterday'),
                             message_contains='must be an integer')


class Lookup(NeedledTestCase):

    def test_find_pen_by_serial(self):
        # A leading digit: sd-bus and GLib escape it differently, so clients must not build paths.
        pen = self.add_pen(serial='1ST-PEN')
        self.assertEqual(str(self.mgr('FindPen', '1ST-PEN')), pen)
        self.assertDBusError(ERR + 'UnknownPen', self.mgr, 'FindPen', '1st-pen', message_contains='1st-pen')
        self.assertDBusError(INVALID_ARGS, self.mgr, 'FindPen', '')
        self.assertDBusError(INVALID_ARGS, self.mgr, 'FindPen', 'x' * 65)
        self.sim('RemovePen', dbus.ObjectPath(pen))
        self.assertDBusError(ERR + 'UnknownPen', self.mgr, 'FindPen', '1ST-PEN')

    def test_removed_pen_path_answers_unknown_pen(self):
        pen = self.add_pen(serial='GONE-1')
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.sim('RemovePen', dbus.ObjectPath(pen))
        for call in (lambda: self.pprop(pen, 'State'), lambda: self.pen_call(pen, 'Stop'),
                     lambda: self.pen_call(pen, 'OpenTelemetry'),
                     lambda: self.call(pen, 'org.freedesktop.DBus.Properties', 'GetAll', 'org.needled1.Pen')):
            self.assertDBusError(ERR + 'UnknownPen', call, message_contains=pen)
        self.assertDBusError(ERR + 'UnknownPen', self.pen_call, '/org/needled/pen/NEVER', 'Stop')
        # The pens' parent still introspects; the Manager still answers.
        self.assertIn('<node', self.fixture.introspect('/org/needled/pen'))
        self.assertEqual(self.mprop('Pens'), [])

    def test_manager_is_a_managed_object(self):
        pen = self.add_pen(serial='OM-2')
        objects = unwrap(self.call(MANAGER_PATH, 'org.freedesktop.DBus.ObjectManager', 'GetManagedObjects'))
        self.assertIn(MANAGER_PATH, objects)
        self.assertEqual(objects[MANAGER_PATH][MANAGER_IFACE]['Pens'], [pen])
        self.assertIn('org.needled1.Simulator', objects[MANAGER_PATH])
        self.assertIn(pen, objects)
        # Introspection of /org/needled still lists only the pen subtree as a child.
        xml = self.fixture.introspect(MANAGER_PATH)
        self.assertNotIn('<node name=""', xml)
        self.assertIn('<node name="pen"/>', xml)


if __name__ == '__main__':
    main()
