"""tools/version_switch.py's package layout: the symlinks that make an earlier commit's worktree
importable as `smearscope` ahead of this checkout's editable install (a check of an update that
ran this checkout's code on both sides would prove nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tools.version_switch import ROOT, outbox_message_ids, package_layout


def _tree(root: Path) -> Path:
    """A worktree of another version: its own pyproject mapping, and code this checkout lacks."""
    (root / "smearscope" / "cli").mkdir(parents=True)
    (root / "smearscope" / "__init__.py").write_text("")
    (root / "smearscope" / "cli" / "__init__.py").write_text("WHERE = 'other cli'\n")
    (root / "service" / "station").mkdir(parents=True)
    (root / "service" / "__init__.py").write_text("")
    (root / "service" / "station" / "__init__.py").write_text("WHERE = 'other service'\n")
    (root / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"smearscope.service" = "service"\n')
    return root


def test_the_layout_imports_the_other_versions_code_before_the_editable_install(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    layout = package_layout(tree, tmp_path / "layout")
    probe = ("import smearscope.cli, smearscope.service.station as s; "
             "print(smearscope.cli.WHERE, '|', s.WHERE, '|', s.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(layout)},
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    where_cli, where_service, path = out.split(" | ")
    assert (where_cli, where_service) == ("other cli", "other service")
    assert Path(path).resolve() == (tree / "service" / "station" / "__init__.py").resolve()


def test_the_layout_of_this_checkout_maps_every_package_dir_of_its_pyproject(tmp_path: Path) -> None:
    package = package_layout(ROOT, tmp_path / "layout") / "smearscope"
    assert {p.name: p.resolve() for p in package.iterdir() if p.name in ("device", "engines", "export", "models",
                                                                          "service", "cli")} == {
        "device": ROOT / "device", "engines": ROOT / "engines", "export": ROOT / "export",
        "models": ROOT / "models", "service": ROOT / "service", "cli": ROOT / "smearscope" / "cli"}
    assert (package / "__main__.py").resolve() == ROOT / "smearscope" / "__main__.py"


def test_reading_the_killed_stations_outbox_leaves_its_wal_for_the_next_version(tmp_path: Path) -> None:
    """The backlog's ids are read after the SIGKILL; the next version must find the file and its WAL
    as the kill left them (a plain connection took the WAL in and deleted it on closing)."""
    outbox = tmp_path / "outbox.sqlite3"
    killed = ("import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
              "c.execute('PRAGMA locking_mode=EXCLUSIVE'); c.execute('PRAGMA journal_mode=WAL'); "
              "c.execute('CREATE TABLE outbox (seq INTEGER PRIMARY KEY, message_id TEXT)'); "
              "c.execute(\"INSERT INTO outbox (message_id) VALUES ('m-1'), ('m-2')\"); os._exit(0)")
    subprocess.run([sys.executable, "-c", killed, str(outbox)], check=True)
    wal = outbox.with_name(outbox.name + "-wal")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert wal.name in before  # what a SIGKILL leaves: the rows only in the WAL
    assert outbox_message_ids(outbox) == {"m-1", "m-2"}
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
