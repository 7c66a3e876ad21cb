#!/usr/bin/python3
"""A bus client for the policy test, run as root or (through setpriv) as an unprivileged
user. It is fed to the interpreter on standard input, so it runs wherever the checkout
lies, even under a directory the unprivileged user cannot enter.

Usage: python3 - COMMANDS_JSON < policy_caller.py
COMMANDS_JSON is a list of commands; one JSON result per command is printed, in order:
  ["own", NAME]                      -> "owned" | "error:DBUS_ERROR_NAME"
  ["call", INTERFACE|null, METHOD, SIGNATURE, ARGS]
                                     -> "ok:REPLY" | "error:DBUS_ERROR_NAME"
                                        (on org.needled /org/needled; null: no interface
                                        field; SIGNATURE and ARGS optional)
  ["signal", TOKEN]                  -> "received" | "timeout" | "error:..."
                                        (asks the stand-in to broadcast ProbeSignal(TOKEN))
The bus is the one in DBUS_SYSTEM_BUS_ADDRESS.
"""

import json
import os
import sys

import dbus
import dbus.mainloop.glib
from gi.repository import GLib

DEST, PATH = 'org.needled', '/org/needled'
SIGNAL_TIMEOUT_MS = 5000


def err(e):
    return f'error:{e.get_dbus_name()}'


def own(bus, name):
    try:
        r = bus.request_name(name, dbus.bus.NAME_FLAG_DO_NOT_QUEUE)
    except dbus.exceptions.DBusException as e:
        return err(e)
    return 'owned' if r == dbus.bus.REQUEST_NAME_REPLY_PRIMARY_OWNER else f'reply:{r}'


def call(bus, interface, method, signature='', args=()):
    try:
        reply = bus.call_blocking(DEST, PATH, interface, method, signature, tuple(args), timeout=10)
    except dbus.exceptions.DBusException as e:
        return err(e)
    return f'ok:{json.dumps(reply)}'


def signal(bus, token):
    got = []
    loop = GLib.MainLoop()

    def on_signal(value):
        got.append(str(value))
        if str(value) == token:
            loop.quit()

    bus.add_signal_receiver(on_signal, 'ProbeSignal', 'org.needled1.Pen', None, PATH)
    try:
        bus.call_blocking(DEST, PATH, 'org.needled1.Manager', 'EmitProbe', 's', (token,), timeout=10)
    except dbus.exceptions.DBusException as e:
        return err(e)
    GLib.timeout_add(SIGNAL_TIMEOUT_MS, loop.quit)
    loop.run()
    return 'received' if token in got else 'timeout'


def main():
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    bus = dbus.bus.BusConnection(os.environ['DBUS_SYSTEM_BUS_ADDRESS'])
    results = []
    for cmd in json.loads(sys.argv[1]):
        if cmd[0] == 'own':
            results.append(own(bus, cmd[1]))
        elif cmd[0] == 'call':
            results.append(call(bus, *cmd[1:]))
        elif cmd[0] == 'signal':
            results.append(signal(bus, cmd[1]))
        else:
            sys.exit(f'unknown command {cmd!r}')
    print(json.dumps({'uid': os.getuid(), 'results': results}))


if __name__ == '__main__':
    main()
