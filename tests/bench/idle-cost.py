#!/usr/bin/python3
"""What an idle needled costs the machine (docs/performance.md, "An idle pen costs nothing").

    tests/bench/idle-cost.py --build-root build-perf [--seconds 10]

Starts a private bus and `needled --session --simulate`, then measures the daemon over a window
from /proc/PID/stat (utime + stime: CPU), /proc/PID/status (voluntary + involuntary context
switches: each sleep the loop wakes from is one voluntary switch) and /proc/PID/schedstat (times
the thread ran), in four situations: no pen; one simulated pen, idle, with nobody reading (the
pen model runs in the daemon: included); the same pen while a client watches its Telemetry
signals; and again idle after the watcher left. Targets: idle pen <= 20 wake-ups/s and
<= 0.2 % of a CPU; no pen: 0 wake-ups/s. Prints a table and writes JSON (--json). Exit status 1
when the daemon died or an idle target is missed (--no-fail: report only).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf('SC_CLK_TCK')
TARGET_WAKEUPS_PER_S = 20.0
TARGET_CPU_PERCENT = 0.2


def sample(pid):
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    switches = 0
    with open(f'/proc/{pid}/status', encoding='ascii') as f:
        for line in f:
            if line.startswith(('voluntary_ctxt_switches', 'nonvoluntary_ctxt_switches')):
                switches += int(line.split()[1])
    with open(f'/proc/{pid}/schedstat', encoding='ascii') as f:
        run_ns, _, slices = (int(x) for x in f.read().split())
    return time.monotonic(), ticks, switches, run_ns, slices


def measure(pid, seconds):
    a = sample(pid)
    time.sleep(seconds)
    b = sample(pid)
    dt = b[0] - a[0]
    return {
        'seconds': round(dt, 2),
        'cpu_percent_stat': round(100.0 * (b[1] - a[1]) / CLK_TCK / dt, 3),
        'cpu_percent_schedstat': round(100.0 * (b[3] - a[3]) / 1e9 / dt, 3),
        'wakeups_per_s': round((b[2] - a[2]) / dt, 1),
        'runs_per_s': round((b[4] - a[4]) / dt, 1),
    }


def busctl(address, *args):
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
    return subprocess.run(['busctl', '--user'] + list(args), env=env, check=True, capture_output=True,
                          text=True, timeout=30).stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--build-root', required=True)
    ap.add_argument('--seconds', type=float, default=10.0)
    ap.add_argument('--json')
    ap.add_argument('--no-fail', action='store_true')
    ap.add_argument('--wakeups-only', action='store_true',
                    help='fail only on the wake-up targets (CPU shares are too noisy for a test on a busy machine)')
    args = ap.parse_args()
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    needled = os.path.join(args.build_root, 'daemon', 'needled')
    tmp = tempfile.mkdtemp(prefix='needled-idle-')
    procs = []
    results = {}
    ok = True
    try:
        bus = subprocess.Popen(['dbus-daemon', '--session', '--nofork', '--print-address=1',
                                f'--address=unix:path={tmp}/bus'], stdout=subprocess.PIPE, text=True)
        procs.append(bus)
        address = bus.stdout.readline().strip()
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
        os.mkdir(os.path.join(tmp, 'state'))
        daemon = subprocess.Popen([needled, '--session', '--simulate', '--limits', os.path.join(src, 'conf', 'limits.yaml'),
                                   '--profiles', os.path.join(src, 'conf', 'profiles.d'),
                                   '--state-dir', os.path.join(tmp, 'state')], env=env,
                                  stderr=subprocess.DEVNULL)
        procs.append(daemon)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                busctl(address, 'get-property', 'org.needled', '/org/needled', 'org.needled1.Manager', 'Version')
                break
            except subprocess.CalledProcessError:
                time.sleep(0.05)
        time.sleep(1.0)
        results['no pen'] = measure(daemon.pid, args.seconds)
        path = busctl(address, 'call', 'org.needled', '/org/needled', 'org.needled1.Simulator', 'AddPen',
                      'a{sv}', '1', 'serial', 's', 'IDLE-1').split()[1].strip('"')
        time.sleep(1.0)
        results['idle pen, nobody reading'] = measure(daemon.pid, args.seconds)
        # A watcher: a client of its own that calls WatchTelemetry and stays on the bus.
        watcher = subprocess.Popen(['/usr/bin/python3', '-c', WATCHER, path], env=env, stdout=subprocess.PIPE,
                                   text=True)
        procs.append(watcher)
        watcher.stdout.readline()
        time.sleep(0.5)
        results['idle pen, one Telemetry watcher'] = measure(daemon.pid, args.seconds)
        watcher.terminate()
        watcher.wait()
        time.sleep(1.0)
        results['idle pen, the watcher gone'] = measure(daemon.pid, args.seconds)
        if daemon.poll() is not None:
            print('needled died', file=sys.stderr)
            ok = False
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f'{"situation":34} {"CPU % (stat)":>13} {"CPU % (schedstat)":>18} {"wake-ups/s":>11} {"runs/s":>8}')
    for name, r in results.items():
        print(f'{name:34} {r["cpu_percent_stat"]:13.3f} {r["cpu_percent_schedstat"]:18.3f} '
              f'{r["wakeups_per_s"]:11.1f} {r["runs_per_s"]:8.1f}')
    for name in ('idle pen, nobody reading', 'idle pen, the watcher gone'):
        r = results.get(name)
        cpu_missed = not args.wakeups_only and r and r['cpu_percent_schedstat'] > TARGET_CPU_PERCENT
        if r and (r['wakeups_per_s'] > TARGET_WAKEUPS_PER_S or cpu_missed):
            print(f'missed: {name}: target <= {TARGET_WAKEUPS_PER_S} wake-ups/s, <= {TARGET_CPU_PERCENT} % CPU')
            ok = ok and args.no_fail
    r = results.get('no pen')
    if r and r['wakeups_per_s'] > 0:
        print('missed: no pen: target 0 wake-ups/s')
        ok = ok and args.no_fail
    path = args.json or os.path.join(args.build_root, 'meson-logs', 'bench-idle.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(results, f, indent=2)
    return 0 if ok else 1


WATCHER = '''
import sys
from gi.repository import Gio, GLib
bus = Gio.bus_get_sync(Gio.BusType.SESSION)
n = [0]
bus.signal_subscribe('org.needled', 'org.needled1.Pen', 'Telemetry', sys.argv[1], None, 0,
                     lambda *a: n.__setitem__(0, n[0] + 1))
bus.call_sync('org.needled', sys.argv[1], 'org.needled1.Pen', 'WatchTelemetry', None, None, 0, 5000, None)
print('watching', flush=True)
GLib.MainLoop().run()
'''

if __name__ == '__main__':
    sys.exit(main())
