#!/usr/bin/python3
"""needlectl audit verify: output, exit codes, --json, --anchor, tampering, a busy database.

Environment: NEEDLECTL (the needlectl binary), NEEDLED_MKLEDGER (tests/cli/test_audit.c built:
writes a ledger with 11 audit entries and 4 sessions into a directory), NEEDLED_SOURCE_ROOT (for
tests/data/ledger-schema2.sqlite).
"""
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import unittest

NEEDLECTL = os.environ.get("NEEDLECTL", "needlectl")
MKLEDGER = os.environ["NEEDLED_MKLEDGER"]
ENTRIES = 11
SESSIONS = 4
ANCHOR = re.compile(r"^anchor: (\d+):([0-9a-f]{64})$", re.M)


def run(*args):
    p = subprocess.run([NEEDLECTL, "audit", *args], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout, p.stderr


class AuditVerify(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="test-audit-")
        subprocess.run([MKLEDGER, self.dir], check=True, timeout=30)
        self.db = os.path.join(self.dir, "ledger.sqlite")

    def tearDown(self):
        shutil.rmtree(self.dir)

    def sql(self, statement):
        con = sqlite3.connect(self.db)
        con.executescript(statement)
        con.commit()
        con.close()

    def test_intact(self):
        rc, out, err = run("verify", "--state-dir", self.dir)
        self.assertEqual(rc, 0, err)
        self.assertEqual(err, "")
        self.assertIn(f"{self.db}: audit trail intact: {ENTRIES} entries, {SESSIONS} sessions checked", out)
        m = ANCHOR.search(out)
        self.assertIsNotNone(m, out)
        self.assertEqual(int(m.group(1)), ENTRIES)
        # the same through --database
        rc2, out2, _ = run("verify", "--database", self.db)
        self.assertEqual((rc2, out2), (0, out))

    def test_intact_json(self):
        rc, out, err = run("verify", "--database", self.db, "--json")
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        self.assertEqual(r["database"], self.db)
        self.assertIs(r["intact"], True)
        self.assertEqual((r["entries"], r["sessions"], r["head_seq"]), (ENTRIES, SESSIONS, ENTRIES))
        self.assertRegex(r["head_hash"], r"^[0-9a-f]{64}$")
        self.assertEqual(r["anchor"], f"{ENTRIES}:{r['head_hash']}")
        self.assertIsNone(r["problem"])
        self.assertIsNone(r["broken_seq"])

    def test_does_not_write(self):
        with open(self.db, "rb") as f:
            before = f.read()
        self.assertEqual(run("verify", "--database", self.db)[0], 0)
        with open(self.db, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_edited_entry(self):
        self.sql("UPDATE audit SET detail = 'depth_mm=2.5' WHERE seq = 2")
        rc, out, err = run("verify", "--state-dir", self.dir)
        self.assertEqual(rc, 1, err)
        self.assertIn("audit trail BROKEN at entry 2 (hash-mismatch)", out)
        self.assertIn("entries verified before the problem: 1", out)
        rc, out, _ = run("verify", "--state-dir", self.dir, "--json")
        r = json.loads(out)
        self.assertEqual((rc, r["intact"], r["problem"], r["broken_seq"]), (1, False, "hash-mismatch", 2))
        self.assertIn("changed", r["message"])

    def test_deleted_entry(self):
        self.sql("DELETE FROM audit WHERE seq = 4")
        rc, out, _ = run("verify", "--state-dir", self.dir)
        self.assertEqual(rc, 1)
        self.assertIn("BROKEN at entry 5 (sequence-gap)", out)

    def test_cut_tail(self):
        self.sql(f"DELETE FROM audit WHERE seq = {ENTRIES}")
        rc, out, _ = run("verify", "--state-dir", self.dir)
        self.assertEqual(rc, 1)
        self.assertIn("(head-mismatch)", out)
        self.assertIn("removed from its end", out)

    def test_edited_session(self):
        self.sql("UPDATE sessions SET max_depth_mm = 0.25")
        rc, out, _ = run("verify", "--state-dir", self.dir, "--json")
        self.assertEqual(rc, 1)
        self.assertEqual(json.loads(out)["problem"], "record-mismatch")

    def test_anchor(self):
        rc, out, _ = run("verify", "--state-dir", self.dir)
        anchor = "%s:%s" % ANCHOR.search(out).groups()
        self.assertEqual(run("verify", "--state-dir", self.dir, "--anchor", anchor)[0], 0)
        # the tail cut and the head record fixed up: only the anchor shows it
        self.sql(f"DELETE FROM audit WHERE seq = {ENTRIES}; UPDATE audit_head SET count = {ENTRIES - 1}, "
                 f"head_hash = (SELECT lower(hex(hash)) FROM audit WHERE seq = {ENTRIES - 1})")
        self.assertEqual(run("verify", "--state-dir", self.dir)[0], 0)
        rc, out, _ = run("verify", "--state-dir", self.dir, "--anchor", anchor)
        self.assertEqual(rc, 1)
        self.assertIn("(anchor-mismatch)", out)

    def test_migrated_schema2(self):
        # A ledger written by the schema-2 code, verified, then converted to schema 3 in place
        # (compact records): the anchors printed before hold, in full and incrementally.
        shutil.copyfile(os.path.join(os.environ["NEEDLED_SOURCE_ROOT"], "tests", "data", "ledger-schema2.sqlite"),
                        self.db)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(self.db + suffix):
                os.unlink(self.db + suffix)
        rc, out, err = run("verify", "--database", self.db)
        self.assertEqual(rc, 0, out + err)
        self.assertIn("intact: 34 entries, 11 sessions checked", out)
        head = "%s:%s" % ANCHOR.search(out).groups()
        con = sqlite3.connect(self.db)
        mid = "20:" + con.execute("SELECT hash FROM audit WHERE seq = 20").fetchone()[0]
        self.assertEqual(con.execute("PRAGMA user_version").fetchone()[0], 2)
        con.close()

        subprocess.run([MKLEDGER, "--open", self.dir], check=True, timeout=60)
        con = sqlite3.connect(self.db)
        self.assertEqual(con.execute("PRAGMA user_version").fetchone()[0], 3)
        con.close()
        rc, out, err = run("verify", "--database", self.db)
        self.assertEqual(rc, 0, out + err)
        self.assertIn("intact: 34 entries, 11 sessions checked", out)
        self.assertIn("anchor: " + head + "\n", out)
        for anchor in (head, mid):
            rc, out, err = run("verify", "--database", self.db, "--anchor", anchor)
            self.assertEqual(rc, 0, out + err)
            rc, out, err = run("verify", "--database", self.db, "--incremental", "--anchor", anchor)
            self.assertEqual(rc, 0, out + err)
            self.assertIn("anchor: " + head + "\n", out)
        # a change after the migration: an entry whose detail is rebuilt from its session's row
        self.sql("UPDATE sessions SET strokes = strokes + 1 WHERE cartridge_id = 'S2CART2'")
        rc, out, _ = run("verify", "--database", self.db, "--incremental", "--anchor", mid)
        self.assertEqual(rc, 1, out)
        self.assertIn("record-mismatch", out)

    def test_while_daemon_has_it_open(self):
        # A writer in WAL mode with a transaction in flight: verify reads the committed state.
        con = sqlite3.connect(self.db, isolation_level=None)
        self.assertEqual(con.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        con.execute("BEGIN IMMEDIATE")
        con.execute("UPDATE audit SET detail = 'uncommitted' WHERE seq = 1")
        try:
            rc, out, err = run("verify", "--state-dir", self.dir)
            self.assertEqual(rc, 0, out + err)
            self.assertIn(f"intact: {ENTRIES} entries", out)
        finally:
            con.execute("ROLLBACK")
            con.close()

    def test_unreadable(self):
        missing = os.path.join(self.dir, "nope", "ledger.sqlite")
        rc, out, err = run("verify", "--database", missing)
        self.assertEqual((rc, out), (2, ""))
        self.assertIn(missing, err)
        self.assertIn("No such file", err)
        rc, out, err = run("verify", "--database", missing, "--json")
        r = json.loads(out)
        self.assertEqual((rc, r["intact"]), (2, None))
        self.assertIn(missing, r["error"])

        junk = os.path.join(self.dir, "junk.sqlite")
        with open(junk, "wb") as f:
            f.write(os.urandom(4096))
        rc, out, err = run("verify", "--database", junk)
        self.assertEqual(rc, 2, out)
        self.assertIn(junk, err)

        other = os.path.join(self.dir, "other.sqlite")
        con = sqlite3.connect(other)
        con.execute("CREATE TABLE t (x)")
        con.close()
        rc, _, err = run("verify", "--database", other)
        self.assertEqual(rc, 2)
        self.assertIn("not a needled ledger", err)

    def test_usage(self):
        for args in ([], ["frobnicate"], ["verify", "--state-dir", self.dir, "--database", self.db],
                     ["verify", "--bogus"], ["verify", "extra"], ["verify", "--anchor", "0:abc"],
                     ["verify", "--anchor", "5:" + "A" * 64], ["verify", "--state-dir"]):
            rc, out, err = run(*args)
            self.assertEqual(rc, 64, args)
            self.assertEqual(out, "", args)
            self.assertNotEqual(err, "", args)
        rc, out, _ = run("verify", "--help")
        self.assertEqual(rc, 0)
        self.assertIn("Exit status", out)


if __name__ == "__main__":
    unittest.main(verbosity=2)
