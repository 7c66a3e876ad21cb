#!/usr/bin/python3
"""org.needled1.Simulator with good and bad arguments, every injectable fault seen through the
Pen interface, and the ObjectManager on /org/needled (GetManagedObjects, InterfacesAdded,
InterfacesRemoved). Also: the Simulator does not exist without --simulate."""

import dbus

from needledtest import (ERR, INVALID_ARGS, MANAGER_PATH, OM_IFACE, PEN_IFACE, SIM_IFACE,
                         UNKNOWN_INTERFACE, UNKNOWN_METHOD, UNKNOWN_OBJECT, NeedledTestCase,
                         SignalLog, main, unwrap, wait_until)

EMPTY_SV = dbus.Dictionary({}, signature='sv')
NOWHERE = dbus.ObjectPath('/org/needled/pen/NOWHERE')
# fault injected -> the Fault code (and SessionEnded "fault:CODE") the daemon reports
FAULTS = {
    'over-temperature': 'over-temperature',
    'motor-stall': 'motor-stall',
    'over-current': 'over-current',
    'depth-deviation': 'depth-deviation',
    'unresponsive': 'heartbeat-lost',
    'corrupt-telemetry': 'telemetry-corrupt',
}


def opts(**kw):
    return dbus.Dictionary(kw, signature='sv')


class Simulator(NeedledTestCase):

    def test_add_pen_options(self):
        pen = self.add_pen(serial='OPT-1', model='Model X', firmware_version='2.0.1',
                           battery_percent=dbus.UInt32(55), telemetry_rate_hz=dbus.UInt32(250))
        p = self.get_all(pen, PEN_IFACE)
        self.assertEqual((p['Serial'], p['Model'], p['FirmwareVersion'], p['TelemetryRateHz']),
                         ('OPT-1', 'Model X', '2.0.1', 250))
        self.wait_pen_prop(pen, 'BatteryPercent', lambda v: 53 <= v <= 55)
        self.assertEqual(p['Cartridge']['state'], 'none')

    def test_add_pen_bad_options(self):
        self.add_pen(serial='DUP-1')
        before = self.mprop('Pens')
        bad = [
            opts(colour='red'),
            opts(serial=dbus.UInt32(5)),
            opts(battery_percent='full'),
            opts(battery_percent=dbus.Int32(-1)),
            opts(battery_percent=dbus.UInt32(101)),
            opts(telemetry_rate_hz=dbus.UInt32(0)),
            opts(telemetry_rate_hz=dbus.UInt32(10**6)),
            opts(serial='DUP-1'),
            opts(serial=''),
            opts(serial='has space'),
            opts(serial='x' * 10000),
            opts(serial='ctl\x01char'),
            opts(model='m' * 10000),
            opts(firmware_version=''),
        ]
        for o in bad:
            with self.subTest(options=str(dict(o))[:60]):
                self.assertDBusError(INVALID_ARGS, self.sim, 'AddPen', o)
        self.assertEqual(self.mprop('Pens'), before)

    def test_remove_pen(self):
        self.assertDBusError(UNKNOWN_OBJECT, self.sim, 'RemovePen', NOWHERE)
        self.assertDBusError(UNKNOWN_OBJECT, self.sim, 'RemovePen', dbus.ObjectPath('/'))
        pen = self.add_pen()
        self.sim('RemovePen', dbus.ObjectPath(pen))
        self.assertNotIn(pen, self.mprop('Pens'))
        self.assertDBusError(UNKNOWN_OBJECT, self.sim, 'RemovePen', dbus.ObjectPath(pen))

    def test_cartridges(self):
        pen = dbus.ObjectPath(self.add_pen())
        self.assertDBusError(UNKNOWN_OBJECT, self.sim, 'InsertCartridge', NOWHERE, 'C', dbus.UInt32(12))
        self.assertDBusError(INVALID_ARGS, self.sim, 'InsertCartridge', pen, '', dbus.UInt32(12))
        self.assertDBusError(INVALID_ARGS, self.sim, 'InsertCartridge', pen, 'C-0', dbus.UInt32(0))
        self.assertDBusError(INVALID_ARGS, self.sim, 'InsertCartridge', pen, 'x' * 1000, dbus.UInt32(12))
        self.assertDBusError(ERR + 'NoCartridge', self.sim, 'EjectCartridge', pen)
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'none')
        self.sim('InsertCartridge', pen, 'SIM-CART-1', dbus.UInt32(12))
        self.assertEqual(self.pprop(pen, 'Cartridge')['id'], 'SIM-CART-1')
        self.assertDBusError(ERR + 'WrongState', self.sim, 'InsertCartridge', pen, 'SIM-CART-2', dbus.UInt32(12))
        self.assertEqual(self.pprop(pen, 'Cartridge')['id'], 'SIM-CART-1')
        # Locked while a session runs.
        sid = self.start_session(pen)
        self.assertDBusError(ERR + 'WrongState', self.sim, 'EjectCartridge', pen)
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        self.pen_call(pen, 'Stop')
        self.sim('EjectCartridge', pen)
        self.assertEqual(self.pprop(pen, 'Cartridge'), {'id': '', 'needles': 0, 'state': 'none', 'runtime_s': 0})
        self.assertDBusError(UNKNOWN_OBJECT, self.sim, 'EjectCartridge', NOWHERE)

    def test_battery(self):
        pen = dbus.ObjectPath(self.add_pen())
        self.sim('SetBattery', pen, dbus.UInt32(42))
        self.wait_pen_prop(pen, 'BatteryPercent', lambda v: v == 42)
        self.assertDBusError(INVALID_ARGS, self.sim, 'SetBattery', pen, dbus.UInt32(101))
        self.assertDBusError(INVALID_ARGS, self.sim, 'SetBattery', pen, dbus.UInt32(2**32 - 1))
        self.assertDBusError(UNKNOWN_OBJECT, self.sim, 'SetBattery', NOWHERE, dbus.UInt32(50))
        self.wait_pen_prop(pen, 'BatteryPercent', lambda v: v <= 42)

    def test_pen_counters(self):
        pen = dbus.ObjectPath(self.add_pen())

        def counters():
            c = unwrap(self.sim('GetPenCounters', pen))
            self.assertEqual(set(c), {'samples_produced', 'samples_sent', 'samples_dropped', 'samples_queued',
                                      'next_sequence'})
            # every sample measured was sent, dropped or is still queued
            self.assertEqual(c['samples_produced'], c['samples_sent'] + c['samples_dropped'] + c['samples_queued'])
            return c

        first = counters()

        def measured_and_sent():
            c = counters()
            return c['samples_sent'] > first['samples_sent'] + 2 and c['next_sequence'] > first['next_sequence'] + 2

        # it measures and sends on (what it sends may have been queued before the first read)
        wait_until(measured_and_sent, 10, 'the pen measuring and sending telemetry')
        # An unresponsive pen measures on but sends nothing: what it measures is dropped, and said so.
        self.sim('InjectFault', pen, 'unresponsive')
        before = counters()
        wait_until(lambda: counters()['samples_dropped'] > before['samples_dropped'] + 2, 10,
                   'the unresponsive pen dropping samples')
        self.assertEqual(counters()['samples_sent'], before['samples_sent'])
        self.assertDBusError(UNKNOWN_OBJECT, self.sim, 'GetPenCounters', NOWHERE)

    def test_inject_fault_bad_arguments(self):
        pen = dbus.ObjectPath(self.add_pen())
        for name in ('', 'meltdown', 'OVER-TEMPERATURE', 'over-temperature ', 'x' * 100000):
            with self.subTest(fault=name[:30]):
                msg = self.assertDBusError(INVALID_ARGS, self.sim, 'InjectFault', pen, name)
                self.assertLess(len(msg), 1000)
        self.assertDBusError(UNKNOWN_OBJECT, self.sim, 'InjectFault', NOWHERE, 'clear')
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.sim('InjectFault', pen, 'clear')   # nothing to clear: fine
        self.assertEqual(self.pprop(pen, 'State'), 'idle')

    def test_every_fault_stops_a_session(self):
        pens = {}
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE)
        for i, fault in enumerate(FAULTS):
            pen = self.add_pen(serial=f'FAULT-{i}', cartridge=(f'FAULT-CART-{i}', 12),
                               telemetry_rate_hz=dbus.UInt32(250))
            pens[fault] = (pen, self.start_session(pen))
        for fault, (pen, _) in pens.items():
            self.sim('InjectFault', dbus.ObjectPath(pen), fault)
        for fault, (pen, sid) in pens.items():
            with self.subTest(fault=fault):
                item = ended.wait_for(lambda i, sid=sid: i[1][0] == sid, 10, f'SessionEnded after {fault}')
                self.assertEqual(item, (pen, (sid, 'fault:' + FAULTS[fault])))
                self.assertEqual(self.pprop(pen, 'State'), 'fault')
                self.assertEqual(self.pprop(pen, 'Fault'), FAULTS[fault])
                self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'Start', EMPTY_SV)


class ObjectManager(NeedledTestCase):

    def managed(self):
        return unwrap(self.call(MANAGER_PATH, OM_IFACE, 'GetManagedObjects'))

    def test_managed_objects_and_signals(self):
        added = SignalLog(self.bus, 'InterfacesAdded', OM_IFACE, MANAGER_PATH)
        removed = SignalLog(self.bus, 'InterfacesRemoved', OM_IFACE, MANAGER_PATH)
        self.assertEqual({p for p in self.managed() if p.startswith('/org/needled/pen/')}, set())
        pen = self.add_pen(serial='OM-1', cartridge=('OM-CART', 12))
        item = added.wait_for(lambda i: i[1][0] == pen, 5, 'InterfacesAdded')
        self.assertIn(PEN_IFACE, item[1][1])
        self.assertEqual(item[1][1][PEN_IFACE]['Serial'], 'OM-1')
        objects = self.managed()
        self.assertIn(pen, objects)
        props = objects[pen][PEN_IFACE]
        self.assertEqual(props['Serial'], 'OM-1')
        self.assertEqual(props['Cartridge']['id'], 'OM-CART')
        self.assertEqual(set(props), set(self.get_all(pen, PEN_IFACE)))
        for p in self.mprop('Pens'):
            self.assertIn(p, objects)
        self.sim('RemovePen', dbus.ObjectPath(pen))
        item = removed.wait_for(lambda i: i[1][0] == pen, 5, 'InterfacesRemoved')
        self.assertIn(PEN_IFACE, item[1][1])
        self.assertNotIn(pen, self.managed())


class NoSimulator(NeedledTestCase):
    """Without --simulate the Simulator interface does not exist and is not advertised."""

    daemon_args = []

    def test_no_simulator(self):
        self.assertNotIn('simulator', self.mprop('Features'))
        with self.assertRaises(dbus.exceptions.DBusException) as cm:
            self.sim('AddPen', EMPTY_SV)
        self.assertIn(cm.exception.get_dbus_name(), (UNKNOWN_METHOD, UNKNOWN_INTERFACE, UNKNOWN_OBJECT))
        xml = self.fixture.introspect(MANAGER_PATH)
        self.assertNotIn(SIM_IFACE, xml)


if __name__ == '__main__':
    main()
