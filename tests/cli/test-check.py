#!/usr/bin/python3
"""needlectl check-limits / check-profile: output format, exit codes, --json.

Environment: NEEDLECTL (path of the needlectl binary), NEEDLED_SOURCE_ROOT.
"""
import json
import os
import re
import subprocess
import tempfile
import unittest

NEEDLECTL = os.environ.get("NEEDLECTL", "needlectl")
ROOT = os.environ.get("NEEDLED_SOURCE_ROOT", os.path.join(os.path.dirname(__file__), "..", ".."))
CONF = os.path.join(ROOT, "conf")
DATA = os.path.join(ROOT, "tests", "data")
LIMITS = os.path.join(CONF, "limits.yaml")
PROFILES = os.path.join(CONF, "profiles.d")

LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<column>\d+): (?P<field>[^ :]+): (?P<message>.+)$")
JSON_KEYS = {"file", "line", "column", "field", "code", "message", "value", "limit"}


def run(*args):
    p = subprocess.run([NEEDLECTL, *args], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout, p.stderr


def parse_lines(stdout):
    lines = stdout.splitlines()
    parsed = []
    for line in lines:
        m = LINE.match(line)
        if not m:
            raise AssertionError(f"not FILE:LINE:COLUMN: FIELD: MESSAGE: {line!r}")
        parsed.append(m.groupdict())
    return parsed


class CheckLimits(unittest.TestCase):
    def test_valid(self):
        rc, out, err = run("check-limits", LIMITS)
        self.assertEqual((rc, out), (0, ""), err)

    def test_valid_json(self):
        rc, out, err = run("check-limits", LIMITS, "--json")
        self.assertEqual(rc, 0, err)
        self.assertEqual(json.loads(out), [])
        self.assertEqual(out.strip(), "[]")

    def test_invalid(self):
        path = os.path.join(DATA, "limits-invalid.yaml")
        rc, out, err = run("check-limits", path)
        self.assertEqual(rc, 1, err)
        self.assertEqual(err, "")
        problems = parse_lines(out)
        self.assertEqual(len(problems), 17, out)
        self.assertTrue(all(p["file"] == path for p in problems))
        self.assertEqual(problems[0], {"file": path, "line": "2", "column": "10", "field": "version",
                                       "message": "version 2 is not supported; this needled reads version 1"})
        fields = [(int(p["line"]), int(p["column"]), p["field"]) for p in problems]
        self.assertEqual(fields, sorted(fields, key=lambda f: (f[0], f[1])), "ordered by position")
        self.assertIn((5, 23, "pen.depth_tolerance_mm"), fields)
        self.assertIn((25, 3, "areas.neck"), fields)

    def test_invalid_json(self):
        path = os.path.join(DATA, "limits-invalid.yaml")
        rc, out, err = run("check-limits", "--json", path)
        self.assertEqual(rc, 1, err)
        problems = json.loads(out)
        self.assertEqual(len(problems), 17)
        for p in problems:
            self.assertEqual(set(p), JSON_KEYS)
            self.assertEqual(p["file"], path)
            self.assertIsInstance(p["line"], int)
            self.assertIsInstance(p["column"], int)
        by_code = {p["code"]: p for p in problems}
        self.assertEqual(by_code["unsupported-version"]["value"], "2")
        self.assertEqual(by_code["unsupported-version"]["limit"], "1")
        self.assertEqual(by_code["wrong-type"]["limit"], None)
        self.assertEqual(by_code["area-duration-above-session"]["limit"], "2700 s")
        self.assertEqual(by_code["missing-field"]["value"], None)
        # The text form and the JSON form say the same things in the same order.
        rc, text, _ = run("check-limits", path)
        self.assertEqual([p["message"] for p in problems], [p["message"] for p in parse_lines(text)])

    def test_unreadable(self):
        with tempfile.TemporaryDirectory() as d:
            missing = os.path.join(d, "missing.yaml")
            rc, out, err = run("check-limits", missing)
            self.assertEqual((rc, out), (2, ""))
            self.assertIn(missing, err)
            self.assertIn("No such file or directory", err)
            rc, out, err = run("check-limits", d, "--json")
            self.assertEqual((rc, out), (2, ""))
            self.assertIn("Is a directory", err)

    def test_hostile(self):
        rc, out, err = run("check-limits", os.path.join(DATA, "profile-alias-bomb.yaml"))
        self.assertEqual(rc, 1, err)
        (p,) = parse_lines(out)
        self.assertEqual((p["line"], p["column"], p["field"]), ("1", "4", "(document)"))
        self.assertIn("aliases are not supported", p["message"])

    def test_usage(self):
        for args in ([], [LIMITS, LIMITS], ["--bogus", LIMITS], ["--limits", LIMITS, LIMITS]):
            rc, out, err = run("check-limits", *args)
            self.assertEqual(rc, 64, args)
            self.assertEqual(out, "", args)
            self.assertIn("Usage:", err)
        rc, out, err = run("check-limits", "--help")
        self.assertEqual(rc, 0)
        self.assertIn("Usage: needlectl check-limits", out)
        self.assertIn("Exit status", out)


class CheckProfile(unittest.TestCase):
    def test_shipped_profiles_valid(self):
        names = sorted(f for f in os.listdir(PROFILES) if f.endswith(".yaml"))
        self.assertGreaterEqual(len(names), 6)
        for name in names:
            rc, out, err = run("check-profile", os.path.join(PROFILES, name), "--limits", LIMITS)
            self.assertEqual((rc, out, err), (0, "", ""), name)
            rc, out, err = run("check-profile", "--json", "--limits", LIMITS, os.path.join(PROFILES, name))
            self.assertEqual((rc, json.loads(out)), (0, []), name)

    def test_invalid(self):
        path = os.path.join(DATA, "profile-invalid.yaml")
        rc, out, err = run("check-profile", path, "--limits", LIMITS)
        self.assertEqual(rc, 1, err)
        problems = parse_lines(out)
        got = [(int(p["line"]), int(p["column"]), p["field"]) for p in problems]
        self.assertEqual(got, [(2, 7, "name"), (3, 13, "indication"), (5, 11, "depth_mm"),
                               (8, 10, "needles"), (9, 1, "colour")])
        depth = problems[2]["message"]
        self.assertRegex(depth, r"^depth_mm 2\.0 exceeds the 1\.5 mm maximum for area cheeks \(limits\.yaml line \d+\)$")

    def test_invalid_json_escaping(self):
        path = os.path.join(DATA, "profile-invalid.yaml")
        rc, out, err = run("check-profile", path, "--limits", LIMITS, "--json")
        self.assertEqual(rc, 1, err)
        problems = json.loads(out)
        self.assertEqual([p["code"] for p in problems],
                         ["invalid-name", "unknown-indication", "above-area-max", "needles-not-allowed",
                          "unknown-field"])
        self.assertEqual(problems[0]["value"], 'Bad "Name" \\ é')
        self.assertEqual(problems[2]["value"], "2.0")
        self.assertEqual(problems[2]["limit"], "1.5")
        for p in problems:
            self.assertEqual(set(p), JSON_KEYS)

    def test_unknown_area(self):
        rc, out, _ = run("check-profile", os.path.join(DATA, "profile-unknown-area.yaml"), "--limits", LIMITS)
        self.assertEqual(rc, 1)
        (p,) = parse_lines(out)
        self.assertEqual((p["line"], p["column"], p["field"]), ("3", "7", "area"))
        self.assertIn("'elbow'", p["message"])

    def test_invalid_limits(self):
        """Invalid limits: their problems, the profile's structural ones and no-limits; exit 1."""
        limits = os.path.join(DATA, "limits-invalid.yaml")
        profile = os.path.join(DATA, "profile-invalid.yaml")
        rc, out, err = run("check-profile", profile, "--limits", limits)
        self.assertEqual(rc, 1, err)
        problems = parse_lines(out)
        files = [p["file"] for p in problems]
        self.assertEqual(files[:17], [limits] * 17)
        self.assertTrue(all(f == profile for f in files[17:]))
        self.assertEqual(problems[17]["field"], "(document)")
        self.assertEqual((problems[17]["line"], problems[17]["column"]), ("0", "0"))
        rc, out, _ = run("check-profile", profile, "--limits", limits, "--json")
        codes = [p["code"] for p in json.loads(out)]
        self.assertIn("no-limits", codes)
        self.assertIn("invalid-name", codes)
        self.assertNotIn("above-area-max", codes)

    def test_unreadable(self):
        with tempfile.TemporaryDirectory() as d:
            missing = os.path.join(d, "nope.yaml")
            profile = os.path.join(PROFILES, "scalp.yaml")
            rc, out, err = run("check-profile", profile, "--limits", missing)
            self.assertEqual((rc, out), (2, ""))
            self.assertIn(missing, err)
            rc, out, err = run("check-profile", missing, "--limits", LIMITS)
            self.assertEqual((rc, out), (2, ""))
            self.assertIn(missing, err)
        if not os.path.exists("/etc/needled/limits.yaml"):
            rc, out, err = run("check-profile", os.path.join(PROFILES, "scalp.yaml"))
            self.assertEqual((rc, out), (2, ""))
            self.assertIn("/etc/needled/limits.yaml", err)

    def test_usage(self):
        for args in ([], ["--limits"], ["a.yaml", "b.yaml"], ["--frobnicate", "a.yaml"]):
            rc, out, err = run("check-profile", *args)
            self.assertEqual(rc, 64, args)
            self.assertEqual(out, "", args)
        rc, out, _ = run("check-profile", "-h")
        self.assertEqual(rc, 0)
        self.assertIn("--limits FILE", out)
        self.assertIn("invalid", out)

    def test_unknown_verb(self):
        rc, out, _ = run("check-everything")
        self.assertEqual((rc, out), (64, ""))


class CheckSkinTypesAndDose(unittest.TestCase):
    """The optional skin types, density caps, passes and treated surface (issue 15)."""
    SKIN_LIMITS = os.path.join(DATA, "limits-skin.yaml")

    def test_valid_files(self):
        rc, out, err = run("check-limits", self.SKIN_LIMITS)
        self.assertEqual((rc, out, err), (0, "", ""))
        rc, out, err = run("check-profile", os.path.join(DATA, "profile-skin.yaml"), "--limits", self.SKIN_LIMITS)
        self.assertEqual((rc, out, err), (0, "", ""))
        # The shipped profiles are valid under limits with skin types too, except where the
        # density cap of cheeks asks for a surface they do not give.
        for name in sorted(os.listdir(PROFILES)):
            rc, out, _ = run("check-profile", os.path.join(PROFILES, name), "--limits", self.SKIN_LIMITS, "--json")
            codes = {p["code"] for p in json.loads(out)}
            self.assertTrue(codes <= {"no-surface", "unknown-area", "above-skin-type-max"}, (name, codes))

    def test_limits_every_problem(self):
        path = os.path.join(DATA, "limits-skin-invalid.yaml")
        rc, out, err = run("check-limits", path)
        self.assertEqual(rc, 1, err)
        problems = parse_lines(out)
        got = [(int(p["line"]), int(p["column"]), p["field"]) for p in problems]
        self.assertEqual(got, [(17, 22, "session.require_skin_type"),
                               (23, 52, "areas.cheeks.max_density_per_cm2"),
                               (24, 52, "areas.body.max_density_per_cm2"),
                               (26, 22, "skin_types.IV.max_depth_mm"),
                               (27, 3, "skin_types"),
                               (28, 3, "skin_types.IV"),
                               (29, 28, "skin_types.V.max_speed_hz")])
        self.assertEqual(problems[4]["message"],
                         "'VII' is not a Fitzpatrick skin type; the types are: I, II, III, IV, V, VI")
        self.assertEqual(problems[5]["message"], "skin type IV appears twice in skin_types (first at line 26)")
        rc, out, _ = run("check-limits", path, "--json")
        self.assertEqual([p["code"] for p in json.loads(out)],
                         ["wrong-type", "not-positive", "out-of-range", "depth-out-of-range", "unknown-skin-type",
                          "duplicate-key", "unknown-field"])

    def test_profile_every_problem(self):
        path = os.path.join(DATA, "profile-skin-invalid.yaml")
        rc, out, err = run("check-profile", path, "--limits", self.SKIN_LIMITS, "--json")
        self.assertEqual(rc, 1, err)
        problems = json.loads(out)
        self.assertEqual([(p["line"], p["column"], p["field"], p["code"]) for p in problems],
                         [(5, 11, "depth_mm", "above-skin-type-max"),
                          (9, 21, "skin_types", "unknown-skin-type"),
                          (9, 26, "skin_types", "duplicate-key"),
                          (10, 9, "passes", "out-of-range"),
                          (11, 11, "area_cm2", "above-density-max")])
        self.assertEqual(problems[0]["message"],
                         "depth_mm 1.25 exceeds the 1 mm maximum for skin type IV (limits-skin.yaml line 27)")
        self.assertEqual((problems[4]["value"], problems[4]["limit"]), ("25920", "21600"))
        rc, text, _ = run("check-profile", path, "--limits", self.SKIN_LIMITS)
        self.assertEqual([p["message"] for p in problems], [p["message"] for p in parse_lines(text)])

    def test_no_surface(self):
        path = os.path.join(DATA, "profile-no-surface.yaml")
        rc, out, err = run("check-profile", path, "--limits", self.SKIN_LIMITS)
        self.assertEqual(rc, 1, err)
        (p,) = parse_lines(out)
        self.assertEqual((p["line"], p["column"], p["field"]), ("4", "7", "area_cm2"))
        self.assertIn("no area_cm2", p["message"])
        # The same profile under today's limits (no density cap): valid.
        rc, out, err = run("check-profile", path, "--limits", LIMITS)
        self.assertEqual((rc, out, err), (0, "", ""))

    def test_boundaries(self):
        """At the dose cap, just below it and just above it; passes and area_cm2 at their ends."""
        with open(os.path.join(DATA, "profile-skin.yaml"), encoding="utf-8") as f:
            base = f.read()
        cases = [("area_cm2: 60", "area_cm2: 60", None), ("area_cm2: 60", "area_cm2: 60.5", None),
                 ("area_cm2: 60", "area_cm2: 59.5", "above-density-max"),
                 ("passes: 3", "passes: 10", None), ("passes: 3", "passes: 11", "out-of-range"),
                 ("passes: 3", "passes: 1", None), ("passes: 3", "passes: 0", "out-of-range"),
                 ("area_cm2: 60", "area_cm2: 1000.5", "out-of-range"),
                 ("area_cm2: 60", "area_cm2: 0", "out-of-range"),
                 ("depth_mm: 1.0", "depth_mm: 1.05", "above-skin-type-max"),
                 ("skin_types: [I, II, III, IV]", "skin_types: [I, II, III]", None),
                 ("skin_types: [I, II, III, IV]", "skin_types: [i]", "unknown-skin-type")]
        with tempfile.TemporaryDirectory() as d:
            for old, new, code in cases:
                path = os.path.join(d, "p.yaml")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(base.replace(old, new))
                rc, out, _ = run("check-profile", path, "--limits", self.SKIN_LIMITS, "--json")
                codes = [p["code"] for p in json.loads(out)]
                self.assertEqual((rc, codes), (0, []) if code is None else (1, [code]), new)


if __name__ == "__main__":
    unittest.main(verbosity=2)
