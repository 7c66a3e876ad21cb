#!/usr/bin/python3
"""`meson install --destdir` puts every integration file where the system reads it.

Installs the whole build into a temporary DESTDIR (as a package build would) and checks each
file's location, type, permissions and content. The expected locations are written out
here, not taken from the build, so a wrong directory in a meson.build fails the test.
`systemd-analyze verify` checks the installed unit (syntax, option values, dependencies).

Usage: test_install.py BUILD_ROOT SOURCE_ROOT
"""

import filecmp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest

BUILD, SOURCE = None, None

# path under the prefix -> the file it must be a copy of (build or source tree)
EXPECTED = {
    'share/dbus-1/system.d/org.needled.conf': ('build', 'dbus/org.needled.conf'),
    'share/dbus-1/system-services/org.needled.service': ('build', 'dbus/org.needled.service'),
    'share/dbus-1/interfaces/org.needled1.xml': ('source', 'dbus/org.needled1.xml'),
    'share/polkit-1/actions/org.needled1.policy': ('build', 'dbus/org.needled1.policy'),
    'lib/systemd/system/needled.service': ('build', 'daemon/needled.service'),
    'lib/sysusers.d/needled.conf': ('build', 'daemon/needled-sysusers.conf'),
    'lib/udev/rules.d/70-needled.rules': ('build', 'udev/70-needled.rules'),
}


class Install(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix='needled-install-')
        cls.destdir = cls.tmp.name
        r = subprocess.run(['meson', 'introspect', '--buildoptions', BUILD],
                           capture_output=True, text=True, timeout=120, check=True)
        options = {o['name']: o['value'] for o in json.loads(r.stdout)}
        cls.prefix = options['prefix']
        cls.libexecdir = options['libexecdir']
        r = subprocess.run(['meson', 'install', '--no-rebuild', '--quiet', '-C', BUILD,
                            '--destdir', cls.destdir],
                           capture_output=True, text=True, timeout=300)
        cls.install_error = None if r.returncode == 0 else r.stdout + r.stderr

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def installed(self, rel):
        return os.path.join(self.destdir, self.prefix.lstrip('/'), rel)

    def test_00_install_succeeded(self):
        self.assertIsNone(self.install_error)

    def test_files_where_the_system_reads_them(self):
        if self.prefix == '/usr':
            # Spelled out for the prefix every distribution package uses.
            self.assertTrue(os.path.isfile(os.path.join(
                self.destdir, 'usr/share/dbus-1/system.d/org.needled.conf')))
            self.assertTrue(os.path.isfile(os.path.join(
                self.destdir, 'usr/lib/systemd/system/needled.service')))
            self.assertTrue(os.path.isfile(os.path.join(
                self.destdir, 'usr/lib/udev/rules.d/70-needled.rules')))
        for rel, (tree, origin) in EXPECTED.items():
            with self.subTest(path=rel):
                path = self.installed(rel)
                st = os.lstat(path)
                self.assertTrue(stat.S_ISREG(st.st_mode), f'{path} is not a regular file')
                self.assertEqual(stat.S_IMODE(st.st_mode), 0o644, f'{path} mode')
                reference = os.path.join(BUILD if tree == 'build' else SOURCE, origin)
                self.assertTrue(filecmp.cmp(path, reference, shallow=False),
                                f'{path} differs from {reference}')

    def test_unit_points_at_the_installed_daemon(self):
        with open(self.installed('lib/systemd/system/needled.service'), encoding='utf-8') as f:
            execs = [l.split('=', 1)[1].strip() for l in f if l.startswith('ExecStart=')]
        self.assertEqual(execs, [os.path.join(self.prefix, self.libexecdir, 'needled')])

    def daemon_target_exists(self):
        r = subprocess.run(['meson', 'introspect', '--targets', BUILD],
                           capture_output=True, text=True, timeout=120, check=True)
        return any(t['name'] == 'needled' and t['type'] == 'executable' for t in json.loads(r.stdout))

    def test_daemon_installed_where_the_unit_looks(self):
        if not self.daemon_target_exists():
            self.skipTest('the build has no needled executable yet')
        daemon = self.installed(os.path.join(self.libexecdir, 'needled'))
        self.assertTrue(os.path.isfile(daemon) and os.access(daemon, os.X_OK), daemon)

    @unittest.skipIf(shutil.which('systemd-analyze') is None, 'systemd-analyze not installed')
    def test_unit_verifies(self):
        # systemd-analyze verify --root= would look for dbus.socket inside DESTDIR too, so the
        # installed unit is verified against the host's units, its ExecStart pointed at the
        # daemon in DESTDIR (or, before the daemon exists, at a stand-in executable: the rest
        # of the unit is checked all the same).
        daemon = self.installed(os.path.join(self.libexecdir, 'needled'))
        if not os.path.exists(daemon):
            daemon = shutil.which('true')
        with open(self.installed('lib/systemd/system/needled.service'), encoding='utf-8') as f:
            unit = f.read()
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, 'needled.service')
            with open(copy, 'w', encoding='utf-8') as f:
                f.write(''.join(f'ExecStart={daemon}\n' if l.startswith('ExecStart=') else l
                                for l in unit.splitlines(keepends=True)))
            r = subprocess.run(['systemd-analyze', 'verify', '--man=no', copy],
                               capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(r.stderr.strip(), '', 'systemd-analyze verify warned')

if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(f'usage: {sys.argv[0]} BUILD_ROOT SOURCE_ROOT')
    BUILD, SOURCE = sys.argv[1:3]
    unittest.main(argv=sys.argv[:1], verbosity=2)
