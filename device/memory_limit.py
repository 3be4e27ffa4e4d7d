"""The memory this process may use: its cgroup v2 limits and the machine's RAM.

Read from the files the kernel presents: `/proc/self/cgroup` names the process's cgroup v2
(its `0::` line), `/proc/self/mountinfo` where the cgroup2 hierarchy is mounted (else
`/sys/fs/cgroup`), and each directory from the cgroup up to the hierarchy's root may hold
`memory.max` (the kernel OOM-kills above it) and `memory.high` (it reclaims and slows above it),
a number of bytes or `max` (no limit). The tightest along the way binds: a slice's limit bounds
every service in it. `/proc/meminfo` (parsed by device.meminfo, as for the telemetry) gives MemTotal
and MemAvailable. A cgroup v1 memory controller's limit is not read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from smearscope.device.meminfo import read_meminfo

logger = logging.getLogger(__name__)

#: Where the kernel's files are read from; a test lays out a tree of the same shape elsewhere.
SYSTEM_ROOT = Path("/")


@dataclass(frozen=True)
class CgroupBound:
    """One cgroup memory limit: its bytes and the cgroup (as /proc/self/cgroup names it) that sets it."""

    bytes: int
    cgroup: str


@dataclass(frozen=True)
class MemoryLimits:
    """What bounds this process's memory. `max`/`high`: the tightest cgroup v2 memory.max and
    memory.high from the process's cgroup up (None: 'max' everywhere, or no cgroup v2);
    `total`/`available`: MemTotal and MemAvailable in bytes (None where /proc/meminfo lacks them)."""

    cgroup: str | None
    max: CgroupBound | None
    high: CgroupBound | None
    total: int | None
    available: int | None


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


def _tightest(mount: Path, cgroup: str, name: str) -> CgroupBound | None:
    parts = [p for p in cgroup.split("/") if p]
    found: CgroupBound | None = None
    for depth in range(len(parts), -1, -1):  # the process's cgroup first, then each parent
        value = _limit(mount.joinpath(*parts[:depth]), name)
        if value is not None and (found is None or value < found.bytes):
            found = CgroupBound(value, "/" + "/".join(parts[:depth]))
    return found


def read_memory_limits(root: Path | None = None) -> MemoryLimits:
    """This process's memory limits as the files under `root` (default: the system's) give them."""
    root = SYSTEM_ROOT if root is None else root
    cgroup = _cgroup_v2_path(root)
    mount = _cgroup2_mount(root)
    meminfo = read_meminfo(root / "proc/meminfo")
    return MemoryLimits(
        cgroup=cgroup,
        max=None if cgroup is None else _tightest(mount, cgroup, "memory.max"),
        high=None if cgroup is None else _tightest(mount, cgroup, "memory.high"),
        total=meminfo.get("MemTotal"),
        available=meminfo.get("MemAvailable"),
    )
