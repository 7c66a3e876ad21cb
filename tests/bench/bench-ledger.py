#!/usr/bin/python3
"""The ledger at a clinic's size (issue 13; docs/performance.md, "A clinic's ledger"):

    tests/bench/bench-ledger.py --build-root build-perf [--sessions 100000] [--quick]

Writes (once, kept in BUILD/bench-ledger-N/) a ledger of N sessions with make-ledger, then on a
private session bus measures:
  - exec -> owning org.needled with that ledger, page cache warm, and cold (every page cache
    dropped before each run: `echo 3 > /proc/sys/vm/drop_caches`, root only; else the ledger's
    own pages evicted with posix_fadvise(DONTNEED)); the same with an empty state directory;
  - GetHistory pages of 100 (limit + before), all and one pen's, round trip as a client sees it;
  - the loop's longest stall while a simulated pen streams at 1 kHz and a client pulls history
    (1,000 sessions a call, all and per pen) in a loop, warm and with the ledger evicted before
    every round, or reads another (idle) pen's Cartridge property with the ledger evicted before
    each Get: the largest gap between the host times of consecutive samples (stamped on the
    loop as it decodes them), against the same session with no history pulled;
  - `needlectl audit verify` (entries a second, wall and CPU) and the bytes stored per session;
  - the ledger's own time per page of 100 (tests/bench/ledger-pages.c: wall and CPU, no daemon).
It fails only on broken behaviour (a daemon that dies, a lost sample, a session that faults).
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

import dbus
import dbus.mainloop.glib
from gi.repository import GLib

RECORD = struct.Struct('<HHIQQIIddddB7x')
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  <limit name="max_message_size">1000000000</limit>
</busconfig>
"""
HISTORY_LINE = re.compile(r'GetHistory: (\d+) sessions; query ([\d.]+) ms off the loop, reply ([\d.]+) ms on it '
                          r'in \d+ slice\(s\), the longest ([\d.]+) ms')
# bytes_per_session: half of the 3,431 bytes a session of schema 2 (issue 13).
TARGETS = {'start_ratio': 2.0, 'page_ms': 5.0, 'verify_per_s': 200000, 'loop_stall_ms': 1.0, 'bytes_per_session': 1715}


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else None


def evict(path):
    for name in (path, path + '-wal'):
        if os.path.exists(name):
            fd = os.open(name, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def drop_all_caches():
    try:
        subprocess.run(['sync'], check=True)
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3\n')
        return True
    except OSError:
        return False


class Bench:
    def __init__(self, args):
        self.build = os.path.abspath(args.build_root)
        self.source = os.path.abspath(args.source_root)
        self.needled = os.path.join(self.build, 'daemon', 'needled')
        self.needlectl = os.path.join(self.build, 'tools', 'needlectl')
        self.make_ledger = os.path.join(self.build, 'tests', 'bench', 'make-ledger')
        self.workdir = tempfile.mkdtemp(prefix='needled-bench-ledger-')
        self.daemon = None
        self.bus_pid = None
        # As needled.service runs it (CPUSchedulingPolicy=fifo, priority 20), when allowed here.
        self.rt_prefix = ['chrt', '-f', '20'] if subprocess.run(['chrt', '-f', '20', 'true'],
                                                              capture_output=True).returncode == 0 else []

    def start_bus(self):
        conf = os.path.join(self.workdir, 'bus.conf')
        with open(conf, 'w') as f:
            f.write(BUS_CONFIG.format(socket=os.path.join(self.workdir, 'bus')))
        out = subprocess.run(['dbus-daemon', '--config-file=' + conf, '--print-address=1', '--print-pid=1',
                              '--fork', '--nopidfile'], check=True, capture_output=True, text=True).stdout.split()
        os.environ['DBUS_SESSION_BUS_ADDRESS'] = out[0]
        self.bus_pid = int(out[1])
        dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
        self.bus = dbus.SessionBus()

    def stop(self):
        self.stop_daemon()
        if self.bus_pid:
            try:
                os.kill(self.bus_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            for _ in range(200):
                if not os.path.exists('/proc/%d' % self.bus_pid):
                    break
                time.sleep(0.01)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start_daemon(self, state_dir, verbose=False):
        """Starts needled; returns seconds from exec to its owning org.needled (NameOwnerChanged)."""
        loop = GLib.MainLoop()
        owned = []

        def on_owner(name, old, new):
            if name == 'org.needled' and new:
                owned.append(time.monotonic())
                loop.quit()
        match = self.bus.add_signal_receiver(on_owner, 'NameOwnerChanged', 'org.freedesktop.DBus',
                                             arg0='org.needled')
        log = open(os.path.join(self.workdir, 'needled.log'), 'a')
        t0 = time.monotonic()
        self.daemon = subprocess.Popen(
            self.rt_prefix + [self.needled, '--session', '--simulate', '--limits', os.path.join(self.source, 'conf', 'limits.yaml'),
             '--profiles', os.path.join(self.source, 'conf', 'profiles.d'), '--state-dir', state_dir] +
            (['--verbose'] if verbose else []), stderr=log, stdout=log)
        GLib.timeout_add(60000, loop.quit)
        loop.run()
        match.remove()
        if not owned:
            raise SystemExit('needled did not own its name within 60 s')
        return owned[0] - t0

    def stop_daemon(self):
        if self.daemon:
            self.daemon.send_signal(signal.SIGTERM)
            status = self.daemon.wait(30)
            self.daemon = None
            if status != 0:
                raise SystemExit('needled exited with status %d' % status)

    def mgr(self):
        return dbus.Interface(self.bus.get_object('org.needled', '/org/needled'), 'org.needled1.Manager')

    def call(self, method, *args, iface='org.needled1.Manager', path='/org/needled', timeout=120):
        obj = self.bus.get_object('org.needled', path, introspect=False)
        return getattr(obj, method)(*args, dbus_interface=iface, timeout=timeout)

    def wait_checked(self, timeout_s=120):
        """Until the ledger's background integrity check has passed (the log says so)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(os.path.join(self.workdir, 'needled.log')) as f:
                text = f.read()
            if text.count('passed its integrity check') >= self.checks_seen + 1:
                self.checks_seen += 1
                return
            time.sleep(0.05)
        raise SystemExit('the ledger check did not pass within %d s' % timeout_s)


def bench_startup(b, ledger_dir, runs, cold_runs):
    empty = tempfile.mkdtemp(prefix='empty-', dir=b.workdir)
    res = {}
    for name, state in (('empty', empty), ('clinic', ledger_dir)):
        warm = []
        for _ in range(runs):
            warm.append(b.start_daemon(state) * 1000)
            b.stop_daemon()
        cold = []
        how = None
        for _ in range(cold_runs):
            if drop_all_caches():
                how = 'drop_caches'
            else:
                how = 'fadvise'
                evict(os.path.join(state, 'ledger.sqlite'))
            cold.append(b.start_daemon(state) * 1000)
            b.stop_daemon()
        res[name] = {'warm_ms': warm, 'cold_ms': cold, 'cold_by': how,
                     'warm_median_ms': statistics.median(warm), 'cold_median_ms': statistics.median(cold)}
    return res


def page_through(b, flt, pages):
    times = []
    before = 0
    for _ in range(pages):
        f = dict(flt)
        f['limit'] = dbus.UInt32(100)
        if before:
            f['before'] = dbus.UInt64(before)
        t0 = time.monotonic()
        page = b.call('GetHistory', dbus.Dictionary(f, signature='sv'))
        times.append((time.monotonic() - t0) * 1000)
        if len(page) < 100:
            break
        before = int(page[-1]['start'])
    return times


def daemon_history_lines(b):
    """The daemon's own account of each GetHistory (--verbose): query ms off the loop, reply ms on
    it, the longest slice of the reply on the loop."""
    out = []
    with open(os.path.join(b.workdir, 'needled.log')) as f:
        for line in f:
            m = HISTORY_LINE.search(line)
            if m:
                out.append((int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))))
    return out


def bench_pages(b, pages):
    res = {}
    for name, flt in (('all', {}), ('pen', {'pen': 'NP-0002'})):
        page_through(b, flt, 3)  # warm the connection and the cache
        seen = len(daemon_history_lines(b))
        t = page_through(b, flt, pages)
        time.sleep(0.2)
        d = daemon_history_lines(b)[seen:]
        daemon_ms = [q + r for _, q, r, _ in d]
        res[name] = {'n': len(t), 'median_ms': statistics.median(t), 'p99_ms': pct(t, 99), 'max_ms': max(t),
                     'daemon_median_ms': statistics.median(daemon_ms) if d else None,
                     'daemon_p99_ms': pct(daemon_ms, 99) if d else None,
                     'query_p99_ms': pct([q for _, q, _, _ in d], 99) if d else None,
                     'slice_max_ms': max(x[3] for x in d) if d else None}
    return res


class Reader:
    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd.take())
        self.sock.settimeout(0.05)
        self.records = []
        self.closing = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.closing:
            try:
                data = self.sock.recv(256)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            self.records.append(RECORD.unpack_from(data))

    def close(self):
        self.closing = True
        self.thread.join()
        self.sock.close()


def pump(seconds):
    ctx = GLib.MainContext.default()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ctx.iteration(False)
        time.sleep(0.001)


MODES = ('none', 'warm', 'cold', 'cartridge')
MODE_NAMES = {'none': 'no history pulled', 'warm': 'history pulled, warm',
              'cold': 'history pulled, ledger evicted each round',
              'cartridge': 'another pen\'s Cartridge property read (Get), ledger evicted each round'}


def bench_stall(b, ledger_path, seconds, cart_no):
    """One session per mode on a 1 kHz pen; returns each mode's gaps between consecutive samples."""
    out = {}
    pen = str(b.call('AddPen', dbus.Dictionary({'serial': 'BENCH-PEN', 'telemetry_rate_hz': dbus.UInt32(1000)},
                                                 signature='sv'), iface='org.needled1.Simulator'))
    pen2 = None
    for mode in MODES:
        cart_no += 1
        if mode == 'cartridge':
            # A second pen, idle, with a cartridge the ledger knows; a client reads its Cartridge
            # property (which once read the ledger on the loop) with the ledger evicted each time.
            pen2 = str(b.call('AddPen', dbus.Dictionary({'serial': 'BENCH-PEN-2'}, signature='sv'),
                              iface='org.needled1.Simulator'))
            b.call('InsertCartridge', dbus.ObjectPath(pen2), 'CART-0000000001', dbus.UInt32(12),
                   iface='org.needled1.Simulator')
        b.call('InsertCartridge', dbus.ObjectPath(pen), 'BENCH-CART-%d' % cart_no, dbus.UInt32(12),
               iface='org.needled1.Simulator')
        b.call('LoadProfile', 'acne-scars-cheeks', iface='org.needled1.Pen', path=pen)
        reader = Reader(b.call('OpenTelemetry', iface='org.needled1.Pen', path=pen))
        b.call('Start', dbus.Dictionary({}, signature='sv'), iface='org.needled1.Pen', path=pen)
        pump(0.3)
        pulls = []
        seen = len(daemon_history_lines(b))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if mode == 'none':
                pump(0.05)
                continue
            if mode in ('cold', 'cartridge'):
                evict(ledger_path)
            if mode == 'cartridge':
                t0 = time.monotonic()
                b.call('Get', 'org.needled1.Pen', 'Cartridge', iface='org.freedesktop.DBus.Properties', path=pen2)
                pulls.append((time.monotonic() - t0) * 1000)
                continue
            for flt in ({'pen': 'NP-0001'}, {}):
                t0 = time.monotonic()
                b.call('GetHistory', dbus.Dictionary(flt, signature='sv'))
                pulls.append((time.monotonic() - t0) * 1000)
        state = str(b.call('Get', 'org.needled1.Pen', 'State', iface='org.freedesktop.DBus.Properties', path=pen))
        fault = str(b.call('Get', 'org.needled1.Pen', 'Fault', iface='org.freedesktop.DBus.Properties', path=pen))
        b.call('Stop', iface='org.needled1.Pen', path=pen)
        pump(0.3)
        reader.close()
        recs = reader.records
        seqs = [r[2] for r in recs]
        lost = sum((b2 - a2 - 1) % 2**32 for a2, b2 in zip(seqs, seqs[1:]))
        gaps = [(r2[4] - r1[4]) / 1000 for r1, r2 in zip(recs, recs[1:])]
        out[mode] = {'samples': len(recs), 'lost': lost, 'dropped': recs[-1][5] if recs else None,
                     'state_before_stop': state, 'fault': fault, 'pulls': len(pulls),
                     'pull_median_ms': statistics.median(pulls) if pulls else None,
                     'pull_max_ms': max(pulls) if pulls else None,
                     'gap_max_ms': max(gaps), 'gap_p999_ms': pct(gaps, 99.9), 'gap_p99_ms': pct(gaps, 99)}
        d = daemon_history_lines(b)[seen:]
        out[mode]['query_max_ms'] = max((x[1] for x in d), default=None)
        out[mode]['slice_max_ms'] = max((x[3] for x in d), default=None)
        b.call('EjectCartridge', dbus.ObjectPath(pen), iface='org.needled1.Simulator')
    return out


def bench_verify(b, ledger_dir, entries):
    """needlectl audit verify of the kept ledger: wall time, and its CPU time (user + system)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run([b.needlectl, 'audit', 'verify', '--state-dir', ledger_dir], capture_output=True, text=True)
    dt = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {'status': p.returncode, 'seconds': dt, 'cpu_seconds': cpu, 'entries': entries, 'entries_per_s': entries / dt,
            'entries_per_cpu_s': entries / cpu if cpu > 0 else None, 'output': p.stdout.strip().splitlines()[:1]}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--build-root', default=os.environ.get('NEEDLED_BUILD_ROOT', 'build'))
    ap.add_argument('--source-root', default=os.path.dirname(os.path.dirname(here)))
    ap.add_argument('--sessions', type=int, default=100000)
    ap.add_argument('--ledger-dir', help='use (and keep) the ledger here (default BUILD/bench-ledger-N)')
    ap.add_argument('--quick', action='store_true', default=os.environ.get('NEEDLED_BENCH_QUICK') == '1')
    ap.add_argument('--json')
    args = ap.parse_args()
    b = Bench(args)
    b.checks_seen = 0
    ledger_dir = args.ledger_dir or os.path.join(b.build, 'bench-ledger-%d' % args.sessions)
    ledger = os.path.join(ledger_dir, 'ledger.sqlite')
    if not os.path.exists(ledger):
        os.makedirs(ledger_dir, exist_ok=True)
        print('writing a ledger of %d sessions with make-ledger (once) ...' % args.sessions, flush=True)
        subprocess.run([b.make_ledger, ledger_dir, str(args.sessions)], check=True, stdout=subprocess.DEVNULL)
    # Work on a copy: the benchmark's own sessions must not change the kept ledger.
    work = tempfile.mkdtemp(prefix='clinic-', dir=b.workdir)
    shutil.copy(ledger, os.path.join(work, 'ledger.sqlite'))
    work_ledger = os.path.join(work, 'ledger.sqlite')
    size = os.path.getsize(ledger)
    out = {'sessions': args.sessions, 'bytes': size, 'bytes_per_session': size / args.sessions,
           'cpus': os.cpu_count(), 'load_before': os.getloadavg()}
    print('ledger benchmark: %d sessions, %.1f MB (%.0f bytes a session), %d CPUs, load %.2f %.2f %.2f; needled %s' % (
        args.sessions, size / 1e6, size / args.sessions, os.cpu_count(), *os.getloadavg(),
        'real-time (SCHED_FIFO 20, as needled.service)' if b.rt_prefix else 'time-shared'), flush=True)
    out['daemon_rt'] = bool(b.rt_prefix)
    try:
        b.start_bus()
        out['startup'] = bench_startup(b, work, 3 if args.quick else 10, 2 if args.quick else 5)
        b.start_daemon(work, verbose=True)
        b.wait_checked()
        out['pages'] = bench_pages(b, 20 if args.quick else 100)
        out['stall'] = bench_stall(b, work_ledger, 3 if args.quick else 8, 0)
        b.stop_daemon()
        out['verify'] = bench_verify(b, ledger_dir, args.sessions * 7)
        # The ledger's own cost of a page, outside the daemon: wall and CPU time (tests/bench/ledger-pages.c).
        p = subprocess.run([os.path.join(b.build, 'tests', 'bench', 'ledger-pages'), ledger, 'NP-0002',
                            str(20 if args.quick else 100)], capture_output=True, text=True)
        out['ledger_pages'] = p.stdout.strip().splitlines() if p.returncode == 0 else ['failed: ' + p.stderr.strip()]
    finally:
        b.stop()

    s = out['startup']
    print('\n| what | empty ledger | %d sessions | target |' % args.sessions)
    print('| --- | --- | --- | --- |')
    for k, label in (('warm_median_ms', 'exec -> org.needled, page cache warm (median ms)'),
                     ('cold_median_ms', 'the same, cold (%s; median ms)' % s['clinic']['cold_by'])):
        e, c = s['empty'][k], s['clinic'][k]
        print('| %s | %.1f | %.1f | <= 2x: %s |' % (label, e, c, 'met' if c <= TARGETS['start_ratio'] * e else 'MISSED'))
    for name in ('all', 'pen'):
        p = out['pages'][name]
        print('| GetHistory page of 100 (%s): in needled (query + reply) median / p99 ms; round trip to a Python '
              'client median / p99 ms | - | %.2f / %.2f; %.2f / %.2f | <= 5 ms: %s |' % (
                  'one pen' if name == 'pen' else 'all', p['daemon_median_ms'], p['daemon_p99_ms'],
                  p['median_ms'], p['p99_ms'], 'met' if p['daemon_p99_ms'] <= TARGETS['page_ms'] else 'MISSED'))
    for mode in MODES:
        st = out['stall'][mode]
        print('| 1 kHz session, %s: longest gap between samples / p99.9 ms (lost %d, fault "%s", %d pulls, '
              'pull median / max %s ms, longest query off the loop %s ms, longest reply slice on it %s ms) | - | '
              '%.2f / %.2f | |' % (
                  MODE_NAMES[mode], st['lost'], st['fault'], st['pulls'],
                  '%.2f / %.2f' % (st['pull_median_ms'], st['pull_max_ms']) if st['pull_median_ms'] else '-',
                  '%.1f' % st['query_max_ms'] if st['query_max_ms'] is not None else '-',
                  '%.2f' % st['slice_max_ms'] if st['slice_max_ms'] is not None else '-',
                  st['gap_max_ms'], st['gap_p999_ms']))
    v = out['verify']
    print('| needlectl audit verify | - | %.1f s wall, %.2f s CPU: %.0f entries/s wall, %.0f per CPU-second | '
          '>= 200,000/s: %s |' % (
              v['seconds'], v['cpu_seconds'], v['entries_per_s'], v['entries_per_cpu_s'] or 0,
              'met' if v['entries_per_s'] >= TARGETS['verify_per_s'] else 'MISSED'))
    print('| bytes per session | - | %.0f | <= %d: %s |' % (
        out['bytes_per_session'], TARGETS['bytes_per_session'],
        'met' if out['bytes_per_session'] <= TARGETS['bytes_per_session'] else 'MISSED'))
    print('\nthe ledger alone (ledger-pages, a read-only connection, no daemon):')
    for line in out['ledger_pages']:
        print('  ' + line)
    path = args.json or os.path.join(b.build, 'meson-logs', 'bench-ledger.json')
    with open(path, 'w') as f:
        json.dump(out, f, indent=1)
    print('\nfigures written to %s' % path)
    broken = [m for m, st in out['stall'].items() if st['lost'] or st['fault'] or st['state_before_stop'] != 'running']
    if broken or v['status'] != 0:
        print('BROKEN: %s' % (broken or 'audit verify status %d' % v['status']))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
