#!/usr/bin/python3
"""The API as real client stacks use it (issue 14): integers of any D-Bus integer type, pens found
by serial, removed pens answering UnknownPen, the Manager in GetManagedObjects, telemetry only to
watchers, the telemetry pipe."""

import dbus

from needled_testlib import (ERR, INVALID_ARGS, MANAGER_IFACE, MANAGER_PATH, NeedledTestCase, main)

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


if __name__ == '__main__':
    main()
