"""`/proc/meminfo` read once for the station: the telemetry's memory figures (device.telemetry) and
the machine's memory that bounds the station (device.memory_limit) come from this one parser."""

from __future__ import annotations

from pathlib import Path

#: Where the kernel presents it.
PROC_MEMINFO = Path("/proc/meminfo")


def read_meminfo(path: Path = PROC_MEMINFO) -> dict[str, int]:
    """Each numeric field of a meminfo file in bytes (a `kB` value times 1024; one without a unit,
    e.g. HugePages_Total, as it is); {} when the file cannot be read. Bytes that are no UTF-8 are
    kept (surrogateescape): no decoding error can stop a start or a telemetry sample."""
    fields: dict[str, int] = {}
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            fields[key] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return fields
