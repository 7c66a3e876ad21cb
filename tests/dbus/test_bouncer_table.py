#!/usr/bin/python3
"""The bouncer's table (daemon/bouncer.c, printed by bouncer-table) against the contract: every
method of dbus/org.needled1.xml is mapped exactly once, nothing else is, each to a polkit action
of dbus/org.needled1.policy or to none, and the methods that must never wait for polkit (Stop,
OpenTelemetry, ValidateProfile, the Simulator) need none (../shared/design/dbus-api.md)."""

import subprocess
import sys
import unittest
import xml.etree.ElementTree as ET

TABLE_BIN, XML_PATH, POLICY_PATH = sys.argv[1:4]
NONE = '-'
# What the contract says, method by method (dbus-api.md): the polkit action or none.
CONTRACT = {
    ('org.needled1.Manager', 'GetLimits'): NONE,
    ('org.needled1.Manager', 'ReloadLimits'): 'org.needled1.configure',
    ('org.needled1.Manager', 'ValidateProfile'): NONE,
    ('org.needled1.Manager', 'GetHistory'): 'org.needled1.read-history',
    ('org.needled1.Pen', 'LoadProfile'): 'org.needled1.operate',
    ('org.needled1.Pen', 'LoadProfileData'): 'org.needled1.operate',
    ('org.needled1.Pen', 'Start'): 'org.needled1.operate',
    ('org.needled1.Pen', 'Pause'): 'org.needled1.operate',
    ('org.needled1.Pen', 'Resume'): 'org.needled1.operate',
    ('org.needled1.Pen', 'SetDepth'): 'org.needled1.operate',
    ('org.needled1.Pen', 'SetSpeed'): 'org.needled1.operate',
    ('org.needled1.Pen', 'Heartbeat'): 'org.needled1.operate',
    ('org.needled1.Pen', 'ClearFault'): 'org.needled1.operate',
    ('org.needled1.Pen', 'Stop'): NONE,
    ('org.needled1.Pen', 'OpenTelemetry'): NONE,
}


def table():
    out = subprocess.run([TABLE_BIN], check=True, capture_output=True, text=True).stdout
    rows = [tuple(line.split(' ')) for line in out.splitlines()]
    for row in rows:
        assert len(row) == 3, row
    return rows


def xml_methods():
    root = ET.parse(XML_PATH).getroot()
    return [(iface.get('name'), m.get('name')) for iface in root.iter('interface')
            if iface.get('name').startswith('org.needled1.') for m in iface.iter('method')]


class BouncerTable(unittest.TestCase):

    def test_every_method_of_the_xml_is_mapped_once_and_nothing_else(self):
        mapped = [(i, m) for i, m, _ in table()]
        self.assertEqual(len(mapped), len(set(mapped)), 'a method is in the table twice')
        methods = xml_methods()
        self.assertGreater(len(methods), 20)
        self.assertEqual(sorted(set(methods) - set(mapped)), [], 'methods of the XML the bouncer refuses')
        self.assertEqual(sorted(set(mapped) - set(methods)), [], 'table entries for no method of the XML')

    def test_actions_are_the_policy_actions(self):
        policy = {a.get('id') for a in ET.parse(POLICY_PATH).getroot().iter('action')}
        self.assertEqual(policy, {'org.needled1.operate', 'org.needled1.configure', 'org.needled1.read-history'})
        for iface, member, action in table():
            if action != NONE:
                self.assertIn(action, policy, f'{iface}.{member}')

    def test_the_contract_s_authorization(self):
        actions = {(i, m): a for i, m, a in table()}
        for key, want in CONTRACT.items():
            self.assertEqual(actions.get(key), want, f'{key[0]}.{key[1]}')
        for (iface, member), action in actions.items():
            if iface == 'org.needled1.Simulator':
                self.assertEqual(action, NONE, f'{member}: the simulator asks no polkit')


if __name__ == '__main__':
    unittest.main(argv=sys.argv[:1], verbosity=2)
