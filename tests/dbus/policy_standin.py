#!/usr/bin/python3
"""A stand-in owner of org.needled for the bus policy test (test_policy.py), NOT a fake of
needled: the bus policy decides by bus name and interface name only, so any service that
exports those interface names shows what the policy lets through. Each interface has a
Probe() method returning the caller's uid as the bus reports it; org.needled1.Internal
stands for any interface the policy does not admit.

Usage (on the bus in DBUS_SYSTEM_BUS_ADDRESS): policy_standin.py
Prints "ready" once it owns org.needled; exits 3 when the bus refuses it the name.
"""

import sys

import dbus
import dbus.service
import dbus.mainloop.glib
from gi.repository import GLib

NAME = 'org.needled'
PATH = '/org/needled'
ADMITTED = ('org.needled1.Manager', 'org.needled1.Pen', 'org.needled1.Simulator')
NOT_ADMITTED = 'org.needled1.Internal'
PROPS = 'org.freedesktop.DBus.Properties'
OBJECT_MANAGER = 'org.freedesktop.DBus.ObjectManager'


class StandIn(dbus.service.Object):
    def _uid(self, sender):
        return dbus.UInt32(self.connection.get_unix_user(sender))

    @dbus.service.method(ADMITTED[0], out_signature='u', sender_keyword='sender')
    def Probe(self, sender=None):
        return self._uid(sender)

    @dbus.service.method(ADMITTED[1], out_signature='u', sender_keyword='sender')
    def ProbePen(self, sender=None):
        return self._uid(sender)

    @dbus.service.method(ADMITTED[2], out_signature='u', sender_keyword='sender')
    def ProbeSimulator(self, sender=None):
        return self._uid(sender)

    @dbus.service.method(NOT_ADMITTED, out_signature='u', sender_keyword='sender')
    def ProbeInternal(self, sender=None):
        return self._uid(sender)

    @dbus.service.method(ADMITTED[0], in_signature='s')
    def EmitProbe(self, token):
        self.ProbeSignal(token)

    @dbus.service.signal(ADMITTED[1], signature='s')
    def ProbeSignal(self, token):
        pass

    @dbus.service.method(PROPS, in_signature='ss', out_signature='v')
    def Get(self, interface, prop):
        return self.GetAll(interface)[prop]

    @dbus.service.method(PROPS, in_signature='s', out_signature='a{sv}')
    def GetAll(self, interface):
        return dbus.Dictionary({'Version': dbus.String('stand-in')}, signature='sv')

    @dbus.service.method(OBJECT_MANAGER, out_signature='a{oa{sa{sv}}}')
    def GetManagedObjects(self):
        return dbus.Dictionary({}, signature='oa{sa{sv}}')


def main():
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    # SIGTERM ends the loop cleanly: handled before the name is owned, since whoever waits for
    # the name may stop us the moment it appears
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, 15, loop.quit)
    bus = dbus.SystemBus()
    StandIn(bus, PATH)
    try:
        name = dbus.service.BusName(NAME, bus, do_not_queue=True)
    except dbus.exceptions.DBusException as e:
        print(f'cannot own {NAME}: {e.get_dbus_name()}: {e.get_dbus_message()}', flush=True)
        return 3
    print('ready', flush=True)
    loop.run()
    del name
    return 0


if __name__ == '__main__':
    sys.exit(main())
