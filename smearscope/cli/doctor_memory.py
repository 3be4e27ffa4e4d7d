"""doctor's memory line: the station's predicted peak memory against the limits its systemd unit
runs under.

Run from a technician's shell, doctor's own cgroup is the shell's, not the unit's. So unless doctor
itself runs in the unit (its cgroup, /proc/self/cgroup, is the unit's ControlGroup or below it), it
reads the unit's settings: `systemctl show UNIT -p LoadState -p ControlGroup -p MemoryMax -p
MemoryHigh`, each limit a number of bytes or `infinity` (none set). Where that cannot be read (no
systemctl, no systemd running, the unit not installed) it compares with its own cgroup's limits, as
the station's start does (`memory_bound`), and says so.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

#: The station's unit as systemd/install-jetson.sh installs it.
STATION_UNIT = "smearscope.service"
#: systemctl answers from the manager at once; a hung D-Bus must not hold doctor.
SYSTEMCTL_TIMEOUT_S = 10.0

Check = tuple[str, str, str]


@dataclass(frozen=True)
class UnitMemory:
    """A systemd unit's memory settings as `systemctl show` gives them: MemoryMax= and MemoryHigh=
    in bytes (None: infinity), and its ControlGroup ('' while the unit is not running)."""

    unit: str
    control_group: str
    max: int | None
    high: int | None


def _bytes(value: str) -> int | None:
    """A systemctl memory value: `infinity` is none; else a number of bytes (ValueError otherwise)."""
    if value == "infinity":
        return None
    if not value.isdigit():
        raise ValueError(value)
    return int(value)


def read_unit_memory(unit: str) -> UnitMemory | str:
    """The unit's memory settings, or why they could not be read."""
    command = ["systemctl", "show", unit, "-p", "LoadState", "-p", "ControlGroup", "-p", "MemoryMax",
               "-p", "MemoryHigh"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return "no systemctl on this machine"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"systemctl show {unit}: {exc}"
    if proc.returncode != 0:
        said = " ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
        return f"systemctl show {unit}: {said or f'exit status {proc.returncode}'}"
    props = dict(line.partition("=")[::2] for line in proc.stdout.splitlines() if "=" in line)
    load = props.get("LoadState", "")
    if load != "loaded":
        return (f"the unit is not installed (systemctl show {unit}: LoadState=not-found)" if load == "not-found"
                else f"systemctl show {unit}: LoadState={load or 'not said'}")
    try:
        limits = [_bytes(props.get(name, "infinity")) for name in ("MemoryMax", "MemoryHigh")]
    except ValueError as exc:
        return f"systemctl show {unit}: a memory limit it gives is not bytes or infinity: {exc}"
    return UnitMemory(unit, props.get("ControlGroup", ""), limits[0], limits[1])


def _runs_in(cgroup: str | None, control_group: str) -> bool:
    if not (cgroup and control_group):
        return False
    return cgroup == control_group or cgroup.startswith(control_group.rstrip("/") + "/")


def memory_checks(config, unit: str = STATION_UNIT) -> list[Check]:
    """The station's predicted peak memory (frame limit, concurrent_fields) against the limits of
    `unit`: its own cgroup's where doctor runs in the unit, else the unit's MemoryMax/MemoryHigh, else
    (they cannot be read) doctor's own cgroup's; with the machine's memory (`memory_bound`)."""
    from smearscope.device.ingest.errors import shown
    from smearscope.device.memory_limit import (
        CgroupBound,
        MemoryLimits,
        memory_on_v1,
        read_memory_limits,
        systemd_cgroup,
    )
    from smearscope.service.station.memory_bound import memory_verdict

    own = read_memory_limits()
    found = read_unit_memory(unit)
    name = shown(unit)
    if isinstance(found, str):
        verdict = memory_verdict(config, own)
        note = f"compared with this shell's cgroup, not the unit {name}'s limits: {found}"
    elif _runs_in(systemd_cgroup(), found.control_group):
        verdict = memory_verdict(config, own)
        note = f"doctor runs in the unit {name}: its cgroup's limits"
    else:
        group = found.control_group
        v1 = memory_on_v1()  # no memory.high on a v1 memory controller: MemoryHigh= is not applied
        high = None if found.high is None or v1 else CgroupBound(found.high, group, "MemoryHigh")
        limits = MemoryLimits(
            cgroup=group or None,
            max=None if found.max is None else CgroupBound(found.max, group, "MemoryMax"),
            high=high, total=own.total, available=own.available, unit=unit)
        verdict = memory_verdict(config, limits)
        note = (f"the unit {name}'s limits (systemctl show)" if found.max is not None or found.high is not None
                else f"the unit {name} sets no MemoryMax or MemoryHigh (systemctl show)")
        if v1 and found.high is not None:
            note += "; its MemoryHigh is not applied on this host's cgroup v1 memory controller"
    return [("OK" if verdict.fits else "WARN", "memory", f"{verdict.text} ({note})")]
