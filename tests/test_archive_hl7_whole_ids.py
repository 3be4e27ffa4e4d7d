"""A run whose report an earlier smearscope delivered with its specimen and run ids whole in ORC-2/3 and SPM-2
(tests/data/archive-whole-ids: its index and the message it delivered, made by commit 1a0afdf) keeps them
whole in its amended report, so the lab system matches the two; a run no earlier smearscope delivered
gets the short forms v2.5.1's lengths need, and `archive find` finds it by them. Real archive folders, real SQLite indexes, the archive's own
storer and `smearscope archive send-hl7` / `show --hl7`."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from test_hl7 import parsed

from smearscope.cli import main
from smearscope.service.archive.hl7_out import Hl7Output
from smearscope.service.archive.message import read_report
from smearscope.service.archive.query import find
from smearscope.service.archive.store import ArchiveStore

FIXTURE = Path(__file__).resolve().parent / "data" / "archive-whole-ids"
FIRST, VERIFIED = "677c350e-5742-432a-94a7-0cb61535294e", "2954a7b8-d42e-4cfc-a7a8-8cb06e81ecb5"
RUN = "5b1e6f0a-3c2d-4e8f-9a7b-1c2d3e4f5a6b"


def order_ids(message: str) -> dict[str, str]:
    """ORC-2, ORC-3, OBR-2, OBR-3 and SPM-2 as sent: what a lab system matches an order and specimen by."""
    fields = {s.split("|")[0]: s.split("|") for s in message.split("\r") if s[:3] in ("ORC", "OBR", "SPM")}
    return {"ORC-2": fields["ORC"][2], "ORC-3": fields["ORC"][3], "OBR-2": fields["OBR"][2],
            "OBR-3": fields["OBR"][3], "SPM-2": fields["SPM"][2]}


def stored(archive: Path, hl7_dir: Path, *envelopes: bytes) -> None:
    """`envelopes` stored by the archive's storer with HL7 files to `hl7_dir`, consulting the index as the
    running archive does (Hl7Output.use_index)."""
    output = Hl7Output(hl7_dir, None, 10.0)
    store = ArchiveStore(archive, output)
    output.use_index(store)
    try:
        for envelope in envelopes:
            store.put_report(read_report("lab-7", envelope))
    finally:
        store.close()


def test_an_amended_report_of_a_run_sent_with_whole_ids_keeps_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(FIXTURE / "archive", archive)
    original = (FIXTURE / "delivered" / f"{FIRST}.hl7").read_bytes().decode()
    assert order_ids(original)["ORC-3"] == f"{RUN}^smearscope"  # over v2.5.1's 22: what that smearscope sent

    # read before any writer upgraded the index (version 3): the original's message as it was delivered
    assert main(["archive", "show", FIRST, "--dir", str(archive), "--hl7"]) == 0
    assert capsys.readouterr().out == original.replace("\r", "\n")

    hl7_dir = tmp_path / "hl7"
    stored(archive, hl7_dir, (FIXTURE / "incoming" / f"{VERIFIED}.json").read_bytes())
    amended = (hl7_dir / f"{VERIFIED}.hl7").read_bytes().decode()
    parsed(amended)
    assert amended.split("\r")[2].split("|")[25] == "F"
    assert order_ids(amended) == order_ids(original)  # the lab system updates the order it has
    db = sqlite3.connect(f"{(archive / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert list(db.execute("SELECT run_id FROM hl7_whole_id_runs")) == [(RUN,)]
    finally:
        db.close()

    # send-hl7 to another folder and show --hl7 make the same messages: the original byte for byte as delivered
    again = tmp_path / "again"
    assert main(["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-dir", str(again)]) == 0
    assert (again / f"{FIRST}.hl7").read_bytes().decode() == original
    assert (again / f"{VERIFIED}.hl7").read_bytes().decode() == amended
    capsys.readouterr()
    assert main(["archive", "show", VERIFIED, "--dir", str(archive), "--hl7"]) == 0
    assert capsys.readouterr().out == amended.replace("\r", "\n")


def test_a_run_no_earlier_smearscope_sent_gets_the_short_forms(tmp_path: Path) -> None:
    archive, hl7_dir = tmp_path / "archive", tmp_path / "hl7"
    first = (FIXTURE / "archive" / "lab-7" / "2026-11" / f"{FIRST}.json").read_bytes()
    stored(archive, hl7_dir, first, (FIXTURE / "incoming" / f"{VERIFIED}.json").read_bytes())
    ids = [order_ids((hl7_dir / f"{r}.hl7").read_bytes().decode()) for r in (FIRST, VERIFIED)]
    assert ids[0] == ids[1]
    assert len(ids[0]["ORC-3"]) <= 22 and len(ids[0]["ORC-2"]) <= 22 and RUN not in ids[0]["SPM-2"]
    # the run and specimen found by what the lab system shows: ORC-3 (its id part) and ORC-2
    by_lis = [find(archive, run=ids[0]["ORC-3"].split("^")[0]), find(archive, specimen=ids[0]["ORC-2"])]
    assert [[r.report_id for r in found] for found in by_lis] == [[VERIFIED, FIRST]] * 2
    assert [r.report_id for r in find(archive, run=RUN)] == [VERIFIED, FIRST]
    assert find(archive, run=ids[0]["ORC-3"][:10] + "A") == [] == find(archive, specimen=ids[0]["ORC-2"][:-1])
