#!/usr/bin/python3
"""org.needled1.Pen on the running daemon with simulated pens: every property, a full
treatment (cartridge, arming, start, telemetry on the bus and on the fd, pause/resume,
adjustments within and beyond the limits, a non-owner's Stop without any authorization),
the ledger's record of it, and every error a client can get from a pen."""

import bisect
import math
import os
import socket
import threading
import time
import unittest

import dbus

from needledtest import (ERR, INVALID_ARGS, OPERATE, PEN_IFACE, PROFILE_TEXT_MAX, PROPS_IFACE,
                         TELEMETRY_RECORD, UNKNOWN_METHOD, UNKNOWN_OBJECT, AsyncCall,
                         NeedledTestCase, SignalLog, limits_yaml, main, profile_yaml, pump,
                         sha256_file, source_path, timeout_multiplier, unwrap, wait_until)

EMPTY_SV = dbus.Dictionary({}, signature='sv')
# Pen properties and their D-Bus types, as the contract (XML) has them.
PEN_PROPERTIES = {
    'Serial': 's', 'Model': 's', 'FirmwareVersion': 's', 'ProtocolVersion': 'u', 'Generation': 'u',
    'Simulated': 'b', 'State': 's', 'Fault': 's', 'Warnings': 'as', 'Profile': 'a{sv}', 'DepthMm': 'd',
    'SpeedHz': 'd', 'DepthRangeMm': '(dd)', 'DepthStepMm': 'd', 'SpeedRangeHz': '(dd)',
    'BatteryPercent': 'u', 'TemperatureC': 'd', 'Cartridge': 'a{sv}', 'SessionId': 's',
    'ElapsedS': 'd', 'Strokes': 't', 'Punctures': 't', 'DensityPerCm2': 'd', 'SkinType': 's',
    'TelemetryRateHz': 'u',
}
FLAG_MOTOR_RUNNING = 1 << 0
FLAG_CARTRIDGE_PRESENT = 1 << 1
# A limits area whose maximum is beyond what a simulated pen can do (2.5 mm), for beyond-pen-range.
DEEP_LIMITS = limits_yaml().replace('areas:\n', 'areas:\n  deep: {max_depth_mm: 3.0}\n')


def signature_of(value):
    if isinstance(value, dbus.String):
        return 's'
    if isinstance(value, dbus.UInt32):
        return 'u'
    if isinstance(value, dbus.UInt64):
        return 't'
    if isinstance(value, dbus.Double):
        return 'd'
    if isinstance(value, dbus.Boolean):
        return 'b'
    if isinstance(value, dbus.Dictionary):
        return 'a{' + value.signature + '}' if value.signature else 'a{??}'
    if isinstance(value, dbus.Array):
        return 'a' + (value.signature or '?')
    if isinstance(value, dbus.Struct):
        return '(' + ''.join(signature_of(v) for v in value) + ')'
    return type(value).__name__


class TelemetryReader:
    """Reads an OpenTelemetry socket in a thread of its own, as a client that must not lose
    records would (the daemon's socket holds 683 records, 0.68 s at 1000 Hz; the test's own
    calls may block longer than that, under valgrind by far). Each record is kept with the
    CLOCK_MONOTONIC time this thread received it, in the clock of the record's host_time_us."""

    def __init__(self, unix_fd):
        self.sock = socket.socket(fileno=unix_fd.take())
        self.sock.settimeout(0.05)
        self._timed = []
        self.eof = False
        self.bad = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._closing:
            try:
                data = self.sock.recv(256)
            except socket.timeout:
                continue
            except OSError:
                return
            received_us = time.monotonic_ns() // 1000
            if not data:
                self.eof = True
                return
            if len(data) < TELEMETRY_RECORD.size:
                self.bad.append(data)
            else:
                self._timed.append((TELEMETRY_RECORD.unpack_from(data), received_us))

    @property
    def records(self):
        """The records received so far (a copy)."""
        return [r for r, _ in list(self._timed)]

    def snapshot(self):
        """(records, received_us): the records so far and when each was received, aligned."""
        timed = list(self._timed)
        return [r for r, _ in timed], [t for _, t in timed]

    def close(self):
        self._closing = True
        self._thread.join()
        self.sock.close()


# A reader that is never this many records behind the daemon loses none: the daemon drops a
# reader's records only when its socket is full, and the socket holds 683 (SO_SNDBUF 256 KiB,
# 72-byte records). How far behind the reader was is measured from its own receive times against
# the records' host_time_us (the daemon decoded the sample then, and sent it right after).
READER_BEHIND_MIN = 100


def reader_behind(records, host_times, received_us, i):
    """How many samples the daemon had decoded after record i by the time the reader received it
    (taken from the records it got: a lower bound when records were lost after i). host_times:
    the records' host_time_us, in order."""
    k = bisect.bisect_right(host_times, received_us[i]) - 1
    return (records[k][2] - records[i][2]) % 2**32 if k > i else 0


def reader_behind_before(records, host_times, received_us, n):
    """The most the reader was behind at records n, n-1, ... back to 1000 sequence numbers before
    record n."""
    behind = 0
    for i in range(n, -1, -1):
        if (records[n][2] - records[i][2]) % 2**32 > 1000:
            break
        behind = max(behind, reader_behind(records, host_times, received_us, i))
    return behind


def check_records(testcase, records, what='fd records', pen_dropped=0, received_us=None):
    """Records are in order, without duplicates; every gap in the sequence numbers is what the
    reader's dropped counter says it lost, plus samples the pen itself dropped (pen_dropped: the
    pen's own count, for a harness that can read it; at most that many in all).

    The reader loses records only while it is behind: with received_us (TelemetryReader.snapshot),
    each loss must follow a time, among the 1000 samples before it, when the reader was at least
    READER_BEHIND_MIN records behind the daemon. A busy machine may starve the reader; a daemon
    that drops records of a reader that keeps up fails. Without received_us, no loss at all."""
    testcase.assertTrue(records, f'no {what}')
    host_times = [r[4] for r in records]
    testcase.assertEqual(host_times, sorted(host_times), f'{what}: host time going back')
    if records[0][5]:
        testcase.assertIsNotNone(received_us, f'{what}: {records[0][5]} records dropped before the first')
        behind = reader_behind(records, host_times, received_us, 0)
        testcase.assertGreaterEqual(behind, READER_BEHIND_MIN,
                                    f'{what}: {records[0][5]} records dropped before the first, for a reader '
                                    f'{behind} records behind the daemon')
    by_pen = 0
    for n, (a, b) in enumerate(zip(records, records[1:])):
        lost = (b[2] - a[2] - 1) % 2**32
        testcase.assertLess(lost, 2**31, f'{what}: sequence going back {a[2]} -> {b[2]}')
        by_reader = b[5] - a[5]
        testcase.assertTrue(0 <= by_reader <= lost, f'{what}: sequence {a[2]} -> {b[2]} with dropped {a[5]} -> {b[5]}')
        by_pen += lost - by_reader
        if by_reader:
            testcase.assertIsNotNone(received_us, f'{what}: {by_reader} records dropped for the reader '
                                     f'at {a[2]} -> {b[2]}')
            behind = reader_behind_before(records, host_times, received_us, n)
            testcase.assertGreaterEqual(behind, READER_BEHIND_MIN,
                                        f'{what}: {by_reader} records dropped at {a[2]} -> {b[2]} for a reader '
                                        f'at most {behind} records behind the daemon')
    testcase.assertLessEqual(by_pen, pen_dropped,
                             f'{what}: {by_pen} samples missing that neither the reader nor the pen dropped')
    device_times = [r[3] for r in records]
    testcase.assertEqual(device_times, sorted(set(device_times)), f'{what}: device time not increasing')


def check_consecutive(testcase, seqs, what, pen_dropped=0):
    """Sequence numbers without duplicates, each one after the last, skipping in all no more than
    the pen_dropped samples the pen itself says it dropped."""
    testcase.assertTrue(seqs, f'no {what}')
    testcase.assertEqual(len(seqs), len(set(seqs)), f'{what}: duplicates')
    gaps = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != (a + 1) % 2**32]
    for a, b in gaps:
        testcase.assertLess((b - a - 1) % 2**32, 2**31, f'{what}: sequence going back {a} -> {b}')
    skipped = sum((b - a - 1) % 2**32 for a, b in gaps)
    testcase.assertLessEqual(skipped, pen_dropped,
                             f'{what}: not consecutive ({skipped} skipped, the pen dropped {pen_dropped}): {gaps[:5]}')


def synthetic_records(n, drops=(), lag_us=0, rate_hz=1000):
    """n records at rate_hz, each received lag_us after the daemon decoded it; drops: sequence
    numbers the daemon dropped for the reader (not in the result, counted in the later records)."""
    records, received_us, dropped = [], [], 0
    for seq in range(n):
        if seq in drops:
            dropped += 1
            continue
        host_us = 1_000_000 + seq * 1_000_000 // rate_hz
        records.append((1, 72, seq, 5_000 + seq * 1_000_000 // rate_hz, host_us, dropped, 0, 1.0, 100.0, 500.0,
                        30.0, 100))
        received_us.append(host_us + lag_us)
    return records, received_us


class RecordChecks(unittest.TestCase):
    """check_records itself: what it must let through, and what it must catch."""

    def test_a_reader_that_keeps_up_may_lose_nothing(self):
        records, received_us = synthetic_records(3000, drops=range(1500, 1600), lag_us=20_000)
        with self.assertRaisesRegex(AssertionError, r'100 records dropped at 1499 -> 1600 for a reader at most 2[01] '
                                    r'records behind'):
            check_records(self, records, received_us=received_us)
        with self.assertRaisesRegex(AssertionError, 'records dropped for the reader'):
            check_records(self, records)

    def test_a_reader_far_behind_may_lose_counted_records(self):
        records, received_us = synthetic_records(3000, drops=range(1500, 1600), lag_us=700_000)
        check_records(self, records, received_us=received_us)

    def test_the_lag_must_be_near_the_loss(self):
        records, received_us = synthetic_records(5000, drops=range(4000, 4100))
        for i in range(100, 200):
            received_us[i] += 500_000
        with self.assertRaisesRegex(AssertionError, 'for a reader at most 0 records behind'):
            check_records(self, records, received_us=received_us)

    def test_losses_nobody_counted_fail(self):
        records, received_us = synthetic_records(3000, lag_us=700_000)
        del records[1000:1010], received_us[1000:1010]
        with self.assertRaisesRegex(AssertionError, '10 samples missing that neither the reader nor the pen dropped'):
            check_records(self, records, received_us=received_us)
        check_records(self, records, received_us=received_us, pen_dropped=10)

    def test_a_loss_before_the_first_record(self):
        records, received_us = synthetic_records(2000, drops=range(0, 700), lag_us=1_000)
        with self.assertRaisesRegex(AssertionError, 'before the first'):
            check_records(self, records, received_us=received_us)
        records, received_us = synthetic_records(2000, drops=range(0, 700), lag_us=800_000)
        check_records(self, records, received_us=received_us)

    def test_order_and_counts(self):
        records, received_us = synthetic_records(100)
        records[50] = records[50][:2] + (52,) + records[50][3:]
        with self.assertRaisesRegex(AssertionError, 'sequence going back 52 -> 51'):
            check_records(self, records, received_us=received_us)
        records, received_us = synthetic_records(100)
        records[50], records[51] = records[51], records[50]
        with self.assertRaisesRegex(AssertionError, 'host time going back'):
            check_records(self, records, received_us=received_us)
        records, received_us = synthetic_records(1000, drops=[500], lag_us=700_000)
        records[-1] = records[-1][:5] + (2,) + records[-1][6:]
        with self.assertRaisesRegex(AssertionError, 'with dropped'):
            check_records(self, records, received_us=received_us)


class PenProperties(NeedledTestCase):

    def test_every_property(self):
        pen = self.add_pen(serial='PROPS-1', model='Test Model', firmware_version='9.8.7',
                           battery_percent=dbus.UInt32(80), telemetry_rate_hz=dbus.UInt32(500))
        self.assertEqual(pen, '/org/needled/pen/PROPS_2d1')   # sd_bus_path_encode('PROPS-1')
        raw = self.call(pen, PROPS_IFACE, 'GetAll', PEN_IFACE)
        self.assertEqual(set(raw), set(PEN_PROPERTIES) | {'Warnings'})
        for name, sig in PEN_PROPERTIES.items():
            if sig.startswith('a{'):
                self.assertIsInstance(raw[name], dbus.Dictionary, name)
            elif sig == 'as':
                self.assertIsInstance(raw[name], dbus.Array, name)
            else:
                self.assertEqual(signature_of(raw[name]), sig, name)
        p = unwrap(raw)
        self.assertEqual(p['Serial'], 'PROPS-1')
        self.assertEqual(p['Model'], 'Test Model')
        self.assertEqual(p['FirmwareVersion'], '9.8.7')
        self.assertGreaterEqual(p['ProtocolVersion'], 1)
        self.assertEqual(p['Generation'], 1)
        self.assertTrue(p['Simulated'])
        self.assertEqual(p['State'], 'idle')
        self.assertEqual(p['Fault'], '')
        self.assertEqual(p['Profile'], {})
        self.assertEqual(p['DepthRangeMm'], (0.0, 2.5))
        self.assertAlmostEqual(p['DepthStepMm'], 0.05)
        self.assertEqual(p['SpeedRangeHz'], (25.0, 150.0))
        self.assertEqual(p['TelemetryRateHz'], 500)
        self.assertEqual(p['SessionId'], '')
        self.assertEqual(p['ElapsedS'], 0.0)
        self.assertEqual(p['Strokes'], 0)
        self.assertEqual(p['Punctures'], 0)
        self.assertEqual(p['DensityPerCm2'], 0.0)
        self.assertEqual(p['SkinType'], '')
        self.assertEqual(p['Cartridge'], {'id': '', 'needles': 0, 'state': 'none', 'runtime_s': 0})
        self.assertTrue(math.isfinite(p['TemperatureC']) and 15 < p['TemperatureC'] < 41, p['TemperatureC'])
        self.wait_pen_prop(pen, 'BatteryPercent', lambda v: 78 <= v <= 80)
        self.assertEqual(p['Warnings'], [])

    def test_defaults_of_a_simulated_pen(self):
        pen = self.add_pen()
        p = self.get_all(pen, PEN_IFACE)
        self.assertRegex(p['Serial'], r'^SIM\d{4}$')
        self.assertEqual(pen, '/org/needled/pen/' + p['Serial'])
        self.assertEqual(p['TelemetryRateHz'], 1000)
        self.wait_pen_prop(pen, 'BatteryPercent', lambda v: v >= 99)

    def test_generation_after_replug(self):
        pen = self.add_pen(serial='REPLUG-1')
        self.assertEqual(self.pprop(pen, 'Generation'), 1)
        self.sim('RemovePen', dbus.ObjectPath(pen))
        again = self.add_pen(serial='REPLUG-1')
        self.assertEqual(again, pen)
        self.assertEqual(self.pprop(pen, 'Generation'), 2)

    def test_cartridge_property(self):
        pen = self.add_pen()
        changed = SignalLog(self.bus, 'PropertiesChanged', PROPS_IFACE, pen)
        self.sim('InsertCartridge', dbus.ObjectPath(pen), 'CART-PROP', dbus.UInt32(16))
        self.assertEqual(self.pprop(pen, 'Cartridge'),
                         {'id': 'CART-PROP', 'needles': 16, 'state': 'fresh', 'runtime_s': 0})
        changed.wait_for(lambda i: 'Cartridge' in i[1][1] or 'Cartridge' in i[1][2], 5,
                         'PropertiesChanged(Cartridge)')
        # A needle count the limits do not allow.
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'none')
        self.sim('InsertCartridge', dbus.ObjectPath(pen), 'CART-ODD', dbus.UInt32(13))
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'rejected')

    def test_warnings_low_battery(self):
        pen = self.add_pen()
        self.sim('SetBattery', dbus.ObjectPath(pen), dbus.UInt32(15))
        self.wait_pen_prop(pen, 'Warnings', lambda v: 'low-battery' in v)


class PenTreatment(NeedledTestCase):
    """The whole treatment, as a clinic application does it."""

    def test_full_treatment(self):
        pen = self.add_pen(serial='TREAT-1')
        self.sim('InsertCartridge', dbus.ObjectPath(pen), 'TREAT-CART', dbus.UInt32(12))
        props = SignalLog(self.bus, 'PropertiesChanged', PROPS_IFACE, pen)
        telemetry = SignalLog(self.bus, 'Telemetry', PEN_IFACE, pen)
        self.pen_call(pen, 'WatchTelemetry')  # Telemetry goes only to watchers
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)

        # Arm an installed profile: Profile mirrors the file, set points follow it.
        self.pen_call(pen, 'LoadProfile', 'acne-scars-cheeks')
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        path = source_path('conf', 'profiles.d', 'acne-scars-cheeks.yaml')
        profile = self.pprop(pen, 'Profile')
        self.assertEqual(profile, {'name': 'acne-scars-cheeks', 'area': 'cheeks', 'indication': 'acne-scars',
                                   'depth_mm': 1.25, 'speed_hz': 120.0, 'duration_s': 900.0, 'needles': 12,
                                   'digest': sha256_file(path)})
        self.assertEqual(self.pprop(pen, 'DepthMm'), 1.25)
        self.assertEqual(self.pprop(pen, 'SpeedHz'), 120.0)
        props.wait_for(lambda i: i[1][1].get('State') == 'armed' or 'State' in i[1][2], 5,
                       'PropertiesChanged(State armed)')

        reader = TelemetryReader(self.pen_call(pen, 'OpenTelemetry'))
        self.addCleanup(reader.close)
        telemetry.items.clear()

        sid = str(self.pen_call(pen, 'Start', dbus.Dictionary({'label': 'appointment-42'}, signature='sv')))
        self.assertRegex(sid, r'^\S+$')
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'in-use')

        # ElapsedS and Strokes grow; telemetry flows on the bus and on the fd.
        e1 = self.wait_pen_prop(pen, 'ElapsedS', lambda v: v > 0.3)
        s1 = self.wait_pen_prop(pen, 'Strokes', lambda v: v > 0)
        pump(2.0)
        self.assertGreater(self.pprop(pen, 'ElapsedS'), e1)
        self.assertGreater(self.pprop(pen, 'Strokes'), s1)
        props.wait_for(lambda i: 'ElapsedS' in i[1][1] or 'ElapsedS' in i[1][2], 5,
                       'PropertiesChanged(ElapsedS)')

        batches = [args[0] for _, args in telemetry.items]
        samples = [s for b in batches for s in b]
        self.assertGreaterEqual(len(batches), 10, 'about 20 batches a second')
        self.assertGreater(len(samples), 500)
        check_consecutive(self, [s[1] for s in samples], 'Telemetry signal sequences', self.pen_dropped(pen))
        times = [s[0] for s in samples]
        self.assertEqual(times, sorted(times))
        running = [s for s in samples if s[6] & FLAG_MOTOR_RUNNING]
        self.assertTrue(running, 'samples with the motor-running flag')
        for s in running[-50:]:
            self.assertTrue(s[6] & FLAG_CARTRIDGE_PRESENT)
            self.assertLess(abs(s[2] - 1.25), 0.15, 'measured depth near the set point')
            self.assertTrue(all(math.isfinite(x) for x in s[2:6]))

        wait_until(lambda: len(reader.records) > 500, 5, 'records on the telemetry fd')
        self.assertEqual(reader.bad, [])
        for rec in reader.records:
            version, size, seq, dev_us, host_us, dropped, flags, depth, speed, current, temp, battery = rec
            self.assertEqual(version, 1)
            self.assertEqual(size, 72)
            self.assertLessEqual(battery, 100)
        records, received_us = reader.snapshot()
        check_records(self, records, received_us=received_us, pen_dropped=self.pen_dropped(pen))
        # The fd and the signal carry the same samples.
        by_seq = {s[1]: s for s in samples}
        common = [r for r in reader.records if r[2] in by_seq]
        self.assertGreater(len(common), 100)
        for r in common:
            s = by_seq[r[2]]
            self.assertEqual((r[3], r[7], r[8], r[9], r[10], r[6]), (s[0], s[2], s[3], s[4], s[5], s[6]))

        # Pause: the motor stops, the session stays, elapsed time stops counting.
        self.pen_call(pen, 'Pause')
        self.assertEqual(self.pprop(pen, 'State'), 'paused')
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        paused_at = self.pprop(pen, 'ElapsedS')
        pump(0.5)
        self.assertAlmostEqual(self.pprop(pen, 'ElapsedS'), paused_at, places=3)
        self.assertDBusError(ERR + 'WrongState', self.pen_call, pen, 'Pause')
        self.pen_call(pen, 'Resume')
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.assertDBusError(ERR + 'WrongState', self.pen_call, pen, 'Resume')
        self.wait_pen_prop(pen, 'ElapsedS', lambda v: v > paused_at)

        # Adjustments within the cheeks limits (1.5 mm; 50..150 Hz).
        self.pen_call(pen, 'SetDepth', 1.5)
        self.assertEqual(self.pprop(pen, 'DepthMm'), 1.5)
        self.pen_call(pen, 'SetDepth', 1.0)
        self.pen_call(pen, 'SetSpeed', 140.0)
        self.assertEqual(self.pprop(pen, 'SpeedHz'), 140.0)
        props.wait_for(lambda i: i[1][1].get('SpeedHz') == 140.0 or 'SpeedHz' in i[1][2], 5,
                       'PropertiesChanged(SpeedHz)')
        # Beyond them: refused, naming the value and the limit; set points unchanged.
        msg = self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetDepth', 1.6)
        self.assertIn('1.6', msg)
        self.assertIn('1.5', msg)
        msg = self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetSpeed', 151.0)
        self.assertIn('150', msg)
        self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetSpeed', 40.0)
        self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetDepth', 1.03)  # off the 0.05 grid
        for bad in (float('nan'), float('inf'), float('-inf')):
            self.assertDBusError(INVALID_ARGS, self.pen_call, pen, 'SetDepth', bad)
            self.assertDBusError(INVALID_ARGS, self.pen_call, pen, 'SetSpeed', bad)
        self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetDepth', -0.5)
        self.assertEqual(self.pprop(pen, 'DepthMm'), 1.0)
        self.assertEqual(self.pprop(pen, 'SpeedHz'), 140.0)
        # The owner's heartbeat is harmless when the limits do not ask for one.
        self.pen_call(pen, 'Heartbeat')

        # Another client is not the owner.
        other = self.new_connection()
        for method, args in (('SetDepth', (0.5,)), ('SetSpeed', (100.0,)), ('Pause', ()), ('Heartbeat', ())):
            self.assertDBusError(ERR + 'NotOwner', self.pen_call, pen, method, *args, bus=other)
        self.assertDBusError(ERR + 'WrongState', self.pen_call, pen, 'LoadProfile', 'acne-scars-cheeks', bus=other)
        self.assertEqual(self.pprop(pen, 'State'), 'running')

        # ... but stops it, with no polkit permission at all: stopping is never blocked.
        self.polkit.set_allowed([])
        self.pen_call(pen, 'Stop', bus=other)
        item = ended.wait_for(lambda i: i[1][0] == sid, 5, 'SessionEnded')
        self.assertEqual(item[1], (sid, 'stopped'))
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.assertEqual(self.pprop(pen, 'Profile'), {})
        self.assertEqual(self.pprop(pen, 'SessionId'), '')
        self.assertEqual(self.pprop(pen, 'ElapsedS'), 0.0)
        self.assertEqual(self.pprop(pen, 'Strokes'), 0)
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'spent')
        # Idempotent.
        self.pen_call(pen, 'Stop', bus=other)
        self.assertEqual(len([i for i in ended.items if i[1][0] == sid]), 1)

        # Every sample of the session was on the bus before SessionEnded; the fd kept up.
        pump(0.3)
        samples = [s for _, args in telemetry.items for s in args[0]]
        check_consecutive(self, [s[1] for s in samples], 'Telemetry signal sequences', self.pen_dropped(pen))
        records, received_us = reader.snapshot()
        check_records(self, records, received_us=received_us)

        # The ledger has it.
        self.polkit.set_allowed([OPERATE, 'org.needled1.read-history'])
        hist = [h for h in unwrap(self.mgr('GetHistory', EMPTY_SV)) if h['id'] == sid]
        self.assertEqual(len(hist), 1)
        h = hist[0]
        self.assertEqual((h['pen'], h['cartridge'], h['profile'], h['label'], h['reason']),
                         ('TREAT-1', 'TREAT-CART', 'acne-scars-cheeks', 'appointment-42', 'stopped'))
        self.assertEqual(h['profile_digest'], sha256_file(path))
        self.assertEqual(h['limits_digest'], self.mprop('LimitsDigest'))
        self.assertGreater(h['strokes'], 0)
        self.assertGreater(h['duration_s'], 1.0)
        self.assertGreater(h['end'], h['start'])
        self.assertLessEqual(h['max_depth_mm'], 1.5 + 0.15)
        self.assertGreater(h['max_current_ma'], 0)

        # Single use: the cartridge never runs again, in this pen or another.
        self.pen_call(pen, 'LoadProfile', 'acne-scars-cheeks')
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        pen2 = self.add_pen(cartridge=('TREAT-CART', 12))
        self.assertEqual(self.pprop(pen2, 'Cartridge')['state'], 'spent')
        self.pen_call(pen2, 'LoadProfile', 'acne-scars-cheeks')
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen2, 'Start', EMPTY_SV)
        # Closing the reader unsubscribes; the daemon carries on.
        reader.close()
        self.ping()

    def test_properties_changed_mirror(self):
        """A client that reads GetAll once and then follows PropertiesChanged only sees every
        state change, in order, and ends up with the daemon's values."""
        pen = self.add_pen(cartridge=('MIRROR-1', 12))
        changes = SignalLog(self.bus, 'PropertiesChanged', PROPS_IFACE, pen)
        mirror = self.get_all(pen, PEN_IFACE)
        seen_states = [mirror['State']]

        def follow():
            while changes.items:
                _, (iface, changed, invalidated) = changes.items.pop(0)
                self.assertEqual(iface, PEN_IFACE)
                mirror.update(changed)
                for name in invalidated:
                    mirror[name] = self.pprop(pen, name)
                if 'State' in changed or 'State' in invalidated:
                    if mirror['State'] != seen_states[-1]:
                        seen_states.append(mirror['State'])

        self.arm(pen)
        sid = str(self.pen_call(pen, 'Start', EMPTY_SV))
        self.wait_pen_prop(pen, 'ElapsedS', lambda v: v > 0.3)
        self.pen_call(pen, 'SetDepth', 0.8)
        self.pen_call(pen, 'Pause')
        self.pen_call(pen, 'Resume')
        wait_until(lambda: (follow(), mirror['SessionId'] == sid and mirror['Strokes'] > 0
                            and mirror['DepthMm'] == 0.8)[1], 5, 'the session in the mirror')
        self.pen_call(pen, 'Stop')
        stable = ('State', 'Fault', 'Profile', 'SessionId', 'DepthMm', 'SpeedHz', 'Cartridge', 'ElapsedS',
                  'Strokes', 'Punctures', 'DensityPerCm2', 'SkinType', 'Warnings')
        want = {k: v for k, v in self.get_all(pen, PEN_IFACE).items() if k in stable}
        # Low-rate values are announced within about a quarter second (the last one always).
        wait_until(lambda: (follow(), {k: mirror[k] for k in stable} == want)[1], 5,
                   f'the mirror to settle; mirror {mirror} want {want}')
        self.assertEqual(seen_states, ['idle', 'armed', 'running', 'paused', 'running', 'idle'])

    def test_telemetry_fd_ends_when_the_pen_goes(self):
        pen = self.add_pen(telemetry_rate_hz=dbus.UInt32(200))
        reader = TelemetryReader(self.pen_call(pen, 'OpenTelemetry'))
        self.addCleanup(reader.close)
        wait_until(lambda: len(reader.records) > 10, 5, 'records while idle')
        self.sim('RemovePen', dbus.ObjectPath(pen))
        wait_until(lambda: reader.eof, 5, 'end of file on the telemetry socket')
        records, received_us = reader.snapshot()
        check_records(self, records, received_us=received_us)

    def test_owner_disconnect_stops_the_session(self):
        pen = self.add_pen(cartridge=('VANISH-1', 12))
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)
        client = self.new_connection()
        sid = self.start_session(pen, bus=client)
        client.close()
        ended.wait_for(lambda i: i[1] == (sid, 'client-vanished'), 5, 'SessionEnded client-vanished')
        self.wait_state(pen, 'idle')
        self.assertEqual(self.pprop(pen, 'Profile'), {})

    def test_completion(self):
        pen = self.add_pen(cartridge=('COMPLETE-1', 12))
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)
        sid = self.start_session(pen, duration_s=2)
        item = ended.wait_for(lambda i: i[1][0] == sid, 6, 'SessionEnded')
        self.assertEqual(item[1], (sid, 'completed'))
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.assertEqual(self.pprop(pen, 'Profile'), {})
        self.polkit.set_allowed(['org.needled1.read-history'])
        h = [h for h in unwrap(self.mgr('GetHistory', EMPTY_SV)) if h['id'] == sid][0]
        self.assertEqual(h['reason'], 'completed')
        self.assertGreaterEqual(h['duration_s'], 2.0)
        # Stopped at its time (the daemon checks about four times a second), not long after.
        self.assertLess(h['duration_s'], 2.0 + 1.0 * timeout_multiplier())

    def test_device_lost(self):
        pen = self.add_pen(cartridge=('LOST-1', 12))
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)
        sid = self.start_session(pen)
        self.sim('RemovePen', dbus.ObjectPath(pen))
        ended.wait_for(lambda i: i[1] == (sid, 'device-lost'), 5, 'SessionEnded device-lost')
        self.assertNotIn(pen, self.mprop('Pens'))


class PenErrors(NeedledTestCase):
    limits_text = DEEP_LIMITS

    def test_wrong_state(self):
        pen = self.add_pen(cartridge=('WS-1', 12))
        self.assertDBusError(ERR + 'WrongState', self.pen_call, pen, 'Start', EMPTY_SV)
        for method, args in (('Pause', ()), ('Resume', ()), ('SetDepth', (1.0,)), ('SetSpeed', (100.0,)),
                             ('Heartbeat', ())):
            self.assertDBusError(ERR + 'WrongState', self.pen_call, pen, method, *args)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        sid = self.start_session(pen)
        before = self.snapshot(pen)
        self.assertDBusError(ERR + 'WrongState', self.pen_call, pen, 'LoadProfile', 'acne-scars-cheeks')
        self.assertDBusError(ERR + 'WrongState', self.pen_call, pen, 'LoadProfileData', profile_yaml(name='other'))
        self.assertDBusError(ERR + 'WrongState', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertEqual(self.snapshot(pen), before)
        self.assertEqual(self.pprop(pen, 'SessionId'), sid)
        self.pen_call(pen, 'Stop')
        # ClearFault without a fault succeeds without effect.
        self.pen_call(pen, 'ClearFault')
        self.assertEqual(self.pprop(pen, 'State'), 'idle')

    def test_no_cartridge(self):
        pen = self.add_pen()
        self.arm(pen)   # arming needs no cartridge
        self.assertDBusError(ERR + 'NoCartridge', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertEqual(self.pprop(pen, 'State'), 'armed')

    def test_low_battery(self):
        pen = self.add_pen(cartridge=('LOWBAT-1', 12))
        self.arm(pen)
        self.sim('SetBattery', dbus.ObjectPath(pen), dbus.UInt32(10))
        self.wait_pen_prop(pen, 'BatteryPercent', lambda v: v == 10)
        msg = self.assertDBusError(ERR + 'LowBattery', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertIn('10', msg)
        self.assertIn('20', msg)
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.assertEqual(self.pprop(pen, 'SessionId'), '')
        # The cartridge was not used up by the refused start.
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'fresh')

    def test_invalid_profile(self):
        pen = self.add_pen(cartridge=('INV-1', 12))
        self.arm(pen, name='first-one')
        before = self.snapshot(pen)
        cases = [
            (profile_yaml(needles=14), 'needles-mismatch'),
            (profile_yaml(depth_mm=1.03), 'off-step'),
            (profile_yaml(area='deep', depth_mm=2.8), 'beyond-pen-range'),
            (profile_yaml(depth_mm=2.0), 'above-area-max'),
            (profile_yaml(area='elbow', needles=13), 'unknown-area'),
            ('not: [valid', 'yaml-syntax'),
        ]
        for text, code in cases:
            with self.subTest(code=code):
                msg = self.assertDBusError(ERR + 'InvalidProfile', self.pen_call, pen, 'LoadProfileData', text)
                self.assertIn(code, msg)
                self.assertEqual(self.snapshot(pen), before, 'the pen stays as it was')
        # Every violation is listed.
        msg = self.assertDBusError(ERR + 'InvalidProfile', self.pen_call, pen, 'LoadProfileData',
                                   profile_yaml(area='elbow', needles=13))
        self.assertIn('unknown-area', msg)
        self.assertIn('needles-not-allowed', msg)
        # Needles checked at Start too: armed without a cartridge, then a different one fitted.
        pen2 = self.add_pen()
        self.arm(pen2, needles=14)
        self.sim('InsertCartridge', dbus.ObjectPath(pen2), 'INV-2', dbus.UInt32(12))
        self.assertDBusError(ERR + 'InvalidProfile', self.pen_call, pen2, 'Start', EMPTY_SV)
        self.assertEqual(self.pprop(pen2, 'State'), 'armed')

    def test_installed_profile_with_wrong_needles(self):
        pen = self.add_pen(cartridge=('INV-3', 16))
        msg = self.assertDBusError(ERR + 'InvalidProfile', self.pen_call, pen, 'LoadProfile', 'acne-scars-cheeks')
        self.assertIn('needles-mismatch', msg)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')

    def test_unknown_profile(self):
        pen = self.add_pen()
        for name in ('no-such-profile', '../limits', '/etc/passwd', '', 'acne-scars-cheeks.yaml', 'x' * 5000):
            with self.subTest(name=name[:40]):
                msg = self.assertDBusError(ERR + 'UnknownProfile', self.pen_call, pen, 'LoadProfile', name)
                self.assertLess(len(msg), 1000, 'the message does not echo a huge name')
        self.assertEqual(self.pprop(pen, 'State'), 'idle')

    def test_fault_over_temperature(self):
        pen = self.add_pen(cartridge=('FAULT-1', 12))
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)
        sid = self.start_session(pen)
        self.sim('InjectFault', dbus.ObjectPath(pen), 'over-temperature')
        ended.wait_for(lambda i: i[1][0] == sid, 10, 'SessionEnded')
        self.assertEqual(ended.items[-1][1], (sid, 'fault:over-temperature'))
        self.assertEqual(self.pprop(pen, 'State'), 'fault')
        self.assertEqual(self.pprop(pen, 'Fault'), 'over-temperature')
        self.assertEqual(self.pprop(pen, 'SessionId'), '')
        # In fault: no arming, no start, ClearFault refused while the handpiece is hot.
        self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'LoadProfileData', profile_yaml())
        msg = self.assertDBusError(ERR + 'Fault', self.pen_call, pen, 'ClearFault')
        self.assertIn('over-temperature', msg)
        self.assertEqual(self.pprop(pen, 'State'), 'fault')
        self.pen_call(pen, 'Stop')   # idempotent, and a pen in fault stays in fault
        self.assertEqual(self.pprop(pen, 'State'), 'fault')
        # The condition ends and the handpiece cools down: ClearFault brings it back to idle.
        self.sim('InjectFault', dbus.ObjectPath(pen), 'clear')
        self.wait_pen_prop(pen, 'TemperatureC', lambda v: v < 41, 10, 'the handpiece to cool down')

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
        self.assertEqual(self.pprop(pen, 'Profile'), {})

    def test_device_gone(self):
        pen = self.add_pen()
        self.sim('RemovePen', dbus.ObjectPath(pen))
        for method, args in (('LoadProfile', ('acne-scars-cheeks',)), ('Stop', ()), ('OpenTelemetry', ())):
            with self.assertRaises(dbus.exceptions.DBusException) as cm:
                self.pen_call(pen, method, *args)
            self.assertIn(cm.exception.get_dbus_name(), (UNKNOWN_OBJECT, UNKNOWN_METHOD, ERR + 'DeviceGone',
                                                         ERR + 'UnknownPen'))
        with self.assertRaises(dbus.exceptions.DBusException):
            self.pprop(pen, 'State')

    def test_device_gone_while_a_call_is_in_flight(self):
        # The call waits for polkit; the pen goes meanwhile; the caller gets DeviceGone.
        pen = self.add_pen()
        self.polkit.simulate_hang_actions([OPERATE])
        obj = self.bus.get_object('org.needled', pen, introspect=False)
        call = AsyncCall(obj.LoadProfileData, profile_yaml(), dbus_interface=PEN_IFACE, timeout=60)
        wait_until(self.polkit.have_hanging_calls, 5, 'the authorization check to reach polkit')
        self.sim('RemovePen', dbus.ObjectPath(pen))
        self.polkit.release_hanging_calls()
        call.wait(10)
        self.assertIsNotNone(call.error, 'the call must fail')
        self.assertEqual(call.error.get_dbus_name(), ERR + 'DeviceGone')

    def test_device_gone_while_the_pen_does_not_answer(self):
        # The call waits for the pen's answer (an unresponsive pen); the pen is unplugged.
        pen = self.add_pen(telemetry_rate_hz=dbus.UInt32(100))
        self.sim('InjectFault', dbus.ObjectPath(pen), 'unresponsive')
        obj = self.bus.get_object('org.needled', '/org/needled', introspect=False)
        call = AsyncCall(obj.InsertCartridge, dbus.ObjectPath(pen), 'GONE-1', dbus.UInt32(12),
                         dbus_interface='org.needled1.Simulator', timeout=60)
        pump(0.2)
        self.assertFalse(call.done, 'an unresponsive pen cannot have answered')
        self.sim('RemovePen', dbus.ObjectPath(pen))
        call.wait(10)
        self.assertIsNotNone(call.error)
        self.assertEqual(call.error.get_dbus_name(), ERR + 'DeviceGone')


class PenClientHeartbeat(NeedledTestCase):
    # 300 ms as the issue asks; scaled with the setup's slowdown (timeout_multiplier: ASan 3,
    # valgrind 10), since the test is about the rule, not the figure. Unscaled under ASan, on a
    # loaded machine (the README test command beside stress-ng --cpu 2, load average 8) the
    # first heartbeat came more than 300 ms after Start.
    HEARTBEAT_MS = int(300 * timeout_multiplier())
    limits_text = limits_yaml(client_heartbeat_timeout_ms=HEARTBEAT_MS)

    def test_no_heartbeat_stops_the_session(self):
        pen = self.add_pen(cartridge=('HB-1', 12))
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)
        sid = self.start_session(pen)
        item = ended.wait_for(lambda i: i[1][0] == sid, 5, 'SessionEnded')
        self.assertEqual(item[1], (sid, 'client-heartbeat-lost'))
        self.assertEqual(self.pprop(pen, 'State'), 'idle')

    def test_heartbeats_keep_it_running(self):
        pen = self.add_pen(cartridge=('HB-2', 12))
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)
        sid = self.start_session(pen)
        # Fifteen heartbeats at a third of the timeout: five timeouts' worth of time.
        for _ in range(15):
            self.pen_call(pen, 'Heartbeat')
            pump(self.HEARTBEAT_MS / 3000)
        self.assertEqual(ended.items, [])
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        # Not the owner's heartbeat: refused, and it does not count.
        other = self.new_connection()
        self.assertDBusError(ERR + 'NotOwner', self.pen_call, pen, 'Heartbeat', bus=other)
        self.pen_call(pen, 'Stop')
        item = ended.wait_for(lambda i: i[1][0] == sid, 5, 'SessionEnded')
        self.assertEqual(item[1], (sid, 'stopped'))



def profile_of_size(size, name='largest'):
    """A valid profile of exactly size bytes: the longest notes allowed, then comment lines."""
    text = profile_yaml(name=name, extra='notes: "' + 'n' * 2000 + '"\n')
    line = '# ' + 'p' * 77 + '\n'                   # 80 bytes
    while len(text.encode()) + len(line) <= size:
        text += line
    rest = size - len(text.encode())
    assert rest >= 0
    text += ('#' + 'q' * (rest - 2) + '\n') if rest >= 2 else '\n' * rest
    assert len(text.encode()) == size
    return text


class PenProfileSize(NeedledTestCase):
    """A profile at the contract's size bound arms and starts, however it arrives; one byte
    more is refused when it is armed (not at Start, where it used to fail with Storage)."""

    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.profiles_tmp = tempfile.mkdtemp(prefix='needled-profiles-')
        for name, size in (('largest', PROFILE_TEXT_MAX), ('too-large', PROFILE_TEXT_MAX + 1)):
            with open(os.path.join(cls.profiles_tmp, name + '.yaml'), 'w', encoding='utf-8') as f:
                f.write(profile_of_size(size, name))
        cls.profiles_dir = cls.profiles_tmp
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            import shutil
            shutil.rmtree(cls.profiles_tmp, ignore_errors=True)

    def start_and_stop(self, pen, sid_name):
        sid = str(self.pen_call(pen, 'Start', EMPTY_SV))
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.pen_call(pen, 'Stop')
        self.wait_state(pen, 'idle')
        entry = [h for h in unwrap(self.mgr('GetHistory', EMPTY_SV)) if h['id'] == sid]
        self.assertEqual(len(entry), 1, f'{sid_name}: the session is in the ledger')
        self.assertEqual(entry[0]['profile'], sid_name)

    def test_largest_profile_data_arms_and_starts(self):
        text = profile_of_size(PROFILE_TEXT_MAX)
        self.assertEqual(unwrap(self.mgr('ValidateProfile', text)), [])
        pen = self.add_pen(cartridge=('SIZE-1', 12))
        self.pen_call(pen, 'LoadProfileData', text)
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.start_and_stop(pen, 'largest')

    def test_profile_data_one_byte_over_is_refused_when_armed(self):
        text = profile_of_size(PROFILE_TEXT_MAX + 1)
        self.assertDBusError(INVALID_ARGS, self.mgr, 'ValidateProfile', text, message_contains=str(PROFILE_TEXT_MAX))
        pen = self.add_pen(cartridge=('SIZE-2', 12))
        before = self.snapshot(pen)
        self.assertDBusError(INVALID_ARGS, self.pen_call, pen, 'LoadProfileData', text,
                             message_contains=str(PROFILE_TEXT_MAX))
        self.assertEqual(self.snapshot(pen), before)

    def test_largest_installed_profile_arms_and_starts(self):
        pen = self.add_pen(cartridge=('SIZE-3', 12))
        self.pen_call(pen, 'LoadProfile', 'largest')
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.start_and_stop(pen, 'largest')

    def test_installed_profile_one_byte_over_is_refused_when_armed(self):
        pen = self.add_pen(cartridge=('SIZE-4', 12))
        before = self.snapshot(pen)
        with self.assertRaises(dbus.exceptions.DBusException) as cm:
            self.pen_call(pen, 'LoadProfile', 'too-large')
        self.assertTrue(cm.exception.get_dbus_name().startswith(ERR), cm.exception.get_dbus_name())
        self.assertNotEqual(cm.exception.get_dbus_name(), ERR + 'Storage')
        self.assertEqual(self.snapshot(pen), before, 'refused when armed: the pen stays idle')
        # The cartridge is untouched: a valid profile still starts on it.
        self.pen_call(pen, 'LoadProfile', 'largest')
        self.start_and_stop(pen, 'largest')

    def test_installed_profile_over_the_bound_says_so(self):
        pen = self.add_pen()
        self.assertDBusError(ERR + 'InvalidProfile', self.pen_call, pen, 'LoadProfile', 'too-large',
                             message_contains=str(PROFILE_TEXT_MAX))
        self.assertEqual(self.pprop(pen, 'State'), 'idle')


if __name__ == '__main__':
    main()
