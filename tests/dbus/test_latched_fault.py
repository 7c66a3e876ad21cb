#!/usr/bin/python3
"""A fault the pen itself has latched is a fault in every state (issue 12, item 5): an idle or
armed pen whose firmware latched a fault shows State fault and its code in Fault; arming and
starting are refused with org.needled1.Error.Fault without touching the ledger (no session, the
cartridge as it was); the fault clears like any other once its cause is gone. And a start that the
pen itself refuses is not a session: Start fails with Fault, the pen stays armed, the cartridge is
as it was, nothing announces a session, the trail records the voided attempt and verifies."""

import os
import sqlite3

import dbus

from needledtest import (ERR, PEN_IFACE, PROPS_IFACE, NeedledTestCase, SignalLog, main, profile_yaml, pump,
                         unwrap, wait_until)

EMPTY_SV = dbus.Dictionary({}, signature='sv')
# The simulated pen latches over-temperature at 45 °C; injected heat rises 10 °C/s from ~30 °C.
LATCH_TIMEOUT_S = 10


class LedgerChecks:
    """What the ledger says of a pen and a cartridge, through the contract."""

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


class LatchedFault(LedgerChecks, NeedledTestCase):

    def latch_over_temperature(self, pen):
        self.sim('InjectFault', dbus.ObjectPath(pen), 'over-temperature')
        self.wait_state(pen, 'fault', LATCH_TIMEOUT_S)
        self.assertEqual(self.pprop(pen, 'Fault'), 'over-temperature')

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



class RefusedStart(LedgerChecks, NeedledTestCase):
    """The simulated pen's "refuse-start" makes it answer MOTOR_START with a STALL (as a pen does
    with a fault bit set or no cartridge), with no fault bit the daemon could see first."""

    def audit_entries(self, action):
        db = os.path.join(self.state_dir, 'ledger.sqlite')
        with sqlite3.connect(f'file:{db}?mode=ro', uri=True) as conn:
            return conn.execute('SELECT object, detail FROM audit WHERE action = ? ORDER BY seq', (action,)).fetchall()

    def test_a_start_the_pen_refuses_is_not_a_session(self):
        pen = self.add_pen(serial='REFUSE-1', cartridge=('REFUSE-C1', 12))
        self.arm(pen)
        cartridge_before = unwrap(self.pprop(pen, 'Cartridge'))
        self.assertEqual(cartridge_before['state'], 'fresh')
        tel = self.telemetry(pen)
        changes = SignalLog(self.bus, 'PropertiesChanged', PROPS_IFACE, pen)
        self.addCleanup(changes.remove)
        ended = self.ended_log(pen)
        self.addCleanup(ended.remove)
        recorded = SignalLog(self.bus, 'SessionRecorded', PEN_IFACE, pen)
        self.addCleanup(recorded.remove)
        begins_before = len(self.audit_entries('session-begin'))

        self.sim('InjectFault', dbus.ObjectPath(pen), 'refuse-start')
        start = tel.mark()
        msg = self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertIn('the pen refused', msg)
        self.assertIn('no session was started', msg)
        self.assertIn('REFUSE-C1', msg)
        self.assertNotIn('start-failed', msg)

        # The pen as it was: armed, not in fault, no session, the cartridge unchanged.
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.assertEqual(self.pprop(pen, 'Fault'), '')
        self.assertEqual(self.pprop(pen, 'SessionId'), '')
        self.assertEqual(unwrap(self.pprop(pen, 'Cartridge')), cartridge_before)
        self.assert_cartridge_untouched(pen, 'REFUSE-C1')
        self.assertEqual(self.history_of('REFUSE-1'), [])
        self.assert_motor_never_ran(tel, start)

        # Nothing that reached clients shows a session: no SessionEnded, no SessionRecorded, no
        # SessionId, no state but armed, no cartridge but fresh.
        pump(0.5)
        self.assertEqual(ended.items, [])
        self.assertEqual(recorded.items, [])
        for _, (iface, changed, _) in changes.items:
            if iface != PEN_IFACE:
                continue
            self.assertNotIn('SessionId', changed, changed)
            self.assertEqual(changed.get('State', 'armed'), 'armed', changed)
            self.assertEqual(changed.get('Fault', ''), '', changed)
            if 'Cartridge' in changed:
                self.assertEqual(changed['Cartridge']['state'], 'fresh', changed)

        # The trail keeps the attempt: its begin, then its void naming why; and it verifies.
        begins = self.audit_entries('session-begin')
        self.assertEqual(len(begins), begins_before + 1)
        voids = self.audit_entries('session-void')
        self.assertEqual([v[0] for v in voids], [begins[-1][0]])
        self.assertIn('cartridge=REFUSE-C1 cartridge-state=fresh', voids[0][1])
        self.assertIn('the pen refused the command', voids[0][1])
        self.audit_verify()

        # Once the pen accepts, the same single-use cartridge starts: a session like any other.
        self.sim('InjectFault', dbus.ObjectPath(pen), 'clear')
        sid = str(self.pen_call(pen, 'Start', EMPTY_SV))
        self.assertNotEqual(sid, voids[0][0])
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        changes.wait_for(lambda i: i[1][0] == PEN_IFACE and i[1][1].get('SessionId') == sid, 5,
                         'SessionId announced')
        self.pen_call(pen, 'Stop')
        self.wait_state(pen, 'idle')
        self.assertEqual(self.wait_ended(ended, sid), 'stopped')
        self.assertEqual([str(h['id']) for h in self.history_of('REFUSE-1')], [sid])
        self.assertEqual(str(self.mgr('GetCartridge', 'REFUSE-C1')['state']), 'spent')
        self.audit_verify()

    def test_a_resume_the_pen_refuses_leaves_the_session_paused(self):
        pen = self.add_pen(serial='REFUSE-2', cartridge=('REFUSE-C2', 12))
        sid = self.start_session(pen)
        self.pen_call(pen, 'Pause')
        self.assertEqual(self.pprop(pen, 'State'), 'paused')
        self.sim('InjectFault', dbus.ObjectPath(pen), 'refuse-start')
        msg = self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'Resume')
        self.assertIn('stays paused', msg)
        self.assertEqual(self.pprop(pen, 'State'), 'paused')
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        self.sim('InjectFault', dbus.ObjectPath(pen), 'clear')
        self.pen_call(pen, 'Resume')
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        ended = self.ended_log(pen)
        self.addCleanup(ended.remove)
        self.pen_call(pen, 'Stop')
        self.assertEqual(self.wait_ended(ended, sid), 'stopped')
        self.audit_verify()


if __name__ == '__main__':
    main()
