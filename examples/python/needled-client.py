#!/usr/bin/python3
"""A small needled client with PyGObject (Gio), as a clinic's Python tool would be.

Lists the pens through the object manager (the Manager is one of its objects), follows a pen's
property changes, arms an installed profile, runs a short session, reads the telemetry socket
(OpenTelemetry: a Gio reply carries the fd in its fd list), handles a named error and prints the
session's figures as the ledger recorded them (SessionRecorded).

    needled-client.py [--session] SERIAL [PROFILE]

Exit status 0 when the session ran and ended "stopped", 1 otherwise.
"""

import socket
import struct
import sys
import threading

from gi.repository import Gio, GLib

NAME = 'org.needled'
ROOT = '/org/needled'
PEN = 'org.needled1.Pen'
MANAGER = 'org.needled1.Manager'
RECORD = struct.Struct('<HHIQQIIddddB7x')  # docs/telemetry.md, version 1


def main():
    args = [a for a in sys.argv[1:] if a != '--session']
    bus_type = Gio.BusType.SESSION if '--session' in sys.argv else Gio.BusType.SYSTEM
    serial = args[0]
    profile = args[1] if len(args) > 1 else 'acne-scars-cheeks'
    bus = Gio.bus_get_sync(bus_type, None)

    # Every object, the Manager included, through one object manager client.
    om = Gio.DBusObjectManagerClient.new_sync(bus, Gio.DBusObjectManagerClientFlags.NONE, NAME, ROOT,
                                              None, None, None)
    manager = om.get_interface(ROOT, MANAGER)
    print('needled', manager.get_cached_property('Version').unpack(),
          'features', ', '.join(manager.get_cached_property('Features').unpack()))
    for obj in om.get_objects():
        iface = obj.get_interface(PEN)
        if iface:
            print('pen', iface.get_cached_property('Serial').unpack(), iface.get_cached_property('State').unpack())

    # A named error: a serial nobody has.
    try:
        manager.call_sync('FindPen', GLib.Variant('(s)', ('NO-SUCH-PEN',)), 0, -1, None)
    except GLib.Error as e:
        name = Gio.DBusError.get_remote_error(e)
        Gio.DBusError.strip_remote_error(e)
        print(f'named error: {name}: {e.message}')

    path = manager.call_sync('FindPen', GLib.Variant('(s)', (serial,)), 0, -1, None).unpack()[0]
    pen = om.get_interface(path, PEN)
    loop = GLib.MainLoop()
    state = {'changes': 0, 'figures': None, 'reason': None}

    def on_properties(proxy, changed, invalidated):
        for key, value in changed.unpack().items():
            state['changes'] += 1
            if key in ('State', 'Fault', 'SessionId'):
                print(f'  {key} = {value!r}')

    def on_signal(proxy, sender, signal, params):
        if signal == 'SessionRecorded':
            state['figures'] = params.unpack()[1]
        elif signal == 'SessionEnded':
            state['reason'] = params.unpack()[1]
            loop.quit()

    pen.connect('g-properties-changed', on_properties)
    pen.connect('g-signal', on_signal)

    # Telemetry from the socket, read in a thread of its own so that nothing is lost.
    reply, fds = bus.call_with_unix_fd_list_sync(NAME, path, PEN, 'OpenTelemetry', None, GLib.VariantType('(h)'),
                                                 0, -1, None, None)
    sock = socket.socket(fileno=fds.get(reply.unpack()[0]))
    records = []

    def read_telemetry():
        while True:
            data = sock.recv(256)
            if not data:
                return
            records.append(RECORD.unpack_from(data))
    reader = threading.Thread(target=read_telemetry, daemon=True)
    reader.start()

    pen.call_sync('LoadProfile', GLib.Variant('(s)', (profile,)), 0, -1, None)
    sid = pen.call_sync('Start', GLib.Variant('(a{sv})', ({'label': GLib.Variant('s', 'example')},)), 0, -1,
                        None).unpack()[0]
    print('session', sid, 'started')
    GLib.timeout_add(1500, lambda: pen.call_sync('Stop', None, 0, -1, None) and False)
    GLib.timeout_add(15000, loop.quit)
    loop.run()
    sock.shutdown(socket.SHUT_RDWR)
    reader.join(2)
    sock.close()

    seqs = [r[2] for r in records]
    gaps = sum(1 for a, b in zip(seqs, seqs[1:]) if b != (a + 1) % 2**32)
    dropped = records[-1][5] if records else 0
    figures = state['figures'] or {}
    print(f'ended: {state["reason"]} ({figures.get("duration_s", 0):.1f} s, {figures.get("strokes", 0)} strokes, '
          f'recorded {figures.get("recorded")})')
    print(f'telemetry: {len(records)} records, {gaps} gaps, {dropped} dropped; {state["changes"]} property changes')
    ok = state['reason'] == 'stopped' and figures.get('strokes', 0) > 0 and len(records) > 100 and gaps == dropped
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
