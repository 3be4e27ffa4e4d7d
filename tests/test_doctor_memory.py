"""doctor's memory line against the station's systemd unit: run from a technician's shell it
compares the predicted peak with the unit's MemoryMax=/MemoryHigh= (systemctl show), not with the
shell's cgroup; in the unit, with the unit's own cgroup; where systemctl cannot say, with the
shell's cgroup, and it says which.

`systemctl show` needs a running systemd manager. This container has none (PID 1 is not systemd:
systemctl answers 'System has not been booted with systemd as init system (PID 1). Can't
operate.', and `systemd --user` exits 1 at once), so the unit's answers come from a stand-in
`systemctl` on PATH that prints what systemd 252 prints for these properties (one `Name=value` a
line; bytes, or `infinity` where nothing is set; `ControlGroup=` empty while the unit is stopped;
`LoadState=not-found` with exit 0 for a unit that is not installed) and records the arguments it
was given. The real systemctl is run too, for the fallback it gives here."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from test_memory_bound import GIB, SERVICE, V1_UNLIMITED, _folder_station, cgroup_tree, v1_tree

from smearscope.cli import main
from smearscope.cli.doctor_memory import memory_checks, read_unit_memory
from smearscope.device import memory_limit
from smearscope.service.config import load_config

#: A technician's login shell: its cgroup sets no memory limit.
SHELL = "/user.slice/user-1000.slice/session-4.scope"
#: The unit's MemoryMax=3G and MemoryHigh=2560M as `systemctl show` gives them, the unit running.
RUNNING = (f"ControlGroup={SERVICE}\nMemoryHigh={2560 * 1024 ** 2}\nMemoryMax={3 * GIB}\nLoadState=loaded\n")


def fake_systemctl(folder: Path, stdout: str, *, status: int = 0, stderr: str = "") -> Path:
    """A `systemctl` in `folder` printing `stdout` (and `stderr`) with exit `status`; each call's
    arguments are appended to folder/args."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "systemctl"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> '{folder / 'args'}'\ncat <<'EOF'\n{stdout}EOF\n"
                      f"cat >&2 <<'EOF'\n{stderr}EOF\nexit {status}\n")
    script.chmod(0o755)
    return folder


def _shell_tree(root: Path, **limits: str) -> Path:
    """A shell's process as the kernel presents it: its session scope, no limit unless given."""
    return cgroup_tree(root, {SHELL: {"memory.max": "max\n", **limits}}, cgroup=SHELL)


@pytest.fixture
def station(tmp_path: Path):
    def config(fields: int):
        (tmp_path / f"fields-{fields}").mkdir(exist_ok=True)
        return load_config(_folder_station(tmp_path / f"fields-{fields}", fields))
    return config


def test_from_a_shell_doctor_compares_with_the_units_memorymax_and_memoryhigh(
        tmp_path: Path, station, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shell's cgroup sets no limit (doctor read it, and the machine's 4.9 GB free, and said the
    peak fits); the unit's MemoryMax=3G and MemoryHigh=2560M are what the station runs under."""
    monkeypatch.setattr(memory_limit, "SYSTEM_ROOT", _shell_tree(tmp_path / "jetson"))
    bin_dir = fake_systemctl(tmp_path / "bin", RUNNING)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    ((status, what, text),) = memory_checks(station(4))
    assert (status, what) == ("WARN", "memory"), text
    assert "predicted peak 3544 MiB" in text and "above the unit smearscope.service's MemoryMax, 3072 MiB" in text, text
    assert "OOM-kills" in text and text.endswith("(the unit smearscope.service's limits (systemctl show))"), text
    ((status, _, text),) = memory_checks(station(3))
    assert status == "WARN" and "above the unit smearscope.service's MemoryHigh, 2560 MiB" in text, text
    ((status, _, text),) = memory_checks(station(2))
    assert status == "OK" and "2291 MiB" in text and "fits the unit smearscope.service's MemoryHigh, 2560 MiB" in text
    assert (bin_dir / "args").read_text().splitlines()[0] == (
        "show smearscope.service -p LoadState -p ControlGroup -p MemoryMax -p MemoryHigh")
    # the unit stopped: no ControlGroup, its settings still what it will start under
    fake_systemctl(bin_dir, RUNNING.replace(f"ControlGroup={SERVICE}", "ControlGroup="))
    ((status, _, text),) = memory_checks(station(4))
    assert status == "WARN" and "the unit smearscope.service's MemoryMax, 3072 MiB" in text, text


def test_in_the_unit_doctor_reads_its_own_cgroup_where_a_slice_may_bind_tighter(
        tmp_path: Path, station, monkeypatch: pytest.MonkeyPatch) -> None:
    """doctor run in the unit (its cgroup the unit's ControlGroup) reads the cgroup files as the
    station's start does, so a slice's memory.max the unit's settings do not show binds."""
    limits = {"/system.slice": {"memory.max": f"{2300 * 1024 ** 2}\n"},
              SERVICE: {"memory.max": f"{3 * GIB}\n", "memory.high": f"{2560 * 1024 ** 2}\n"}}
    monkeypatch.setattr(memory_limit, "SYSTEM_ROOT", cgroup_tree(tmp_path / "jetson", limits))
    monkeypatch.setenv("PATH", f"{fake_systemctl(tmp_path / 'bin', RUNNING)}:/usr/bin:/bin")
    ((status, _, text),) = memory_checks(station(2))
    assert status == "OK" and "fits the cgroup memory.max of /system.slice, 2300 MiB" in text, text
    assert text.endswith("(doctor runs in the unit smearscope.service: its cgroup's limits)"), text


def test_a_unit_that_sets_no_limit_leaves_the_machines_memory_to_bound_the_station(
        tmp_path: Path, station, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_limit, "SYSTEM_ROOT", _shell_tree(tmp_path / "jetson"))
    none = RUNNING.replace(f"MemoryHigh={2560 * 1024 ** 2}", "MemoryHigh=infinity").replace(
        f"MemoryMax={3 * GIB}", "MemoryMax=infinity")
    monkeypatch.setenv("PATH", f"{fake_systemctl(tmp_path / 'bin', none)}:/usr/bin:/bin")
    ((status, _, text),) = memory_checks(station(4))
    assert status == "OK" and "fits the memory free now (MemAvailable), 5000 MiB" in text, text
    assert text.endswith("(the unit smearscope.service sets no MemoryMax or MemoryHigh (systemctl show))"), text


def test_on_a_cgroup_v1_host_the_units_memoryhigh_is_not_taken_for_a_bound(
        tmp_path: Path, station, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd applies MemoryMax= as memory.limit_in_bytes on a v1 memory controller and MemoryHigh=
    not at all: three fields at once (2918 MiB) fit the 3 GiB MemoryMax there, and doctor says why."""
    monkeypatch.setattr(memory_limit, "SYSTEM_ROOT", v1_tree(tmp_path / "v1", {"/": V1_UNLIMITED}, cgroup=SHELL))
    monkeypatch.setenv("PATH", f"{fake_systemctl(tmp_path / 'bin', RUNNING)}:/usr/bin:/bin")
    ((status, _, text),) = memory_checks(station(3))
    assert status == "OK" and "fits the unit smearscope.service's MemoryMax, 3072 MiB" in text, text
    assert "its MemoryHigh is not applied on this host's cgroup v1 memory controller" in text, text


def test_where_the_units_limits_cannot_be_read_doctor_says_it_compared_with_the_shells_cgroup(
        tmp_path: Path, station, monkeypatch: pytest.MonkeyPatch) -> None:
    """No systemctl, no systemd running, the unit not installed: the shell's own cgroup (here a
    1 GiB memory.max) bounds the prediction, as before, and the line says whose limits those are."""
    monkeypatch.setattr(memory_limit, "SYSTEM_ROOT", _shell_tree(tmp_path / "shell", **{"memory.max": f"{GIB}\n"}))
    shell = f"the cgroup memory.max of {SHELL}, 1024 MiB"
    not_found = "MemoryHigh=infinity\nMemoryMax=infinity\nControlGroup=\nLoadState=not-found\n"
    monkeypatch.setenv("PATH", f"{fake_systemctl(tmp_path / 'absent', not_found)}:/usr/bin:/bin")
    ((status, _, text),) = memory_checks(station(1))
    assert status == "WARN" and shell in text, text
    assert text.endswith("(compared with this shell's cgroup, not the unit smearscope.service's limits: the unit "
                         "is not installed (systemctl show smearscope.service: LoadState=not-found))"), text
    down = ("System has not been booted with systemd as init system (PID 1). Can't operate.\n"
            "Failed to connect to bus: Host is down\n")
    monkeypatch.setenv("PATH", f"{fake_systemctl(tmp_path / 'down', '', status=1, stderr=down)}:/usr/bin:/bin")
    ((_, _, text),) = memory_checks(station(1))
    assert shell in text and text.endswith(
        "not the unit smearscope.service's limits: systemctl show smearscope.service: System has not been booted "
        "with systemd as init system (PID 1). Can't operate. Failed to connect to bus: Host is down)"), text
    empty = tmp_path / "nothing"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    ((_, _, text),) = memory_checks(station(1))
    assert shell in text and text.endswith("(compared with this shell's cgroup, not the unit smearscope.service's "
                                           "limits: no systemctl on this machine)"), text


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="no systemctl on this machine")
def test_the_real_systemctl_on_a_unit_it_cannot_show_leads_to_the_shells_cgroup(
        tmp_path: Path, station, monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's own systemctl, asked for a unit no machine has: here (no systemd running) it
    fails, on a machine with systemd it answers LoadState=not-found; either way doctor says so."""
    unit = f"smearscope-absent-{uuid.uuid4().hex[:8]}.service"
    said = read_unit_memory(unit)
    assert isinstance(said, str) and (said.startswith(f"systemctl show {unit}: ") or "not-found" in said), said
    monkeypatch.setattr(memory_limit, "SYSTEM_ROOT", _shell_tree(tmp_path / "shell", **{"memory.max": f"{GIB}\n"}))
    ((_, _, text),) = memory_checks(station(1), unit)
    assert f"the cgroup memory.max of {SHELL}, 1024 MiB" in text and text.endswith(
        f"(compared with this shell's cgroup, not the unit {unit}'s limits: {said})"), text


def test_doctor_asks_systemd_for_the_unit_its_unit_option_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`smearscope doctor --unit`: a second station on one board, installed as its own unit."""
    monkeypatch.setattr(memory_limit, "SYSTEM_ROOT", _shell_tree(tmp_path / "jetson"))
    bin_dir = fake_systemctl(tmp_path / "bin", RUNNING.replace("3221225472", str(2 * GIB)))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    main(["doctor", "--config", str(_folder_station(tmp_path, 2)), "--no-wait", "--unit", "smearscope-b.service"])
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[1:2] == ["memory"]]
    assert line.startswith("WARN  memory") and "above the unit smearscope-b.service's MemoryMax, 2048 MiB" in line, line
    assert "show smearscope-b.service -p LoadState" in (bin_dir / "args").read_text()
