#!/usr/bin/python3
"""Skin types, passes, treated surface and dose (issue 15) on the running daemon: GetLimits and
ValidateProfile with the optional keys, Start's skin_type option, the skin type's cap on
SetDepth, the Punctures/DensityPerCm2/SkinType properties, dose-reached, the ledger's new
columns in GetHistory, and a ledger written before schema 2 opened, migrated and verified."""

import os
import shutil
import subprocess

import dbus
import yaml

from needledtest import (ERR, INVALID_ARGS, PEN_IFACE, NeedledTestCase, SignalLog, limits_yaml, main,
                             profile_yaml, source_path, unwrap, wait_until)
import busfixture

EMPTY_SV = dbus.Dictionary({}, signature='sv')
SKIN_TAIL = '''skin_types:
  IV: {max_depth_mm: 1.0}
  V:  {max_depth_mm: 0.75}
  VI: {max_depth_mm: 0.5}
'''
# The test limits with skin types, and a density cap on forehead (0.75 mm) only, so that the
# cheeks profiles of the tests need no surface.
SKIN_LIMITS = limits_yaml().replace('  forehead:    {max_depth_mm: 0.75}',
                                    '  forehead:    {max_depth_mm: 0.75, max_density_per_cm2: 6000}') + SKIN_TAIL


def start_opts(**kw):
    opts = dbus.Dictionary({}, signature='sv')
    for k, v in kw.items():
        opts[k] = v
    return opts


def history(test):
    return unwrap(test.mgr('GetHistory', EMPTY_SV))


def needlectl():
    return os.path.join(busfixture.build_root(), 'tools', 'needlectl')


class SkinTypes(NeedledTestCase):
    limits_text = SKIN_LIMITS

    def test_get_limits_mirrors_the_optional_keys(self):
        got = unwrap(self.mgr('GetLimits'))
        self.assertEqual(got, yaml.safe_load(SKIN_LIMITS))
        self.assertEqual(got['skin_types'], {'IV': {'max_depth_mm': 1.0}, 'V': {'max_depth_mm': 0.75},
                                             'VI': {'max_depth_mm': 0.5}})
        self.assertEqual(got['areas']['forehead']['max_density_per_cm2'], 6000.0)
        self.assertNotIn('max_density_per_cm2', got['areas']['cheeks'])
        self.assertNotIn('require_skin_type', got['session'])

    def test_validate_profile_new_codes(self):
        cases = [
            (profile_yaml(depth_mm=1.25, extra='skin_types: [I, IV]\n'), 'depth_mm', 'above-skin-type-max'),
            (profile_yaml(extra='skin_types: [I, VII]\n'), 'skin_types', 'unknown-skin-type'),
            (profile_yaml(extra='passes: 11\n'), 'passes', 'out-of-range'),
            (profile_yaml(extra='area_cm2: 0\n'), 'area_cm2', 'out-of-range'),
            (profile_yaml(area='forehead', depth_mm=0.5), 'area_cm2', 'no-surface'),
            # 12 x 100 x 600 / 100 = 7200 per cm² > 6000
            (profile_yaml(area='forehead', depth_mm=0.5, extra='area_cm2: 100\n'), 'area_cm2', 'above-density-max'),
        ]
        for text, field, code in cases:
            got = [tuple(v) for v in unwrap(self.mgr('ValidateProfile', text))]
            self.assertEqual([(f, c) for f, c, _ in got], [(field, code)], text)
        # At the cap (12 x 100 x 600 / 120 = 6000), every type at its own cap, passes at 10: valid.
        ok = profile_yaml(area='forehead', depth_mm=0.5, extra='area_cm2: 120\npasses: 10\nskin_types: [I, VI]\n')
        self.assertEqual(list(self.mgr('ValidateProfile', ok)), [])

    def test_start_with_an_allowed_skin_type(self):
        pen = self.add_pen(cartridge=('SKIN-OK', 12))
        self.arm(pen, extra='skin_types: [I, II, III]\npasses: 3\n')
        profile = unwrap(self.pprop(pen, 'Profile'))
        self.assertEqual((profile['skin_types'], profile['passes']), (['I', 'II', 'III'], 3))
        sid = str(self.pen_call(pen, 'Start', start_opts(skin_type='II', label='appt-1')))
        self.assertEqual(self.pprop(pen, 'SkinType'), 'II')
        self.pen_call(pen, 'Stop')
        self.wait_state(pen, 'idle')
        self.assertEqual(self.pprop(pen, 'SkinType'), '')
        entry = [h for h in history(self) if h['id'] == sid][0]
        self.assertEqual((entry['skin_type'], entry['reason'], entry['label']), ('II', 'stopped', 'appt-1'))

    def assert_refused(self, pen, options, code):
        before = self.snapshot(pen)
        sessions = len(history(self))
        msg = self.assertDBusError(ERR + 'InvalidProfile', self.pen_call, pen, 'Start', options)
        self.assertIn(f'[{code}]', msg)
        self.assertEqual(self.snapshot(pen), before)
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.assertEqual(len(history(self)), sessions, 'a refused start is not recorded')
        return msg

    def test_start_refused_for_a_type_the_profile_is_not_meant_for(self):
        pen = self.add_pen(cartridge=('SKIN-NOT', 12))
        self.arm(pen, depth_mm=0.5, extra='skin_types: [I, II, III]\n')
        msg = self.assert_refused(pen, start_opts(skin_type='IV'), 'skin-type-not-allowed')
        self.assertIn('meant for skin types I, II, III, not IV', msg)

    def test_start_refused_above_the_type_cap(self):
        pen = self.add_pen(cartridge=('SKIN-CAP', 12))
        self.arm(pen, depth_mm=1.0)      # no skin_types: any type whose cap it meets
        msg = self.assert_refused(pen, start_opts(skin_type='V'), 'above-skin-type-max')
        self.assertIn('0.75 mm maximum for skin type V', msg)
        self.assert_refused(pen, start_opts(skin_type='VI'), 'above-skin-type-max')
        # At IV's cap exactly: starts.
        self.pen_call(pen, 'Start', start_opts(skin_type='IV'))
        self.assertEqual(self.pprop(pen, 'State'), 'running')
        self.pen_call(pen, 'Stop')

    def test_unknown_skin_type(self):
        pen = self.add_pen(cartridge=('SKIN-UNK', 12))
        self.arm(pen, depth_mm=0.5)
        for bad in ('iv', 'VII', '', ' I'):
            if bad == '':
                continue   # empty: no skin type (allowed here)
            self.assert_refused(pen, start_opts(skin_type=bad), 'unknown-skin-type')
        self.assertDBusError(INVALID_ARGS, self.pen_call, pen, 'Start', start_opts(skin_type=dbus.Int32(4)))
        self.assertEqual(self.pprop(pen, 'State'), 'armed')

    def test_set_depth_is_capped_by_the_skin_type(self):
        pen = self.add_pen(cartridge=('SKIN-SET', 12))
        self.arm(pen, depth_mm=0.8)
        self.pen_call(pen, 'Start', start_opts(skin_type='IV'))
        self.pen_call(pen, 'SetDepth', 1.0)                       # at the cap
        self.assertEqual(self.pprop(pen, 'DepthMm'), 1.0)
        msg = self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetDepth', 1.05)
        self.assertIn('skin type IV', msg)
        self.assertEqual(self.pprop(pen, 'DepthMm'), 1.0)
        self.assertDBusError(ERR + 'LimitExceeded', self.pen_call, pen, 'SetDepth', 1.6)  # beyond the area too
        self.pen_call(pen, 'SetDepth', 0.95)
        self.pen_call(pen, 'Stop')
        self.wait_state(pen, 'idle')
        # Without a skin type only the area's 1.5 mm applies.
        self.arm(pen, depth_mm=0.8)
        self.sim('EjectCartridge', dbus.ObjectPath(pen))
        self.sim('InsertCartridge', dbus.ObjectPath(pen), 'SKIN-SET-2', dbus.UInt32(12))
        self.wait_pen_prop(pen, 'Cartridge', lambda c: c['id'] == 'SKIN-SET-2')
        self.pen_call(pen, 'Start', EMPTY_SV)
        self.pen_call(pen, 'SetDepth', 1.25)
        self.assertEqual(self.pprop(pen, 'DepthMm'), 1.25)
        self.pen_call(pen, 'Stop')


class RequireSkinType(NeedledTestCase):
    limits_text = SKIN_LIMITS.replace('  client_heartbeat_timeout_ms: 0\n',
                                      '  client_heartbeat_timeout_ms: 0\n  require_skin_type: true\n')

    def test_start_needs_a_skin_type(self):
        self.assertTrue(unwrap(self.mgr('GetLimits'))['session']['require_skin_type'])
        pen = self.add_pen(cartridge=('REQ-1', 12))
        self.arm(pen, depth_mm=0.5)
        msg = self.assertDBusError(ERR + 'InvalidProfile', self.pen_call, pen, 'Start', EMPTY_SV)
        self.assertIn('[missing-field]', msg)
        self.assertIn('skin_type', msg)
        msg = self.assertDBusError(ERR + 'InvalidProfile', self.pen_call, pen, 'Start', start_opts(skin_type=''))
        self.assertIn('[missing-field]', msg)
        self.assertEqual(self.pprop(pen, 'State'), 'armed')
        self.pen_call(pen, 'Start', start_opts(skin_type='I'))
        self.assertEqual(self.pprop(pen, 'SkinType'), 'I')
        self.pen_call(pen, 'Stop')


class Dose(NeedledTestCase):
    limits_text = SKIN_LIMITS

    def test_punctures_and_density_follow_the_strokes(self):
        pen = self.add_pen(cartridge=('DOSE-1', 12))
        # 12 x 50 x 600 / 100 = 3000 per cm²: within the forehead's 6000.
        self.pen_call(pen, 'LoadProfileData', profile_yaml(area='forehead', depth_mm=0.5, speed_hz=50,
                                                           extra='area_cm2: 100\n'))
        changes = SignalLog(self.bus, 'PropertiesChanged', 'org.freedesktop.DBus.Properties', pen)
        self.pen_call(pen, 'Start', EMPTY_SV)
        self.wait_pen_prop(pen, 'Strokes', lambda v: v >= 50)
        # Announced with Strokes.
        changes.wait_for(lambda i: i[1][0] == PEN_IFACE and 'Punctures' in i[1][1] and 'DensityPerCm2' in i[1][1]
                         and 'Strokes' in i[1][1] and i[1][1]['Punctures'] > 0, 5, 'Punctures announced')
        self.pen_call(pen, 'Pause')       # frozen figures, read consistently
        p = self.get_all(pen, PEN_IFACE)
        self.assertGreater(p['Strokes'], 0)
        self.assertEqual(p['Punctures'], p['Strokes'] * 12)
        self.assertAlmostEqual(p['DensityPerCm2'], p['Punctures'] / 100.0)
        sid = p['SessionId']
        self.pen_call(pen, 'Stop')
        self.wait_state(pen, 'idle')
        self.assertEqual((self.pprop(pen, 'Punctures'), self.pprop(pen, 'DensityPerCm2')), (0, 0.0))
        entry = [h for h in history(self) if h['id'] == sid][0]
        self.assertEqual(entry['punctures'], p['Punctures'])
        self.assertAlmostEqual(entry['density_per_cm2'], p['DensityPerCm2'])
        self.assertEqual((entry['area_cm2'], entry['skin_type']), (100.0, ''))

    def test_no_surface_no_density(self):
        pen = self.add_pen(cartridge=('DOSE-2', 12))
        self.arm(pen, depth_mm=0.5)                  # cheeks: no density cap, no area_cm2
        self.pen_call(pen, 'Start', EMPTY_SV)
        self.wait_pen_prop(pen, 'Punctures', lambda v: v > 0)
        self.assertEqual(self.pprop(pen, 'DensityPerCm2'), 0.0)
        self.pen_call(pen, 'Stop')

    def test_dose_reached_ends_the_session_normally(self):
        pen = self.add_pen(cartridge=('DOSE-3', 12))
        # Planned 12 x 50 x 10 / 1 = 6000 per cm², the cap exactly; raising the speed delivers it
        # before the 10 s are up, and the daemon ends the session there.
        self.pen_call(pen, 'LoadProfileData', profile_yaml(area='forehead', depth_mm=0.5, speed_hz=50, duration_s=10,
                                                           extra='area_cm2: 1\n'))
        ended = SignalLog(self.bus, 'SessionEnded', PEN_IFACE, pen)
        sid = str(self.pen_call(pen, 'Start', start_opts(skin_type='VI')))
        self.pen_call(pen, 'SetSpeed', 150.0)
        item = ended.wait_for(lambda i: str(i[1][0]) == sid, 15, 'SessionEnded')
        self.assertEqual(str(item[1][1]), 'dose-reached')
        self.wait_state(pen, 'idle')
        self.assertEqual(unwrap(self.pprop(pen, 'Profile')), {}, 'disarmed, as after completed')
        entry = [h for h in history(self) if h['id'] == sid][0]
        self.assertEqual(entry['reason'], 'dose-reached')
        self.assertEqual(entry['skin_type'], 'VI')
        self.assertGreaterEqual(entry['density_per_cm2'], 6000)
        self.assertLess(entry['density_per_cm2'], 6000 * 1.2, 'stopped at the cap, not long after')
        self.assertEqual(entry['punctures'], entry['strokes'] * 12)
        self.assertLess(entry['duration_s'], 9.0, 'before the profile duration')
        # The cartridge is spent as after any session.
        self.assertEqual(unwrap(self.mgr('GetCartridge', 'DOSE-3'))['state'], 'spent')


class LedgerFromSchema1(NeedledTestCase):
    """A ledger written by the schema-1 code (tests/data/ledger-schema1.sqlite) in the state
    directory: the daemon opens it, migrates it, keeps every record and the audit chain."""
    limits_text = SKIN_LIMITS

    @classmethod
    def start_needled(cls, extra_args=(), env=None):
        shutil.copyfile(source_path('tests', 'data', 'ledger-schema1.sqlite'),
                        os.path.join(cls.state_dir, 'ledger.sqlite'))
        return super().start_needled(extra_args, env)

    def verify(self):
        p = subprocess.run([needlectl(), 'audit', 'verify', '--state-dir', self.state_dir],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_old_records_readable_and_chain_intact(self):
        old = [h for h in history(self) if h['profile'] == 'forehead-lines']
        self.assertEqual(len(old), 4)
        self.assertEqual(sorted(h['reason'] for h in old), ['completed'] * 3 + ['daemon-restart'])
        for h in old:
            self.assertEqual((h['skin_type'], h['punctures'], h['density_per_cm2'], h['area_cm2']), ('', 0, 0.0, 0.0))
            self.assertEqual(h['pen'] in ('PEN1', 'PEN2'), True)
        self.assertEqual(unwrap(self.mgr('GetCartridge', 'CART0'))['state'], 'spent')
        self.verify()
        # A new session beside the old ones, with the new columns; the whole trail verifies.
        pen = self.add_pen(cartridge=('AFTER-MIGRATION', 12))
        self.arm(pen, depth_mm=0.5)
        sid = str(self.pen_call(pen, 'Start', start_opts(skin_type='III')))
        self.wait_pen_prop(pen, 'Punctures', lambda v: v > 0)
        self.pen_call(pen, 'Stop')
        self.wait_state(pen, 'idle')
        entry = [h for h in history(self) if h['id'] == sid][0]
        self.assertEqual(entry['skin_type'], 'III')
        self.assertGreater(entry['punctures'], 0)
        self.verify()
        # A schema-1 cartridge stays single use.
        pen2 = self.add_pen(cartridge=('CART1', 12))
        self.arm(pen2, depth_mm=0.5)
        self.assertDBusError(ERR + 'CartridgeSpent', self.pen_call, pen2, 'Start', EMPTY_SV)


if __name__ == '__main__':
    main()
