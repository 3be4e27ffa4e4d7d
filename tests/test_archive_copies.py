"""The copies the archive keeps beside a report (`<report_id>+<digest>.json`: received again with
other content, or while the first file could not be read) are listed by `archive find` with their
digests and sizes, counted by `archive show` and printed by `archive show --copy N`. Real files
written by the archive's store, its real SQLite index, the real command line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_archive import SPECIMEN, STATION, a_report, envelope_of
from test_archive_hold import NOBODY, open_dir  # noqa: F401 - the fixture

from smearscope.cli import main
from smearscope.service.archive.message import read_bundle, read_report
from smearscope.service.archive.store import ArchiveStore
from smearscope.service.fhir.bundle import report_bundle


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def _run(capsys: pytest.CaptureFixture[bytes], *argv: str) -> tuple[int, bytes, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.decode()


def test_find_lists_a_reports_copies_and_show_counts_them_and_prints_each(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch,
) -> None:
    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    plain = a_report("run-2", SPECIMEN, 1_796_000_100.0)  # in the same folder, no copy
    # report `<id>.fhir`: its first file takes a copy's name (`<id>.fhir.json` is the bundle's), not a copy of either
    twin = a_report("run-3", SPECIMEN, 1_796_000_200.0).model_copy(update={"report_id": f"{report.report_id}.fhir"})
    first, second, third = envelope_of(report), envelope_of(report), envelope_of(report)
    bundle = json.dumps(report_bundle(report)).encode()
    other_bundle = json.dumps({**report_bundle(report), "id": "another"}).encode()
    directory = tmp_path / "archive"
    store = ArchiveStore(directory)
    try:
        kept = store.put_report(read_report(STATION, first)).path
        copy_2 = store.put_report(read_report(STATION, second)).path
        copy_3 = store.put_report(read_report(STATION, third)).path
        store.put_report(read_report(STATION, envelope_of(plain)))
        store.put_bundle(read_bundle(STATION, bundle))
        bundle_copy = store.put_bundle(read_bundle(STATION, other_bundle)).path
        twin_path = store.put_report(read_report(STATION, envelope_of(twin))).path
    finally:
        store.close()
    assert twin_path.name.startswith(f"{twin.report_id}+")
    # written in this order (the numbers follow it): a minute apart, whatever the file system's clock grain
    os.utime(copy_2, (1_796_000_060, 1_796_000_060))
    os.utime(copy_3, (1_796_000_120, 1_796_000_120))
    d = str(directory)

    code, out, err = _run(capsysbinary, "archive", "find", "--dir", d)
    assert code == 0, err
    lines = out.decode().splitlines()
    at = next(i for i, line in enumerate(lines) if f"  {report.report_id}  (" in line)
    assert lines[at].endswith("(current, FHIR, 2 copies beside it)"), lines
    assert lines[at + 1:at + 3] == [
        f"    copy 1  2026-11-30 00:54 UTC  sha256 {_digest(second)}  {len(second)} bytes  {copy_2}",
        f"    copy 2  2026-11-30 00:55 UTC  sha256 {_digest(third)}  {len(third)} bytes  {copy_3}"], lines
    for other in (plain.report_id, twin.report_id):
        line = next(i for i, x in enumerate(lines) if f"  {other}  (" in x)
        assert lines[line].endswith(")") and "cop" not in lines[line], lines
    assert sum(x.startswith("    copy") for x in lines) == 2, lines

    code, out, err = _run(capsysbinary, "archive", "find", "--dir", d, "--json")
    rows = {r["report_id"]: r for r in map(json.loads, out.decode().splitlines())}
    assert rows[report.report_id]["path"] == str(kept)
    assert rows[report.report_id]["copies"] == [
        {"copy": 1, "path": str(copy_2), "digest": _digest(second), "bytes": len(second),
         "written_at": "2026-11-30T00:54:20+00:00"},
        {"copy": 2, "path": str(copy_3), "digest": _digest(third), "bytes": len(third),
         "written_at": "2026-11-30T00:55:20+00:00"}]
    assert rows[plain.report_id]["copies"] == [] and rows[twin.report_id]["copies"] == []

    code, out, err = _run(capsysbinary, "archive", "show", report.report_id, "--dir", d)
    assert (code, out) == (0, first + b"\n")
    assert (f"2 copies of the report {report.report_id} kept beside it (received again with other content, or "
            f"while this file could not be read): smearscope archive show {report.report_id} --copy N (N 1 to 2) "
            "prints one") in err, err
    for n, payload, path in ((1, second, copy_2), (2, third, copy_3)):
        code, out, err = _run(capsysbinary, "archive", "show", report.report_id, "--dir", d, "--copy", str(n))
        assert (code, out) == (0, payload + b"\n"), err
        assert f"copy {n} of 2 of the report {report.report_id}: {path} (sha256 {_digest(payload)}, " in err, err
    code, out, err = _run(capsysbinary, "archive", "show", report.report_id, "--dir", d, "--copy", "2", "--hl7")
    assert code == 0 and out.startswith(b"MSH|") and f"copy 2 of 2 of the report {report.report_id}: {copy_3}" in err
    code, out, err = _run(capsysbinary, "archive", "show", report.report_id, "--dir", d, "--copy", "3")
    assert (code, out) == (1, b"") and "has no copy 3 beside it (copies: 1 to 2)" in err, err

    import smearscope.service.archive.copies as copies_module
    listed: list[str] = []
    scandir = copies_module.os.scandir
    monkeypatch.setattr(copies_module.os, "scandir", lambda path: listed.append(str(path)) or scandir(path))
    code, out, err = _run(capsysbinary, "archive", "show", report.report_id, "--dir", d, "--fhir")
    assert (code, out) == (0, bundle + b"\n") and "1 copy of the FHIR bundle of report" in err, err
    assert len(listed) == 1, listed  # the bundle's folder, listed once (the report's copies are not looked for)
    monkeypatch.undo()
    code, out, err = _run(capsysbinary, "archive", "show", report.report_id, "--dir", d, "--fhir", "--copy", "1")
    assert (code, out) == (0, other_bundle + b"\n") and str(bundle_copy) in err, err

    for other in (plain, twin):  # no copies: the report alone, nothing said
        code, out, err = _run(capsysbinary, "archive", "show", other.report_id, "--dir", d)
        assert code == 0 and json.loads(out)["report_id"] == other.report_id and err == "", err
        code, out, err = _run(capsysbinary, "archive", "show", other.report_id, "--dir", d, "--copy", "1")
        assert (code, out) == (1, b"") and "has no copy 1 beside it (copies: none)" in err, err


def test_a_folder_that_cannot_be_listed_is_said_not_taken_as_no_copies(open_dir: Path) -> None:  # noqa: F811
    """As a user who may open the month folder's files but not list it (mode 0311): find says the
    copies are not listed (null in --json), show prints the report and says they were not looked for."""
    import shutil
    import subprocess
    import sys

    from test_archive import REPO

    report = a_report("run-1", SPECIMEN, 1_796_000_000.0)
    first = envelope_of(report)
    directory = open_dir / "archive"
    store = ArchiveStore(directory)
    try:
        kept = store.put_report(read_report(STATION, first)).path
        store.put_report(read_report(STATION, envelope_of(report)))  # a copy, beside it
    finally:
        store.close()
    for path in [directory, *directory.rglob("*")]:
        shutil.chown(path, 65534, 65534)
    kept.parent.chmod(0o311)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*NOBODY, sys.executable, "-m", "smearscope", "archive", *argv, "--dir", str(directory)],
                              capture_output=True, text=True, cwd=REPO, timeout=120, check=False)

    found = run("find")
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[1] == f"    copies not listed: {kept.parent} cannot be listed (Permission denied)"
    assert json.loads(run("find", "--json").stdout)["copies"] is None
    shown = run("show", report.report_id)
    assert shown.returncode == 0 and shown.stdout.encode() == first + b"\n", shown.stderr
    assert f"copies of the report {report.report_id} not looked for: {kept.parent} cannot be listed" in shown.stderr
    copy = run("show", report.report_id, "--copy", "1")
    assert copy.returncode == 1 and "the copies of the report" in copy.stderr and "are not known" in copy.stderr
