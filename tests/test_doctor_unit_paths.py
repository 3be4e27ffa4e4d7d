"""`smearscope doctor` compares the folders a station's config writes with what its systemd unit file
lets it write (ProtectSystem=strict: only ReadWritePaths= and the unit's own directories): a watched
folder a shell can write passed doctor, and the station then exited 78 under the unit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_daemon import to_toml

from smearscope.cli import main
from smearscope.cli.doctor_unit_paths import UNIT_DIR, unit_path_checks
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR
from smearscope.service.config import load_config

REPO = Path(__file__).resolve().parents[1]
STATION_UNIT = REPO / "systemd" / "smearscope.service"


def _station(tmp_path: Path, inbox: Path, outbox: Path, **sections: dict) -> Path:
    doc = {"station_id": "doc-rw", "source": {"kind": "folder", "path": str(inbox)},
           "analysis": {"models_dir": str(DEFAULT_MODELS_DIR)},
           "mqtt": {"host": "127.0.0.1", "port": 1, "outbox": {"path": str(outbox)}}, **sections}
    path = tmp_path / "station.toml"
    path.write_text(to_toml(doc) + "\n")
    return path


def _installed(tmp_path: Path) -> Path:
    """The repository's station unit, installed as install-jetson.sh does, in a systemd folder here."""
    units = tmp_path / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    return Path(shutil.copy(STATION_UNIT, units / "smearscope.service"))


def _dropin(unit: Path, name: str, text: str) -> None:
    folder = unit.parent / f"{unit.name}.d"  # where `systemctl edit` writes override.conf
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)


def _unit_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln[6:24].rstrip() == "unit paths"]


def test_a_watched_folder_outside_the_units_writable_paths_fails_doctor_and_a_dropin_fixes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inbox = tmp_path / "lab-share" / "inbox"
    inbox.mkdir(parents=True)
    config = _station(tmp_path, inbox, tmp_path / "state" / "outbox.sqlite3", review={"enabled": False})
    unit = _installed(tmp_path)
    args = ["doctor", "--config", str(config), "--no-wait", "--unit-file", str(unit)]
    # the station's unit as shipped: tmp_path is in /tmp, the unit's private one (PrivateTmp=yes)
    main(args)
    lines = _unit_lines(capsys.readouterr().out)
    assert len(lines) == 2 and all(ln.startswith("WARN") and "private /tmp (PrivateTmp=yes" in ln for ln in lines), lines
    # a site's drop-in without a private /tmp: /tmp is read-only under ProtectSystem=strict like the rest
    _dropin(unit, "10-site.conf", "[Service]\nPrivateTmp=no\n")
    assert main(["validate-config", str(config)]) == 0  # a shell, here, can write both folders
    assert main(args) == 1
    lines = _unit_lines(capsys.readouterr().out)
    assert [ln[:4] for ln in lines] == ["FAIL", "FAIL"], lines
    watched = next(ln for ln in lines if "source.path" in ln)
    assert f"source.path: {inbox} is read-only (ProtectSystem=strict; in no ReadWritePaths=" in watched
    assert f"under {unit} with 10-site.conf" in watched and "refuses to start (exit 78)" in watched
    assert f"sudo systemctl edit smearscope, add [Service] then ReadWritePaths={inbox}" in watched
    # the drop-in doctor names, as `systemctl edit` saves it: the watched folder passes, the outbox not yet
    _dropin(unit, "override.conf", f"[Service]\nReadWritePaths={inbox}\n")
    main(args)
    lines = _unit_lines(capsys.readouterr().out)
    assert len(lines) == 1 and lines[0].startswith("FAIL  unit paths         mqtt.outbox.path:"), lines
    # ReadWritePaths= adds to the unit's list ("-" marks a path that may be absent); a folder above counts
    _dropin(unit, "override.conf", f"[Service]\nReadWritePaths={inbox}\nReadWritePaths=-{tmp_path / 'state'}\n")
    main(args)
    assert _unit_lines(capsys.readouterr().out) == [
        (f"OK    unit paths         the folders the config writes are writable under {unit} with 10-site.conf, "
         "override.conf")]
    # an empty assignment resets the list, as systemd reads it
    _dropin(unit, "zz-reset.conf", "[Service]\nReadWritePaths=\n")
    assert main(args) == 1
    assert [ln[:4] for ln in _unit_lines(capsys.readouterr().out)] == ["FAIL", "FAIL"]


def test_the_units_own_state_directory_passes_and_the_review_folder_elsewhere_is_a_warning(tmp_path: Path) -> None:
    """The example config's folders are all under StateDirectory=smearscope (/var/lib/smearscope); a review
    folder elsewhere is a WARN (the station runs without its gallery), the outbox a FAIL."""
    unit = _installed(tmp_path)
    example = load_config(REPO / "config" / "station.example.toml")
    checks = unit_path_checks(example, "smearscope.service", unit)
    assert checks == [("OK", "unit paths", f"the folders the config writes are writable under {unit}")], checks
    config = load_config(_station(tmp_path, Path("/var/lib/smearscope/inbox"), Path("/srv/smearscope/outbox.sqlite3"),
                                  review={"directory": "/srv/gallery", "typed_cells_path": "/srv/typed/cells.sqlite3"}))
    found = {detail.split(":")[0]: status for status, _, detail in unit_path_checks(config, "smearscope.service", unit)}
    assert found == {"mqtt.outbox.path": "FAIL", "review.directory": "WARN", "review.typed_cells_path": "WARN"}, found
    # the typed cells beside the outbox (their default): one line, the outbox's; the gallery in it its own
    config = load_config(_station(tmp_path, Path("/var/lib/smearscope/inbox"), Path("/srv/smearscope/outbox.sqlite3")))
    found = {detail.split(":")[0]: status for status, _, detail in unit_path_checks(config, "smearscope.service", unit)}
    assert found == {"mqtt.outbox.path": "FAIL", "review.directory": "WARN"}, found


def test_a_folder_in_a_home_directory_is_hidden_by_protect_home(tmp_path: Path) -> None:
    unit = _installed(tmp_path)
    _dropin(unit, "override.conf", "[Service]\nReadWritePaths=/home/lab/inbox\n")
    config = load_config(_station(tmp_path, Path("/home/lab/inbox"), Path("/var/lib/smearscope/outbox.sqlite3"),
                                  review={"enabled": False}))
    [(status, _, detail)] = unit_path_checks(config, "smearscope.service", unit)
    assert status == "FAIL" and "hidden (ProtectHome=yes hides /home)" in detail, detail
    assert "Move it out of there" in detail and "systemctl edit" not in detail


@pytest.mark.skipif((UNIT_DIR / "smearscope.service").exists(), reason="a station unit is installed on this machine")
def test_without_an_installed_unit_the_repositorys_is_compared_and_only_warned_of(tmp_path: Path) -> None:
    config = load_config(_station(tmp_path, Path("/srv/inbox"), Path("/var/lib/smearscope/outbox.sqlite3"),
                                  review={"enabled": False}))
    [(status, _, detail)] = unit_path_checks(config, "smearscope.service")
    assert status == "WARN" and f"under {STATION_UNIT} (the repository's; {UNIT_DIR}/smearscope.service is not installed)" \
        in detail, detail


def _verdicts(config: Path, unit: Path) -> dict[str, str]:
    """Config field -> "STATUS why" of each folder the unit would not let the station write ({}: all can)."""
    return {detail.split(":")[0]: f"{status} {detail.split(' is ', 1)[1].split(' under ')[0]}"
            for status, _, detail in unit_path_checks(load_config(config), "smearscope.service", unit) if status != "OK"}


def test_specifiers_nested_read_only_hidden_and_bound_paths_decide_as_systemd_mounts_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ReadWritePaths=%S/... was never resolved (the folder failed though the unit allows it); a
    ReadOnlyPaths= or InaccessiblePaths= inside a writable one, and a BindPaths= destination, were not
    read at all. The deepest path setting over a folder decides."""
    monkeypatch.setattr("smearscope.cli.doctor_unit_paths.DROPIN_ROOTS", ())
    unit = _installed(tmp_path)
    config = _station(tmp_path, Path("/var/lib/lab-inbox"), Path("/var/lib/smearscope/outbox.sqlite3"),
                      review={"enabled": False})
    assert _verdicts(config, unit) == {"source.path": "FAIL read-only (ProtectSystem=strict; in no ReadWritePaths= nor "
                                                      "a directory of the unit's own)"}
    _dropin(unit, "override.conf", "[Service]\nReadWritePaths=%S/lab-inbox\n")  # %S: the state folder, /var/lib
    assert _verdicts(config, unit) == {}
    # a read-only path inside the unit's own state directory: the outbox's folder is no longer writable
    config = _station(tmp_path, Path("/var/lib/lab-inbox"), Path("/var/lib/smearscope/box/outbox.sqlite3"),
                      review={"enabled": False})
    assert _verdicts(config, unit) == {}
    _dropin(unit, "override.conf", "[Service]\nReadWritePaths=%S/lab-inbox\nReadOnlyPaths=/var/lib/smearscope/box\n")
    assert _verdicts(config, unit) == {"mqtt.outbox.path": "FAIL read-only (ReadOnlyPaths= or BindReadOnlyPaths= "
                                                           "names /var/lib/smearscope/box)"}
    # ... and a writable path deeper than the read-only one is writable again
    config = _station(tmp_path, Path("/var/lib/lab-inbox/scope-1"), Path("/srv/box/outbox.sqlite3"), review={"enabled": False})
    _dropin(unit, "override.conf", "[Service]\nReadWritePaths=/srv/box %S/lab-inbox/scope-1\nReadOnlyPaths=%S/lab-inbox\n"
                                   "InaccessiblePaths=/srv\n")
    assert _verdicts(config, unit) == {}  # /srv/box is deeper than the hidden /srv
    _dropin(unit, "override.conf", "[Service]\nReadWritePaths=/srv\nInaccessiblePaths=-/srv/box\n"
                                   "BindPaths=-/mnt/share:%S/lab-inbox/scope-1:rbind\n")
    assert _verdicts(config, unit) == {"mqtt.outbox.path": "FAIL hidden (InaccessiblePaths= names /srv/box)"}
    # a bind's destination read only; a specifier this cannot resolve (%h) names nothing writable
    _dropin(unit, "override.conf", "[Service]\nReadWritePaths=/srv %h/inbox\nBindReadOnlyPaths=/mnt/share:%S/lab-inbox\n")
    assert _verdicts(config, unit) == {"source.path": "FAIL read-only (ReadOnlyPaths= or BindReadOnlyPaths= names "
                                                      "/var/lib/lab-inbox)"}


def test_dropins_are_found_in_every_unit_folder_and_the_type_wide_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`systemctl edit` writes /etc/systemd/system/UNIT.d; a package or an admin can also drop one in
    /run/systemd/system or /usr/lib/systemd/system, or one for every service (service.d): only the first
    folder was read. One of the same name in an earlier folder hides the later one."""
    unit = _installed(tmp_path)
    runtime, vendor = tmp_path / "run" / "systemd" / "system", tmp_path / "usr" / "lib" / "systemd" / "system"
    monkeypatch.setattr("smearscope.cli.doctor_unit_paths.DROPIN_ROOTS", (unit.parent, runtime, vendor))
    config = _station(tmp_path, Path("/var/lib/lab-inbox"), Path("/var/lib/smearscope/outbox.sqlite3"),
                      review={"enabled": False})
    (vendor / "service.d").mkdir(parents=True)
    (vendor / "service.d" / "50-inbox.conf").write_text("[Service]\nReadWritePaths=/var/lib/lab-inbox\n")
    checks = unit_path_checks(load_config(config), "smearscope.service", unit)
    assert checks == [("OK", "unit paths", f"the folders the config writes are writable under {unit} with 50-inbox.conf")]
    (runtime / "smearscope.service.d").mkdir(parents=True)  # the same name, an earlier folder: it hides the vendor's
    (runtime / "smearscope.service.d" / "50-inbox.conf").write_text("[Service]\nPrivateTmp=yes\n")
    assert _verdicts(config, unit) == {"source.path": "FAIL read-only (ProtectSystem=strict; in no ReadWritePaths= nor "
                                                      "a directory of the unit's own)"}
