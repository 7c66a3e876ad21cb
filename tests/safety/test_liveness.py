#!/usr/bin/python3
"""Safety suite: liveness both ways and the limits in force. The session owner leaving the bus,
a missed client heartbeat, the pen unplugged, the pen that stops answering, a reload that forbids
the running treatment, a wrong limits file, SIGTERM mid-session and the bus daemon dying under a
session: each ends the session with its reason, records it, and the pen's telemetry shows the
motor stopped."""

import hashlib
import signal

import dbus

from needledtest import (ALL_ACTIONS, ERR, PEN_HEARTBEAT_TIMEOUT_MS, SafetyTestCase, limits_text, main, profile_yaml,
                         pump, running, timeout_multiplier, valgrind, wait_until)

# The client heartbeat the tests use, long enough for a loaded machine to keep it when it tries.
CLIENT_HEARTBEAT_MS = int(400 * timeout_multiplier())  # ASan 3, valgrind 10: the rule, not the figure


class OwnerLiveness(SafetyTestCase):

    def test_owner_leaves_the_bus(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-VANISH', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        owner = self.new_connection()
        sid = self.start_session(pen, bus=owner)
        first = self.assert_motor_running(tel)
        owner.close()   # the clinic application crashed
        self.assertEqual(self.wait_ended(ended, sid), 'client-vanished')
        self.assert_motor_stops(tel, first)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.assert_recorded(sid, 'client-vanished', cartridge='CART-VANISH')
        self.audit_verify()

    def test_owner_killed(self):
        # A real process that dies by SIGKILL, not a polite close.
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-KILLED', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        script = ('import dbus, sys, time\n'
                  'b = dbus.SystemBus()\n'
                  'p = b.get_object("org.needled", sys.argv[1], introspect=False)\n'
                  'p.LoadProfileData(sys.argv[2], dbus_interface="org.needled1.Pen")\n'
                  'print(p.Start(dbus.Dictionary({}, signature="sv"), dbus_interface="org.needled1.Pen"), flush=True)\n'
                  'time.sleep(600)\n')
        client = self.fixture.spawn(['/usr/bin/python3', '-c', script, pen, profile_yaml()], name='client')
        wait_until(lambda: self.pprop(pen, 'State') == 'running' or not client.running(), 10, 'the client started')
        sid = self.pprop(pen, 'SessionId')
        self.assertTrue(sid, client.log())
        first = self.assert_motor_running(tel)
        client.signal(signal.SIGKILL)
        self.assertEqual(self.wait_ended(ended, sid), 'client-vanished')
        self.assert_motor_stops(tel, first)
        self.assert_recorded(sid, 'client-vanished', cartridge='CART-KILLED')

    def test_missed_client_heartbeat(self):
        self.start_needled(limits=limits_text(client_heartbeat_timeout_ms=CLIENT_HEARTBEAT_MS))
        pen = self.add_pen(cartridge=('CART-HB', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen)
        first = self.assert_motor_running(tel)
        # Heartbeats at a third of the timeout keep it running for three timeouts ...
        period_s = CLIENT_HEARTBEAT_MS / 3000
        for _ in range(9):
            self.pen_call(pen, 'Heartbeat')
            pump(period_s)
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        # ... and a non-owner's heartbeat does not count.
        other = self.new_connection()
        self.assertDBusError(ERR + 'NotOwner', self.pen_call, pen, 'Heartbeat', bus=other)
        # The owner hangs (still on the bus, no heartbeat).
        last = tel.mark()
        self.assertEqual(self.wait_ended(ended, sid, 5), 'client-heartbeat-lost')
        self.assert_motor_stops(tel, first)
        stop = tel.first(lambda s: not running(s), first)
        late_ms = (tel.samples[stop].host_us - tel.samples[last].host_us) / 1000
        self.assertLess(late_ms, CLIENT_HEARTBEAT_MS + 300 * timeout_multiplier(),
                        'the motor ran on long after the missed heartbeat')
        self.assert_recorded(sid, 'client-heartbeat-lost', cartridge='CART-HB')


class PenLiveness(SafetyTestCase):

    def test_pen_unplugged_mid_session(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-UNPLUG', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen)
        self.assert_motor_running(tel)
        self.sim('RemovePen', dbus.ObjectPath(pen))
        self.assertEqual(self.wait_ended(ended, sid), 'device-lost')
        wait_until(lambda: tel.eof, 5, 'the telemetry socket closed')
        self.assertNotIn(pen, self.mprop('Pens'))
        self.assert_recorded(sid, 'device-lost', cartridge='CART-UNPLUG')
        self.audit_verify()
        # (The simulated pen is gone with its model; that the pen's own watchdog stops the motor
        # of an unplugged pen is shown on the libusb path: test_usb.py.)
        # Plugged in again: same path, idle, and the cartridge that ran is spent.
        again = self.add_pen(serial=self.pen_serial(pen), cartridge=('CART-UNPLUG', 12))
        self.assertEqual(again, pen)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'spent')

    def pen_serial(self, path):
        return path.rsplit('/', 1)[1]

    def test_pen_stops_answering(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-SILENT', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen)
        first = self.assert_motor_running(tel)
        self.sim('InjectFault', dbus.ObjectPath(pen), 'unresponsive')
        self.wait_state(pen, 'fault', 5)
        self.assertEqual(self.pprop(pen, 'Fault'), 'heartbeat-lost')
        self.assertEqual(self.wait_ended(ended, sid), 'fault:heartbeat-lost')
        self.assert_recorded(sid, 'fault:heartbeat-lost', cartridge='CART-SILENT')
        # The daemon's stop cannot reach a pen that does not answer: the pen's own watchdog is
        # the control. When it talks again, its first samples show the motor stopped and the
        # watchdog-expired fault latched.
        if valgrind():   # there the pen's watchdog is 10 s (PEN_HEARTBEAT_TIMEOUT_MS): let it expire
            pump(PEN_HEARTBEAT_TIMEOUT_MS / 1000 + 1)
        mark = tel.mark()
        self.sim('InjectFault', dbus.ObjectPath(pen), 'clear')
        i = tel.wait_first(lambda s: True, 5, 'telemetry again', mark)
        self.assertFalse(running(tel.samples[i]), 'the motor of a silent pen kept running')
        self.assertTrue(tel.samples[i].flags & (0x10 << 8), 'the pen watchdog did not latch')
        self.assert_motor_stops(tel, first)
        self.audit_verify()


class LimitsInForce(SafetyTestCase):

    def test_reload_that_forbids_the_running_profile(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-RELOAD', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen, depth_mm=1.2)
        first = self.assert_motor_running(tel)
        old_digest = self.mprop('LimitsDigest')
        # Still within: it keeps running.
        self.write_limits(limits_text(areas={'cheeks': {'max_depth_mm': 1.25}}))
        self.mgr('ReloadLimits')
        self.assertNotEqual(self.mprop('LimitsDigest'), old_digest)
        pump(0.2)
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        # Cheeks now at most 1.0 mm: the running 1.2 mm treatment stops.
        self.write_limits(limits_text(areas={'cheeks': {'max_depth_mm': 1.0}}))
        self.mgr('ReloadLimits')
        self.assertEqual(self.wait_ended(ended, sid), 'limits-changed')
        self.assert_motor_stops(tel, first)
        self.assert_recorded(sid, 'limits-changed', cartridge='CART-RELOAD')
        self.assertEqual(self.pprop(pen, 'State'), 'idle')

    def test_reload_that_forbids_an_adjusted_set_point(self):
        # The profile is fine under the new limits, the depth the owner set since is not.
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-ADJRELOAD', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen, depth_mm=0.8)
        first = self.assert_motor_running(tel)
        self.pen_call(pen, 'SetDepth', 1.4)
        self.write_limits(limits_text(areas={'cheeks': {'max_depth_mm': 1.0}}))
        self.mgr('ReloadLimits')
        self.assertEqual(self.wait_ended(ended, sid), 'limits-changed')
        self.assert_motor_stops(tel, first)

    def test_bad_reload_keeps_the_limits_and_the_session(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-BADRELOAD', 12))
        tel = self.telemetry(pen)
        sid = self.start_session(pen)
        self.assert_motor_running(tel)
        digest = self.mprop('LimitsDigest')
        self.write_limits(limits_text().replace('max_temperature_c: 43', 'max_temperature_c: 40'))  # warn 41 > max
        msg = self.assertDBusError(ERR + 'InvalidLimits', self.mgr, 'ReloadLimits')
        self.assertIn('limits.yaml', msg)
        self.assertEqual(self.mprop('LimitsDigest'), digest)
        self.assertEqual(self.mprop('LimitsState'), 'ok')
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        # And the old limits are still enforced.
        self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetDepth', 1.55)

    def test_wrong_limits_file_at_start_fails_closed(self):
        self.start_needled(limits='version: 1\npen: {}\n')
        self.assertEqual(self.mprop('LimitsState'), 'invalid')
        self.assertEqual(self.mprop('LimitsDigest'), '')
        self.assertTrue(self.mprop('LimitsError'))
        pen = self.add_pen(cartridge=('CART-NOLIMITS', 12))
        tel = self.telemetry(pen)
        self.assertDBusError(ERR + 'LimitsUnavailable', self.arm, pen)
        self.assertDBusError(ERR + 'LimitsUnavailable', self.pen_call, pen, 'Start',
                             dbus.Dictionary({}, signature='sv'))
        self.assert_motor_never_ran(tel)
        # A good file, reloaded: the digest recorded with the session is that file's.
        self.write_limits(limits_text())
        self.mgr('ReloadLimits')
        sid = self.start_session(pen)
        with open(self.limits_path, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.assertEqual(self.history_entry(sid)['limits_digest'], digest)


class DaemonShutdown(SafetyTestCase):

    def test_sigterm_stops_the_motor_and_records_the_session(self):
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-TERM', 12))
        tel = self.telemetry(pen)
        ended = self.ended_log(pen)
        sid = self.start_session(pen)
        first = self.assert_motor_running(tel)
        self.stop_needled()   # SIGTERM; asserts exit status 0
        # The session's end went out before the daemon left, and the motor stop was acknowledged
        # (the daemon waits for that); the pen's last samples on the socket may or may not show it.
        self.assertEqual(self.wait_ended(ended, sid), 'stopped')
        wait_until(lambda: tel.eof, 5, 'the telemetry socket closed')
        self.assertTrue(any(running(s) for s in tel.samples[first:]))
        self.start_needled()
        self.assert_recorded(sid, 'stopped', cartridge='CART-TERM')
        self.audit_verify()


class BusLiveness(SafetyTestCase):

    def test_bus_daemon_dies_mid_session(self):
        # No operator can reach the treatment any more: needled stops the motor and exits with
        # an error, so that the service manager restarts it (Restart=on-failure).
        self.start_needled()
        pen = self.add_pen(cartridge=('CART-NOBUS', 12))
        tel = self.telemetry(pen)
        sid = self.start_session(pen)
        self.assert_motor_running(tel)
        daemon, self.daemon = self.daemon, None
        self.fixture.kill_bus()
        try:
            status = daemon.wait(10 * timeout_multiplier())
            log = daemon.log()
            self.fixture.stop_process(daemon)
            self.assertIsNotNone(status, f'needled did not exit after losing the bus:\n{log[-4000:]}')
            self.assertNotIn(status, (0, 99), f'needled exited with {status}:\n{log[-4000:]}')
            self.assertGreater(status, 0, f'needled died by a signal:\n{log[-4000:]}')
            self.assertIn('lost the connection to the system bus', log)
            self.assertNotIn('not acknowledged before exit', log)  # the motor stop reached the pen
            wait_until(lambda: tel.eof, 5, 'the telemetry socket closed')
        finally:
            # a bus and polkit again for what follows (and for this class's next test)
            self.fixture.restart_bus()
            self._baseline.append(self.fixture.polkit.process)
            self.bus = self.fixture.connection()
        # On the new bus, the session is on record as stopped, the cartridge spent.
        self.polkit.set_allowed(ALL_ACTIONS)
        self.start_needled()
        self.assert_recorded(sid, 'stopped', cartridge='CART-NOBUS')
        self.audit_verify()


if __name__ == '__main__':
    main()
