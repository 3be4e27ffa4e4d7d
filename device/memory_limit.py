"""The memory this process may use: its cgroup limits (v2, v1, or both on a hybrid host) and the machine's RAM.

Read from the files the kernel presents: `/proc/self/cgroup` names the process's cgroup v2
(its `0::` line), `/proc/self/mountinfo` where the cgroup2 hierarchy is mounted (else
`/sys/fs/cgroup`), and each directory from the cgroup up to the hierarchy's root may hold
`memory.max` (the kernel OOM-kills above it) and `memory.high` (it reclaims and slows above it),
a number of bytes or `max` (no limit). The tightest along the way binds: a slice's limit bounds
every service in it. Where the memory controller is a cgroup v1 hierarchy (a legacy or hybrid
host: a `N:memory:/path` line, and a `cgroup` mount whose options name `memory`), its
`memory.limit_in_bytes` is read the same way, from the cgroup up to the mount's root; the kernel's
'unlimited' (PAGE_COUNTER_MAX pages: 9223372036854771712 with 4 KiB pages) is no limit. v1 has no
counterpart of memory.high. `/proc/meminfo` (parsed by device.meminfo, as for the telemetry) gives
MemTotal and MemAvailable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from smearscope.device.meminfo import read_meminfo

logger = logging.getLogger(__name__)

#: Where the kernel's files are read from; a test lays out a tree of the same shape elsewhere.
SYSTEM_ROOT = Path("/")
#: cgroup v1's memory.limit_in_bytes at or above this is 'unlimited': the kernel's PAGE_COUNTER_MAX
#: (LONG_MAX / page size) pages, 9223372036854771712 bytes with 4 KiB pages, lower with 64 KiB pages.
V1_UNLIMITED_BYTES = (2 ** 63 - 1) // 65536 * 65536


@dataclass(frozen=True)
class CgroupBound:
    """One memory limit: its bytes, the cgroup (as /proc/self/cgroup names it) that sets it and the
    file it was read from (memory.max, memory.high, memory.limit_in_bytes); for a systemd unit's
    setting (MemoryLimits.unit) the setting's name (MemoryMax, MemoryHigh) and the unit's cgroup."""

    bytes: int
    cgroup: str
    file: str = "memory.max"


@dataclass(frozen=True)
class MemoryLimits:
    """What bounds this process's memory. `max`/`high`: the tightest cgroup v2 memory.max (or v1
    memory.limit_in_bytes, the tighter of both on a hybrid host) and memory.high from the process's
    cgroup up (None: no limit anywhere, or no such cgroup); `total`/`available`: MemTotal and
    MemAvailable in bytes (None where /proc/meminfo lacks them). `unit`: None for these files;
    the systemd unit's name where `max`/`high` are that unit's MemoryMax=/MemoryHigh= instead."""

    cgroup: str | None
    max: CgroupBound | None
    high: CgroupBound | None
    total: int | None
    available: int | None
    unit: str | None = None


def _read(path: Path) -> str:
    """A kernel file's text; bytes that are no UTF-8 (a mount point or cgroup named in another
    encoding: the kernel shows names as they are) kept as they are, so a path made of them is the
    same path (os.fsencode), and no decoding error can stop a start."""
    return path.read_bytes().decode("utf-8", "surrogateescape")


def _cgroup_v2_path(root: Path) -> str | None:
    try:
        text = _read(root / "proc/self/cgroup")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def _cgroup2_mount(root: Path) -> Path:
    """The cgroup2 hierarchy's mount point (under `root`), from mountinfo; /sys/fs/cgroup without one."""
    try:
        lines = _read(root / "proc/self/mountinfo").splitlines()
    except OSError:
        lines = []
    for line in lines:
        head, sep, tail = line.partition(" - ")
        if sep and tail.split(" ", 1)[0] == "cgroup2" and len(head.split()) >= 5:
            return root / head.split()[4].lstrip("/")
    return root / "sys/fs/cgroup"


def _limit(folder: Path, name: str) -> int | None:
    try:
        value = _read(folder / name).strip()
    except OSError:
        return None
    if value == "max" or not value.isdigit():
        return None
    return int(value)


def _tightest(mount: Path, cgroup: str, name: str, mounted: tuple[str, ...] = (),
              unlimited: int | None = None) -> CgroupBound | None:
    """The tightest `name` from `cgroup` (a path below the mount's root) up to the mount's root;
    `mounted`: the hierarchy's path the mount shows (part of the cgroup each bound names);
    a value at or above `unlimited` is no limit."""
    parts = [p for p in cgroup.split("/") if p]
    found: CgroupBound | None = None
    for depth in range(len(parts), -1, -1):  # the process's cgroup first, then each parent
        value = _limit(mount.joinpath(*parts[:depth]), name)
        if (value is not None and (unlimited is None or value < unlimited)
                and (found is None or value < found.bytes)):
            found = CgroupBound(value, "/" + "/".join([*mounted, *parts[:depth]]), name)
    return found


def _v1_path(root: Path, controller: str) -> str | None:
    """The process's cgroup in the v1 hierarchy holding `controller` (`4:memory:/path`;
    `1:name=systemd:/path` for systemd's own), else None."""
    try:
        text = _read(root / "proc/self/cgroup")
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] != "0" and controller in parts[1].split(","):
            return parts[2].strip() or "/"
    return None


def systemd_cgroup(root: Path | None = None) -> str | None:
    """The process's cgroup in systemd's hierarchy (ControlGroup= of the unit it runs in): the v2
    `0::` line, else (a legacy v1 host) the `name=systemd` line; None without either."""
    root = SYSTEM_ROOT if root is None else root
    return _cgroup_v2_path(root) or _v1_path(root, "name=systemd")


def memory_on_v1(root: Path | None = None) -> bool:
    """Whether the memory controller is a cgroup v1 hierarchy here (systemd applies a unit's
    MemoryMax= as its memory.limit_in_bytes there, and MemoryHigh= not at all)."""
    return _v1_path(SYSTEM_ROOT if root is None else root, "memory") is not None


def _v1_memory(root: Path) -> CgroupBound | None:
    """The tightest memory.limit_in_bytes from the process's v1 memory cgroup up to its mount's root."""
    cgroup = _v1_path(root, "memory")
    if cgroup is None:
        return None
    try:
        lines = _read(root / "proc/self/mountinfo").splitlines()
    except OSError:
        return None
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields, super_ = head.split(), tail.split()
        if not (sep and len(fields) >= 5 and len(super_) >= 3 and super_[0] == "cgroup"
                and "memory" in super_[2].split(",")):
            continue
        # the mount shows the hierarchy from its root (field 4) down: a container sees its own cgroup there
        mounted = [p for p in fields[3].split("/") if p]
        parts = [p for p in cgroup.split("/") if p]
        below = parts[len(mounted):] if parts[:len(mounted)] == mounted else []
        return _tightest(root / fields[4].lstrip("/"), "/".join(below), "memory.limit_in_bytes", tuple(mounted),
                         V1_UNLIMITED_BYTES)
    return None


def read_memory_limits(root: Path | None = None) -> MemoryLimits:
    """This process's memory limits as the files under `root` (default: the system's) give them."""
    root = SYSTEM_ROOT if root is None else root
    cgroup = _cgroup_v2_path(root)
    mount = _cgroup2_mount(root)
    meminfo = read_meminfo(root / "proc/meminfo")
    v2_max = None if cgroup is None else _tightest(mount, cgroup, "memory.max")
    bounds = [b for b in (v2_max, _v1_memory(root)) if b is not None]
    return MemoryLimits(
        cgroup=cgroup,
        max=min(bounds, key=lambda b: b.bytes) if bounds else None,
        high=None if cgroup is None else _tightest(mount, cgroup, "memory.high"),
        total=meminfo.get("MemTotal"),
        available=meminfo.get("MemAvailable"),
    )
