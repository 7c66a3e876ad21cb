#!/usr/bin/python3
"""The interface contract (dbus/org.needled1.xml) and its checker (introspect_compare.py).

- The contract holds exactly the members of the D-Bus API (dbus-api.md) plus the documented
  extensions, with their types and argument names, and a doc comment on every member.
- The checker finds two documents equal when they differ only as sd-bus's introspection
  differs from the file (no comments, other order, defaults left out, standard interfaces
  and child nodes around), and reports every kind of real difference.

Usage: test_introspect_compare.py CONTRACT_XML
"""

import os
import subprocess
import sys
import unittest
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import introspect_compare as ic  # noqa: E402

CONTRACT = None
EMITS = ic.EMITS

# The API as dbus-api.md states it; (ext) marks this project's documented extensions.
# Methods: "Name(in args) -> out args"; signals: "Name(args)"; properties: "Name: type [const]".
API = {
    'org.needled1.Manager': [
        'Version: s const', 'Features: as const', 'Pens: ao', 'LimitsPath: s const',
        'LimitsState: s', 'LimitsError: s', 'LimitsDigest: s',
        'LimitsLoadedAt: t',  # (ext)
        'LedgerState: s', 'LedgerError: s',  # (ext)
        'GetLimits() -> a{sv} limits', 'ReloadLimits() -> ',
        'ValidateProfile(s yaml) -> a(sss) violations', 'GetProfiles() -> aa{sv} profiles',
        'GetHistory(a{sv} filter) -> aa{sv} sessions', 'GetCartridge(s id) -> a{sv} cartridge',
        'FindPen(s serial) -> o pen',
    ],
    'org.needled1.Pen': [
        'Serial: s const', 'Model: s const', 'FirmwareVersion: s const',
        'ProtocolVersion: u const', 'Generation: u const',
        'Simulated: b const',  # (ext)
        'State: s', 'Fault: s',
        'Warnings: as',  # (ext)
        'Profile: a{sv}', 'DepthMm: d', 'SpeedHz: d', 'DepthRangeMm: (dd) const',
        'DepthStepMm: d const', 'SpeedRangeHz: (dd) const', 'BatteryPercent: u',
        'TemperatureC: d', 'Cartridge: a{sv}', 'SessionId: s', 'ElapsedS: d', 'Strokes: t',
        'Punctures: t', 'DensityPerCm2: d', 'SkinType: s',  # Punctures, DensityPerCm2: issue 15; SkinType (ext)
        'TelemetryRateHz: u',
        'LoadProfile(s name) -> ', 'LoadProfileData(s yaml) -> ',
        'Start(a{sv} options) -> s session_id', 'Pause() -> ', 'Resume() -> ',
        'SetDepth(d mm) -> ', 'SetSpeed(d hz) -> ', 'Stop() -> ', 'Heartbeat() -> ',
        'ClearFault() -> ', 'OpenTelemetry() -> h fd',
        'OpenTelemetryPipe() -> h fd', 'WatchTelemetry() -> ', 'UnwatchTelemetry() -> ',
        'signal Telemetry(a(tuddddu) samples)', 'signal SessionEnded(s session_id, s reason)',
        'signal SessionRecorded(s session_id, a{sv} figures)',  # (ext)
    ],
    'org.needled1.Simulator': [
        'AddPen(a{sv} options) -> o pen', 'RemovePen(o pen) -> ',
        'InsertCartridge(o pen, s id, u needles) -> ', 'EjectCartridge(o pen) -> ',
        'SetBattery(o pen, u percent) -> ', 'InjectFault(o pen, s fault) -> ',
        'GetPenCounters(o pen) -> a{sv} counters',  # (ext)
    ],
}


def describe(model):
    """The API lines of one interface model, in the notation of API."""
    lines = []
    for name, p in model['property'].items():
        const = ' const' if p['annotations'].get(EMITS) == 'const' else ''
        lines.append(f'{name}: {p["type"]}{const}')
    for name, m in model['method'].items():
        ins = ', '.join(f'{t} {n}' for n, t, d in m['args'] if d == 'in')
        outs = ', '.join(f'{t} {n}' for n, t, d in m['args'] if d == 'out')
        lines.append(f'{name}({ins}) -> {outs}')
    for name, s in model['signal'].items():
        lines.append(f'signal {name}({", ".join(f"{t} {n}" for n, t, _ in s["args"])})')
    return sorted(lines)


def render_like_sdbus(contract_text, interfaces, children=()):
    """One object's introspection as sd-bus writes it: a DOCTYPE, the standard interfaces
    first, members in another order, no comments, EmitsChangedSignal only when not "true",
    method args with explicit directions, child nodes last."""
    root = ET.fromstring(contract_text)
    out = ['<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"',
           '"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">', '<node>',
           ' <interface name="org.freedesktop.DBus.Peer">',
           '  <method name="Ping"/>',
           '  <method name="GetMachineId"><arg type="s" name="machine_uuid" direction="out"/></method>',
           ' </interface>',
           ' <interface name="org.freedesktop.DBus.Introspectable">',
           '  <method name="Introspect"><arg name="xml_data" type="s" direction="out"/></method>',
           ' </interface>']
    for iface in root.findall('interface'):
        if iface.get('name') not in interfaces:
            continue
        out.append(f' <interface name="{iface.get("name")}">')
        for member in reversed(list(iface)):
            if member.tag == 'property':
                out.append(f'  <property name="{member.get("name")}" type="{member.get("type")}" access="read">')
                for a in member.findall('annotation'):
                    if ic.is_codegen_annotation(a.get('name')):
                        continue  # sd-bus has no way to emit them
                    if not (a.get('name') == EMITS and a.get('value') == 'true'):
                        out.append(f'   <annotation name="{a.get("name")}" value="{a.get("value")}"/>')
                out.append('  </property>')
            elif member.tag in ('method', 'signal'):
                out.append(f'  <{member.tag} name="{member.get("name")}">')
                for a in member.findall('arg'):
                    direction = ''
                    if member.tag == 'method':
                        direction = f' direction="{a.get("direction") or "in"}"'
                    out.append(f'   <arg type="{a.get("type")}" name="{a.get("name")}"{direction}/>')
                out.append(f'  </{member.tag}>')
        out.append(' </interface>')
    out += [f' <node name="{c}"/>' for c in children]
    out.append('</node>')
    return '\n'.join(out)


def live_documents():
    """The manager object (with the simulator) and a pen object, as sd-bus renders them."""
    text = CONTRACT_TEXT
    manager = render_like_sdbus(text, {'org.needled1.Manager', 'org.needled1.Simulator'}, ['pen'])
    pen = render_like_sdbus(text, {'org.needled1.Pen'})
    return manager, pen


def mutate(xml_text, iface, member, fn):
    """xml_text with fn applied to the element of member (None: the interface itself)."""
    root = ET.fromstring(xml_text)
    i = root.find(f"interface[@name='{iface}']")
    target = i if member is None else i.find(f"*[@name='{member}']")
    fn(i, target)
    return ET.tostring(root, encoding='unicode')


class Contract(unittest.TestCase):
    def test_members_are_the_api(self):
        model = ic.parse_interfaces(CONTRACT_TEXT, CONTRACT)
        self.assertEqual(sorted(model), sorted(API))
        for name, lines in API.items():
            with self.subTest(interface=name):
                self.assertEqual(describe(model[name]), sorted(lines))

    def test_every_member_documented(self):
        parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
        root = ET.fromstring(CONTRACT_TEXT, parser=parser)
        for iface in root.iter('interface'):
            previous = None
            for child in iface:
                if child.tag in ('method', 'signal', 'property'):
                    with self.subTest(member=f'{iface.get("name")}.{child.get("name")}'):
                        self.assertIs(previous is not None and previous.tag, ET.Comment)
                        self.assertGreater(len(previous.text.split()), 3)
                previous = child

    def test_code_generators_find_their_annotations(self):
        # qdbusxml2cpp refuses a member of a complex type without a QtTypeName naming a type of
        # dbus/needled1-qt-types.h; gdbus-codegen passes the fd list only with UnixFD.
        root = ET.fromstring(CONTRACT_TEXT)
        qt = 'org.qtproject.QtDBus.QtTypeName'
        simple = {'s', 'o', 'u', 't', 'd', 'b', 'h', 'as', 'ao', 'y', 'n', 'q', 'i', 'x'}
        for iface in root.findall('interface'):
            for member in iface:
                names = {a.get('name') for a in member.findall('annotation')}
                where = f'{iface.get("name")}.{member.get("name")}'
                if member.tag == 'property' and member.get('type') not in simple:
                    with self.subTest(member=where):
                        self.assertIn(qt, names)
                for kind in ('method', 'signal'):
                    if member.tag != kind:
                        continue
                    counters = {'in': 0, 'out': 0}
                    for arg in member.findall('arg'):
                        direction = arg.get('direction') or ('in' if kind == 'method' else 'out')
                        n = counters[direction]
                        counters[direction] += 1
                        if arg.get('type') in simple:
                            continue
                        with self.subTest(member=where, arg=arg.get('name')):
                            self.assertIn(f'{qt}.{direction.capitalize()}{n}', names)
        fd = root.find("interface[@name='org.needled1.Pen']/method[@name='OpenTelemetry']")
        self.assertIn(('org.gtk.GDBus.C.UnixFD', 'true'),
                      [(a.get('name'), a.get('value')) for a in fd.findall('annotation')])

    def test_no_member_is_privileged(self):
        self.assertNotIn('org.freedesktop.systemd1.Privileged', CONTRACT_TEXT.replace(
            'No member carries org.freedesktop.systemd1.Privileged', ''))


class Compare(unittest.TestCase):
    def diffs(self, contract, lives, **kw):
        return ic.differences(contract, lives, **kw)

    def test_contract_equals_itself(self):
        self.assertEqual(self.diffs(CONTRACT_TEXT, [CONTRACT_TEXT]), [])

    def test_sdbus_rendering_equals_contract(self):
        self.assertEqual(self.diffs(CONTRACT_TEXT, list(live_documents())), [])

    def test_interface_level_annotation_inherited(self):
        # Interface-level const, overridden per property, is the same as per-property const.
        def to_interface_level(iface, _):
            for prop in iface.findall('property'):
                const = prop.find('annotation') is not None
                for a in prop.findall('annotation'):
                    prop.remove(a)
                if not const:
                    prop.append(ET.fromstring(f'<annotation name="{EMITS}" value="true"/>'))
            iface.insert(0, ET.fromstring(f'<annotation name="{EMITS}" value="const"/>'))
        live = mutate(CONTRACT_TEXT, 'org.needled1.Manager', None, to_interface_level)
        self.assertNotEqual(live, CONTRACT_TEXT)
        self.assertEqual(self.diffs(CONTRACT_TEXT, [live]), [])

    def assertReports(self, live_text, *needles, lives=None):
        diffs = self.diffs(CONTRACT_TEXT, lives or [live_text])
        self.assertTrue(diffs, 'no difference reported')
        joined = '\n'.join(diffs)
        for needle in needles:
            self.assertIn(needle, joined)

    def test_argument_renamed(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'SetDepth',
                      lambda i, m: m.find('arg').set('name', 'depth_mm'))
        self.assertReports(live, 'org.needled1.Pen.SetDepth: method arguments are [in d depth_mm]',
                           'the contract says [in d mm]')

    def test_argument_unnamed(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'SetDepth',
                      lambda i, m: m.find('arg').attrib.pop('name'))
        self.assertReports(live, 'in d (unnamed)')

    def test_direction_flipped(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'Start',
                      lambda i, m: m.findall('arg')[1].set('direction', 'in'))
        self.assertReports(live, 'org.needled1.Pen.Start: method arguments')

    def test_property_type(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'DepthMm', lambda i, p: p.set('type', 'u'))
        self.assertReports(live, 'org.needled1.Pen.DepthMm: property type is "u", the contract says "d"')

    def test_property_access(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'DepthMm', lambda i, p: p.set('access', 'readwrite'))
        self.assertReports(live, 'property access is "readwrite"')

    def test_property_missing(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'Warnings', lambda i, p: i.remove(p))
        self.assertReports(live, 'org.needled1.Pen.Warnings: property missing from the live introspection')

    def test_extra_method(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Manager', None,
                      lambda i, t: i.append(ET.fromstring('<method name="Debug"/>')))
        self.assertReports(live, 'org.needled1.Manager.Debug: method not in the contract')

    def test_privileged_method(self):
        # What sd-bus adds to a vtable entry without SD_BUS_VTABLE_UNPRIVILEGED.
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'Start', lambda i, m: m.append(ET.fromstring(
            '<annotation name="org.freedesktop.systemd1.Privileged" value="true"/>')))
        self.assertReports(live, 'org.needled1.Pen.Start: annotation org.freedesktop.systemd1.Privileged="true" '
                                 'not in the contract')

    def test_codegen_annotations_ignored_others_compared(self):
        def strip_codegen(i, t):
            for e in i.iter():
                for a in list(e.findall('annotation')):
                    if ic.is_codegen_annotation(a.get('name')):
                        e.remove(a)
        bare = mutate(CONTRACT_TEXT, 'org.needled1.Pen', None, strip_codegen)
        self.assertNotEqual(bare, CONTRACT_TEXT)
        self.assertEqual(self.diffs(CONTRACT_TEXT, [bare]), [])
        # Another generator annotation the live side has and the contract not: still ignored.
        extra = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'Stop', lambda i, m: m.append(ET.fromstring(
            '<annotation name="org.gtk.GDBus.C.Name" value="halt"/>')))
        self.assertEqual(self.diffs(CONTRACT_TEXT, [extra]), [])
        # Every other annotation is compared, on methods as on properties.
        deprecated = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'OpenTelemetry', lambda i, m: m.append(
            ET.fromstring('<annotation name="org.freedesktop.DBus.Deprecated" value="true"/>')))
        self.assertReports(deprecated, 'org.needled1.Pen.OpenTelemetry: annotation org.freedesktop.DBus.Deprecated')

    def test_const_dropped(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'Serial',
                      lambda i, p: p.remove(p.find('annotation')))
        self.assertReports(live, f'org.needled1.Pen.Serial: annotation {EMITS} is "true", the contract says "const"')

    def test_signal_argument_type(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'Telemetry',
                      lambda i, s: s.find('arg').set('type', 'a(tudddd)'))
        self.assertReports(live, 'org.needled1.Pen.Telemetry: signal arguments')

    def test_interface_missing(self):
        manager, pen = live_documents()
        manager_only = render_like_sdbus(CONTRACT_TEXT, {'org.needled1.Manager'})
        self.assertReports(None, 'org.needled1.Simulator: interface missing', lives=[manager_only, pen])
        # ... unless the comparison is restricted to what the daemon runs with.
        self.assertEqual(self.diffs(CONTRACT_TEXT, [manager_only, pen],
                                    interfaces=['org.needled1.Manager', 'org.needled1.Pen']), [])

    def test_unknown_interface_with_prefix(self):
        live = CONTRACT_TEXT.replace('<node>', '<node><interface name="org.needled1.Debug"/>', 1)
        self.assertReports(live, 'org.needled1.Debug: interface not in the contract')

    def test_two_objects_disagree(self):
        pen_a = render_like_sdbus(CONTRACT_TEXT, {'org.needled1.Pen'})
        pen_b = render_like_sdbus(mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'State',
                                         lambda i, p: i.remove(p)), {'org.needled1.Pen'})
        manager, _ = live_documents()
        self.assertReports(None, 'org.needled1.Pen: differs between', lives=[manager, pen_a, pen_b])

    def test_malformed_documents_raise(self):
        for bad in ['<node>', '<nope/>', '<node><interface name="x.y"><method/></interface></node>',
                    '<node><interface name="x.y"><signal name="S"><arg type="s" direction="in"/>'
                    '</signal></interface></node>']:
            with self.subTest(doc=bad), self.assertRaises(ic.IntrospectionError):
                ic.differences(CONTRACT_TEXT, [bad])


class CommandLine(unittest.TestCase):
    def run_tool(self, *args, stdin=''):
        tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'introspect_compare.py')
        return subprocess.run([sys.executable, tool] + list(args), input=stdin,
                              capture_output=True, text=True, timeout=60)

    def test_equal_exit_0(self):
        manager, pen = live_documents()
        r = self.run_tool(CONTRACT, '-', stdin=manager + '\n')
        self.assertEqual(r.returncode, 1, 'the pen interface is missing from this one')
        r = self.run_tool('--interface', 'org.needled1.Manager', '--interface', 'org.needled1.Simulator',
                          CONTRACT, '-', stdin=manager)
        self.assertEqual((r.returncode, r.stdout), (0, ''), r.stderr)

    def test_different_exit_1_with_diff(self):
        live = mutate(CONTRACT_TEXT, 'org.needled1.Pen', 'SetSpeed',
                      lambda i, m: m.find('arg').set('type', 'u'))
        r = self.run_tool(CONTRACT, '-', stdin=live)
        self.assertEqual(r.returncode, 1)
        self.assertIn('org.needled1.Pen.SetSpeed: method arguments are [in u hz]', r.stdout)
        self.assertIn('1 difference(s)', r.stderr)

    def test_unreadable_exit_2(self):
        r = self.run_tool(CONTRACT, '-', stdin='<node><interface')
        self.assertEqual(r.returncode, 2)
        self.assertIn('not well-formed', r.stderr)
        r = self.run_tool(CONTRACT, '/nonexistent/file.xml')
        self.assertEqual(r.returncode, 2)


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(f'usage: {sys.argv[0]} CONTRACT_XML')
    CONTRACT = sys.argv[1]
    with open(CONTRACT, encoding='utf-8') as f:
        CONTRACT_TEXT = f.read()
    unittest.main(argv=sys.argv[:1], verbosity=2)
