#!/usr/bin/python3
"""The daemon WITHOUT --simulate, on its real libusb path, with a pen emulated under umockdev
(tests/dbus/umockdev-pen.c: the fakepen harness of tests/usb and the daemon's own loop from
needled-core in one process). The pen shows up on the bus as a Pen object with Simulated
false and live telemetry (signal and fd), runs a treatment, and when it is unplugged the
session ends with device-lost and the object goes."""

import os
import signal

import dbus

import introspect_compare as ic
from needledtest import (MANAGER_PATH, OM_IFACE, OPERATE, PEN_IFACE, READ_HISTORY, SIM_IFACE,
                         NeedledTestCase, SignalLog, main, pump, realtime_prefix, source_path, unwrap,
                         wait_until)
from test_pen import FLAG_MOTOR_RUNNING, TelemetryReader, check_consecutive, check_records

EMPTY_SV = dbus.Dictionary({}, signature='sv')
SERIAL = 'USB0001'
PEN_PATH = '/org/needled/pen/' + SERIAL
CARTRIDGE = 'USB-CART-1'
# Under valgrind the daemon reaps the pen's packets so late that the emulated pen's own FIFO
# overflows at 1 kHz (the pen, not the daemon, would skip sequence numbers): a slower pen there.
# On a busy machine it may still overflow (a stall of over 0.5 s at 1 kHz): the checks allow
# gaps up to what the pen says it dropped (UsbPen.pen_dropped), and none beyond.
RATE_HZ = 100 if os.environ.get('NEEDLED_TEST_VALGRIND') == '1' else 1000


class UsbPen(NeedledTestCase):
    daemon_args = ['--cartridge', f'{CARTRIDGE}:12', '--serial', SERIAL, '--telemetry-rate', str(RATE_HZ)]
    allowed_actions = [OPERATE, READ_HISTORY]

    @classmethod
    def start_needled(cls, extra_args=(), env=None):
        helper = os.environ.get('NEEDLED_UMOCKDEV_PEN')
        if not helper:
            raise AssertionError('NEEDLED_UMOCKDEV_PEN is not set (run through meson test)')
        cls.stats_path = os.path.join(cls.tmpdir, 'pen-stats')
        # Real-time as needled.service runs the daemon (realtime_prefix): the daemon's loop runs
        # in this process, and time-shared on a loaded machine it can miss the pen's 500 ms
        # watchdog (the pen then stops its motor: heartbeat-lost).
        argv = realtime_prefix() + [helper] + list(cls.daemon_args) + [
            '--limits', cls.limits_path, '--profiles', cls.profiles_path, '--state-dir', cls.state_dir,
            '--stats', cls.stats_path]
        # umockdev-wrapper's whole job, done here so that a valgrind wrapper wraps the program.
        preload = 'libumockdev-preload.so.0'
        if os.environ.get('LD_PRELOAD'):
            preload += ':' + os.environ['LD_PRELOAD']
        return cls.fixture.start_daemon(argv, env={'LD_PRELOAD': preload}, timeout_s=20)

    def pen_dropped(self):
        """The samples the emulated pen has dropped so far (its queue overflowed), as it reports
        them on SIGUSR2. Read after the records it is compared with: the count only grows."""
        if os.path.exists(self.stats_path):
            os.unlink(self.stats_path)
        self.daemon.signal(signal.SIGUSR2)
        wait_until(lambda: os.path.exists(self.stats_path), 10, 'the pen\'s counters')
        with open(self.stats_path, encoding='utf-8') as f:
            counters = dict(line.split() for line in f)
        return int(counters['dropped'])

    def test_usb_pen_treatment_and_unplug(self):
        pens = wait_until(lambda: self.mprop('Pens'), 10, 'the USB pen on the bus')
        self.assertEqual(pens, [PEN_PATH])
        self.assertNotIn('simulator', self.mprop('Features'))
        self.assertNotIn(SIM_IFACE, self.fixture.introspect(MANAGER_PATH))
        p = self.get_all(PEN_PATH, PEN_IFACE)
        self.assertFalse(p['Simulated'])
        self.assertEqual((p['Serial'], p['Model'], p['Generation'], p['State']), (SERIAL, 'needle-usb', 1, 'idle'))
        self.assertGreaterEqual(p['ProtocolVersion'], 1)
        self.assertEqual(p['DepthRangeMm'], (0.0, 2.5))
        self.assertEqual(p['SpeedRangeHz'], (25.0, 150.0))
        self.assertEqual(p['TelemetryRateHz'], RATE_HZ)
        self.assertEqual(p['Cartridge'], {'id': CARTRIDGE, 'needles': 12, 'state': 'fresh', 'runtime_s': 0})
        objects = unwrap(self.call(MANAGER_PATH, OM_IFACE, 'GetManagedObjects'))
        self.assertFalse(objects[PEN_PATH][PEN_IFACE]['Simulated'])
        # The contract holds for a hardware pen's object too.
        with open(source_path('dbus', 'org.needled1.xml'), encoding='utf-8') as f:
            diffs = ic.differences(f.read(), [self.fixture.introspect(MANAGER_PATH), self.fixture.introspect(PEN_PATH)],
                                   interfaces=['org.needled1.Manager', 'org.needled1.Pen'])
        self.assertEqual(diffs, [], '\n'.join(diffs))

        # Live telemetry while idle: on the bus and on the fd, consecutive, none lost.
        telemetry = SignalLog(self.bus, 'Telemetry', PEN_IFACE, PEN_PATH)
        self.pen_call(PEN_PATH, 'WatchTelemetry')  # Telemetry goes only to watchers
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, PEN_PATH)
        removed = SignalLog(self.bus, 'InterfacesRemoved', OM_IFACE, MANAGER_PATH)
        reader = TelemetryReader(self.pen_call(PEN_PATH, 'OpenTelemetry'))
        self.addCleanup(reader.close)
        wait_until(lambda: sum(len(a[0]) for _, a in telemetry.items) > 100 and len(reader.records) > 100, 10,
                   'telemetry from the USB pen')
        records, received_us = reader.snapshot()
        samples = [s for _, a in telemetry.items for s in a[0]]
        dropped = self.pen_dropped()
        check_consecutive(self, [s[1] for s in samples], 'Telemetry sequences', dropped)
        check_records(self, records, pen_dropped=dropped, received_us=received_us)

        # A treatment on the hardware path.
        self.pen_call(PEN_PATH, 'LoadProfile', 'acne-scars-cheeks')
        sid = str(self.pen_call(PEN_PATH, 'Start', dbus.Dictionary({'label': 'usb'}, signature='sv')))
        self.assertEqual(self.pprop(PEN_PATH, 'State'), 'running')
        self.wait_pen_prop(PEN_PATH, 'Strokes', lambda v: v > 20, 10)
        self.pen_call(PEN_PATH, 'SetDepth', 1.0)
        self.assertEqual(self.pprop(PEN_PATH, 'DepthMm'), 1.0)
        self.pen_call(PEN_PATH, 'Pause')
        self.pen_call(PEN_PATH, 'Resume')
        pump(0.5)
        samples = [s for _, a in telemetry.items for s in a[0]]
        self.assertTrue([s for s in samples if s[6] & FLAG_MOTOR_RUNNING], 'the motor ran')
        check_consecutive(self, [s[1] for s in samples], 'Telemetry sequences', self.pen_dropped())
        self.assertEqual(self.pprop(PEN_PATH, 'State'), 'running')

        # Unplugged mid-session: device-lost, the object goes, the fd ends.
        self.daemon.signal(signal.SIGUSR1)
        ended.wait_for(lambda i: i[1] == (sid, 'device-lost'), 10, 'SessionEnded device-lost')
        removed.wait_for(lambda i: i[1][0] == PEN_PATH, 10, 'InterfacesRemoved')
        self.assertEqual(self.mprop('Pens'), [])
        wait_until(lambda: reader.eof, 10, 'end of file on the telemetry socket')
        records, received_us = reader.snapshot()
        check_records(self, records, pen_dropped=self.pen_dropped(), received_us=received_us)
        hist = [h for h in unwrap(self.mgr('GetHistory', EMPTY_SV)) if h['id'] == sid]
        self.assertEqual([(h['pen'], h['cartridge'], h['reason']) for h in hist], [(SERIAL, CARTRIDGE, 'device-lost')])
        self.assertEqual(unwrap(self.mgr('GetCartridge', CARTRIDGE))['state'], 'spent')


if __name__ == '__main__':
    main()
