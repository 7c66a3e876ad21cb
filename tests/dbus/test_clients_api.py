#!/usr/bin/python3
"""The API as real client stacks use it (issue 14): integers of any D-Bus integer type, pens found
by serial, removed pens answering UnknownPen, the Manager in GetManagedObjects, telemetry only to
watchers, the telemetry pipe."""

import os
import signal
import re
import stat
import time

import xml.etree.ElementTree as ET

import dbus

from needledtest import (ERR, INVALID_ARGS, MANAGER_IFACE, MANAGER_PATH, PEN_IFACE, PROPS_IFACE, TELEMETRY_RECORD,
                             NeedledTestCase, SignalLog, main, pump, source_path, timeout_multiplier, unwrap,
                             valgrind, wait_until)
from test_pen import check_consecutive

LIMITS_EXCEEDED = 'org.freedesktop.DBus.Error.LimitsExceeded'

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


class TelemetryOnRequest(NeedledTestCase):

    def samples(self, log):
        return [s[1] for _, args in log.items for s in args[0]]

    def test_only_watchers_receive_telemetry(self):
        pen = self.add_pen(serial='WATCH-1')
        self.assertIn('telemetry-watch', self.mprop('Features'))
        other = self.new_connection()
        unasked = SignalLog(other, 'Telemetry', PEN_IFACE, pen)
        mine = SignalLog(self.bus, 'Telemetry', PEN_IFACE, pen)
        pump(0.5)
        self.assertEqual(mine.items, [], 'Telemetry arrived without WatchTelemetry')
        self.pen_call(pen, 'WatchTelemetry')
        self.pen_call(pen, 'WatchTelemetry')  # idempotent: still each batch once
        mine.wait_for(lambda i: True, 5, 'a Telemetry batch after WatchTelemetry')
        pump(0.5)
        check_consecutive(self, self.samples(mine), 'watched Telemetry', self.pen_dropped(pen))
        self.assertEqual(unasked.items, [], 'a client that did not ask received Telemetry')
        # Unwatch: no more batches (one in flight may still arrive).
        self.pen_call(pen, 'UnwatchTelemetry')
        self.pen_call(pen, 'UnwatchTelemetry')
        pump(0.3)
        n = len(mine.items)
        pump(0.5)
        self.assertEqual(len(mine.items), n, 'Telemetry after UnwatchTelemetry')

    def test_watchers_that_leave_the_bus_are_dropped(self):
        # Under valgrind a 1 kHz pen unicast to 64 watchers starved the loop (seen once in a fresh
        # root): the pen's queue overflowed again and again, a WatchTelemetry call outlasted the
        # 25 s D-Bus timeout, and needled lost its bus connection (most likely one of its own calls
        # timed out too, such as the AddMatch behind each tracked watcher, on whose failure sd-bus
        # closes the connection). This test is about the watcher bookkeeping: a slower pen there.
        pen = self.add_pen(serial='WATCH-2', **({'telemetry_rate_hz': 50} if valgrind() else {}))
        conns = [self.new_connection() for _ in range(64)]
        for c in conns:
            self.pen_call(pen, 'WatchTelemetry', bus=c)
        self.assertDBusError(LIMITS_EXCEEDED, self.pen_call, pen, 'WatchTelemetry')
        for c in conns:
            c.close()
        # Each departure is seen: there is room again.
        wait_until(lambda: self._watch_succeeds(pen), 10, 'WatchTelemetry accepted again')
        log = SignalLog(self.bus, 'Telemetry', PEN_IFACE, pen)
        log.wait_for(lambda i: True, 5, 'Telemetry to the new watcher')

    def test_a_bus_that_takes_nothing_does_not_fill_the_daemon(self):
        # The bus daemon stopped: every Telemetry signal would wait in needled's own connection,
        # one per watcher every 50 ms, without bound. Beyond its backlog bound needled drops them
        # and says so; once the bus reads again, watchers get Telemetry again.
        pen = self.add_pen(serial='WATCH-3')
        # 16 watchers: sd-bus gives its socket an 8 MB send buffer, which they fill in seconds
        # (with many more, needled under valgrind cannot keep up with WatchTelemetry calls)
        conns = [self.new_connection() for _ in range(15)]
        for c in conns:
            self.pen_call(pen, 'WatchTelemetry', bus=c)
        self.pen_call(pen, 'WatchTelemetry')
        log = SignalLog(self.bus, 'Telemetry', PEN_IFACE, pen)
        log.wait_for(lambda i: True, 5, 'Telemetry to the watcher')
        bus_pid = self.fixture.bus.process.pid
        os.kill(bus_pid, signal.SIGSTOP)
        try:
            # the socket's buffer fills first, then the backlog (256 signals)
            wait_until(lambda: 'Telemetry signals are dropped' in self.daemon_log(), 90,
                       'needled dropping Telemetry signals while the bus takes nothing')
        finally:
            os.kill(bus_pid, signal.SIGCONT)
        wait_until(lambda: 'the bus takes messages again' in self.daemon_log(), 60, 'needled seeing the bus again')
        self.assertTrue(self.daemon.running(), 'needled stopped')
        n = len(log.items)
        log.wait_for(lambda i: len(log.items) > n, 10, 'Telemetry again after the bus came back')

    def _watch_succeeds(self, pen):
        try:
            self.pen_call(pen, 'WatchTelemetry')
            return True
        except dbus.exceptions.DBusException as e:
            if e.get_dbus_name() != LIMITS_EXCEEDED:
                raise
            return None

    def test_pipe_carries_whole_records_with_loss_counted(self):
        pen = self.add_pen(serial='PIPE-1')
        self.assertIn('telemetry-pipe', self.mprop('Features'))
        fd = self.pen_call(pen, 'OpenTelemetryPipe').take()
        self.assertTrue(stat.S_ISFIFO(os.fstat(fd).st_mode), 'OpenTelemetryPipe returns a pipe')
        os.set_blocking(fd, False)
        stream = b''

        def read_some():
            nonlocal stream
            try:
                while True:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    stream += chunk
            except BlockingIOError:
                pass

        # Keep up for a while: consecutive, nothing dropped.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            read_some()
            pump(0.02)
        self.assertEqual(len(stream) % TELEMETRY_RECORD.size, 0, 'a record was split')
        first = [TELEMETRY_RECORD.unpack_from(stream, i) for i in range(0, len(stream), TELEMETRY_RECORD.size)]
        self.assertGreater(len(first), 200)
        check_consecutive(self, [r[2] for r in first], 'pipe records', self.pen_dropped(pen))
        self.assertEqual({r[5] for r in first}, {0})
        # Stall for longer than the pipe holds: the loss is counted, records stay whole.
        stream = b''
        time.sleep(4.5)  # the pipe holds 256 KiB: about 3.6 s at 1 kHz
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            read_some()
            pump(0.02)
        self.assertEqual(len(stream) % TELEMETRY_RECORD.size, 0, 'a record was split')
        records = [TELEMETRY_RECORD.unpack_from(stream, i) for i in range(0, len(stream), TELEMETRY_RECORD.size)]
        self.assertGreater(records[-1][5], 0, 'a stalled pipe reader lost records, counted')
        check_records_lossy(self, first[-1:] + records)
        os.close(fd)


class FinishedSession(NeedledTestCase):

    def test_session_recorded_carries_the_ledger_figures(self):
        pen = self.add_pen(serial='REC-1', cartridge=('REC-CART', 12))
        order = []
        recorded = SignalLog(self.bus, 'SessionRecorded', PEN_IFACE, pen)
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)
        self.bus.add_signal_receiver(lambda *a: order.append('recorded'), signal_name='SessionRecorded',
                                     dbus_interface=PEN_IFACE, path=pen)
        self.bus.add_signal_receiver(lambda *a: order.append('ended'), signal_name='SessionEnded',
                                     dbus_interface=PEN_IFACE, path=pen)
        sid = self.start_session(pen)
        pump(1.2)
        self.pen_call(pen, 'Stop')
        ended.wait_for(lambda i: i[1][0] == sid, 5, 'SessionEnded')
        item = recorded.wait_for(lambda i: i[1][0] == sid, 5, 'SessionRecorded')
        self.assertEqual(order[:2], ['recorded', 'ended'], 'the figures come before SessionEnded')
        figures = item[1][1]
        self.assertEqual(figures['reason'], 'stopped')
        self.assertTrue(figures['recorded'])
        history = [h for h in unwrap(self.mgr('GetHistory', opts(pen='REC-1'))) if h['id'] == sid][0]
        for key in ('strokes', 'duration_s', 'max_depth_mm', 'max_speed_hz', 'max_temperature_c', 'max_current_ma',
                    'end', 'reason'):
            with self.subTest(key=key):
                self.assertEqual(figures[key], history[key])
        self.assertGreater(figures['strokes'], 0)


class DocumentedKeys(NeedledTestCase):
    """Every dictionary key the daemon sends is named in the member's comment in the XML."""

    def doc_of(self, member):
        parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
        with open(source_path('dbus', 'org.needled1.xml'), encoding='utf-8') as f:
            root = ET.fromstring(f.read(), parser=parser)
        for iface in root.iter('interface'):
            previous = None
            for child in iface:
                if child.tag != ET.Comment and child.get('name') == member:
                    return set(re.findall(r'[a-z_][a-z0-9_]*', previous.text))
                previous = child
        self.fail(f'{member} not in the XML')

    def assertDocumented(self, member, dicts):
        words = self.doc_of(member)
        keys = set().union(*[set(d) for d in dicts])
        self.assertTrue(keys)
        self.assertEqual(sorted(keys - words), [], f'{member}: keys sent but not documented')

    def test_every_key_is_documented(self):
        pen = self.add_pen(serial='DOC-1', cartridge=('DOC-CART', 12))
        sid = self.start_session(pen)
        self.assertDocumented('Profile', [self.pprop(pen, 'Profile')])
        self.assertDocumented('Cartridge', [self.pprop(pen, 'Cartridge')])
        self.pen_call(pen, 'Stop')
        self.assertDocumented('GetProfiles', unwrap(self.mgr('GetProfiles')))
        history = [h for h in unwrap(self.mgr('GetHistory', opts())) if h['id'] == sid]
        self.assertDocumented('GetHistory', history)
        self.assertDocumented('GetCartridge', [unwrap(self.mgr('GetCartridge', 'DOC-CART')),
                                               unwrap(self.mgr('GetCartridge', 'NEVER-SEEN'))])


class Announcements(NeedledTestCase):
    """A caching client (as Gio and dbus-next keep one) over a whole session, plug and unplug:
    every announced value is a change, and the cache ends equal to Get."""

    def test_a_caching_client_stays_right(self):
        cache = {MANAGER_PATH: unwrap(self.call(MANAGER_PATH, PROPS_IFACE, 'GetAll', MANAGER_IFACE))}
        redundant = []

        def on_changed(iface, changed, invalidated, path=None):
            if iface not in (MANAGER_IFACE, PEN_IFACE):
                return
            mine = cache.setdefault(str(path), {})
            for k, v in unwrap(changed).items():
                if k in mine and mine[k] == v:
                    redundant.append((str(path), k, v))
                mine[k] = v

        def on_added(path, ifaces):
            if PEN_IFACE in ifaces:
                cache[str(path)] = dict(unwrap(ifaces[PEN_IFACE]))

        m1 = self.bus.add_signal_receiver(on_changed, 'PropertiesChanged', PROPS_IFACE,
                                          busfixture_name(), None, path_keyword='path')
        m2 = self.bus.add_signal_receiver(on_added, 'InterfacesAdded', 'org.freedesktop.DBus.ObjectManager',
                                          busfixture_name(), MANAGER_PATH)
        self.addCleanup(m1.remove)
        self.addCleanup(m2.remove)

        def assert_cache_right(path, iface, running=False):
            pump(0.7)  # low-rate values are announced at about 4 Hz
            got = unwrap(self.call(path, PROPS_IFACE, 'GetAll', iface))
            for k, v in got.items():
                if running and k in ('ElapsedS', 'Strokes', 'Punctures'):
                    # They move while the motor runs: the cache is at most a tick behind.
                    self.assertLessEqual(cache[path][k], v, k)
                    self.assertGreater(cache[path][k], 0, k)
                elif running and k == 'Cartridge':
                    # its runtime_s moves while the motor runs, announced at the same rate
                    self.assertEqual({**cache[path][k], 'runtime_s': 0}, {**v, 'runtime_s': 0}, k)
                    self.assertLessEqual(cache[path][k]['runtime_s'], v['runtime_s'], k)
                elif running and k == 'DensityPerCm2':
                    self.assertLessEqual(cache[path][k], v, k)  # 0 without area_cm2, else moves
                elif k in ('TemperatureC', 'BatteryPercent'):
                    self.assertAlmostEqual(cache[path][k], v, delta=1.0, msg=k)
                else:
                    self.assertEqual(cache[path].get(k, v), v, f'{path} {k}: the cache says {cache[path].get(k)!r}')

        pen = self.add_pen(serial='ANN-1', cartridge=('ANN-CART', 12))
        wait_until(lambda: pen in cache, 5, 'InterfacesAdded')
        assert_cache_right(MANAGER_PATH, MANAGER_IFACE)
        assert_cache_right(pen, PEN_IFACE)
        sid = self.start_session(pen)
        pump(1.0)
        assert_cache_right(pen, PEN_IFACE, running=True)
        self.pen_call(pen, 'SetDepth', 1.0)
        self.pen_call(pen, 'Pause')
        assert_cache_right(pen, PEN_IFACE)
        self.pen_call(pen, 'Resume')
        pump(0.5)
        self.pen_call(pen, 'Stop')
        self.assertTrue(sid)
        assert_cache_right(pen, PEN_IFACE)
        self.sim('RemovePen', dbus.ObjectPath(pen))
        assert_cache_right(MANAGER_PATH, MANAGER_IFACE)
        self.assertEqual(cache[MANAGER_PATH]['Pens'], [], 'the announced Pens still lists the removed pen')
        self.assertEqual(redundant[:5], [], 'PropertiesChanged announced values that had not changed')


def busfixture_name():
    import busfixture
    return busfixture.NEEDLED_NAME


def check_records_lossy(testcase, records):
    """Every gap in the sequence numbers is what the dropped counter says was lost."""
    for a, b in zip(records, records[1:]):
        lost = (b[2] - a[2] - 1) % 2**32
        testcase.assertEqual(b[5] - a[5], lost, f'sequence {a[2]} -> {b[2]} with dropped {a[5]} -> {b[5]}')


if __name__ == '__main__':
    main()
