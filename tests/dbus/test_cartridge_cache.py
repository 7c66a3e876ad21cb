#!/usr/bin/python3
"""The Cartridge property never reads the ledger on the loop (issue 13, item 2): what the ledger
knows of the inserted cartridge is looked up off the loop when the cartridge changes and after a
session on it, and the property (Get, GetAll, GetManagedObjects, PropertiesChanged) shows that.
A new cartridge is shown once its lookup is done, so a cartridge the ledger knows as spent is
never announced as fresh; Start still refuses a spent cartridge (CartridgeSpent), the ledger's
write path deciding."""

import os
import sqlite3
import time

import dbus

from needledtest import (ERR, PEN_IFACE, PROPS_IFACE, NeedledTestCase, SignalLog, main, pump,
                         unwrap, wait_until, timeout_multiplier)


def announced_cartridges(log):
    """Every Cartridge value PropertiesChanged carried, in order ((id, state) pairs); an
    invalidation without a value is recorded as None."""
    seen = []
    for _path, (iface, changed, invalidated) in log.items:
        if iface != PEN_IFACE:
            continue
        if 'Cartridge' in changed:
            seen.append((changed['Cartridge']['id'], changed['Cartridge']['state']))
        elif 'Cartridge' in invalidated:
            seen.append(None)
    return seen


def without_repeats(items):
    out = []
    for i in items:
        if not out or out[-1] != i:
            out.append(i)
    return out


class TestCartridgeProperty(NeedledTestCase):

    def cartridge_now(self, pen):
        """Cartridge through GetAll and through GetManagedObjects; both must agree."""
        via_getall = self.get_all(pen, PEN_IFACE)['Cartridge']
        objects = unwrap(self.call('/org/needled', 'org.freedesktop.DBus.ObjectManager', 'GetManagedObjects'))
        self.assertEqual(objects[pen][PEN_IFACE]['Cartridge'], via_getall)
        return via_getall

    def test_spent_fresh_and_after_a_session(self):
        pen = self.add_pen(serial='CC-PEN-1')
        log = SignalLog(self.bus, 'PropertiesChanged', PROPS_IFACE, pen)
        self.addCleanup(log.remove)

        self.insert_cartridge(pen, 'CC-USED', 12)
        # InsertCartridge answers once the property is up to date.
        self.assertEqual(self.cartridge_now(pen), {'id': 'CC-USED', 'needles': 12, 'state': 'fresh', 'runtime_s': 0})
        sid = self.start_session(pen)
        pump(1.3)
        self.pen_call(pen, 'Stop')
        wait_until(lambda: self.pprop(pen, 'SessionId') == '', 5 * timeout_multiplier(), 'the session to end')
        after = self.cartridge_now(pen)
        self.assertEqual((after['id'], after['state']), ('CC-USED', 'spent'))
        recorded = self.cartridge('CC-USED')
        self.assertEqual(recorded['state'], 'spent')
        self.assertGreaterEqual(after['runtime_s'], 1)
        self.assertEqual(after['runtime_s'], int(recorded['runtime_s']))
        self.assert_recorded(sid, 'stopped', cartridge='CC-USED')

        # The spent cartridge, out and in again: spent from the first value shown.
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        self.assertEqual(self.cartridge_now(pen)['state'], 'none')
        self.insert_cartridge(pen, 'CC-USED', 12)
        self.assertEqual(self.cartridge_now(pen)['state'], 'spent')
        self.arm(pen)
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))

        # A new one: fresh.
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        self.insert_cartridge(pen, 'CC-NEW', 12)
        self.assertEqual(self.cartridge_now(pen), {'id': 'CC-NEW', 'needles': 12, 'state': 'fresh', 'runtime_s': 0})
        wait_until(lambda: announced_cartridges(log) and announced_cartridges(log)[-1] == ('CC-NEW', 'fresh'),
                   5 * timeout_multiplier(), 'PropertiesChanged(Cartridge CC-NEW)')
        seen = announced_cartridges(log)
        self.assertNotIn(None, seen)
        # Every value announced, in order: no transient state (a spent cartridge never fresh,
        # a session's cartridge never fresh after it ran).
        self.assertEqual(without_repeats(seen), [
            ('CC-USED', 'fresh'), ('CC-USED', 'in-use'), ('CC-USED', 'spent'),
            ('', 'none'), ('CC-USED', 'spent'), ('', 'none'), ('CC-NEW', 'fresh')])


class TestCartridgeNotReadOnTheLoop(NeedledTestCase):
    """The property shows what the lookup made when the cartridge came found, not what the ledger
    says at the moment of each Get: a record written behind the daemon's back (here, straight into
    the ledger's file) is seen only at the next lookup. Before the lookups ran off the loop, every
    Get read the ledger on the loop and saw it at once."""

    def mark_spent_behind_the_daemons_back(self, cid):
        db = sqlite3.connect(os.path.join(self.state_dir, 'ledger.sqlite'), timeout=10)
        try:
            with db:
                db.execute("INSERT INTO cartridges (id, needles, first_used_us, state) VALUES (?, 12, ?, 'spent')",
                           (cid, int(time.time() * 1e6)))
        finally:
            db.close()

    def test_get_does_not_read_the_ledger(self):
        wait_until(lambda: self.mprop('LedgerState') == 'ok', 60 * timeout_multiplier(), 'the ledger check')
        pen = self.add_pen(serial='CC-PEN-3')
        self.insert_cartridge(pen, 'CC-BEHIND', 12)
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'fresh')
        self.mark_spent_behind_the_daemons_back('CC-BEHIND')
        self.assertEqual(self.cartridge('CC-BEHIND')['state'], 'spent')     # GetCartridge reads it
        for _ in range(20):
            self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'fresh')
            self.assertEqual(self.get_all(pen, PEN_IFACE)['Cartridge']['state'], 'fresh')

        # Start's early check used the lookup; the ledger's write path refuses all the same, and
        # the client is told CartridgeSpent.
        self.arm(pen)
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start', dbus.Dictionary({}, signature='sv'))
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.assertEqual(self.pprop(pen, 'SessionId'), '')

        # The next lookup (the cartridge out and in) sees it.
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        self.insert_cartridge(pen, 'CC-BEHIND', 12)
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'spent')


if __name__ == '__main__':
    main()
