#!/usr/bin/python3
"""Runs one example client against `needled --session --simulate` on a private session bus.

    run-against-simulator.py NEEDLED SOURCE_ROOT -- COMMAND [ARGS...]

Starts dbus-daemon (session type, a socket in a temporary directory) and the daemon with the
shipped limits and profiles and a fresh state directory, adds a simulated pen EX-1 with a fresh
12-needle cartridge, then runs COMMAND with DBUS_SESSION_BUS_ADDRESS set and the serial EX-1 as
its last argument. Exits with COMMAND's status; the daemon's log goes to stderr when it fails.
Everything it started is stopped and waited for. Under the valgrind test setup
(NEEDLED_TEST_VALGRIND=1, or NEEDLED_DAEMON_WRAPPER) the daemon runs wrapped as in tests/lib's
busfixture, with longer waits, the pen heartbeat timeout the tests use there (needledtest's
shipped_limits_yaml: 10 s) and a 200 Hz pen, and the daemon's own failing exit status
(valgrind's 99) fails the run.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'lib'))
from busfixture import daemon_wrapper, timeout_multiplier  # noqa: E402


def busctl(env, *args):
    return subprocess.run(['busctl', '--user'] + list(args), env=env, check=True, capture_output=True, text=True,
                          timeout=30).stdout


def main():
    sep = sys.argv.index('--')
    needled, source_root = sys.argv[1:3]
    command = sys.argv[sep + 1:]
    tmp = tempfile.mkdtemp(prefix='needled-example-')
    procs = []
    status = 1
    daemon = None
    wrapper = daemon_wrapper()
    slow = timeout_multiplier()
    log_path = os.path.join(tmp, 'needled.log')
    try:
        bus = subprocess.Popen(['dbus-daemon', '--session', '--nofork', '--print-address=1',
                                f'--address=unix:path={tmp}/bus'], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        procs.append(bus)
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus.stdout.readline().strip())
        os.mkdir(os.path.join(tmp, 'state'))
        limits = os.path.join(source_root, 'conf', 'limits.yaml')
        if slow > 1:
            # A valgrinded daemon on a busy machine can be silent for longer than the shipped
            # 500 ms, and the pen would rightly stop itself (heartbeat-lost).
            from needledtest import shipped_limits_yaml
            limits = os.path.join(tmp, 'limits.yaml')
            with open(limits, 'w', encoding='utf-8') as f:
                f.write(shipped_limits_yaml())
        with open(log_path, 'w', encoding='utf-8') as log:
            # real-time where it may be, as needled.service runs it and the other suites do (a
            # time-shared daemon on a busy machine can miss the pen's heartbeat); never under
            # valgrind
            from needledtest import realtime_prefix
            daemon = subprocess.Popen(wrapper + realtime_prefix() + [needled, '--session', '--simulate',
                                       '--limits', limits,
                                       '--profiles', os.path.join(source_root, 'conf', 'profiles.d'),
                                       '--state-dir', os.path.join(tmp, 'state')], env=env, stderr=log)
        procs.append(daemon)
        deadline = time.monotonic() + 20 * slow
        # Under valgrind the daemon is ten times slower: a pen at 1 kHz would starve it (the pen's
        # own queue overflows, the heartbeat runs late). 200 Hz still gives the clients hundreds
        # of records.
        rate = ['telemetry_rate_hz', 'u', '200'] if slow > 1 else []
        while True:
            try:
                busctl(env, 'call', 'org.needled', '/org/needled', 'org.needled1.Simulator', 'AddPen', 'a{sv}',
                       str(1 + len(rate) // 3), 'serial', 's', 'EX-1', *rate)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise
                time.sleep(0.05)
        path = busctl(env, 'call', 'org.needled', '/org/needled', 'org.needled1.Manager', 'FindPen', 's',
                      'EX-1').split()[1].strip('"')
        busctl(env, 'call', 'org.needled', '/org/needled', 'org.needled1.Simulator', 'InsertCartridge', 'osu',
               path, 'EX-CART-1', '12')
        status = subprocess.run(command + ['EX-1'], env=env, timeout=120 * slow).returncode
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10 * slow)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if daemon is not None and daemon.returncode != 0 and status == 0:
            sys.stderr.write(f'needled exited with status {daemon.returncode}\n')
            status = 1
        if status != 0 and os.path.exists(log_path):
            with open(log_path, encoding='utf-8') as f:
                sys.stderr.write('---- needled log ----\n' + f.read()[-6000:])
        shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
