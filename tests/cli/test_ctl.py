#!/usr/bin/python3
"""needlectl's D-Bus verbs against a real needled --simulate on a private, policy-enforcing
system bus with a mock polkit (tests/lib/busfixture.py): every command, --json output
parsed and checked, exit codes, watch and run --watch under a pseudo-terminal.

Environment: NEEDLECTL, NEEDLED_BUILD_ROOT, NEEDLED_SOURCE_ROOT (set by meson).
Under the valgrind setup (NEEDLED_TEST_VALGRIND=1) needlectl itself runs under valgrind too: every
call shape once (call_shape), or every call with NEEDLED_TEST_VALGRIND_EVERY_CALL=1.
"""

import hashlib
import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
import unittest

ROOT = os.environ.get('NEEDLED_SOURCE_ROOT') or os.path.join(os.path.dirname(__file__), '..', '..')
import busfixture
from needledtest import (ALL_ACTIONS, limits_text, needled_binary, profile_yaml, realtime_prefix,
                         timeout_multiplier)

NEEDLECTL = os.environ.get('NEEDLECTL', 'needlectl')
CONF = os.path.join(ROOT, 'conf')
PROFILES = os.path.join(CONF, 'profiles.d')
DATA = os.path.join(ROOT, 'tests', 'data')

EXIT = {'ok': 0, 'invalid': 1, 'unreadable': 2, 'not-authorized': 3, 'no-daemon': 4, 'no-pen': 5,
        'wrong-state': 6, 'fault': 7, 'cartridge': 8, 'low-battery': 9, 'no-limits': 10,
        'storage': 11, 'ended': 12, 'usage': 64}

VERBS = ['list', 'status', 'watch', 'profiles', 'validate', 'arm', 'run', 'start', 'pause', 'resume',
         'stop', 'set-depth', 'set-speed', 'clear-fault', 'limits', 'reload-limits', 'history',
         'cartridge', 'record', 'sim']

PEN_KEYS = {'serial', 'model', 'firmware_version', 'protocol_version', 'generation', 'state', 'fault',
            'profile', 'depth_mm', 'speed_hz', 'depth_range_mm', 'depth_step_mm', 'speed_range_hz',
            'battery_percent', 'temperature_c', 'cartridge', 'session_id', 'elapsed_s', 'strokes',
            'telemetry_rate_hz', 'path'}
HISTORY_KEYS = {'id', 'pen', 'cartridge', 'profile', 'profile_digest', 'limits_digest', 'label',
                'owner_uid', 'start', 'end', 'duration_s', 'strokes', 'max_depth_mm',
                'max_temperature_c', 'max_current_ma', 'reason'}


# Under the valgrind setup, the needlectl call shapes (call_shape) already run under valgrind in
# this test process: a repeat of one runs natively. A valgrinded needlectl costs about a second of
# start-up and leak check, and a suite repeats its common calls (add-pen, status, arm) hundreds of
# times, which made the cli suite half of the valgrind stage. What a repeat may reach that the
# first call did not (another pen state in `status`, more rows in `list`) is still checked by the
# ASan+UBSan stage, where every call is sanitized. NEEDLED_TEST_VALGRIND_EVERY_CALL=1 runs every
# call under valgrind.
_valgrinded_shapes = set()
# valgrind's exit status when it found errors (meson.build's setup, busfixture.daemon_wrapper);
# needlectl's own statuses stop at 64.
VALGRIND_ERRORS = 99


def _word_kind(word):
    if os.path.isdir(word):
        return 'directory'
    if os.path.isfile(word):
        return 'file'
    if '/' in word or word.endswith(('.yaml', '.yml', '.csv', '.json')):
        return 'missing path'
    return 'word'


def call_shape(args, expect=None, stdin=False):
    """What a needlectl call exercises, for the valgrind setup: its verb (with the sub-verb of sim
    and audit), the options it names, the kind of each other word (a file, a directory, a path
    that does not exist, a word), whether it reads standard input, and the exit status expected
    (so an expected error is a shape of its own)."""
    words = [a for a in args if not a.startswith('-')]
    verb = tuple(words[:2]) if words[:1] in (['sim'], ['audit']) else tuple(words[:1])
    options = tuple(sorted({a.split('=', 1)[0] for a in args if a.startswith('-')}))
    kinds = tuple(_word_kind(w) for w in words[len(verb):])
    return verb, options, kinds, stdin, expect


def wrapper(args=None, expect=None, stdin=False):
    """needlectl under valgrind in the valgrind setup, so its leaks and errors fail tests (with
    args, only the first call of each call_shape); NEEDLECTL_WRAPPER (e.g. "strace -f -o /tmp/t")
    for debugging."""
    if os.environ.get('NEEDLECTL_WRAPPER'):
        return shlex.split(os.environ['NEEDLECTL_WRAPPER'])
    if os.environ.get('NEEDLED_TEST_VALGRIND') != '1':
        return []
    if args is not None and os.environ.get('NEEDLED_TEST_VALGRIND_EVERY_CALL') != '1':
        shape = call_shape(args, expect, stdin)
        if shape in _valgrinded_shapes:
            return []
        _valgrinded_shapes.add(shape)
    return busfixture.daemon_wrapper()


def valgrinded(prefix):
    return bool(prefix) and os.path.basename(prefix[0]) in ('valgrind', 'valgrind-wrap')


def profile_text(name='cli-test', **profile):
    return profile_yaml(name=name, **profile)


class NeedlectlTestCase(busfixture.BusTestCase):
    """One bus, polkit mock and needled --simulate per class; every action allowed unless a
    test says otherwise; each test's pens removed after it."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix='needlectl-test-')
        cls.limits_path = os.path.join(cls.tmp, 'limits.yaml')
        shutil.copyfile(os.path.join(CONF, 'limits.yaml'), cls.limits_path)
        state = os.path.join(cls.tmp, 'state')
        os.mkdir(state)
        # needlectl is what this suite checks (under valgrind in the valgrind setup); the daemon
        # is checked under valgrind by the dbus and safety suites, so it runs natively here, and
        # real-time as its unit runs it: a time-shared daemon on a loaded machine can miss the
        # simulated pen's 500 ms heartbeat, and the session ends heartbeat-lost.
        cls.daemon = cls.fixture.start_daemon(realtime_prefix(wrapped=False) + [
            needled_binary(), '--simulate',
            '--limits', cls.limits_path, '--profiles', PROFILES, '--state-dir', state], wrap=False)

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        super().setUp()
        self.polkit.set_allowed(ALL_ACTIONS)
        self.addCleanup(self.remove_all_pens)
        self.counter = getattr(type(self), 'counter', 0)

    def env(self):
        return self.fixture.env({'LC_ALL': 'C.UTF-8', 'TERM': 'xterm'})

    def ctl(self, *args, input=None, timeout=30, expect=None):
        """Runs needlectl; returns (exit status, stdout, stderr). With expect, asserts the status."""
        prefix = wrapper(args, expect, stdin=input is not None)
        p = subprocess.run(prefix + [NEEDLECTL, *args], input=input, capture_output=True, text=True,
                           timeout=timeout * timeout_multiplier(), env=self.env())
        # Whatever the caller expects (a poll may take any status as "not yet"): valgrind's errors
        # fail the test.
        if valgrinded(prefix) and p.returncode == VALGRIND_ERRORS:
            self.fail(f'valgrind found errors in needlectl {" ".join(args)}\nstderr: {p.stderr}')
        if expect is not None:
            self.assertEqual(p.returncode, EXIT[expect] if isinstance(expect, str) else expect,
                             f'needlectl {" ".join(args)}\nstdout: {p.stdout}\nstderr: {p.stderr}')
        return p.returncode, p.stdout, p.stderr

    def ctl_json(self, *args, expect='ok'):
        _, out, _ = self.ctl(*args, '--json', expect=expect)
        return json.loads(out)

    def spawn(self, *args, stdin=subprocess.DEVNULL):
        return subprocess.Popen(wrapper() + [NEEDLECTL, *args], stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env())

    def add_pen(self, serial=None, cartridge=None, **options):
        type(self).counter = getattr(type(self), 'counter', 0) + 1
        serial = serial or f'CLI{type(self).counter:03d}'
        args = ['sim', 'add-pen', '--serial', serial]
        for key, value in options.items():
            args += [f'--{key}', str(value)]
        _, out, _ = self.ctl(*args, expect='ok')
        self.assertEqual(out.strip(), serial)
        if cartridge:
            self.ctl('sim', 'insert-cartridge', serial, cartridge[0], str(cartridge[1]), expect='ok')
        return serial

    def remove_all_pens(self):
        for pen in self.ctl_json('list'):
            self.ctl('stop', pen['serial'])
            self.ctl('sim', 'remove-pen', pen['serial'])

    def pen(self, serial):
        return self.ctl_json('status', serial)

    def wait_for(self, predicate, timeout_s=10.0, what='condition'):
        deadline = time.monotonic() + timeout_s * timeout_multiplier()
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        self.fail(f'timed out waiting for {what}')

    @staticmethod
    def csv_rows(path):
        """Data rows written so far to a CSV file (0 when it is not there yet)."""
        try:
            with open(path, encoding='utf-8') as f:
                return max(len(f.read().splitlines()) - 1, 0)
        except FileNotFoundError:
            return 0

    def read_limits(self):
        with open(self.limits_path, encoding='utf-8') as f:
            return f.read()

    def write(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        return path


class Basics(NeedlectlTestCase):
    def test_help_for_every_verb(self):
        for verb in VERBS:
            rc, out, err = self.ctl(verb, '--help')
            self.assertEqual(rc, 0, f'{verb}: {err}')
            self.assertIn(f'Usage: needlectl {verb}', out)
            self.assertIn('Exit status', out, verb)
            self.assertEqual(err, '')
        _, out, _ = self.ctl('--help', expect='ok')
        for verb in VERBS:
            self.assertRegex(out, rf'\n  {re.escape(verb)} ', verb)

    def test_usage_errors(self):
        self.ctl('list', '--bogus', expect='usage')
        self.ctl('list', 'extra', expect='usage')
        self.ctl('validate', expect='usage')
        self.ctl('set-depth', 'PEN', 'deep', expect='usage')
        self.ctl('history', '--since', 'yesterday-ish', expect='usage')
        self.ctl('history', '--limit', '0', expect='usage')
        self.ctl('sim', 'teleport', expect='usage')
        self.ctl('sim', 'insert-cartridge', 'C', 'many', expect='usage')
        self.ctl('sim', 'battery', '101', expect='usage')
        self.ctl('record', expect='usage')
        self.ctl('run', '--watch', '--quiet', expect='usage')
        self.ctl('watch', '--interval', '0', expect='usage')

    def test_bus_unreachable(self):
        env = self.env()
        env['DBUS_SYSTEM_BUS_ADDRESS'] = 'unix:path=' + os.path.join(self.tmp, 'no-such-socket')
        p = subprocess.run(wrapper() + [NEEDLECTL, 'list'], capture_output=True, text=True, env=env,
                           timeout=30 * timeout_multiplier())
        self.assertEqual(p.returncode, EXIT['no-daemon'], p.stderr)
        self.assertIn('cannot connect to the system bus', p.stderr)

    def test_daemon_not_running(self):
        # A bus of its own, where nobody owns org.needled.
        p = subprocess.run(['dbus-run-session', '--'] + wrapper() + [NEEDLECTL, '--session', 'status'],
                           capture_output=True, text=True, env=self.env(), timeout=30 * timeout_multiplier())
        self.assertEqual(p.returncode, EXIT['no-daemon'], p.stderr)
        self.assertIn('org.freedesktop.DBus.Error.ServiceUnknown', p.stderr)
        self.assertIn('is needled running?', p.stderr)

    def test_global_options_before_the_verb(self):
        _, out, _ = self.ctl('--json', 'list', expect='ok')
        self.assertEqual(json.loads(out), [])
        _, out, _ = self.ctl('--system', '--json', 'status', expect='ok')
        self.assertIn('version', json.loads(out))


class Documentation(NeedlectlTestCase):
    def complete(self, line):
        """The candidates bash completion offers for line (completing its last word)."""
        words = line.split(' ')
        script = (f'source {shlex.quote(os.path.join(ROOT, "tools", "needlectl.bash-completion"))}\n'
                  f'needlectl() {{ {shlex.quote(NEEDLECTL)} "$@"; }}\n'
                  f'COMP_WORDS=({" ".join(shlex.quote(w) for w in words)})\n'
                  f'COMP_CWORD={len(words) - 1}\n'
                  '_needlectl\nprintf "%s\\n" "${COMPREPLY[@]}"\n')
        p = subprocess.run(['bash', '--norc', '--noprofile', '-c', script], capture_output=True, text=True,
                           env=self.env(), timeout=30 * timeout_multiplier())
        self.assertEqual(p.returncode, 0, p.stderr)
        return set(p.stdout.split())

    def test_bash_completion(self):
        self.assertTrue({'status', 'start', 'stop'} <= self.complete('needlectl st'))
        self.assertTrue(set(VERBS) <= self.complete('needlectl '))
        self.assertEqual(self.complete('needlectl sim '),
                         {'add-pen', 'remove-pen', 'insert-cartridge', 'eject', 'battery', 'fault'})
        self.assertIn('--profile', self.complete('needlectl run --'))
        self.assertEqual(self.complete('needlectl export --format '), {'csv', 'fhir'})
        pen = self.add_pen()
        self.assertEqual(self.complete('needlectl status '), {pen})
        self.assertIn('acne-scars-cheeks', self.complete('needlectl run --profile '))

    @unittest.skipUnless(shutil.which('groff'), 'groff is not installed')
    def test_man_pages_are_well_formed(self):
        for page in ('needlectl.1', 'needled.8'):
            p = subprocess.run(['groff', '-man', '-Tutf8', '-ww', '-z', os.path.join(ROOT, 'docs', page)],
                               capture_output=True, text=True, env=dict(os.environ, LC_ALL='C.UTF-8'))
            self.assertEqual((p.returncode, p.stderr), (0, ''), page)

    def test_man_page_lists_every_verb_and_exit_code(self):
        with open(os.path.join(ROOT, 'docs', 'needlectl.1'), encoding='utf-8') as f:
            page = f.read().replace('\\-', '-')
        for verb in VERBS:
            self.assertIn(verb, page)
        for code in EXIT.values():
            self.assertIn(f'.B {code}\n', page)


class Pens(NeedlectlTestCase):
    def test_list_and_status(self):
        self.assertEqual(self.ctl_json('list'), [])
        _, out, _ = self.ctl('list', expect='ok')
        self.assertIn('No pens', out)
        a = self.add_pen(cartridge=('LS-1', 12), battery=80)
        b = self.add_pen(model='needle-sim-b')
        pens = self.ctl_json('list')
        self.assertEqual([p['serial'] for p in pens], [a, b])
        for p in pens:
            self.assertTrue(PEN_KEYS <= set(p), set(p) ^ PEN_KEYS)
            self.assertEqual(p['path'], f'/org/needled/pen/{p["serial"]}')
            self.assertEqual(p['state'], 'idle')
            self.assertIsInstance(p['depth_mm'], float)
            self.assertEqual(len(p['depth_range_mm']), 2)
        self.assertEqual(pens[0]['battery_percent'], 80)
        self.assertEqual(pens[0]['cartridge'], {'id': 'LS-1', 'needles': 12, 'state': 'fresh', 'runtime_s': 0})
        self.assertEqual(pens[1]['model'], 'needle-sim-b')
        _, out, _ = self.ctl('list', expect='ok')
        self.assertRegex(out, rf'(?m)^{a}\s+needle-sim\s+idle\s+80%\s+LS-1 \(fresh\)')

        overview = self.ctl_json('status')
        self.assertIn('simulator', overview['features'])
        self.assertEqual(overview['limits_state'], 'ok')
        self.assertEqual([p['serial'] for p in overview['pens']], [a, b])
        _, out, _ = self.ctl('status', a, expect='ok')
        self.assertIn(f'{a} (/org/needled/pen/{a})', out)
        self.assertIn('Cartridge:    LS-1, 12 needles, fresh', out)

    def test_naming_a_pen(self):
        self.ctl('status', 'NOPE', expect='no-pen')
        self.ctl('stop', expect='no-pen')  # none connected, none named
        a = self.add_pen()
        self.assertEqual(self.ctl_json('status', a)['serial'], a)
        self.assertEqual(self.ctl_json('status', f'/org/needled/pen/{a}')['serial'], a)
        self.ctl('clear-fault', expect='ok')  # the only pen may be omitted
        rc, _, err = self.ctl('status', 'NOPE', expect='no-pen')
        self.assertIn(f'no pen NOPE is connected; connected: {a}', err)
        b = self.add_pen()
        rc, _, err = self.ctl('clear-fault', expect='usage')
        self.assertIn(f'2 pens are connected; name one by serial or path: {a} {b}', err)
        self.ctl('status', '/not/a pen', expect='usage')

    def test_profiles(self):
        profiles = self.ctl_json('profiles')
        names = sorted(f[:-len('.yaml')] for f in os.listdir(PROFILES) if f.endswith('.yaml'))
        self.assertEqual([p['name'] for p in profiles], names)
        for p in profiles:
            self.assertTrue({'name', 'area', 'indication', 'depth_mm', 'speed_hz', 'duration_s', 'needles',
                             'valid', 'violations'} <= set(p))
            self.assertIs(p['valid'], True, p)
        _, out, _ = self.ctl('profiles', expect='ok')
        self.assertRegex(out, r'(?m)^acne-scars-cheeks\s+cheeks\s+acne-scars\s+1\.25 mm\s+120 Hz\s+900 s\s+12\s+yes$')

    def test_validate(self):
        good = self.write('good.yaml', profile_text())
        _, out, _ = self.ctl('validate', good, expect='ok')
        self.assertEqual(out, '')
        self.assertEqual(self.ctl_json('validate', good), [])
        bad = os.path.join(DATA, 'profile-invalid.yaml')
        problems = self.ctl_json('validate', bad, expect='invalid')
        self.assertTrue(problems)
        for p in problems:
            self.assertEqual(set(p), {'file', 'field', 'code', 'message'})
            self.assertEqual(p['file'], bad)
        codes = {p['code'] for p in problems}
        self.assertIn('above-area-max', codes)
        self.assertIn('unknown-field', codes)
        _, out, _ = self.ctl('validate', bad, expect='invalid')
        self.assertIn(f'{bad}: depth_mm: depth_mm 2.0 exceeds the 1.5 mm maximum for area cheeks', out)
        # Standard input, and files that cannot be read.
        _, out, _ = self.ctl('validate', '-', input=profile_text(depth_mm=2.0), expect='invalid')
        self.assertIn('-: depth_mm: depth_mm 2.0 exceeds', out)
        rc, _, err = self.ctl('validate', os.path.join(self.tmp, 'missing.yaml'), expect='unreadable')
        self.assertIn('No such file or directory', err)
        self.ctl('validate', self.tmp, expect='unreadable')
        big = self.write('big.yaml', 'notes: "' + 'x' * 70000 + '"\n')
        self.ctl('validate', big, expect='unreadable')

    def test_arm(self):
        pen = self.add_pen(cartridge=('ARM-1', 12))
        self.ctl('arm', pen, 'acne-scars-cheeks', expect='ok')
        p = self.pen(pen)
        self.assertEqual((p['state'], p['profile']['name']), ('armed', 'acne-scars-cheeks'))
        rc, _, err = self.ctl('arm', pen, 'no-such-profile', expect='invalid')
        self.assertIn('org.needled1.Error.UnknownProfile', err)
        custom = self.write('custom.yaml', profile_text(name='custom-arm', depth_mm=0.8))
        self.ctl('arm', custom, expect='ok')  # the only pen
        self.assertEqual(self.pen(pen)['profile']['name'], 'custom-arm')
        too_deep = self.write('deep.yaml', profile_text(name='too-deep', depth_mm=2.0))
        rc, _, err = self.ctl('arm', pen, too_deep, expect='invalid')
        self.assertIn('org.needled1.Error.InvalidProfile', err)
        self.assertIn('1.5 mm', err)
        self.assertEqual(self.pen(pen)['profile']['name'], 'custom-arm', 'unchanged after a refusal')
        mismatch = self.write('mismatch.yaml', profile_text(name='mismatch', needles=36))
        self.ctl('arm', pen, mismatch, expect='invalid')
        self.ctl('arm', pen, os.path.join(self.tmp, 'missing.yaml'), expect='unreadable')
        self.polkit.set_allowed([])
        rc, _, err = self.ctl('arm', pen, 'acne-scars-cheeks', expect='not-authorized')
        self.assertIn('org.freedesktop.DBus.Error.AccessDenied', err)

    def test_start_alone_ends_with_needlectl(self):
        pen = self.add_pen()
        self.ctl('start', pen, expect='wrong-state')  # nothing armed
        self.ctl('arm', pen, 'acne-scars-cheeks', expect='ok')
        rc, _, err = self.ctl('start', pen, expect='cartridge')
        self.assertIn('org.needled1.Error.NoCartridge', err)
        self.ctl('sim', 'insert-cartridge', pen, 'ST-1', '12', expect='ok')
        rc, out, err = self.ctl('start', pen, '--json', '--label', 'appt-7', expect='ok')
        session = json.loads(out)['session_id']
        self.assertIn('ends now, as needlectl exits', err)
        history = self.wait_for(lambda: [s for s in self.ctl_json('history', '--pen', pen)
                                         if s['id'] == session and s['reason']], what='the session to end')
        self.assertEqual(history[0]['reason'], 'client-vanished')
        self.assertEqual(history[0]['label'], 'appt-7')
        # Single use: the cartridge is spent now.
        self.ctl('arm', pen, 'acne-scars-cheeks', expect='ok')
        rc, _, err = self.ctl('start', pen, expect='cartridge')
        self.assertIn('org.needled1.Error.CartridgeSpent', err)
        cartridge = self.ctl_json('cartridge', 'ST-1')
        self.assertEqual((cartridge['id'], cartridge['state'], cartridge['sessions']), ('ST-1', 'spent', 1))
        self.assertEqual(self.ctl_json('cartridge', 'NEVER-SEEN')['state'], 'fresh')
        _, out, _ = self.ctl('cartridge', 'ST-1', expect='ok')
        self.assertIn('State:       spent', out)
        self.ctl('cartridge', '', expect='usage')

    def test_low_battery(self):
        pen = self.add_pen(cartridge=('LB-1', 12), battery=10)
        self.ctl('arm', pen, 'acne-scars-cheeks', expect='ok')
        rc, _, err = self.ctl('start', pen, expect='low-battery')
        self.assertIn('org.needled1.Error.LowBattery', err)

    def test_owner_only_verbs_from_another_program(self):
        pen = self.add_pen(cartridge=('OW-1', 12))
        for verb in (['pause'], ['resume'], ['set-depth', '1.0'], ['set-speed', '100']):
            rc, _, err = self.ctl(verb[0], pen, *verb[1:], expect='wrong-state')
            self.assertIn('org.needled1.Error.WrongState', err)
        runner = self.spawn('run', pen, '--profile', 'acne-scars-cheeks', '--quiet')
        try:
            self.wait_for(lambda: self.pen(pen)['state'] == 'running', what='running')
            for verb in (['pause'], ['set-depth', '1.0'], ['set-speed', '100']):
                rc, _, err = self.ctl(verb[0], pen, *verb[1:], expect='wrong-state')
                self.assertIn('org.needled1.Error.NotOwner', err)
                self.assertIn('needlectl run', err)
            # Stop needs nothing: no authorization, no ownership.
            self.polkit.set_allowed([])
            self.ctl('stop', pen, expect='ok')
            out, err = runner.communicate(timeout=15 * timeout_multiplier())
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.communicate()
        self.assertEqual(runner.returncode, EXIT['ended'], err)
        self.assertRegex(out, r'Session \S+ ended: stopped')
        self.ctl('stop', pen, expect='ok')  # idempotent

    def test_stop_all(self):
        self.ctl('stop', '--all', expect='ok')  # none connected
        a = self.add_pen()
        b = self.add_pen()
        self.polkit.set_allowed([])
        self.ctl('stop', '--all', expect='ok')
        self.ctl('stop', '--all', a, expect='usage')
        self.assertEqual({self.pen(a)['state'], self.pen(b)['state']}, {'idle'})


class Sessions(NeedlectlTestCase):
    def test_run_with_commands_json(self):
        pen = self.add_pen(cartridge=('RUN-1', 12))
        runner = self.spawn('run', pen, '--profile', 'acne-scars-cheeks', '--label', 'appt-42', '--json',
                            '--interval', '0.2', '--commands', stdin=subprocess.PIPE)
        events = []
        try:
            def next_event(name):
                while True:
                    line = runner.stdout.readline()
                    if not line:
                        self.fail(f'run ended before {name}: {runner.stderr.read()}')
                    event = json.loads(line)
                    events.append(event)
                    if event['event'] == name:
                        return event
            started = next_event('session-started')
            session = started['session_id']
            self.assertEqual(started['pen'], pen)
            update = next_event('update')
            while update['state'] != 'running' or update['depth_mm'] is None:
                update = next_event('update')
            self.assertEqual(update['pen'], pen)
            self.assertAlmostEqual(update['depth_mm'], 1.25, delta=0.2)
            for key in ('state', 'set_depth_mm', 'depth_mm', 'speed_hz', 'current_ma', 'temperature_c',
                        'battery_percent', 'cartridge', 'elapsed_s', 'strokes', 'session_id'):
                self.assertIn(key, update)
            runner.stdin.write('depth 1.0\n')
            runner.stdin.flush()
            self.assertIn('SetDepth 1: done', next_event('done')['message'])
            runner.stdin.write('depth 9\n')
            runner.stdin.flush()
            self.assertIn('LimitExceeded', next_event('refused')['message'])
            runner.stdin.write('pause\n')
            runner.stdin.flush()
            next_event('done')
            self.wait_for(lambda: self.pen(pen)['state'] == 'paused', what='paused')
            runner.stdin.write('resume\n')
            runner.stdin.flush()
            next_event('done')
            runner.stdin.write('fly\n')
            runner.stdin.flush()
            next_event('bad-command')
            runner.stdin.write('stop\n')
            runner.stdin.flush()
            ended = next_event('session-ended')
            runner.wait(timeout=15 * timeout_multiplier())
        finally:
            if runner.poll() is None:
                runner.kill()
            runner.communicate()
        self.assertEqual((ended['session_id'], ended['reason']), (session, 'stopped'))
        self.assertEqual(runner.returncode, EXIT['ended'])
        entry = self.ctl_json('history', '--pen', pen, '--limit', '1')[0]
        self.assertTrue(HISTORY_KEYS <= set(entry), HISTORY_KEYS - set(entry))
        self.assertEqual((entry['id'], entry['label'], entry['reason']), (session, 'appt-42', 'stopped'))
        self.assertGreater(entry['end'], entry['start'])
        # One truth: run's closing figures are the ledger's, not the last coalesced properties.
        self.assertEqual(ended['strokes'], entry['strokes'])
        self.assertEqual(ended['elapsed_s'], entry['duration_s'])

    def test_run_completes(self):
        pen = self.add_pen(cartridge=('DONE-1', 12))
        short = self.write('short.yaml', profile_text(name='short-one', duration_s=1))
        rc, out, err = self.ctl('run', pen, '--profile', short, '--interval', '0.2', expect='ok', timeout=60)
        self.assertRegex(out, r'Session \S+ started on ' + pen)
        self.assertRegex(out, r'Session \S+ ended: completed')
        self.assertRegex(out, rf'(?m)^\d\d:\d\d:\d\d\.\d{{3}} {pen} running depth 1\.00/')
        self.assertEqual(self.pen(pen)['state'], 'idle')

    def test_run_with_a_skin_type_shows_the_dose(self):
        pen = self.add_pen(cartridge=('SKIN-CLI-1', 12))
        short = self.write('skin.yaml', profile_text(name='skin-one', duration_s=1) + 'skin_types: [I, II]\npasses: 2\n')
        rc, out, err = self.ctl('run', pen, '--profile', short, '--skin-type', 'II', '--interval', '0.2',
                                expect='ok', timeout=60)
        self.assertRegex(out, r'Session \S+ started on ' + pen + ', skin type II')
        self.assertRegex(out, r'Session \S+ ended: completed \([\d.]+ s, \d+ strokes, \d+ punctures, 0/cm²\)')
        self.assertRegex(out, rf'(?m)^\d\d:\d\d:\d\d\.\d{{3}} {pen} running .* punctures [1-9]\d* per-cm2 0$')
        entry = self.ctl_json('history', '--pen', pen, '--limit', '1')[0]
        self.assertEqual(entry['skin_type'], 'II')
        self.assertGreater(entry['punctures'], 0)
        self.assertEqual(entry['punctures'], entry['strokes'] * 12)
        _, table, _ = self.ctl('history', '--pen', pen, '--limit', '1', expect='ok')
        self.assertIn('PUNCTURES', table.splitlines()[0])
        self.assertRegex(table.splitlines()[1], rf'\s{entry["punctures"]}\s+-\s+II\s+completed')
        # A type the profile is not meant for: refused as invalid, nothing recorded.
        self.ctl('sim', 'eject', pen, expect='ok')
        self.ctl('sim', 'insert-cartridge', pen, 'SKIN-CLI-2', '12', expect='ok')
        rc, _, err = self.ctl('run', pen, '--profile', short, '--skin-type', 'IV', expect='invalid')
        self.assertIn('skin-type-not-allowed', err)
        self.assertEqual(len(self.ctl_json('history', '--pen', pen)), 1)

    def test_run_refused_exits_with_the_reason(self):
        pen = self.add_pen()
        rc, _, err = self.ctl('run', pen, '--profile', 'acne-scars-cheeks', expect='cartridge')
        self.assertIn('NoCartridge', err)
        self.ctl('run', 'NOPE', expect='no-pen')

    def test_run_fault_and_clear_fault(self):
        pen = self.add_pen(cartridge=('FLT-1', 12))
        runner = self.spawn('run', pen, '--profile', 'acne-scars-cheeks', '--quiet')
        try:
            self.wait_for(lambda: self.pen(pen)['state'] == 'running', what='running')
            self.ctl('sim', 'fault', pen, 'over-temperature', expect='ok')
            out, err = runner.communicate(timeout=20 * timeout_multiplier())
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.communicate()
        self.assertEqual(runner.returncode, EXIT['fault'], err)
        self.assertRegex(out, r'ended: fault:over-temperature')
        self.assertEqual(self.pen(pen)['state'], 'fault')
        rc, _, err = self.ctl('clear-fault', pen, expect='fault')
        self.assertIn('org.needled1.Error.Fault', err)
        self.ctl('sim', 'fault', pen, 'clear', expect='ok')
        self.wait_for(lambda: self.ctl('clear-fault', pen)[0] == 0, what='clear-fault to succeed')
        self.assertEqual(self.pen(pen)['state'], 'idle')

    def test_run_ends_when_the_pen_leaves(self):
        pen = self.add_pen(cartridge=('GONE-1', 12))
        runner = self.spawn('run', pen, '--profile', 'acne-scars-cheeks', '--json')
        try:
            self.wait_for(lambda: self.pen(pen)['state'] == 'running', what='running')
            self.ctl('sim', 'remove-pen', pen, expect='ok')
            out, err = runner.communicate(timeout=20 * timeout_multiplier())
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.communicate()
        self.assertEqual(runner.returncode, EXIT['no-pen'], err)
        ended = [json.loads(line) for line in out.splitlines() if '"session-ended"' in line]
        self.assertEqual(ended[0]['reason'], 'device-lost')

    def test_run_heartbeats_when_the_limits_ask(self):
        # 1 s, scaled under valgrind: there needlectl itself runs under valgrind and its
        # heartbeats come late (the test is about needlectl keeping the rule, not the figure).
        # needlectl beats every third of it: only a stall of two thirds (over 0.6 s of needlectl
        # or the daemon not running, seen with 300 ms on an overloaded machine) ends the session.
        timeout_ms = int(1000 * timeout_multiplier())
        original = self.read_limits()
        self.addCleanup(self.restore_limits, original)
        with open(self.limits_path, 'w', encoding='utf-8') as f:
            f.write(limits_text(client_heartbeat_timeout_ms=timeout_ms))
        self.ctl('reload-limits', expect='ok')
        pen = self.add_pen(cartridge=('HB-1', 12))
        runner = self.spawn('run', pen, '--profile', 'acne-scars-cheeks', '--json', '--interval', '0.2')
        # Its status lines are read as they come: a full pipe would block needlectl's loop, its
        # heartbeats with it (64 KiB is about 20 s of lines at this interval).
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(runner.stdout), daemon=True)
        try:
            started = json.loads(runner.stdout.readline())
            self.assertEqual(started['event'], 'session-started')
            self.assertEqual(started['heartbeat_ms'], timeout_ms // 3)
            reader.start()
            # Three heartbeat timeouts: without heartbeats the session would have ended.
            time.sleep(3 * timeout_ms / 1000)
            state = self.pen(pen)['state']
            if state != 'running':
                ended = self.ctl_json('history', '--pen', pen, '--limit', '1')
                self.fail(f'the session did not keep running ({state}): {ended}')
            runner.send_signal(signal.SIGINT)
            runner.wait(timeout=15 * timeout_multiplier())
            reader.join(timeout=15 * timeout_multiplier())
            err = runner.stderr.read()
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.communicate()
        self.assertEqual(runner.returncode, EXIT['ended'], err)
        self.assertIn('"reason":"stopped"', ''.join(lines))

    def restore_limits(self, text):
        with open(self.limits_path, 'w', encoding='utf-8') as f:
            f.write(text)
        self.polkit.set_allowed(ALL_ACTIONS)
        self.ctl('reload-limits', expect='ok')

    def test_start_wait(self):
        pen = self.add_pen(cartridge=('SW-1', 12))
        self.ctl('arm', pen, 'acne-scars-cheeks', expect='ok')
        runner = self.spawn('start', pen, '--wait', '--interval', '0.2')
        try:
            self.wait_for(lambda: self.pen(pen)['state'] == 'running', what='running')
            time.sleep(0.5)
            self.assertEqual(self.pen(pen)['state'], 'running', 'start --wait keeps the session')
            runner.send_signal(signal.SIGTERM)
            out, err = runner.communicate(timeout=15 * timeout_multiplier())
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.communicate()
        self.assertEqual(runner.returncode, EXIT['ended'], err)
        self.assertIn('ended: stopped', out)


class Limits(NeedlectlTestCase):
    def test_limits(self):
        info = self.ctl_json('limits')
        with open(self.limits_path, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.assertEqual((info['path'], info['state'], info['digest'], info['error']),
                         (self.limits_path, 'ok', digest, ''))
        self.assertGreater(info['loaded_at'], 0)
        self.assertEqual(info['limits']['version'], 1)
        self.assertEqual(info['limits']['areas']['cheeks']['max_depth_mm'], 1.5)
        self.assertEqual(info['limits']['cartridge']['allowed_needles'], [12, 14, 16, 24, 36, 42])
        _, out, _ = self.ctl('limits', expect='ok')
        self.assertIn(f'Digest:  {digest}', out)
        self.assertIn('  cheeks:\n    max_depth_mm: 1.5', out)

    def test_reload(self):
        original = self.read_limits()
        self.addCleanup(self.restore, original)
        before = self.ctl_json('limits')['digest']
        with open(self.limits_path, 'w', encoding='utf-8') as f:
            f.write(original.replace('version: 1', 'version: 2'))
        rc, _, err = self.ctl('reload-limits', expect='invalid')
        self.assertIn('org.needled1.Error.InvalidLimits', err)
        self.assertIn('the limits in force are unchanged', err)
        info = self.ctl_json('limits')
        self.assertEqual((info['state'], info['digest']), ('ok', before))
        self.assertIn('version', info['error'])
        with open(self.limits_path, 'w', encoding='utf-8') as f:
            f.write(original.replace('max_duration_s: 2700', 'max_duration_s: 2400'))
        result = self.ctl_json('reload-limits')
        self.assertNotEqual(result['digest'], before)
        self.assertEqual(result['digest'], self.ctl_json('limits')['digest'])
        self.assertEqual(self.ctl_json('limits')['limits']['session']['max_duration_s'], 2400)
        self.polkit.set_allowed(['org.needled1.operate'])
        rc, _, err = self.ctl('reload-limits', expect='not-authorized')
        self.assertIn('AccessDenied', err)

    def restore(self, text):
        with open(self.limits_path, 'w', encoding='utf-8') as f:
            f.write(text)
        self.polkit.set_allowed(ALL_ACTIONS)
        self.ctl('reload-limits', expect='ok')

    def test_history_filters_and_authorization(self):
        pen = self.add_pen(cartridge=('HI-1', 12))
        self.ctl('arm', pen, 'acne-scars-cheeks', expect='ok')
        self.ctl('start', pen, '--json', expect='ok')
        self.wait_for(lambda: self.ctl_json('history', '--pen', pen), what='a history entry')
        self.assertEqual(self.ctl_json('history', '--pen', 'NOBODY'), [])
        self.assertEqual(len(self.ctl_json('history', '--limit', '1')), 1)
        self.assertEqual(self.ctl_json('history', '--since', '@4102444800'), [])  # 2100-01-01
        self.assertTrue(self.ctl_json('history', '--since', '-1d', '--pen', pen))
        self.assertTrue(self.ctl_json('history', '--since', '2000-01-01', '--pen', pen))
        _, out, _ = self.ctl('history', '--pen', pen, expect='ok')
        self.assertRegex(out, rf'(?m)^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\s+{pen}\s+acne-scars-cheeks\s+HI-1\s')
        self.polkit.set_allowed(['org.needled1.operate'])
        self.ctl('history', expect='not-authorized')


class Simulator(NeedlectlTestCase):
    def test_sim_commands(self):
        added = self.ctl_json('sim', 'add-pen', '--serial', 'SIMX', '--firmware', '2.0.0', '--rate', '500')
        self.assertEqual(added, {'serial': 'SIMX', 'path': '/org/needled/pen/SIMX'})
        p = self.pen('SIMX')
        self.assertEqual((p['firmware_version'], p['telemetry_rate_hz']), ('2.0.0', 500))
        rc, _, err = self.ctl('sim', 'add-pen', '--serial', 'SIMX', expect='invalid')
        self.assertIn('org.freedesktop.DBus.Error.InvalidArgs', err)
        self.ctl('sim', 'battery', 'SIMX', '42', expect='ok')
        self.wait_for(lambda: self.pen('SIMX')['battery_percent'] == 42, what='battery 42')
        self.ctl('sim', 'eject', expect='cartridge')  # nothing fitted
        self.ctl('sim', 'insert-cartridge', 'C-9', '16', expect='ok')
        self.assertEqual(self.pen('SIMX')['cartridge']['id'], 'C-9')
        self.ctl('sim', 'insert-cartridge', 'C-10', '16', expect='wrong-state')
        self.ctl('sim', 'eject', 'SIMX', expect='ok')
        self.assertEqual(self.pen('SIMX')['cartridge']['state'], 'none')
        rc, _, err = self.ctl('sim', 'fault', 'SIMX', 'gremlins', expect='invalid')
        self.assertIn('InvalidArgs', err)
        self.ctl('sim', 'add-pen', '--serial', 'X', 'extra', expect='usage')
        self.ctl('sim', 'eject', '--serial', 'X', expect='usage')
        self.ctl('sim', 'remove-pen', 'SIMX', expect='ok')
        self.ctl('sim', 'remove-pen', 'SIMX', expect='no-pen')


class Telemetry(NeedlectlTestCase):
    def test_record(self):
        pen = self.add_pen()
        out_path = os.path.join(self.tmp, 'rec.csv')
        summary = self.ctl_json('record', pen, '--output', out_path, '--samples', '300')
        self.assertEqual((summary['samples'], summary['dropped'], summary['ended']), (300, 0, 'samples'))
        with open(out_path, encoding='utf-8') as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[0], 'sequence,device_time_us,host_time_us,dropped,flags,depth_mm,speed_hz,'
                                   'current_ma,temperature_c,battery_percent')
        rows = [line.split(',') for line in lines[1:]]
        self.assertEqual(len(rows), 300)
        seqs = [int(r[0]) for r in rows]
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + 300)))
        self.assertEqual((summary['first_sequence'], summary['last_sequence']), (seqs[0], seqs[-1]))
        self.assertTrue(all(int(r[9]) == 100 for r in rows))
        device_times = [int(r[1]) for r in rows]
        self.assertEqual(device_times, sorted(device_times))
        # The text summary, and a stop by signal: once it records (not after a fixed sleep, which a
        # valgrinded needlectl on a loaded machine outlasted before it handled SIGINT at all).
        out_path = os.path.join(self.tmp, 'rec-signal.csv')
        proc = self.spawn('record', pen, '--output', out_path)
        self.wait_for(lambda: self.csv_rows(out_path) >= 1, what='the first recorded sample')
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15 * timeout_multiplier())
        self.assertEqual(proc.returncode, 0, err)
        self.assertRegex(err, rf'Recorded \d+ samples of {pen} to {re.escape(out_path)} in [\d.]+ s: 0 dropped')
        # The pen leaving ends the recording with exit 5, the file complete so far.
        out_path = os.path.join(self.tmp, 'rec-gone.csv')
        proc = self.spawn('record', pen, '--output', out_path, '--json')
        self.wait_for(lambda: self.csv_rows(out_path) >= 1, what='the first recorded sample')
        self.ctl('sim', 'remove-pen', pen, expect='ok')
        out, err = proc.communicate(timeout=15 * timeout_multiplier())
        self.assertEqual(proc.returncode, EXIT['no-pen'], err)
        summary = json.loads(out)
        self.assertEqual(summary['ended'], 'pen-gone')
        with open(out_path, encoding='utf-8') as f:
            self.assertEqual(len(f.read().splitlines()), summary['samples'] + 1)

    def test_record_unwritable(self):
        pen = self.add_pen()
        self.ctl('record', pen, '--output', os.path.join(self.tmp, 'no', 'such', 'dir.csv'), expect='unreadable')

    def test_watch_lines_notice_the_pen_leaving_and_coming_back(self):
        pen = self.add_pen(cartridge=('W-1', 14))
        watcher = self.spawn('watch', pen, '--json', '--interval', '0.1')
        events = []
        try:
            def wait_event(name):
                while True:
                    line = watcher.stdout.readline()
                    if not line:
                        self.fail(f'watch ended: {watcher.stderr.read()}')
                    events.append(json.loads(line))
                    if events[-1]['event'] == name:
                        return events[-1]
            first = wait_event('update')
            self.assertEqual((first['pen'], first['present'], first['state']), (pen, True, 'idle'))
            self.assertEqual(first['cartridge']['id'], 'W-1')
            self.ctl('sim', 'remove-pen', pen, expect='ok')
            gone = wait_event('pen-gone')
            self.assertIs(gone['present'], False)
            self.ctl('sim', 'add-pen', '--serial', pen, expect='ok')
            back = wait_event('pen-back')
            self.assertIs(back['present'], True)
            later = self.wait_for(lambda: (lambda e: e if e['event'] == 'update' and e['depth_mm'] is not None
                                           else None)(json.loads(watcher.stdout.readline())),
                                  what='measured values after the return')
            self.assertEqual(later['cartridge']['state'], 'none')
            watcher.send_signal(signal.SIGINT)
            watcher.communicate(timeout=15 * timeout_multiplier())
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.communicate()
        self.assertEqual(watcher.returncode, 0)

    def pty_run(self, args, actions, timeout_s=20.0):
        """Runs needlectl on a pseudo-terminal; actions is a list of (wait_for_bytes, send_bytes
        or callable). Returns (exit status, everything it wrote, the terminal's lflag after)."""
        pid, fd = pty.fork()
        if pid == 0:
            env = self.env()
            env['COLUMNS'] = '100'
            cmd = wrapper() + [NEEDLECTL, *args]
            os.execvpe(cmd[0], cmd, env)
        before = termios.tcgetattr(fd)[3]
        output = b''
        deadline = time.monotonic() + timeout_s * timeout_multiplier()
        status = None
        try:
            pending = list(actions)
            while time.monotonic() < deadline:
                if pending and (pending[0][0](output) if callable(pending[0][0]) else pending[0][0] in output):
                    _, action = pending.pop(0)
                    if callable(action):
                        action()
                    else:
                        os.write(fd, action)
                ready, _, _ = select.select([fd], [], [], 0.05)
                if ready:
                    try:
                        chunk = os.read(fd, 65536)
                    except OSError:
                        chunk = b''
                    if not chunk:
                        break
                    output += chunk
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st
                    # Drain what is left.
                    while select.select([fd], [], [], 0.1)[0]:
                        try:
                            chunk = os.read(fd, 65536)
                        except OSError:
                            break
                        if not chunk:
                            break
                        output += chunk
                    break
            after = termios.tcgetattr(fd)[3]
        finally:
            if status is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status = os.waitpid(pid, 0)
            os.close(fd)
        return os.waitstatus_to_exitcode(status), output, before, after

    def assert_terminal_restored(self, output, before, after):
        self.assertEqual(output.count(b'\x1b[?1049h'), 1, 'entered the alternate screen once')
        self.assertEqual(output.count(b'\x1b[?1049l'), 1, 'left it once')
        self.assertGreater(output.rindex(b'\x1b[?25h'), output.rindex(b'\x1b[?25l'), 'cursor shown again')
        self.assertGreater(output.index(b'\x1b[?1049l'), output.index(b'\x1b[?1049h'))
        self.assertEqual(after & (termios.ICANON | termios.ECHO), before & (termios.ICANON | termios.ECHO),
                         'line editing and echo restored')

    def test_watch_on_a_terminal(self):
        pen = self.add_pen(cartridge=('TTY-1', 12))
        for quit_key in (b'q', b'\x03'):  # q, and Ctrl-C (SIGINT from the terminal)
            # Quit after a few frames: the view is redrawn, not printed once.
            rc, out, before, after = self.pty_run(['watch', pen], [(lambda o: o.count(b'\x1b[H') >= 4, quit_key)])
            self.assertEqual(rc, 0, out[-2000:])
            self.assert_terminal_restored(out, before, after)
            screen = out.decode('utf-8', 'replace')
            for field in ('State', 'idle', 'Depth', 'Speed', 'Current', 'Temperature', 'Battery',
                          'Cartridge', 'TTY-1', 'Elapsed', 'Telemetry', pen):
                self.assertIn(field, screen)

    def test_watch_on_a_terminal_sees_the_pen_go_and_return(self):
        pen = self.add_pen()

        def remove():
            self.ctl('sim', 'remove-pen', pen, expect='ok')

        def add():
            self.ctl('sim', 'add-pen', '--serial', pen, expect='ok')
        rc, out, before, after = self.pty_run(['watch', pen], [
            (b'Telemetry', remove), (b'pen gone', add), (b'came back', b'q')])
        self.assertEqual(rc, 0, out[-2000:])
        self.assert_terminal_restored(out, before, after)

    def test_run_watch_on_a_terminal(self):
        pen = self.add_pen(cartridge=('TTY-2', 12))
        rc, out, before, after = self.pty_run(['run', pen, '--profile', 'acne-scars-cheeks', '--watch'],
                                              [(b'running', b'q')])
        self.assertEqual(rc, EXIT['ended'], out[-2000:])
        self.assert_terminal_restored(out, before, after)
        tail = out[out.rindex(b'\x1b[?1049l'):].decode('utf-8', 'replace')
        self.assertRegex(tail, r'Session \S+ ended: stopped')
        self.assertIn('p: pause/resume', out.decode('utf-8', 'replace'))


if __name__ == '__main__':
    busfixture.skip_unless_available()
    if not os.environ.get('NEEDLED_BUILD_ROOT'):
        print('skipping: NEEDLED_BUILD_ROOT is not set (run through meson test)')
        sys.exit(busfixture.EXIT_SKIP)
    unittest.main(verbosity=2)
