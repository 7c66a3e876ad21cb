#!/usr/bin/python3
"""Compare D-Bus introspection XML documents semantically.

Usage:
  introspect_compare.py [--interface NAME]... [--prefix PREFIX] CONTRACT LIVE [LIVE...]

CONTRACT is the interface file (dbus/org.needled1.xml). Each LIVE is an introspection
reply of one object of the running daemon (a file, or "-" for standard input), e.g.
  busctl --system introspect --xml-interface org.needled /org/needled
Several LIVE documents are merged (the manager object and a pen object together cover
every interface); an interface that appears in several must be identical in each.

Compared, for every interface whose name starts with PREFIX (default "org.needled1."), or
only the interfaces named with --interface: the set of interfaces; each method, signal and
property by name; arguments in order with their names, types and directions; property
types and access; every annotation. The D-Bus defaults are made explicit before comparing
(method arguments default to direction "in"; EmitsChangedSignal defaults to the interface's
value, else "true", which is why sd-bus omits it), so equivalent spellings compare equal.
Comments, whitespace, element order, child nodes and other interfaces (Peer,
Introspectable, Properties, ObjectManager) are ignored.

Exit status: 0 same, 1 different (each difference printed on its own line), 2 a document
could not be read or parsed.

As a module: differences(contract_xml, [live_xml, ...], interfaces=None, prefix=...) returns
the list of difference lines (empty when the documents agree).
"""

import argparse
import sys
import xml.etree.ElementTree as ET

DEFAULT_PREFIX = 'org.needled1.'
EMITS = 'org.freedesktop.DBus.Property.EmitsChangedSignal'
# Annotations read only by code generators (gdbus-codegen, qdbusxml2cpp): a daemon's runtime
# introspection never carries them (sd-bus cannot emit them), so they are not compared.
CODEGEN_ANNOTATION_PREFIXES = ('org.gtk.GDBus.', 'org.qtproject.QtDBus.')


def is_codegen_annotation(name):
    """Whether an annotation is meant for a code generator only (ignored by the comparison)."""
    return name.startswith(CODEGEN_ANNOTATION_PREFIXES)


class IntrospectionError(Exception):
    """A document is not well-formed introspection XML."""


def _annotations(elem, where):
    result = {}
    for a in elem.findall('annotation'):
        name = a.get('name')
        if name is None or a.get('value') is None:
            raise IntrospectionError(f'{where}: annotation without name or value')
        if name in result:
            raise IntrospectionError(f'{where}: annotation {name} given twice')
        if is_codegen_annotation(name):
            continue
        result[name] = a.get('value')
    return result


def _args(elem, where, kind):
    args = []
    for i, a in enumerate(elem.findall('arg')):
        typ = a.get('type')
        if not typ:
            raise IntrospectionError(f'{where}: argument {i} has no type')
        direction = a.get('direction')
        if kind == 'method':
            direction = direction or 'in'
            if direction not in ('in', 'out'):
                raise IntrospectionError(f'{where}: argument {i} has direction "{direction}"')
        else:
            # Signal arguments are always emitted; "out" is the only legal spelling.
            if direction not in (None, 'out'):
                raise IntrospectionError(f'{where}: signal argument {i} has direction "{direction}"')
            direction = 'out'
        args.append((a.get('name'), typ, direction))
    return args


def _named(parent, tag, where):
    seen = {}
    for e in parent.findall(tag):
        name = e.get('name')
        if not name:
            raise IntrospectionError(f'{where}: <{tag}> without a name')
        if name in seen:
            raise IntrospectionError(f'{where}: {tag} {name} declared twice')
        seen[name] = e
    return seen


def normalize_interface(elem):
    """Returns a comparable model of one <interface> element."""
    iname = elem.get('name')
    annotations = _annotations(elem, iname)
    # On an interface it is only a default for its properties: compared there.
    iface_emits = annotations.pop(EMITS, 'true')
    model = {'annotations': annotations, 'method': {}, 'signal': {}, 'property': {}}
    for name, m in _named(elem, 'method', iname).items():
        where = f'{iname}.{name}'
        model['method'][name] = {'args': _args(m, where, 'method'),
                                 'annotations': _annotations(m, where)}
    for name, s in _named(elem, 'signal', iname).items():
        where = f'{iname}.{name}'
        model['signal'][name] = {'args': _args(s, where, 'signal'),
                                 'annotations': _annotations(s, where)}
    for name, p in _named(elem, 'property', iname).items():
        where = f'{iname}.{name}'
        if not p.get('type') or p.get('access') not in ('read', 'write', 'readwrite'):
            raise IntrospectionError(f'{where}: property needs a type and access read|write|readwrite')
        ann = _annotations(p, where)
        ann[EMITS] = ann.get(EMITS, iface_emits)
        model['property'][name] = {'type': p.get('type'), 'access': p.get('access'),
                                   'annotations': ann}
    return model


def parse_interfaces(xml_text, source):
    """Returns {interface name: model} of the interfaces on the root node of a document."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise IntrospectionError(f'{source}: not well-formed XML: {e}') from None
    if root.tag != 'node':
        raise IntrospectionError(f'{source}: root element is <{root.tag}>, not <node>')
    result = {}
    for name, elem in _named(root, 'interface', source).items():
        try:
            result[name] = normalize_interface(elem)
        except IntrospectionError as e:
            raise IntrospectionError(f'{source}: {e}') from None
    return result


def _fmt_args(args):
    return ', '.join(f'{d} {t} {n if n is not None else "(unnamed)"}' for n, t, d in args) or '(none)'


def _diff_annotations(where, want, got, out):
    for key in sorted(set(want) | set(got)):
        if key not in got:
            out.append(f'{where}: annotation {key}="{want[key]}" missing from the live introspection')
        elif key not in want:
            out.append(f'{where}: annotation {key}="{got[key]}" not in the contract')
        elif want[key] != got[key]:
            out.append(f'{where}: annotation {key} is "{got[key]}", the contract says "{want[key]}"')


def _diff_members(iname, kind, want, got, out):
    for name in sorted(set(want) | set(got)):
        where = f'{iname}.{name}'
        if name not in got:
            out.append(f'{where}: {kind} missing from the live introspection')
            continue
        if name not in want:
            out.append(f'{where}: {kind} not in the contract')
            continue
        w, g = want[name], got[name]
        if kind == 'property':
            if w['type'] != g['type']:
                out.append(f'{where}: property type is "{g["type"]}", the contract says "{w["type"]}"')
            if w['access'] != g['access']:
                out.append(f'{where}: property access is "{g["access"]}", the contract says "{w["access"]}"')
        elif w['args'] != g['args']:
            out.append(f'{where}: {kind} arguments are [{_fmt_args(g["args"])}], '
                       f'the contract says [{_fmt_args(w["args"])}]')
        _diff_annotations(where, w['annotations'], g['annotations'], out)


def diff_interface(iname, want, got):
    """Returns the difference lines between two interface models (want: the contract)."""
    out = []
    _diff_annotations(iname, want['annotations'], got['annotations'], out)
    for kind in ('method', 'signal', 'property'):
        _diff_members(iname, kind, want[kind], got[kind], out)
    return out


def differences(contract_xml, live_xmls, interfaces=None, prefix=DEFAULT_PREFIX,
                contract_source='contract', live_sources=None):
    """Returns difference lines between the contract and the merged live documents."""
    contract = parse_interfaces(contract_xml, contract_source)
    live_sources = live_sources or [f'live document {i + 1}' for i in range(len(live_xmls))]
    out = []
    live = {}
    for text, source in zip(live_xmls, live_sources):
        for name, model in parse_interfaces(text, source).items():
            if name in live and live[name][0] != model:
                out.append(f'{name}: differs between {live[name][1]} and {source}: '
                           + '; '.join(diff_interface(name, live[name][0], model)))
                continue
            live.setdefault(name, (model, source))

    if interfaces:
        wanted = list(interfaces)
        for name in wanted:
            if name not in contract:
                out.append(f'{name}: interface not in the contract')
    else:
        wanted = sorted(n for n in set(contract) | set(live) if n.startswith(prefix))
    for name in wanted:
        if name not in contract:
            if not interfaces:
                out.append(f'{name}: interface not in the contract')
            continue
        if name not in live:
            out.append(f'{name}: interface missing from the live introspection')
            continue
        out.extend(diff_interface(name, contract[name], live[name][0]))
    return out


def _read(path):
    if path == '-':
        return sys.stdin.read()
    with open(path, encoding='utf-8') as f:
        return f.read()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    ap.add_argument('--interface', action='append', metavar='NAME',
                    help='compare only this interface (repeatable)')
    ap.add_argument('--prefix', default=DEFAULT_PREFIX,
                    help='compare every interface with this name prefix (default %(default)s)')
    ap.add_argument('contract')
    ap.add_argument('live', nargs='+')
    args = ap.parse_args(argv)
    if args.live.count('-') > 1:
        ap.error('standard input can be given only once')
    try:
        contract = _read(args.contract)
        lives = [_read(p) for p in args.live]
        diffs = differences(contract, lives, args.interface, args.prefix,
                            contract_source=args.contract,
                            live_sources=['<stdin>' if p == '-' else p for p in args.live])
    except (OSError, UnicodeDecodeError, IntrospectionError) as e:
        print(f'introspect_compare: {e}', file=sys.stderr)
        return 2
    for line in diffs:
        print(line)
    if diffs:
        print(f'introspect_compare: {len(diffs)} difference(s) between {args.contract} '
              f'and the live introspection', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
