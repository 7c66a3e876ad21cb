#!/usr/bin/python3
"""The generated and installed integration files, checked the way their consumers read them:
the polkit actions (defaults per the D-Bus API), the D-Bus activation file, the system bus
policy, the udev rule (parsed with udev's rule grammar), the sysusers.d entry (applied by
systemd-sysusers to an empty root) and their agreement with each other.

Usage: test_files.py BUILD_ROOT SOURCE_ROOT DAEMON_USER DAEMON_GROUP USB_VID USB_PID
"""

import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

ARGS = {}

POLKIT_VALUES = {'no', 'yes', 'auth_self', 'auth_admin', 'auth_self_keep', 'auth_admin_keep'}
# dbus-api.md: active local sessions yes / auth_admin_keep / yes; inactive and remote sessions
# no, except configure (auth_admin).
POLKIT_DEFAULTS = {
    'org.needled1.operate': ('no', 'no', 'yes'),
    'org.needled1.configure': ('auth_admin', 'auth_admin', 'auth_admin_keep'),
    'org.needled1.read-history': ('no', 'no', 'yes'),
}
BUS_INTERFACES = {
    'org.needled1.Manager', 'org.needled1.Pen', 'org.needled1.Simulator',
    'org.freedesktop.DBus.Properties', 'org.freedesktop.DBus.Introspectable',
    'org.freedesktop.DBus.ObjectManager', 'org.freedesktop.DBus.Peer',
}


def build(*parts):
    return os.path.join(ARGS['build'], *parts)


def source(*parts):
    return os.path.join(ARGS['source'], *parts)


class PolkitActions(unittest.TestCase):
    path = None

    @classmethod
    def setUpClass(cls):
        cls.path = build('dbus', 'org.needled1.policy')
        with open(cls.path, encoding='utf-8') as f:
            cls.text = f.read()
        cls.root = ET.fromstring(cls.text)

    def test_document(self):
        self.assertEqual(self.root.tag, 'policyconfig')
        self.assertIn('<!DOCTYPE policyconfig PUBLIC "-//freedesktop//DTD PolicyKit Policy '
                      'Configuration 1.0//EN"', ' '.join(self.text.split()))

    def test_actions_and_defaults(self):
        actions = {a.get('id'): a for a in self.root.findall('action')}
        self.assertEqual(len(actions), len(self.root.findall('action')), 'duplicate action id')
        self.assertEqual(set(actions), set(POLKIT_DEFAULTS))
        for action_id, (any_, inactive, active) in POLKIT_DEFAULTS.items():
            a = actions[action_id]
            with self.subTest(action=action_id):
                self.assertTrue((a.findtext('description') or '').strip())
                self.assertTrue((a.findtext('message') or '').strip())
                d = a.find('defaults')
                self.assertIsNotNone(d)
                got = tuple((d.findtext(k) or '').strip()
                            for k in ('allow_any', 'allow_inactive', 'allow_active'))
                self.assertEqual(got, (any_, inactive, active))
                for v in got:
                    self.assertIn(v, POLKIT_VALUES)

    def test_actions_owned_by_the_daemon_user(self):
        # polkit >= 0.121 answers checks of other users' processes only for root or an owner.
        for a in self.root.findall('action'):
            with self.subTest(action=a.get('id')):
                owners = [x.text for x in a.findall('annotate')
                          if x.get('key') == 'org.freedesktop.policykit.owner']
                self.assertEqual(owners, ['unix-user:' + ARGS['user']])

    def test_interface_names_only_these_actions(self):
        # Every action the contract names exists here, and none is left unused.
        with open(source('dbus', 'org.needled1.xml'), encoding='utf-8') as f:
            # Action ids are the only lower-case names under org.needled1.
            named = set(re.findall(r'org\.needled1\.[a-z][a-z-]*[a-z]', f.read()))
        self.assertEqual(named, set(POLKIT_DEFAULTS))


class ActivationFile(unittest.TestCase):
    def test_systemd_activation_only(self):
        cp = configparser.ConfigParser(interpolation=None)
        cp.optionxform = str
        with open(build('dbus', 'org.needled.service'), encoding='utf-8') as f:
            cp.read_file(f)
        self.assertEqual(cp.sections(), ['D-BUS Service'])
        self.assertEqual(dict(cp['D-BUS Service']), {
            'Name': 'org.needled',
            'Exec': '/bin/false',
            'User': ARGS['user'],
            'SystemdService': 'needled.service',
        })

    def test_unit_answers_for_the_name(self):
        with open(build('daemon', 'needled.service'), encoding='utf-8') as f:
            unit = f.read()
        self.assertRegex(unit, r'(?m)^BusName=org\.needled$')
        self.assertRegex(unit, r'(?m)^Type=dbus$')


class BusPolicy(unittest.TestCase):
    """Static shape of the policy; tests/dbus/test_policy.py proves it on a live bus."""

    @classmethod
    def setUpClass(cls):
        cls.root = ET.parse(build('dbus', 'org.needled.conf')).getroot()

    def test_only_the_daemon_user_owns_the_name(self):
        owners = [(p.attrib, r.attrib) for p in self.root.findall('policy')
                  for r in p if 'own' in r.attrib or 'own_prefix' in r.attrib]
        self.assertEqual(owners, [({'user': ARGS['user']}, {'own': 'org.needled'})])

    def test_default_context_allows_exactly_the_api(self):
        defaults = [p for p in self.root.findall('policy') if p.get('context') == 'default']
        self.assertEqual(len(defaults), 1)
        rules = list(defaults[0])
        self.assertEqual((rules[0].tag, rules[0].attrib), ('deny', {'send_destination': 'org.needled'}))
        allowed = set()
        for r in rules[1:]:
            self.assertEqual(r.tag, 'allow')
            self.assertEqual(set(r.attrib), {'send_destination', 'send_interface'})
            self.assertEqual(r.get('send_destination'), 'org.needled')
            allowed.add(r.get('send_interface'))
        self.assertEqual(allowed, BUS_INTERFACES)

    def test_no_other_policies(self):
        contexts = sorted(str(sorted(p.attrib.items())) for p in self.root.findall('policy'))
        self.assertEqual(contexts, sorted([str([('context', 'default')]), str([('user', ARGS['user'])])]))


RULE_TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
MATCH_ONLY = {'ACTION', 'DEVPATH', 'KERNEL', 'KERNELS', 'SUBSYSTEM', 'SUBSYSTEMS', 'DRIVER',
              'DRIVERS', 'ATTR', 'ATTRS', 'SYSCTL', 'TAGS', 'TEST', 'PROGRAM', 'RESULT', 'CONST'}
ASSIGN_ONLY = {'OWNER', 'GROUP', 'MODE', 'RUN', 'LABEL', 'GOTO', 'IMPORT', 'OPTIONS', 'SECLABEL'}
EITHER = {'ENV', 'TAG', 'NAME', 'SYMLINK'}


def parse_rules(text):
    """Returns the rules of a udev rules file, each a list of (key, attr, op, value)."""
    rules = []
    for lineno, line in enumerate(text.replace('\\\n', ' ').splitlines(), 1):
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        tokens, pos = [], 0
        while pos < len(line):
            m = RULE_TOKEN.match(line, pos)
            if not m or m.end() == pos:
                raise ValueError(f'rule {len(rules) + 1}: cannot parse at {line[pos:]!r}')
            key, attr, op, value = m.group(1, 2, 3, 4)
            if key not in MATCH_ONLY | ASSIGN_ONLY | EITHER:
                raise ValueError(f'unknown key {key}')
            if key in MATCH_ONLY and op not in ('==', '!='):
                raise ValueError(f'{key} is a match key, {op} is an assignment')
            if key in ASSIGN_ONLY and op in ('==', '!='):
                raise ValueError(f'{key} is an assignment key, {op} is a match')
            if (key in ('ATTR', 'ATTRS', 'ENV', 'SYSCTL')) != (attr is not None):
                raise ValueError(f'{key}: attribute braces misused')
            tokens.append((key, attr, op, value))
            pos = m.end()
        rules.append(tokens)
    return rules


class UdevRule(unittest.TestCase):
    def test_parser_refuses_malformed_rules(self):
        # The checks below rely on this parser: show that it fails where udev would.
        for bad in ['SUBSYSTEM="usb"', 'GROUP=="x"', 'SUBSYSTEM=="usb" MODE="0660"',
                    'ATTR=="x"', 'FOO=="x"', 'MODE="0660', 'ENV="x"']:
            with self.subTest(rule=bad), self.assertRaises(ValueError):
                parse_rules(bad)

    def test_rule(self):
        path = build('udev', '70-needled.rules')
        with open(path, encoding='utf-8') as f:
            rules = parse_rules(f.read())
        self.assertEqual(len(rules), 1, 'exactly one rule expected')
        vid = '%04x' % int(ARGS['vid'])
        pid = '%04x' % int(ARGS['pid'])
        expected = {
            ('SUBSYSTEM', None, '==', 'usb'),
            ('ENV', 'DEVTYPE', '==', 'usb_device'),
            ('ACTION', None, '!=', 'remove'),
            ('ATTR', 'idVendor', '==', vid),
            ('ATTR', 'idProduct', '==', pid),
            ('GROUP', None, '=', ARGS['group']),
            ('MODE', None, '=', '0660'),
            ('TAG', None, '+=', 'systemd'),
            ('ENV', 'SYSTEMD_WANTS', '+=', 'needled.service'),
        }
        self.assertEqual(len(rules[0]), len(set(rules[0])), 'a key repeated')
        # Nothing else: in particular no uaccess tag, which would hand the pen to desktop users.
        self.assertEqual(set(rules[0]), expected)
        self.assertRegex(vid + pid, r'^[0-9a-f]{8}$')


class Sysusers(unittest.TestCase):
    @unittest.skipIf(shutil.which('systemd-sysusers') is None, 'systemd-sysusers not installed')
    def test_creates_user_and_group(self):
        with tempfile.TemporaryDirectory() as root:
            os.mkdir(os.path.join(root, 'etc'))
            r = subprocess.run(['systemd-sysusers', f'--root={root}',
                                build('daemon', 'needled-sysusers.conf')],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(os.path.join(root, 'etc', 'passwd'), encoding='utf-8') as f:
                users = {l.split(':')[0]: l.strip().split(':') for l in f if l.strip()}
            with open(os.path.join(root, 'etc', 'group'), encoding='utf-8') as f:
                groups = {l.split(':')[0]: l.strip().split(':') for l in f if l.strip()}
        user = users.get(ARGS['user'])
        self.assertIsNotNone(user, users)
        _, _, uid, gid, _, home, shell = user
        self.assertLess(int(uid), 1000, 'a system user')
        self.assertNotEqual(int(uid), 0)
        self.assertEqual(home, '/var/lib/needled')
        self.assertEqual(shell, '/usr/sbin/nologin')
        group = groups.get(ARGS['group'])
        self.assertIsNotNone(group, groups)
        if ARGS['group'] == ARGS['user']:
            self.assertEqual(group[2], gid, 'primary group')
        else:
            self.assertIn(ARGS['user'], group[3].split(','))


if __name__ == '__main__':
    if len(sys.argv) != 7:
        sys.exit(f'usage: {sys.argv[0]} BUILD_ROOT SOURCE_ROOT DAEMON_USER DAEMON_GROUP USB_VID USB_PID')
    ARGS = dict(zip(('build', 'source', 'user', 'group', 'vid', 'pid'), sys.argv[1:]))
    unittest.main(argv=sys.argv[:1], verbosity=2)
