#!/usr/bin/python3
"""org.needled1.Manager on the running daemon (needled --simulate on a private system bus,
python-dbusmock's polkitd): every property, the limits life cycle (ok / invalid / missing at
start, fail closed, reload allowed and denied, a bad reload keeps the limits in force),
GetLimits mirroring the YAML, ValidateProfile with every violation code, GetProfiles,
GetHistory (authorization, filters, order, fields) and GetCartridge."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import dbus
import yaml

from needledtest import (ACCESS_DENIED, CONFIGURE, ERR, INVALID_ARGS, MANAGER_IFACE, MANAGER_PATH,
                         OPERATE, PROPS_IFACE, READ_HISTORY, NeedledTestCase, SignalLog,
                         limits_fixture_areas, limits_yaml, main, needled_binary, profile_yaml,
                         sha256_file, source_path, timeout_multiplier, unwrap, wait_until)

EMPTY_SV = dbus.Dictionary({}, signature='sv')
PROFILE_KEYS = {'name': str, 'area': str, 'indication': str, 'depth_mm': float, 'speed_hz': float,
                'duration_s': float, 'needles': int, 'valid': bool, 'violations': list}
HISTORY_KEYS = {'id': dbus.String, 'pen': dbus.String, 'cartridge': dbus.String, 'profile': dbus.String,
                'profile_digest': dbus.String, 'limits_digest': dbus.String, 'label': dbus.String,
                'owner_uid': dbus.UInt32, 'start': dbus.UInt64, 'end': dbus.UInt64,
                'duration_s': dbus.Double, 'strokes': dbus.UInt64, 'max_depth_mm': dbus.Double,
                'max_temperature_c': dbus.Double, 'max_current_ma': dbus.Double, 'reason': dbus.String}
HEX64 = re.compile(r'^[0-9a-f]{64}$')

# The limits of ManagerWithLimits: the fixture's, with the body area slower than the pen may
# go, so that an area's own speed bound can be crossed.
MANAGER_LIMITS = {'areas': dict(limits_fixture_areas(),
                                body={'max_depth_mm': 2.0, 'max_speed_hz': 140, 'max_duration_s': 1800})}

# (profile YAML, field, code) for every violation code ValidateProfile can give against
# MANAGER_LIMITS (cheeks max 1.5 mm, body max 2.0 mm / 140 Hz / 1800 s, speeds 50..150 Hz,
# sessions up to 2700 s, needles 12 14 16 24 36 42).
VIOLATIONS = [
    ('name: [unclosed\n', '', 'yaml-syntax'),
    ('- a list\n- not a mapping\n', '', 'not-a-mapping'),
    # dbus-api.md lists duplicate-key among the document-level codes, yet naming the key that
    # appears twice is what a person can act on: either field is accepted (see DUP_FIELDS).
    (profile_yaml() + 'name: again\n', 'name', 'duplicate-key'),
    (profile_yaml(extra='colour: red\n'), 'colour', 'unknown-field'),
    ('name: x\nindication: acne-scars\narea: cheeks\nspeed_hz: 100\nduration_s: 600\nneedles: 12\n',
     'depth_mm', 'missing-field'),
    (profile_yaml(depth_mm='[1, 2]'), 'depth_mm', 'wrong-type'),
    (profile_yaml(depth_mm='.nan'), 'depth_mm', 'not-finite'),
    (profile_yaml(depth_mm=-0.5), 'depth_mm', 'out-of-range'),
    (profile_yaml(name='Bad_Name!'), 'name', 'invalid-name'),
    (profile_yaml(indication='tattoo-removal'), 'indication', 'unknown-indication'),
    (profile_yaml(area='elbow'), 'area', 'unknown-area'),
    (profile_yaml(depth_mm=2.0), 'depth_mm', 'above-area-max'),
    (profile_yaml(speed_hz=200), 'speed_hz', 'speed-out-of-range'),
    (profile_yaml(area='body', speed_hz=145, depth_mm=1.5), 'speed_hz', 'speed-out-of-range'),
    (profile_yaml(area='body', depth_mm=1.5, duration_s=2000), 'duration_s', 'above-duration-max'),
    (profile_yaml(duration_s=3000), 'duration_s', 'above-duration-max'),
    (profile_yaml(needles=13), 'needles', 'needles-not-allowed'),
]


def write(path, text):
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)


def types_of(value):
    """The D-Bus type letters of a dbus-python value tree (for 'travels as u/d/b' checks)."""
    if isinstance(value, dbus.Dictionary):
        return {str(k): types_of(v) for k, v in value.items()}
    if isinstance(value, dbus.Array):
        return [types_of(v) for v in value]
    return {dbus.UInt32: 'u', dbus.Double: 'd', dbus.Boolean: 'b', dbus.String: 's',
            dbus.UInt64: 't', dbus.Int32: 'i'}.get(type(value), type(value).__name__)


def expected_types(tree, key=None):
    """What the contract says each limits field travels as: numbers whose key ends in _ms or
    _percent, version and allowed_needles entries as u; other numbers d; booleans b."""
    if isinstance(tree, dict):
        return {k: expected_types(v, k) for k, v in tree.items()}
    if isinstance(tree, list):
        return [expected_types(v, key) for v in tree]
    if isinstance(tree, bool):
        return 'b'
    if key in ('version', 'allowed_needles') or key.endswith('_ms') or key.endswith('_percent'):
        return 'u'
    return 'd'


class ManagerWithLimits(NeedledTestCase):
    """Good limits at start (a file of the test's, rewritten by the reload tests), a profiles
    directory with the installed examples, one unparsable file and one beyond the limits."""

    limits_text = limits_yaml(**MANAGER_LIMITS)

    @classmethod
    def setUpClass(cls):
        cls.profiles_dir_tmp = tempfile.mkdtemp(prefix='needled-profiles-')
        for name in os.listdir(source_path('conf', 'profiles.d')):
            shutil.copy(source_path('conf', 'profiles.d', name), cls.profiles_dir_tmp)
        write(os.path.join(cls.profiles_dir_tmp, 'broken.yaml'), 'name: [broken\n')
        write(os.path.join(cls.profiles_dir_tmp, 'too-deep-cheeks.yaml'),
              profile_yaml(name='too-deep-cheeks', depth_mm=2.0))
        cls.profiles_dir = cls.profiles_dir_tmp
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            shutil.rmtree(cls.profiles_dir_tmp, ignore_errors=True)

    def setUp(self):
        super().setUp()
        # Every test starts from the good file the daemon loaded at start.
        write(self.limits_path, self.limits_text)
        if self.mprop('LimitsDigest') != sha256_file(self.limits_path):
            self.mgr('ReloadLimits')

    # ---- properties ----

    def test_version_and_features(self):
        version = self.mprop('Version')
        out = subprocess.run([needled_binary(), '--version'], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), f'needled {version}')
        features = self.mprop('Features')
        for f in ('telemetry-fd', 'ledger', 'client-heartbeat', 'simulator'):
            self.assertIn(f, features)
        self.assertEqual(len(features), len(set(features)))

    def test_limits_properties(self):
        props = self.get_all(MANAGER_PATH, MANAGER_IFACE)
        self.assertEqual(props['LimitsPath'], self.limits_path)
        self.assertEqual(props['LimitsState'], 'ok')
        self.assertEqual(props['LimitsError'], '')
        self.assertEqual(props['LimitsDigest'], sha256_file(self.limits_path))
        self.assertRegex(props['LimitsDigest'], HEX64)
        # Loaded in this test run: microseconds since the epoch, not in the future.
        now_us = time.time() * 1e6
        self.assertLessEqual(props['LimitsLoadedAt'], now_us + 1e6)
        self.assertGreater(props['LimitsLoadedAt'], now_us - 3600e6)

    def test_pens_in_order_of_connection(self):
        self.assertEqual(self.mprop('Pens'), [])
        a = self.add_pen(serial='ORDER-A')
        b = self.add_pen(serial='ORDER-B')
        self.assertEqual(self.mprop('Pens'), [a, b])
        changed = SignalLog(self.bus, 'PropertiesChanged', PROPS_IFACE, MANAGER_PATH)
        self.sim('RemovePen', dbus.ObjectPath(a))
        self.assertEqual(self.mprop('Pens'), [b])
        changed.wait_for(lambda item: item[1][0] == MANAGER_IFACE and
                         ('Pens' in item[1][1] or 'Pens' in item[1][2]), 5, 'PropertiesChanged(Pens)')

    # ---- GetLimits ----

    def test_get_limits_mirrors_the_yaml(self):
        raw = self.mgr('GetLimits')
        got = unwrap(raw)
        want = yaml.safe_load(self.limits_text)
        self.assertEqual(got, want)
        # The XML's rule, exactly: numbers whose key ends in _ms or _percent, version and
        # the entries of allowed_needles travel as u; every other number as d; booleans b.
        self.assertEqual(types_of(raw), expected_types(want))

    def test_get_limits_of_the_installed_file(self):
        # The shipped conf/limits.yaml, through a reload: every field, nested as in the file.
        shutil.copyfile(source_path('conf', 'limits.yaml'), self.limits_path)
        self.mgr('ReloadLimits')
        with open(self.limits_path, encoding='utf-8') as f:
            self.assertEqual(unwrap(self.mgr('GetLimits')), yaml.safe_load(f))
        self.assertEqual(self.mprop('LimitsDigest'), sha256_file(self.limits_path))

    # ---- ReloadLimits ----

    def test_reload_denied_without_configure(self):
        self.polkit.set_allowed([OPERATE, READ_HISTORY])
        digest = self.mprop('LimitsDigest')
        write(self.limits_path, limits_yaml(max_duration_s=2000))
        msg = self.assertDBusError(ACCESS_DENIED, self.mgr, 'ReloadLimits')
        self.assertIn(CONFIGURE, msg)
        self.assertEqual(self.mprop('LimitsDigest'), digest)
        self.assertEqual(unwrap(self.mgr('GetLimits'))['session']['max_duration_s'], 2700)

    def test_reload_good_file(self):
        old = self.mprop('LimitsDigest')
        old_loaded = self.mprop('LimitsLoadedAt')
        changed = SignalLog(self.bus, 'PropertiesChanged', PROPS_IFACE, MANAGER_PATH)
        write(self.limits_path, limits_yaml(max_duration_s=2000))
        self.mgr('ReloadLimits')
        new = self.mprop('LimitsDigest')
        self.assertNotEqual(new, old)
        self.assertEqual(new, sha256_file(self.limits_path))
        self.assertEqual(self.mprop('LimitsState'), 'ok')
        self.assertGreaterEqual(self.mprop('LimitsLoadedAt'), old_loaded)
        self.assertEqual(unwrap(self.mgr('GetLimits'))['session']['max_duration_s'], 2000)
        item = changed.wait_for(lambda i: i[1][0] == MANAGER_IFACE and
                                ('LimitsDigest' in i[1][1] or 'LimitsDigest' in i[1][2]),
                                5, 'PropertiesChanged(LimitsDigest)')
        if 'LimitsDigest' in item[1][1]:
            self.assertEqual(item[1][1]['LimitsDigest'], new)
        # The new limits are the ones enforced: 2100 s is now beyond the session maximum.
        codes = [v[1] for v in unwrap(self.mgr('ValidateProfile', profile_yaml(duration_s=2100)))]
        self.assertEqual(codes, ['above-duration-max'])

    def test_reload_bad_file_keeps_limits(self):
        digest = self.mprop('LimitsDigest')
        limits = unwrap(self.mgr('GetLimits'))
        bad = limits_yaml().replace('max_current_ma: 1200', 'max_current_ma: lots')
        write(self.limits_path, bad)
        msg = self.assertDBusError(ERR + 'InvalidLimits', self.mgr, 'ReloadLimits')
        line = bad.splitlines().index('  max_current_ma: lots') + 1
        self.assertRegex(msg, re.escape(self.limits_path) + rf':{line}:\d+: ')
        self.assertIn('max_current_ma', msg)
        self.assertEqual(self.mprop('LimitsState'), 'ok')
        self.assertEqual(self.mprop('LimitsDigest'), digest)
        self.assertEqual(unwrap(self.mgr('GetLimits')), limits)
        error = self.mprop('LimitsError')
        self.assertRegex(error, re.escape(self.limits_path) + rf':{line}:\d+: ')
        # Arming still works under the limits in force.
        pen = self.add_pen()
        self.arm(pen)
        # A good reload clears LimitsError.
        write(self.limits_path, self.limits_text)
        self.mgr('ReloadLimits')
        self.assertEqual(self.mprop('LimitsError'), '')

    def test_reload_missing_file_keeps_limits(self):
        digest = self.mprop('LimitsDigest')
        os.unlink(self.limits_path)
        msg = self.assertDBusError(ERR + 'InvalidLimits', self.mgr, 'ReloadLimits')
        self.assertIn(self.limits_path, msg)
        self.assertEqual(self.mprop('LimitsState'), 'ok')
        self.assertEqual(self.mprop('LimitsDigest'), digest)

    def test_reload_stops_a_treatment_beyond_the_new_limits(self):
        pen = self.add_pen(cartridge=('RELOAD-1', 12))
        ended = SignalLog(self.bus, 'SessionEnded', 'org.needled1.Pen', pen)
        sid = self.start_session(pen, depth_mm=1.0)
        # Still within: keeps running.
        write(self.limits_path, limits_yaml(max_duration_s=2000))
        self.mgr('ReloadLimits')
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        # cheeks now 0.8 mm: the running 1.0 mm treatment must stop.
        write(self.limits_path, limits_yaml().replace('cheeks:      {max_depth_mm: 1.5}',
                                                       'cheeks:      {max_depth_mm: 0.8}'))
        self.mgr('ReloadLimits')
        ended.wait_for(lambda i: i[1] == (sid, 'limits-changed'), 5, 'SessionEnded limits-changed')
        self.wait_state(pen, 'idle')

    # ---- ValidateProfile ----

    def test_validate_valid(self):
        self.assertEqual(unwrap(self.mgr('ValidateProfile', profile_yaml())), [])
        with open(source_path('conf', 'profiles.d', 'acne-scars-cheeks.yaml'), encoding='utf-8') as f:
            self.assertEqual(unwrap(self.mgr('ValidateProfile', f.read())), [])
        # Pen checks (grid, pen range, cartridge) belong to arming, not to validation.
        self.assertEqual(unwrap(self.mgr('ValidateProfile', profile_yaml(depth_mm=1.03))), [])

    def test_validate_every_violation_code(self):
        for text, field, code in VIOLATIONS:
            with self.subTest(code=code, field=field):
                got = unwrap(self.mgr('ValidateProfile', text))
                pairs = [(f, c) for f, c, _ in got]
                if code == 'duplicate-key':
                    pairs = [('name' if f == '' else f, c) for f, c in pairs]
                self.assertIn((field, code), pairs, f'{text!r} gave {got}')
                for f, c, message in got:
                    self.assertTrue(message.strip())
                    self.assertRegex(c, r'^[a-z]+(-[a-z]+)*$')

    def test_validate_message_names_value_and_limit(self):
        got = unwrap(self.mgr('ValidateProfile', profile_yaml(depth_mm=2.0)))
        self.assertEqual(len(got), 1)
        field, code, message = got[0]
        self.assertEqual((field, code), ('depth_mm', 'above-area-max'))
        self.assertIn('2', message)
        self.assertIn('1.5', message)
        self.assertIn('cheeks', message)

    def test_validate_reports_every_violation_at_once(self):
        text = profile_yaml(name='Bad Name', area='elbow', speed_hz=500, needles=13, extra='x: 1\n')
        got = {(f, c) for f, c, _ in unwrap(self.mgr('ValidateProfile', text))}
        for want in (('name', 'invalid-name'), ('area', 'unknown-area'),
                     ('speed_hz', 'speed-out-of-range'), ('needles', 'needles-not-allowed'),
                     ('x', 'unknown-field')):
            self.assertIn(want, got)

    def test_validate_has_no_side_effects(self):
        pen = self.add_pen(cartridge=('VAL-1', 12))
        self.arm(pen, name='armed-one')
        before_pen = self.snapshot(pen)
        before_mgr = self.get_all(MANAGER_PATH, MANAGER_IFACE)
        before_profiles = unwrap(self.mgr('GetProfiles'))
        self.polkit.set_allowed([])   # and needs no authorization
        for text, _, _ in VIOLATIONS + [(profile_yaml(name='other'), '', '')]:
            self.mgr('ValidateProfile', text)
        self.assertEqual(self.snapshot(pen), before_pen)
        self.assertEqual(self.get_all(MANAGER_PATH, MANAGER_IFACE), before_mgr)
        self.assertEqual(unwrap(self.mgr('GetProfiles')), before_profiles)

    # ---- GetProfiles ----

    def test_get_profiles(self):
        profiles = unwrap(self.mgr('GetProfiles'))
        names = [p['name'] for p in profiles]
        for p in profiles:
            for key, typ in PROFILE_KEYS.items():
                self.assertIn(key, p, f'{p.get("name")}: {key}')
                self.assertIsInstance(p[key], typ, f'{p.get("name")}: {key}')
            self.assertEqual(p['valid'], p['violations'] == [], p['name'])
        installed = sorted(f[:-5] for f in os.listdir(source_path('conf', 'profiles.d')) if f.endswith('.yaml'))
        for name in installed:
            self.assertIn(name, names)
            entry = profiles[names.index(name)]
            with open(source_path('conf', 'profiles.d', name + '.yaml'), encoding='utf-8') as f:
                doc = yaml.safe_load(f)
            for key in ('name', 'area', 'indication', 'depth_mm', 'speed_hz', 'duration_s', 'needles'):
                self.assertEqual(entry[key], doc[key], f'{name}.{key}')
        too_deep = profiles[names.index('too-deep-cheeks')]
        self.assertFalse(too_deep['valid'])
        self.assertEqual([(f, c) for f, c, _ in too_deep['violations']], [('depth_mm', 'above-area-max')])
        broken = [p for p in profiles if 'broken' in p['name'] or 'broken' in p.get('file', '')]
        self.assertEqual(len(broken), 1, profiles)
        self.assertFalse(broken[0]['valid'])
        self.assertIn('yaml-syntax', [c for _, c, _ in broken[0]['violations']])

    def test_installed_profiles_against_the_shipped_limits(self):
        # conf/profiles.d is written for conf/limits.yaml: all valid there.
        shutil.copyfile(source_path('conf', 'limits.yaml'), self.limits_path)
        self.mgr('ReloadLimits')
        for p in unwrap(self.mgr('GetProfiles')):
            if p['name'] in ('too-deep-cheeks',) or 'broken' in p['name'] or 'broken' in p.get('file', ''):
                continue
            self.assertTrue(p['valid'], p)

    # ---- GetCartridge ----

    def test_get_cartridge_unknown_is_fresh(self):
        c = unwrap(self.mgr('GetCartridge', 'NEVER-SEEN'))
        self.assertEqual(c['state'], 'fresh')
        self.assertEqual(c['first_used'], 0)
        self.assertEqual(c['runtime_s'], 0)
        self.assertEqual(c['sessions'], 0)

    def test_get_cartridge_after_a_session(self):
        pen = self.add_pen(cartridge=('CART-USED', 12))
        t0 = time.time() * 1e6
        self.start_session(pen)
        c = unwrap(self.mgr('GetCartridge', 'CART-USED'))
        self.assertIn(c['state'], ('in-use', 'spent'))   # single use: spent once it ran
        self.pen_call(pen, 'Stop')
        c = unwrap(self.mgr('GetCartridge', 'CART-USED'))
        self.assertEqual(c['state'], 'spent')
        self.assertEqual(c['sessions'], 1)
        self.assertGreaterEqual(c['first_used'], t0 - 1e6)
        self.assertGreaterEqual(c['runtime_s'], 0)
        self.polkit.set_allowed([])   # no authorization needed
        self.assertEqual(unwrap(self.mgr('GetCartridge', 'CART-USED'))['state'], 'spent')

    def test_get_cartridge_bad_ids(self):
        self.assertDBusError(INVALID_ARGS, self.mgr, 'GetCartridge', '')
        self.assertDBusError(INVALID_ARGS, self.mgr, 'GetCartridge', 'x' * 65)
        self.assertEqual(unwrap(self.mgr('GetCartridge', 'x' * 64))['state'], 'fresh')

    # ---- GetHistory ----

    def test_history_denied_without_read_history(self):
        self.polkit.set_allowed([OPERATE, CONFIGURE])
        msg = self.assertDBusError(ACCESS_DENIED, self.mgr, 'GetHistory', EMPTY_SV)
        self.assertIn(READ_HISTORY, msg)

    def test_history(self):
        a = self.add_pen(serial='HIST-A', cartridge=('HIST-CART-1', 12))
        b = self.add_pen(serial='HIST-B', cartridge=('HIST-CART-2', 14))
        t0 = int(time.time() * 1e6)
        s1 = self.start_session(a, label='appointment-1', name='hist-one')
        self.pen_call(a, 'Stop')
        t_between = int(time.time() * 1e6)
        wait_until(lambda: int(time.time() * 1e6) > t_between + 1000, 1, 'the clock to move')
        s2 = self.start_session(b, label='appointment-2', name='hist-two', needles=14)
        # While running: end 0, reason empty.
        running = [h for h in unwrap(self.mgr('GetHistory', EMPTY_SV)) if h['id'] == s2]
        self.assertEqual(len(running), 1)
        self.assertEqual(running[0]['end'], 0)
        self.assertEqual(running[0]['reason'], '')
        self.pen_call(b, 'Stop')

        raw = self.mgr('GetHistory', EMPTY_SV)
        for entry in raw:
            for key, typ in HISTORY_KEYS.items():
                self.assertIn(key, entry)
                self.assertIsInstance(entry[key], typ, key)
        hist = unwrap(raw)
        mine = [h for h in hist if h['id'] in (s1, s2)]
        self.assertEqual([h['id'] for h in mine], [s2, s1], 'newest first')
        starts = [h['start'] for h in hist]
        self.assertEqual(starts, sorted(starts, reverse=True))
        h2, h1 = mine
        digest = self.mprop('LimitsDigest')
        for h, sid, pen_serial, cart, label, name in ((h1, s1, 'HIST-A', 'HIST-CART-1', 'appointment-1', 'hist-one'),
                                                      (h2, s2, 'HIST-B', 'HIST-CART-2', 'appointment-2', 'hist-two')):
            self.assertEqual(h['pen'], pen_serial)
            self.assertEqual(h['cartridge'], cart)
            self.assertEqual(h['label'], label)
            self.assertEqual(h['profile'], name)
            self.assertEqual(h['limits_digest'], digest)
            self.assertRegex(h['profile_digest'], HEX64)
            self.assertEqual(h['owner_uid'], 0)
            self.assertEqual(h['reason'], 'stopped')
            self.assertGreaterEqual(h['start'], t0 - 1_000_000)
            self.assertGreaterEqual(h['end'], h['start'])
            self.assertGreaterEqual(h['duration_s'], 0.0)
        self.assertLess(h1['start'], h2['start'])

        # Filters.
        only_a = unwrap(self.mgr('GetHistory', dbus.Dictionary({'pen': 'HIST-A'}, signature='sv')))
        self.assertEqual([h['id'] for h in only_a], [s1])
        self.assertEqual(unwrap(self.mgr('GetHistory', dbus.Dictionary({'pen': 'NO-SUCH'}, signature='sv'))), [])
        newest = unwrap(self.mgr('GetHistory', dbus.Dictionary({'limit': dbus.UInt32(1)}, signature='sv')))
        self.assertEqual(len(newest), 1)
        self.assertEqual(newest[0]['id'], hist[0]['id'])
        since = unwrap(self.mgr('GetHistory', dbus.Dictionary({'since': dbus.UInt64(h2['start'])}, signature='sv')))
        self.assertEqual([h['id'] for h in since], [s2])
        both = unwrap(self.mgr('GetHistory', dbus.Dictionary(
            {'since': dbus.UInt64(t0 - 1_000_000), 'limit': dbus.UInt32(0), 'pen': 'HIST-B'}, signature='sv')))
        self.assertEqual([h['id'] for h in both], [s2])

    def test_history_bad_filters(self):
        for bad in ({'colour': 'red'}, {'limit': 'ten'}, {'limit': dbus.Int32(-1)}, {'since': 'yesterday'},
                    {'pen': dbus.UInt32(3)}, {'pen': 'x' * 100000}):
            with self.subTest(filter=str(bad)[:60]):
                self.assertDBusError(INVALID_ARGS, self.mgr, 'GetHistory', dbus.Dictionary(bad, signature='sv'))
        self.ping()


class ManagerLimitsMissing(NeedledTestCase):
    """No limits file at start: the daemon runs, fails closed, and recovers on a reload."""

    limits_missing = True

    def test_missing_fails_closed(self):
        props = self.get_all(MANAGER_PATH, MANAGER_IFACE)
        self.assertEqual(props['LimitsState'], 'missing')
        self.assertEqual(props['LimitsDigest'], '')
        self.assertEqual(props['LimitsLoadedAt'], 0)
        self.assertIn(self.limits_path, props['LimitsError'])
        self.assertDBusError(ERR + 'LimitsUnavailable', self.mgr, 'GetLimits')
        got = unwrap(self.mgr('ValidateProfile', profile_yaml()))
        self.assertIn(('', 'no-limits'), [(f, c) for f, c, _ in got])
        for p in unwrap(self.mgr('GetProfiles')):
            self.assertFalse(p['valid'], p['name'])
        pen = self.add_pen(cartridge=('MISSING-1', 12))
        self.assertDBusError(ERR + 'LimitsUnavailable', self.pen_call, pen, 'LoadProfile', 'acne-scars-cheeks')
        self.assertDBusError(ERR + 'LimitsUnavailable', self.pen_call, pen, 'LoadProfileData', profile_yaml())
        self.assertDBusError(ERR + 'LimitsUnavailable', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')
        self.assertEqual(self.pprop(pen, 'Profile'), {})

        # A bad file on reload: still nothing in force, now "invalid".
        write(self.limits_path, 'version: 2\n')
        self.assertDBusError(ERR + 'InvalidLimits', self.mgr, 'ReloadLimits')
        self.assertEqual(self.mprop('LimitsState'), 'invalid')
        self.assertDBusError(ERR + 'LimitsUnavailable', self.mgr, 'GetLimits')

        # The administrator installs a good file and reloads: arming works.
        write(self.limits_path, limits_yaml())
        self.mgr('ReloadLimits')
        self.assertEqual(self.mprop('LimitsState'), 'ok')
        self.assertEqual(self.mprop('LimitsError'), '')
        self.assertEqual(self.mprop('LimitsDigest'), sha256_file(self.limits_path))
        self.pen_call(pen, 'LoadProfile', 'acne-scars-cheeks')
        self.assertEqual(self.pprop(pen, 'State'), 'armed')


class ManagerLimitsInvalid(NeedledTestCase):
    """A broken limits file at start: "invalid", with the file's line and column."""

    limits_text = limits_yaml().replace('  stall_time_ms: 250\n', '  stall_time_ms: 250.5\n')

    def test_invalid_fails_closed(self):
        props = self.get_all(MANAGER_PATH, MANAGER_IFACE)
        self.assertEqual(props['LimitsState'], 'invalid')
        self.assertEqual(props['LimitsDigest'], '')
        line = self.limits_text.splitlines().index('  stall_time_ms: 250.5') + 1
        self.assertRegex(props['LimitsError'], '^' + re.escape(self.limits_path) + rf':{line}:\d+: ')
        self.assertIn('stall_time_ms', props['LimitsError'])
        msg = self.assertDBusError(ERR + 'LimitsUnavailable', self.mgr, 'GetLimits')
        self.assertIn('invalid', msg)
        pen = self.add_pen(cartridge=('INVALID-1', 12))
        self.assertDBusError(ERR + 'LimitsUnavailable', self.pen_call, pen, 'LoadProfile', 'acne-scars-cheeks')
        self.assertDBusError(ERR + 'LimitsUnavailable', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertEqual(self.pprop(pen, 'State'), 'idle')


class LedgerAcrossRestarts(NeedledTestCase):
    """The ledger outlives the daemon: a clean stop closes the session ("stopped"); a daemon
    killed mid-session has it closed by the next one ("daemon-restart"); a cartridge that ran
    stays spent for ever."""

    limits_text = limits_yaml()
    allowed_actions = [OPERATE, READ_HISTORY]

    def restart(self, signo):
        old = type(self).daemon
        old.signal(signo)
        status = old.wait(20 * timeout_multiplier())
        self.assertIsNotNone(status, 'the daemon exits')
        if signo == signal.SIGTERM:
            self.assertEqual(status, 0, old.log()[-3000:])
        self.fixture.stop_process(old)
        type(self).daemon = None
        wait_until(lambda: not self.bus.name_has_owner('org.needled'), 10, 'the old daemon to leave the bus')
        # Started by the test: stopped (and its exit status checked by nobody) at its end.
        type(self).daemon = type(self).start_needled()
        self.addCleanup(self._stop_restarted)

    def _stop_restarted(self):
        daemon = type(self).daemon
        type(self).daemon = None
        if daemon is not None:
            log = daemon.log()
            status = self.fixture.stop_process(daemon)
            self.assertEqual(status, 0, log[-3000:])

    def history(self, sid):
        return [h for h in unwrap(self.mgr('GetHistory', EMPTY_SV)) if h['id'] == sid]

    def test_sessions_survive_restarts(self):
        pen = self.add_pen(serial='RESTART-1', cartridge=('RESTART-CART-1', 12))
        clean = self.start_session(pen)
        self.restart(signal.SIGTERM)
        self.assertEqual([(h['reason'], h['end'] > 0) for h in self.history(clean)], [('stopped', True)])

        pen = self.add_pen(serial='RESTART-1', cartridge=('RESTART-CART-2', 12))
        killed = self.start_session(pen)
        self.assertEqual(self.history(killed)[0]['reason'], '')
        self.restart(signal.SIGKILL)
        h = self.history(killed)
        self.assertEqual(len(h), 1)
        self.assertEqual(h[0]['reason'], 'daemon-restart')
        self.assertGreaterEqual(h[0]['end'], h[0]['start'])
        for cart in ('RESTART-CART-1', 'RESTART-CART-2'):
            self.assertEqual(unwrap(self.mgr('GetCartridge', cart))['state'], 'spent')
        pen = self.add_pen(serial='RESTART-1', cartridge=('RESTART-CART-2', 12))
        self.assertEqual(self.pprop(pen, 'Cartridge')['state'], 'spent')
        self.pen_call(pen, 'LoadProfile', 'acne-scars-cheeks')
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen, 'Start', EMPTY_SV)


if __name__ == '__main__':
    main()
