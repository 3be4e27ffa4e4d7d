"""Hardware telemetry of the station: load, memory, temperatures, power.

Prefers jetson-stats (`jtop`, which talks to the jtop service over /run/jtop.sock) and falls back
to psutil and sysfs, or to /proc when psutil is not installed. A jtop service that does not answer
is logged once and retried only every few minutes: telemetry must never take the station down.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from smearscope.device.meminfo import PROC_MEMINFO, read_meminfo

logger = logging.getLogger(__name__)

#: How long to wait before asking an unresponsive jtop service again.
JTOP_RETRY_S = 600.0


def read_thermal_zones(root: Path = Path("/sys/class/thermal")) -> dict[str, float]:
    """Temperatures in degrees Celsius by zone type (e.g. 'cpu-thermal', 'GPU-therm')."""
    temps: dict[str, float] = {}
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            name = (zone / "type").read_text().strip() or zone.name
        except OSError:
            name = zone.name
        if name in temps:
            name = f"{name}.{zone.name}"
        temps[name] = milli / 1000.0
    return temps


def _proc_meminfo(path: Path = PROC_MEMINFO) -> dict[str, float]:
    """Total and used memory (MiB, used = total - available) and the used share, from a meminfo
    file (device.meminfo); {} without MemTotal and MemAvailable."""
    values = read_meminfo(path)
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    if not total or available is None:
        return {}
    return {
        "memory_total_mb": total / 2**20,
        "memory_used_mb": (total - available) / 2**20,
        "memory_percent": 100.0 * (total - available) / total,
    }


def _proc_cpu_times(path: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(busy, total) jiffies since boot from the aggregate cpu line."""
    try:
        with open(path, encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def summarize_jtop_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Our telemetry fields from jtop's `stats` dict (keys like 'CPU1', 'GPU', 'Temp gpu')."""
    cpus = [v for k, v in stats.items() if k.startswith("CPU") and isinstance(v, (int, float))]
    temps = {
        k[5:]: float(v) for k, v in stats.items()
        if k.startswith("Temp ") and isinstance(v, (int, float)) and v > -200
    }
    ram, power = stats.get("RAM"), stats.get("Power TOT")
    out: dict[str, Any] = {
        "cpu_percent": sum(cpus) / len(cpus) if cpus else None,
        "gpu_percent": float(stats["GPU"]) if isinstance(stats.get("GPU"), (int, float)) else None,
        # jtop reports RAM as a used fraction.
        "memory_percent": 100.0 * float(ram) if isinstance(ram, (int, float)) else None,
        "temperatures_c": temps,
        "power_mw": float(power) if isinstance(power, (int, float)) else None,
        "jtop": {k: _jsonable(v) for k, v in stats.items()},
    }
    return out


class TelemetryReader:
    """Reads one telemetry snapshot per call; keeps a jtop connection open between calls."""

    def __init__(self, thermal_root: Path = Path("/sys/class/thermal")) -> None:
        self._thermal_root = thermal_root
        self._lock = threading.Lock()
        self._jtop: Any = None
        self._jtop_retry_at = 0.0
        self._jtop_failures = 0
        self._last_cpu: tuple[int, int] | None = None
        self._psutil: Any = None
        self._psutil_checked = False

    def read(self) -> dict[str, Any]:
        """A JSON-friendly snapshot; `source` says which backend produced it."""
        with self._lock:
            snapshot = self._read_jtop()
            if snapshot is None:
                snapshot = self._read_fallback()
            snapshot["read_at"] = time.time()
            return snapshot

    def _read_jtop(self) -> dict[str, Any] | None:
        if self._jtop is None:
            if time.monotonic() < self._jtop_retry_at:
                return None
            self._jtop = self._connect_jtop()
            if self._jtop is None:
                return None
        try:
            if not self._jtop.ok():
                raise RuntimeError("jtop service stopped answering")
            snapshot = summarize_jtop_stats(dict(self._jtop.stats))
        except Exception as exc:  # noqa: BLE001 - jtop raises JtopException, socket errors: fall back
            self._jtop_unavailable(exc)
            self._close_jtop()
            return None
        snapshot["source"] = "jtop"
        return snapshot

    def _connect_jtop(self) -> Any:
        try:
            from jtop import jtop  # jetson-stats, in the 'jetson' extra
        except ImportError:
            self._jtop_retry_at = float("inf")  # not installed: never ask again
            return None
        try:
            conn = jtop()
            conn.start()
        except Exception as exc:  # noqa: BLE001 - service missing, socket refused, its own errors
            self._jtop_unavailable(exc)
            return None
        if self._jtop_failures:
            logger.info("jtop service answering again")
        self._jtop_failures = 0
        return conn

    def _jtop_unavailable(self, exc: BaseException) -> None:
        self._jtop_failures += 1
        self._jtop_retry_at = time.monotonic() + JTOP_RETRY_S
        if self._jtop_failures == 1:
            logger.warning(
                "jtop service not available (%s); using psutil/sysfs telemetry, "
                "retrying every %.0f s",
                exc, JTOP_RETRY_S,
            )
        else:
            logger.debug("jtop still unavailable: %s", exc)

    def _close_jtop(self) -> None:
        if self._jtop is not None:
            try:
                self._jtop.close()
            except Exception as exc:  # noqa: BLE001 - a failing close must not stop the fallback
                logger.debug("closing jtop: %s", exc)
            self._jtop = None

    def _read_fallback(self) -> dict[str, Any]:
        if not self._psutil_checked:
            self._psutil_checked = True
            try:
                import psutil

                self._psutil = psutil
            except ImportError:
                logger.info("psutil not installed; reading /proc for load and memory")
        snapshot: dict[str, Any] = {"gpu_percent": None, "power_mw": None}
        if self._psutil is not None:
            mem = self._psutil.virtual_memory()
            snapshot.update(
                source="psutil",
                cpu_percent=float(self._psutil.cpu_percent(interval=None)),
                memory_percent=float(mem.percent),
                memory_used_mb=(mem.total - mem.available) / 2**20,
                memory_total_mb=mem.total / 2**20,
            )
        else:
            snapshot.update(source="proc", cpu_percent=self._proc_cpu_percent(), **_proc_meminfo())
        snapshot["temperatures_c"] = read_thermal_zones(self._thermal_root)
        try:
            snapshot["load_average"] = list(os.getloadavg())
        except OSError:
            pass
        return snapshot

    def _proc_cpu_percent(self) -> float | None:
        """CPU busy percentage since the previous call (None on the first)."""
        now, prev = _proc_cpu_times(), self._last_cpu
        if now is None:
            return None
        if prev is None or now[1] <= prev[1]:  # first call, or no clock tick since the last one
            self._last_cpu = prev or now
            return None
        self._last_cpu = now
        return 100.0 * (now[0] - prev[0]) / (now[1] - prev[1])

    def close(self) -> None:
        with self._lock:
            self._close_jtop()


_default_reader: TelemetryReader | None = None
_default_lock = threading.Lock()


def read_telemetry() -> dict[str, Any]:
    """One telemetry snapshot from the process-wide reader (created on first call)."""
    global _default_reader
    with _default_lock:
        if _default_reader is None:
            _default_reader = TelemetryReader()
        reader = _default_reader
    return reader.read()
