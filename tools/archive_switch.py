"""Check an archive's update from an earlier release, and going back, on the same archive folder.

    PYTHONPATH=. .venv/bin/python -m tools.archive_switch --from COMMIT [--to HEAD] [--out DIR]

tools.version_switch runs the station alone; this is its counterpart for `smearscope archive`'s
folder and index (`index.sqlite`). Each commit runs from a `git worktree` with this checkout's .venv
(version_switch.make_version). The earlier version opens a copy of tests/data/archive-v1 as its
archive does (its `ArchiveStore`: the index upgraded to its own version) and records an HL7 delivery
of each report (MSH-11 P, and the first report's in T) with its own `record_deliveries`; its
`archive find --json` is what must survive. Then the claims of docs/ARCHIVE.md: the later version
opening the folder as its archive does keeps every report and delivery (its `find`), leaving the
index as it was beside it (`index.sqlite.v<N>-backup`) where it upgrades it; going back by
docs/ARCHIVE.md's steps (the index moved aside, the copy put in its place) the earlier version's
`find` lists all of it again; and the later version, updated again, too. Exit 0 when all hold, 1
naming those that do not.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools.version_switch import ROOT, Version, clean_up, make_version, said_claims, verdict

logger = logging.getLogger(__name__)

SEED = ROOT / "tests" / "data" / "archive-v1"
INDEX = "index.sqlite"

#: Run by the earlier version: open the archive as its archive does, record a delivery of each report.
RECORD = """
import sys, time
from pathlib import Path
from smearscope.service.archive import store
archive = store.ArchiveStore(Path(sys.argv[1]))
ids = [r[0] for r in archive._db.execute("SELECT report_id FROM reports ORDER BY created_at")]
if hasattr(store, "record_deliveries"):
    with archive._db:
        store.record_deliveries(archive._db, [
            store.Delivery(rid, "file:" + sys.argv[2], "AS%018d" % n, "archive", "P") for n, rid in enumerate(ids)]
            + [store.Delivery(ids[0], "file:" + sys.argv[2], "AS%018d" % len(ids), "send-hl7", "T")])
archive.close()
"""
#: Run by the later version: open the archive as its archive does (upgrading its index).
OPEN = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from smearscope.service.archive.store import ArchiveStore
ArchiveStore(Path(sys.argv[1])).close()
"""


def python(version: Version, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(version.layout)}
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def found(version: Version, archive: Path, work: Path) -> tuple[int, Any, str]:
    """`archive find --json` of `version`: exit status, each report's id with its deliveries, what it said."""
    done = python(version, ["-m", "smearscope", "archive", "find", "--json", "--dir", str(archive)], work)
    said = (done.stderr.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        return done.returncode, None, said
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    listed = sorted((r["report_id"], sorted((d["destination"], d["control_id"], d["processing_id"])
                                            for d in r.get("hl7_deliveries") or [])) for r in reports)
    return 0, listed, said


def user_version(index: Path) -> int:
    db = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def check(first: Version, second: Version, work: Path) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []
    archive, hl7 = work / "archive", work / "hl7-out"
    shutil.copytree(SEED, archive, ignore=shutil.ignore_patterns("README.md"))
    recorded = python(first, ["-c", RECORD, str(archive), str(hl7)], work)
    if recorded.returncode != 0:
        return [("earlier version stored", False, recorded.stderr.strip().splitlines()[-1])]
    old_version = user_version(archive / INDEX)
    rc, before, said = found(first, archive, work)
    if rc != 0 or not before:
        return [("earlier version lists its archive", False, f"exit {rc}: {said}")]
    deliveries = sum(len(d) for _, d in before)
    opened = python(second, ["-c", OPEN, str(archive)], work)
    new_version = user_version(archive / INDEX)
    rc, after, said = found(second, archive, work)
    results.append(("update keeps every report and delivery", opened.returncode == 0 and after == before,
                    f"index version {old_version} -> {new_version}; {len(before)} reports, {deliveries} deliveries; "
                    f"the later find: exit {rc}" + (f", {said}" if rc else f", {len(after or [])} reports")))
    backup = archive / f"{INDEX}.v{old_version}-backup"
    upgraded = new_version != old_version
    results.append(("the index as it was kept beside it", not upgraded or (
        backup.is_file() and user_version(backup) == old_version),
        f"{backup.name}: " + (f"version {user_version(backup)}" if backup.is_file() else "none")
        + ("" if upgraded else " (not upgraded: none needed)")))
    rc, listed, said = found(first, archive, work)
    logger.info("the earlier version on the later one's index: exit %d %s", rc, said)
    if rc != 0 and backup.is_file():  # docs/ARCHIVE.md, going back: the index aside, the copy in its place
        (archive / INDEX).rename(archive / f"{INDEX}.v{new_version}")
        if (archive / f"{INDEX}-wal").exists():  # its last writes stay with the index they belong to
            (archive / f"{INDEX}-wal").rename(archive / f"{INDEX}.v{new_version}-wal")
        (archive / f"{INDEX}-shm").unlink(missing_ok=True)
        shutil.copy2(backup, archive / INDEX)
        rc, listed, said = found(first, archive, work)
        how = f"the later index refused, {backup.name} put in its place"
    else:
        how = "on the later version's index as it is"
    results.append(("going back lists every report and delivery", rc == 0 and listed == before,
                    f"{how}: the earlier find exit {rc}" + (f", {said}" if rc else f", {len(listed or [])} reports")))
    opened = python(second, ["-c", OPEN, str(archive)], work)
    rc, again, said = found(second, archive, work)
    results.append(("updated again, all of it found", opened.returncode == 0 and again == before,
                    f"the later find: exit {rc}" + (f", {said}" if rc else f", {len(again or [])} reports")))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="the earlier commit (e.g. cd8f582)")
    parser.add_argument("--to", dest="target", default="HEAD", help="the later commit (default HEAD: what is committed)")
    parser.add_argument("--out", type=Path, default=None, help="keep the archive folders here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="archive-switch-"))
    out.mkdir(parents=True, exist_ok=True)
    versions: list[Version] = []
    failed: list[str] = []
    try:
        versions = [make_version(args.source, out), make_version(args.target, out)]
        first, second = versions
        work = out / f"archive-{first.commit[:7]}-to-{second.commit[:7]}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        name = f"{first.label} -> {second.label}"
        print(f"\n{name} ({first.commit[:7]} -> {second.commit[:7]}; archive)")
        failed += said_claims(name, check(first, second, work))
    finally:
        clean_up(versions, out, keep=args.out is not None)
    return verdict(failed)


if __name__ == "__main__":
    sys.exit(main())
