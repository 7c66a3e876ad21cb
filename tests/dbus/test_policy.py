#!/usr/bin/python3
"""The system bus policy (dbus/org.needled.conf, as built) on a policy-enforcing bus.

Shows, as root and as an unprivileged user (setpriv to nobody/nogroup):
- nobody but the daemon's user may own org.needled: root and nobody are refused with the
  production file; with the same file naming nobody as the daemon user, nobody may and
  others still may not;
- every caller may call org.needled1.Manager/Pen/Simulator and the standard interfaces
  (Properties, Introspectable, ObjectManager, Peer) on the name's owner, and receives its
  signals;
- no caller, root included, may call another interface, or a method without an interface;
- without the file nobody gets through (control: the allowances are the file's doing).

The owner of org.needled here is tests/dbus/policy_standin.py, a service exporting those
interface names: a test of the bus policy, which looks at names only, not of needled.
"""

import json
import os
import subprocess
import sys
import unittest

import busfixture

HERE = os.path.dirname(os.path.abspath(__file__))
NOBODY_UID = 65534
ACCESS_DENIED = 'error:org.freedesktop.DBus.Error.AccessDenied'
STANDARD_CALLS = [
    ['call', 'org.freedesktop.DBus.Properties', 'GetAll', 's', ['org.needled1.Manager']],
    ['call', 'org.freedesktop.DBus.Introspectable', 'Introspect'],
    ['call', 'org.freedesktop.DBus.ObjectManager', 'GetManagedObjects'],
    ['call', 'org.freedesktop.DBus.Peer', 'Ping'],
]


def run_caller(fixture, commands, user=None, group=None):
    """Runs policy_caller.py as root (user None) or as user:group; returns its results."""
    argv = [busfixture.PYTHON, '-', json.dumps(commands)]
    if user is not None:
        argv = busfixture.unprivileged(argv, user, group)
    with open(os.path.join(HERE, 'policy_caller.py'), 'rb') as script:
        r = subprocess.run(argv, stdin=script, env=fixture.env(), capture_output=True,
                           timeout=60 * busfixture.timeout_multiplier())
    if r.returncode != 0:
        raise AssertionError(f'caller failed ({r.returncode}): {r.stderr.decode()}')
    out = json.loads(r.stdout)
    return out['uid'], out['results']


def policy_for_user(path, user, workdir):
    """A copy of the policy file at path with its daemon user replaced by user."""
    daemon_user = os.environ.get('NEEDLED_DAEMON_USER', 'needled')
    with open(path, encoding='utf-8') as f:
        text = f.read()
    attr = f'user="{daemon_user}"'
    if text.count(attr) != 1:
        raise AssertionError(f'{path}: expected exactly one {attr}')
    out = os.path.join(workdir, 'org.needled.conf')
    with open(out, 'w', encoding='utf-8') as f:
        f.write(text.replace(attr, f'user="{user}"'))
    return out


class ProductionOwnership(busfixture.BusTestCase):
    """The file as built, and no test-only permission to own org.needled."""

    @classmethod
    def fixture_args(cls):
        return {'root_owns': (), 'polkit': False}

    def test_root_may_not_own(self):
        uid, results = run_caller(self.fixture, [['own', 'org.needled']])
        self.assertEqual(uid, 0)
        self.assertEqual(results, [ACCESS_DENIED])

    def test_unprivileged_may_not_own(self):
        uid, results = run_caller(self.fixture, [['own', 'org.needled']], 'nobody', 'nogroup')
        self.assertEqual(uid, NOBODY_UID)
        self.assertEqual(results, [ACCESS_DENIED])

    def test_other_names_stay_closed(self):
        # The file opens org.needled only, not a prefix or a neighbour.
        _, results = run_caller(self.fixture, [['own', 'org.needled1'], ['own', 'org.needled.x']],
                                'nobody', 'nogroup')
        self.assertEqual(results, [ACCESS_DENIED, ACCESS_DENIED])


class DaemonUserOwnership(busfixture.BusTestCase):
    """The same file with the daemon user rule naming nobody: only nobody may own."""

    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.tmp = tempfile.TemporaryDirectory()
        cls.policy = policy_for_user(busfixture.production_policy(), 'nobody', cls.tmp.name)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.tmp.cleanup()

    @classmethod
    def fixture_args(cls):
        return {'policy_files': [cls.policy], 'root_owns': (), 'polkit': False}

    def test_daemon_user_may_own(self):
        uid, results = run_caller(self.fixture, [['own', 'org.needled']], 'nobody', 'nogroup')
        self.assertEqual(uid, NOBODY_UID)
        self.assertEqual(results, ['owned'])

    def test_others_may_not(self):
        _, results = run_caller(self.fixture, [['own', 'org.needled']])
        self.assertEqual(results, [ACCESS_DENIED])
        _, results = run_caller(self.fixture, [['own', 'org.needled']], 'daemon', 'daemon')
        self.assertEqual(results, [ACCESS_DENIED])


class Calls(busfixture.BusTestCase):
    """The file as built; the stand-in owns org.needled (as root, by the test-only policy)."""

    @classmethod
    def fixture_args(cls):
        return {'polkit': False}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.standin = cls.fixture.spawn([busfixture.PYTHON, os.path.join(HERE, 'policy_standin.py')])
        cls.fixture.wait_for_name('org.needled', 10, cls.standin)

    def check_admitted(self, user, group, expected_uid):
        uid, results = run_caller(self.fixture, [
            ['call', 'org.needled1.Manager', 'Probe'],
            ['call', 'org.needled1.Pen', 'ProbePen'],
            ['call', 'org.needled1.Simulator', 'ProbeSimulator'],
        ] + STANDARD_CALLS, user, group)
        self.assertEqual(uid, expected_uid)
        # The reply carries the caller's uid as the bus saw it.
        self.assertEqual(results[:3], [f'ok:{expected_uid}'] * 3)
        for cmd, result in zip(STANDARD_CALLS, results[3:]):
            self.assertTrue(result.startswith('ok:'), f'{cmd}: {result}')

    def check_refused(self, user, group):
        _, results = run_caller(self.fixture, [
            ['call', 'org.needled1.Internal', 'ProbeInternal'],
            ['call', None, 'Probe'],
            ['call', 'org.freedesktop.DBus.Debug.Stats', 'GetStats'],
        ], user, group)
        self.assertEqual(results, [ACCESS_DENIED] * 3)

    def test_unprivileged_caller_reaches_the_api(self):
        self.check_admitted('nobody', 'nogroup', NOBODY_UID)

    def test_root_reaches_the_api(self):
        self.check_admitted(None, None, 0)

    def test_unprivileged_caller_refused_elsewhere(self):
        self.check_refused('nobody', 'nogroup')

    def test_root_refused_elsewhere(self):
        # dbus-daemon does not exempt root.
        self.check_refused(None, None)

    def test_unprivileged_caller_receives_signals(self):
        _, results = run_caller(self.fixture, [['signal', 'probe-1']], 'nobody', 'nogroup')
        self.assertEqual(results, ['received'])

    def test_name_taken_is_not_stolen(self):
        _, results = run_caller(self.fixture, [['own', 'org.needled']], 'nobody', 'nogroup')
        self.assertEqual(results, [ACCESS_DENIED])


class WithoutThePolicy(busfixture.BusTestCase):
    """Control: the same stand-in on a bus without dbus/org.needled.conf."""

    @classmethod
    def fixture_args(cls):
        return {'policy_files': [], 'polkit': False}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.standin = cls.fixture.spawn([busfixture.PYTHON, os.path.join(HERE, 'policy_standin.py')])
        cls.fixture.wait_for_name('org.needled', 10, cls.standin)

    def test_nothing_gets_through(self):
        _, results = run_caller(self.fixture, [
            ['call', 'org.needled1.Manager', 'Probe'],
            ['call', 'org.freedesktop.DBus.Properties', 'GetAll', 's', ['org.needled1.Manager']],
        ], 'nobody', 'nogroup')
        self.assertEqual(results, [ACCESS_DENIED] * 2)


if __name__ == '__main__':
    busfixture.skip_unless_available()
    if os.getuid() != 0:
        print('skipping: needs root to start callers as other users')
        sys.exit(busfixture.EXIT_SKIP)
    unittest.main(verbosity=2)
