#!/usr/bin/python3
"""The generated systemd unit: its sandbox is rated 1.5 or lower by systemd-analyze, and the
settings the daemon relies on are there.

Usage: test_unit.py security|settings UNIT DAEMON_USER DAEMON_GROUP
"security" exits 77 (skip) when systemd-analyze is not installed; "settings" needs nothing.
"""

import re
import shutil
import subprocess
import sys
import unittest

MAX_EXPOSURE = 1.5
ANALYZE = shutil.which('systemd-analyze')
UNIT, DAEMON_USER, DAEMON_GROUP = None, None, None


def unit_settings(path):
    """Returns {(section, key): [values in order]} of a unit file."""
    settings, section = {}, None
    with open(path, encoding='utf-8') as f:
        text = f.read()
    for lineno, line in enumerate(text.replace('\\\n', ' ').splitlines(), 1):
        line = line.strip()
        if not line or line[0] in '#;':
            continue
        if line.startswith('['):
            section = line.strip('[]')
            continue
        if '=' not in line or section is None:
            raise ValueError(f'{path}:{lineno}: not a key=value line in a section: {line!r}')
        key, value = line.split('=', 1)
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


class UnitSecurity(unittest.TestCase):
    def test_exposure_at_most_1_5(self):
        # --threshold is in tenths of the exposure scale (its default, 100, is 10.0).
        threshold = int(MAX_EXPOSURE * 10)
        r = subprocess.run([ANALYZE, 'security', '--offline=true', f'--threshold={threshold}',
                            '--no-pager', UNIT], capture_output=True, text=True, timeout=60)
        m = re.search(r'Overall exposure level for \S+: (\d+\.\d+)', r.stdout)
        self.assertIsNotNone(m, f'no exposure level in output:\n{r.stdout}\n{r.stderr}')
        exposure = float(m.group(1))
        print(f'exposure level: {exposure}')
        self.assertLessEqual(exposure, MAX_EXPOSURE,
                             [l for l in r.stdout.splitlines() if l.startswith('✗')])
        self.assertEqual(r.returncode, 0, r.stderr)


class UnitSettings(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.s = unit_settings(UNIT)

    def one(self, key, section='Service'):
        values = self.s.get((section, key))
        self.assertIsNotNone(values, f'{key}= missing from [{section}]')
        self.assertEqual(len(values), 1, f'{key}= given {len(values)} times')
        return values[0]

    def test_dbus_activated_service(self):
        self.assertEqual(self.one('Type'), 'dbus')
        self.assertEqual(self.one('BusName'), 'org.needled')
        self.assertTrue(self.one('ExecStart').endswith('/needled'))
        self.assertTrue(self.one('ExecStart').startswith('/'), 'ExecStart needs an absolute path')

    def test_runs_as_its_own_user(self):
        self.assertEqual(self.one('User'), DAEMON_USER)
        self.assertEqual(self.one('Group'), DAEMON_GROUP)
        self.assertNotIn(self.one('User'), ('root', '0'))
        self.assertEqual(self.one('DynamicUser'), 'no')

    def test_watchdog_and_restart(self):
        self.assertRegex(self.one('WatchdogSec'), r'^[1-9][0-9]*s$')
        self.assertEqual(self.one('NotifyAccess'), 'main')
        self.assertEqual(self.one('Restart'), 'on-failure')
        self.assertGreater(int(self.one('StartLimitBurst', 'Unit')), 0)
        self.assertGreater(int(self.one('StartLimitIntervalSec', 'Unit')), 0)

    def test_state_and_config(self):
        self.assertEqual(self.one('StateDirectory'), 'needled')
        self.assertEqual(self.one('StateDirectoryMode'), '0700')
        self.assertEqual(self.one('ConfigurationDirectory'), 'needled')
        self.assertEqual(self.one('ProtectSystem'), 'strict')
        self.assertEqual(self.one('UMask'), '0077')

    def test_usb_devices_only(self):
        self.assertEqual(self.one('DevicePolicy'), 'closed')
        self.assertEqual(self.one('DeviceAllow'), 'char-usb_device rw')
        # PrivateDevices= would hide /dev/bus/usb from the daemon.
        self.assertNotIn(('Service', 'PrivateDevices'), self.s)

    def test_hotplug_keeps_working(self):
        # uevents reach only the host's network namespace: a private one blinds libusb
        # hotplug. The unit must not trade that for a better score.
        self.assertNotIn(('Service', 'PrivateNetwork'), self.s)
        families = self.one('RestrictAddressFamilies').split()
        self.assertEqual(sorted(families), ['AF_NETLINK', 'AF_UNIX'])
        self.assertEqual(self.one('IPAddressDeny'), 'any')

    def test_realtime_loop(self):
        # the interlocks run in the loop: real-time, below the kernel's interrupt threads (50),
        # inherited by the libraries' threads (no lock held by a time-shared thread), and not
        # changeable by the daemon itself
        self.assertEqual(self.one('CPUSchedulingPolicy'), 'fifo')
        self.assertIn(int(self.one('CPUSchedulingPriority')), range(1, 50))
        self.assertIn(self.s.get(('Service', 'CPUSchedulingResetOnFork'), ['no']), (['no'], ['false']))
        self.assertEqual(self.one('RestrictRealtime'), 'yes')

    def test_no_privileges(self):
        self.assertEqual(self.one('CapabilityBoundingSet'), '')
        self.assertEqual(self.one('NoNewPrivileges'), 'yes')


if __name__ == '__main__':
    if len(sys.argv) != 5 or sys.argv[1] not in ('security', 'settings'):
        sys.exit(f'usage: {sys.argv[0]} security|settings UNIT DAEMON_USER DAEMON_GROUP')
    UNIT, DAEMON_USER, DAEMON_GROUP = sys.argv[2:5]
    if sys.argv[1] == 'security':
        if ANALYZE is None:
            print('systemd-analyze not installed (package systemd): skipping')
            sys.exit(77)
        cases = UnitSecurity
    else:
        cases = UnitSettings
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(cases)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    sys.exit(0 if result.wasSuccessful() else 1)
