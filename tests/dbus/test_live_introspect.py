#!/usr/bin/python3
"""The running daemon's introspection equals the contract, dbus/org.needled1.xml: the Manager
and Simulator on /org/needled and the Pen on a pen object (needled --simulate), compared
member for member by introspect_compare.py; without --simulate the Simulator is absent and
the Manager still matches.

Usage: test_live_introspect.py CONTRACT_XML (meson passes dbus/org.needled1.xml)."""

import sys

import introspect_compare as ic
from needledtest import MANAGER_PATH, NeedledTestCase, main

CONTRACT = None


def contract():
    with open(CONTRACT, encoding='utf-8') as f:
        return f.read()


class LiveIntrospection(NeedledTestCase):

    def test_manager_simulator_and_pen_equal_the_contract(self):
        pen = self.add_pen(serial='INTRO-1', cartridge=('INTRO-CART', 12))
        live_manager = self.fixture.introspect(MANAGER_PATH)
        live_pen = self.fixture.introspect(pen)
        diffs = ic.differences(contract(), [live_manager, live_pen], contract_source=CONTRACT,
                               live_sources=[MANAGER_PATH, pen])
        self.assertEqual(diffs, [], '\n'.join(diffs))
        # A vtable entry without SD_BUS_VTABLE_UNPRIVILEGED would show this annotation.
        for text in (live_manager, live_pen):
            self.assertNotIn('org.freedesktop.systemd1.Privileged', text)
        # The pen node is reachable from the tree (ObjectManager clients walk it).
        self.assertIn('<node name="pen"', live_manager)
        self.assertIn('INTRO_2d1', self.fixture.introspect('/org/needled/pen'))

    def test_a_difference_would_be_seen(self):
        # The comparison is not vacuous: a live document missing a method differs.
        pen = self.add_pen(serial='INTRO-2')
        live_pen = self.fixture.introspect(pen).replace('name="ClearFault"', 'name="ClearFaults"')
        diffs = ic.differences(contract(), [self.fixture.introspect(MANAGER_PATH), live_pen])
        self.assertTrue(any('ClearFault' in d for d in diffs), diffs)


class LiveIntrospectionWithoutSimulator(NeedledTestCase):
    daemon_args = []

    def test_manager_equals_the_contract(self):
        live = self.fixture.introspect(MANAGER_PATH)
        self.assertNotIn('org.needled1.Simulator', live)
        diffs = ic.differences(contract(), [live], interfaces=['org.needled1.Manager'])
        self.assertEqual(diffs, [], '\n'.join(diffs))


if __name__ == '__main__':
    if len(sys.argv) < 2:
        sys.exit('usage: test_live_introspect.py CONTRACT_XML')
    CONTRACT = sys.argv.pop(1)
    main()
