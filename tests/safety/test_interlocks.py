#!/usr/bin/python3
"""Safety suite: the interlocks of daemon/pen.c against every limit field of formats.md, with
simulated pens (Simulator.InjectFault, SetBattery). Each fault test checks four things:
the daemon's verdict (State fault, Fault code), the session's end (SessionEnded fault:<code>),
the ledger (GetHistory reason, GetCartridge spent, audit chain intact) and the MOTOR: the pen's
own telemetry shows status bit 0 clear and the needles at rest, and where the pen has a backstop
of its own, that the motor stopped before that backstop latched (so the daemon's stop did it).
Arming, start and adjustments are checked against the limits too, and a refused start never
moves the motor."""

import dbus

from needledtest import (ERR, SafetyTestCase, limits_text, main, pump, running, sanitized,
                         timeout_multiplier, valgrind, wait_until)

# How long after the first sample beyond a limit the motor must be seen stopped (device time).
# The interlock acts on that very sample; the rest is the simulated pen's reaction to the stop
# command and one telemetry period, so a generous bound still catches a missing interlock.
STOP_WITHIN_MS = 60


def stop_bound_ms(extra_ms=0):
    return (STOP_WITHIN_MS + extra_ms) * timeout_multiplier()


def fast_run():
    """Timing against the pen's own backstops only means something without sanitizers/valgrind
    slowing the daemon down."""
    return not valgrind() and not sanitized()


def slow_before_stop_us(tel, stop, below_hz):
    """Device time from the first sample of the slow run that ends in the stop sample (not the
    spin-up at the session's start) to the stop."""
    i = stop
    while i > 0 and tel.samples[i - 1].speed_hz < below_hz:
        i -= 1
    assert i > 0, 'no sample at speed before the stall'
    return tel.samples[stop].device_us - tel.samples[i].device_us


class FaultsWhileRunning(SafetyTestCase):
    """Every Simulator fault, and every measured limit, while a session runs."""

    def run_fault(self, inject, code, violates, pen_fault=None, limits=None, stop_ms=None, profile=None,
                  fault_timeout_s=5):
        """Starts a session, calls inject(pen), and checks the whole chain. violates(sample) is the
        limit being crossed, seen in the pen's own samples."""
        self.start_needled(limits=limits)
        cart = f'CART-{code}'
        pen = self.add_pen(cartridge=(cart, 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen, label=f'safety-{code}', **(profile or {}))
        self.assert_motor_running(tel)
        mark = tel.mark()
        inject(pen)
        self.wait_state(pen, 'fault', fault_timeout_s)
        self.assertEqual(self.pprop(pen, 'Fault'), code)
        self.assertEqual(self.wait_ended(ended, sid), f'fault:{code}')
        self.assertEqual(self.pprop(pen, 'SessionId'), '')

        # The motor, seen from the pen.
        first_bad = tel.wait_first(violates, 2, f'a sample beyond the {code} limit', mark)
        stop = self.assert_motor_stops(tel, first_bad, within_ms=stop_ms or stop_bound_ms(),
                                       pen_fault=pen_fault if fast_run() else None)
        # From the last sample before the injection to the first one beyond the limit, the motor
        # ran: so the stop that followed was the interlock's (never an empty window: mark >= 1).
        self.assertGreaterEqual(mark, 1, 'no sample before the injection')
        self.assertTrue(all(running(s) for s in tel.samples[mark - 1:first_bad + 1]),
                        'the motor stopped before the fault: the test proves nothing')

        # The record.
        e = self.assert_recorded(sid, f'fault:{code}', cartridge=cart)
        self.assertEqual(e['label'], f'safety-{code}')
        self.audit_verify()
        # The fault stays until cleared: nothing can be armed or started meanwhile.
        self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'LoadProfileData', 'name: x\n')
        return pen, tel, stop

    def test_over_temperature_with_warning_first(self):
        # warn 30 °C: the injected heating (+10 °C/s) crosses the warning before the maximum;
        # the warning is a property only, the motor keeps running until 43 °C.
        limits = limits_text(warn_temperature_c=30, max_temperature_c=43)

        def inject(pen):
            self.assertEqual(self.pprop(pen, 'Warnings'), [])
            self.sim('InjectFault', dbus.ObjectPath(pen), 'over-temperature')
            wait_until(lambda: 'high-temperature' in self.pprop(pen, 'Warnings'), 3, 'Warnings high-temperature')
            if fast_run():   # 30 -> 43 °C takes 1.3 s: the warning comes while the motor still runs
                self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.run_fault(inject, 'over-temperature', lambda s: s.temperature_c > 43.0,
                       pen_fault='over-temperature', limits=limits)

    def test_over_current(self):
        self.run_fault(lambda pen: self.sim('InjectFault', dbus.ObjectPath(pen), 'over-current'),
                       'over-current', lambda s: s.current_ma > 1200, pen_fault='over-current')

    def test_motor_stall(self):
        # Speed falls to 5 % of the set 100 Hz: below 0.7 x 100 for 250 ms trips the interlock,
        # well before the pen's own backstop (25 % for 500 ms).
        _, tel, stop = self.run_fault(lambda pen: self.sim('InjectFault', dbus.ObjectPath(pen), 'motor-stall'),
                                      'motor-stall', lambda s: s.speed_hz < 70.0, pen_fault='motor-stall',
                                      stop_ms=stop_bound_ms(250))
        # Not before the stall time: a brief dip is not a stall.
        self.assertGreaterEqual(slow_before_stop_us(tel, stop, 70.0), 250_000 - 2_000)

    def test_motor_stall_time_is_a_limit_field(self):
        # stall_time_ms 100: the same stall trips sooner, but not before 100 ms.
        _, tel, stop = self.run_fault(lambda pen: self.sim('InjectFault', dbus.ObjectPath(pen), 'motor-stall'),
                                      'motor-stall', lambda s: s.speed_hz < 70.0,
                                      limits=limits_text(stall_time_ms=100), stop_ms=stop_bound_ms(100))
        slow_us = slow_before_stop_us(tel, stop, 70.0)
        self.assertGreaterEqual(slow_us, 100_000 - 2_000, 'tripped before the stall time of the limits')
        if fast_run():   # the daemon's reaction time only means something without valgrind/sanitizers
            self.assertLess(slow_us, 250_000 - 2_000, 'the default 250 ms stall time, not the limits\' 100 ms')

    def test_depth_deviation(self):
        # +0.6 mm measured: beyond the 0.15 mm tolerance at once, the pen's own backstop needs
        # 0.5 mm for 100 ms.
        self.run_fault(lambda pen: self.sim('InjectFault', dbus.ObjectPath(pen), 'depth-deviation'),
                       'depth-deviation', lambda s: abs(s.depth_mm - 1.0) > 0.15, pen_fault='depth-deviation')

    def test_depth_tolerance_is_a_limit_field(self):
        # With a 0.7 mm tolerance the injected +0.6 mm is within it: no trip from the daemon.
        self.start_needled(limits=limits_text(depth_tolerance_mm=0.7))
        pen = self.add_pen(cartridge=('CART-TOL', 12))
        tel = self.telemetry(pen)
        self.start_session(pen, depth_mm=0.5)
        self.assert_motor_running(tel)
        mark = tel.mark()
        self.sim('InjectFault', dbus.ObjectPath(pen), 'depth-deviation')
        tel.wait_first(lambda s: s.depth_mm > 1.0, 2, 'the deviated depth', mark)
        # Within 0.7 mm, but beyond the pen's own 0.5 mm backstop: the PEN stops itself after
        # 100 ms, and the daemon reports the pen's fault bit.
        self.wait_state(pen, 'fault')
        self.assertEqual(self.pprop(pen, 'Fault'), 'depth-deviation')
        i = tel.wait_first(lambda s: not running(s), 3, 'the motor stopped', mark)
        self.assertNotEqual(tel.samples[i].flags & (0x08 << 8), 0, 'the pen latched its own backstop')

    def test_low_battery(self):
        # 4 %: below the 5 % cut-off of the limits, above the pen's own 3 % backstop.
        self.run_fault(lambda pen: self.sim('SetBattery', dbus.ObjectPath(pen), dbus.UInt32(4)),
                       'low-battery', lambda s: s.battery < 5, pen_fault='low-battery')

    def test_corrupt_telemetry(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-CORRUPT', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen)
        self.assert_motor_running(tel)
        self.sim('InjectFault', dbus.ObjectPath(pen), 'corrupt-telemetry')
        self.wait_state(pen, 'fault')
        self.assertEqual(self.pprop(pen, 'Fault'), 'telemetry-corrupt')
        self.assertEqual(self.wait_ended(ended, sid), 'fault:telemetry-corrupt')
        # While corrupt, nothing reaches the clients; once the pen sends good packets again its
        # samples show the motor stopped, and stopped by the host's command: the watchdog bit is
        # clear because the daemon kept its heartbeat going.
        mark = tel.mark()
        self.sim('InjectFault', dbus.ObjectPath(pen), 'clear')
        i = tel.wait_first(lambda s: True, 3, 'telemetry again', mark)
        s = tel.samples[i]
        self.assertFalse(running(s), 'the motor still runs after telemetry-corrupt')
        self.assertEqual(s.flags & (0x10 << 8), 0, 'the pen watchdog had to stop the motor')
        self.assert_motor_stops(tel, i)
        self.assert_recorded(sid, 'fault:telemetry-corrupt', cartridge='CART-CORRUPT')
        self.audit_verify()
        # The condition is gone: the fault clears, and the spent cartridge cannot run again.
        self.pen_call(pen, 'ClearFault')
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.arm(pen)
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))
        self.assert_motor_never_ran(tel, tel.mark())

    def test_clear_fault_refused_while_the_condition_remains(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-HOT', 12))
        tel = self.telemetry(pen)
        self.start_session(pen)
        self.assert_motor_running(tel)
        self.sim('InjectFault', dbus.ObjectPath(pen), 'over-temperature')
        self.wait_state(pen, 'fault')
        self.assertEqual(self.pprop(pen, 'Fault'), 'over-temperature', self.daemon_log()[-2000:])
        # Still hot (the injected heat decays slowly): ClearFault says why not.
        self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'ClearFault', message_contains='°C')
        self.assertEqual(self.pprop(pen, 'State'), 'fault')
        stop = tel.wait_first(lambda s: not running(s), 3, 'the motor stopped', self.first_running(tel))
        self.assert_motor_never_ran(tel, stop)


class SessionAndCartridgeLimits(SafetyTestCase):

    def test_profile_duration_ends_the_session(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-DUR', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen, duration_s=1)
        self.assert_motor_running(tel)
        first = tel.first(running)
        self.assertEqual(self.wait_ended(ended, sid, 5), 'completed')
        stop = self.assert_motor_stops(tel, first)
        ran_s = (tel.samples[stop].device_us - tel.samples[first].device_us) / 1e6
        self.assertGreaterEqual(ran_s, 0.95)
        self.assertLessEqual(ran_s, 1.0 + 0.5 * timeout_multiplier())   # the 250 ms tick, plus slack
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        e = self.assert_recorded(sid, 'completed', cartridge='CART-DUR')
        self.assertGreaterEqual(e['duration_s'], 0.95)

    def test_duration_limits_refuse_longer_profiles(self):
        # Global and per-area maxima: a profile longer than either is refused when armed, and the
        # pen stays idle with the motor still.
        limits = limits_text(max_duration_s=60,
                             areas={'cheeks': {'max_depth_mm': 1.5, 'max_duration_s': 30},
                                    'neck': {'max_depth_mm': 1.0}})
        self.start_needled(limits=limits)
        pen = self.add_pen(cartridge=('CART-LONG', 12))
        tel = self.telemetry(pen)
        msg = self.assertDBusError(ERR + 'InvalidProfile', self.arm, pen, duration_s=31)
        self.assertIn('above-duration-max', msg)
        msg = self.assertDBusError(ERR + 'InvalidProfile', self.arm, pen, area='neck', duration_s=61)
        self.assertIn('above-duration-max', msg)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.arm(pen, duration_s=30)
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.assert_motor_never_ran(tel)

    def test_cartridge_runtime_across_sessions(self):
        # Reusable cartridges (single_use false) with a 2 s runtime: the first session uses 1 s,
        # the second is stopped by the interlock when the total reaches 2 s, and a third start is
        # refused.
        self.start_needled(limits=limits_text(single_use=False, max_runtime_s=2))
        pen = self.add_pen(cartridge=('CART-RT', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid1 = self.start_session(pen, duration_s=1)
        self.assertEqual(self.wait_ended(ended, sid1, 5), 'completed')
        self.assert_motor_stops(tel, self.first_running(tel))
        self.assertEqual(self.cartridge('CART-RT')['state'], 'in-use')
        mark = tel.mark()
        sid2 = self.start_session(pen, duration_s=60)
        first = tel.wait_first(running, 3, 'the motor running again', mark)
        self.wait_state(pen, 'fault', 5)
        self.assertEqual(self.pprop(pen, 'Fault'), 'cartridge-expired')
        self.assertEqual(self.wait_ended(ended, sid2), 'fault:cartridge-expired')
        stop = self.assert_motor_stops(tel, first, timeout_s=5)
        ran_s = (tel.samples[stop].device_us - tel.samples[first].device_us) / 1e6
        self.assertLess(ran_s, 1.0 + 0.3 * timeout_multiplier(), 'ran past the cartridge runtime')
        c = self.cartridge('CART-RT')
        self.assertEqual(c['state'], 'spent')
        self.assertGreaterEqual(c['runtime_s'], 1.9)
        self.assertEqual(c['sessions'], 2)
        self.pen_call(pen, 'ClearFault')
        self.arm(pen)
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))
        self.assert_motor_never_ran(tel, tel.mark())
        self.audit_verify()

    def test_single_use_cartridge(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-ONCE', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen)
        self.pen_call(pen, 'Stop')
        self.assertEqual(self.wait_ended(ended, sid), 'stopped')
        self.assert_motor_stops(tel, self.first_running(tel))
        self.assert_recorded(sid, 'stopped', cartridge='CART-ONCE')
        # Out and in again: the same id is spent.
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        self.insert_cartridge(pen, 'CART-ONCE', 12)
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'spent')
        mark = tel.mark()
        self.arm(pen)
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.assert_motor_never_ran(tel, mark)

    def test_cartridge_locked_during_a_session(self):
        # The handpiece locks its cartridge while the motor may run (EjectCartridge refused).
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-LOCK', 12))
        tel = self.telemetry(pen)
        self.start_session(pen)
        self.assertDBusError(ERR + 'WrongState', self.sim, 'EjectCartridge', dbus.ObjectPath(pen))
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.assert_motor_running(tel)


class ChecksOnArmStartAndAdjust(SafetyTestCase):

    def test_arming_beyond_the_area_limit_is_refused(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-ARM', 12))
        tel = self.telemetry(pen)
        for profile, code in (({'depth_mm': 1.6}, 'above-area-max'),
                              ({'speed_hz': 160}, 'speed-out-of-range'),
                              ({'needles': 13}, 'needles-not-allowed'),
                              ({'area': 'elbow'}, 'unknown-area')):
            msg = self.assertDBusError(ERR + 'InvalidProfile', self.arm, pen, **profile)
            self.assertIn(code, msg)
            self.assertEqual(self.pprop(pen, 'State'), 'idle')
            self.assertEqual(self.pprop(pen, 'Profile'), {})
        self.assertDBusError(ERR + 'WrongState', self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))
        self.assert_motor_never_ran(tel)

    def test_start_rechecks_limits_changed_since_arming(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-RECHECK', 12))
        tel = self.telemetry(pen)
        self.arm(pen, depth_mm=1.4)
        self.write_limits(limits_text(areas={'cheeks': {'max_depth_mm': 1.2}}))
        self.mgr('ReloadLimits')
        msg = self.assertDBusError(ERR + 'InvalidProfile', self.pen_call, pen, 'Start',
                                   dbus.Dictionary({}, signature='sv'))
        self.assertIn('depth_mm', msg)
        self.assertNotEqual(self.pprop(pen, 'State'), 'running')
        self.assertEqual(self.history(), [], 'a refused start left a session record')
        self.assert_motor_never_ran(tel)

    def test_start_refused_below_min_battery(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-BATT', 12))
        tel = self.telemetry(pen)
        self.sim('SetBattery', dbus.ObjectPath(pen), dbus.UInt32(19))
        wait_until(lambda: self.pprop(pen, 'BatteryPercent') == 19, 3, 'BatteryPercent 19')
        self.arm(pen)
        self.assertDBusError(ERR + 'LowBattery', self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.assertEqual(self.cartridge('CART-BATT')['state'], 'fresh')
        self.assert_motor_never_ran(tel)

    def test_adjustments_are_checked(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-ADJ', 12))
        tel = self.telemetry(pen)
        self.start_session(pen, depth_mm=1.0, speed_hz=100)
        self.assert_motor_running(tel)
        # Beyond the area's 1.5 mm, beyond the 150 Hz maximum, below the 50 Hz minimum.
        self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetDepth', 1.55)
        self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetSpeed', 151.0)
        self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetSpeed', 49.0)
        self.assertEqual((self.pprop(pen, 'DepthMm'), self.pprop(pen, 'SpeedHz')), (1.0, 100.0))
        # Within: the pen follows (so the refusals above are not a dead SetDepth).
        mark = tel.mark()
        self.pen_call(pen, 'SetDepth', 1.5)
        tel.wait_first(lambda s: s.depth_mm > 1.4, 2, 'the pen at the new depth', mark)
        pump(0.3)
        deepest = max(s.depth_mm for s in tel.samples)
        self.assertLess(deepest, 1.5 + 0.15, f'measured depth {deepest} beyond the limit plus tolerance')
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        # Adjusting from another client than the owner is refused.
        other = self.new_connection()
        self.assertDBusError(ERR + 'NotOwner', self.pen_call, pen, 'SetDepth', 0.5, bus=other)


if __name__ == '__main__':
    main()
