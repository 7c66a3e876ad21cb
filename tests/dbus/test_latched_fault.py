#!/usr/bin/python3
"""A fault the pen itself has latched is a fault in every state (issue 12, item 5): an idle or
armed pen whose firmware latched a fault shows State fault and its code in Fault; arming and
starting are refused with org.needled1.Error.Fault without touching the ledger (no session, the
cartridge as it was); the fault clears like any other once its cause is gone."""

import dbus

from needledtest import ERR, NeedledTestCase, main, profile_yaml, wait_until

EMPTY_SV = dbus.Dictionary({}, signature='sv')
# The simulated pen latches over-temperature at 45 °C; injected heat rises 10 °C/s from ~30 °C.
LATCH_TIMEOUT_S = 10


class LatchedFault(NeedledTestCase):

    def latch_over_temperature(self, pen):
        self.sim('InjectFault', dbus.ObjectPath(pen), 'over-temperature')
        self.wait_state(pen, 'fault', LATCH_TIMEOUT_S)
        self.assertEqual(self.pprop(pen, 'Fault'), 'over-temperature')

    def history_of(self, serial):
        return [h for h in self.mgr('GetHistory', EMPTY_SV) if str(h['pen']) == serial]

    def assert_cartridge_untouched(self, pen, cartridge_id):
        cart = self.pprop(pen, 'Cartridge')
        self.assertEqual(str(cart['state']), 'fresh')
        self.assertEqual(int(cart['runtime_s']), 0)
        # The ledger has never seen it (an error naming it unknown), or holds it fresh and unused.
        try:
            info = self.mgr('GetCartridge', cartridge_id)
            self.assertEqual(str(info['state']), 'fresh', info)
            self.assertEqual(int(info['sessions']), 0, info)
        except dbus.exceptions.DBusException as e:
            self.assertTrue(e.get_dbus_name().startswith(ERR), e.get_dbus_name())

    def test_idle_pen_with_a_latched_fault_is_in_fault(self):
        pen = self.add_pen(serial='LATCH-IDLE', cartridge=('LATCH-C1', 12))
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.latch_over_temperature(pen)
        self.assertGreater(self.pprop(pen, 'TemperatureC'), 43.0)
        msg = self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'LoadProfileData', profile_yaml())
        self.assertIn('over-temperature', msg)
        self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertEqual(self.pprop(pen, 'State'), 'fault')
        self.assertEqual(dict(self.pprop(pen, 'Profile')), {})
        self.assertEqual(self.history_of('LATCH-IDLE'), [])
        self.assert_cartridge_untouched(pen, 'LATCH-C1')

    def test_armed_pen_with_a_latched_fault_refuses_to_start(self):
        pen = self.add_pen(serial='LATCH-ARMED', cartridge=('LATCH-C2', 12))
        self.arm(pen)
        self.latch_over_temperature(pen)
        msg = self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertIn('over-temperature', msg)
        self.assertNotIn('start-failed', msg)
        self.assertEqual(self.pprop(pen, 'State'), 'fault')
        self.assertEqual(self.pprop(pen, 'Fault'), 'over-temperature')
        self.assertEqual(self.pprop(pen, 'SessionId'), '')
        self.assertEqual(self.history_of('LATCH-ARMED'), [])
        self.assert_cartridge_untouched(pen, 'LATCH-C2')

    def test_latched_fault_clears_once_its_cause_is_gone(self):
        pen = self.add_pen(serial='LATCH-CLEAR', cartridge=('LATCH-C3', 12))
        self.latch_over_temperature(pen)
        self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'ClearFault')
        self.sim('InjectFault', dbus.ObjectPath(pen), 'clear')
        self.wait_pen_prop(pen, 'TemperatureC', lambda v: v < 41, 10, 'cooling down')

        def cleared():
            try:
                self.pen_call(pen, 'ClearFault')
                return True
            except dbus.exceptions.DBusException as e:
                if e.get_dbus_name() != ERR + 'Fault':
                    raise
                return False
        wait_until(cleared, 5, 'ClearFault to succeed')
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.assertEqual(self.pprop(pen, 'Fault'), '')
        # It stays idle (the pen's bits are gone), and now arms and starts on the same cartridge.
        self.arm(pen)
        sid = str(self.pen_call(pen, 'Start', EMPTY_SV))
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.pen_call(pen, 'Stop')
        self.wait_state(pen, 'idle')
        self.assertEqual([str(h['id']) for h in self.history_of('LATCH-CLEAR')], [sid])


if __name__ == '__main__':
    main()
