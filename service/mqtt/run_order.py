"""Whether a run the broker's retained run state names, one the station's state does not hold,
began after every run that state holds (service.mqtt.run_watch): then the station went on after
that state was saved, and the runs the state still had open were closed on the board that went on.

Told by run numbers where both carry them: each run gets the next number of its station as it
opens (`progress.run_seq`, kept in the station's state, service.station.durable), so a state
restored from a backup goes on from the backup's number. The broker's run (same station id) is
later when its number is above every number the state gave, or when the state gave that number
to another run (the restored station's next run takes the number the station that went on gave
already: the broker's run is of a timeline the state lacks); below, it is an older run. Run ids
are random (uuid4) and carry no order.

Otherwise (a run state of a version without numbers, or a state that gave none) from the runs'
start times: `progress.started_at` in the broker's run state, and each run's `started_at` in the
station's state. Both were read from this station id's wall clock, each when its run began, so
the current clock plays no part; a station runs one specimen run at a time, so a run begun after
another was begun after that one closed. A time before this release
(service.mqtt.wall_clock.RELEASED) is a wrong clock's (no clock battery, no network time yet): the
order is then not told. A clock set back by hand between the runs can make a later run look
earlier; that is said where the order is used."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from smearscope.service.mqtt.wall_clock import RELEASED


@dataclass(frozen=True)
class RunOrder:
    """The broker's run against the runs of the station's state."""

    #: True: it began after every run the state holds; False: it did not; None: not told.
    later: bool | None
    #: Why, for the log line.
    said: str
    #: How it was told: by the runs' numbers or by their start times.
    by: Literal["run numbers", "start times"] = "start times"


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")


def _stamp(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _by_number(run_id: str, number: int, numbers: Mapping[str, int]) -> RunOrder:
    latest = max(numbers, key=lambda r: numbers[r])
    given = {n: r for r, n in numbers.items()}.get(number)
    if number > numbers[latest]:
        return RunOrder(True, f"run {run_id} is run number {number} of this station, after every run this station's "
                              f"state numbered (the latest, {latest}, is number {numbers[latest]}; told by run "
                              "numbers)", "run numbers")
    if given is not None and given != run_id:
        return RunOrder(True, f"run {run_id} is run number {number} of this station, a number this station's state "
                              f"gave its own run {given}: the broker's run is of a station that went on from an "
                              "earlier point than this state (told by run numbers)", "run numbers")
    return RunOrder(False, f"run {run_id} is run number {number} of this station, before run {latest} of this "
                           f"station's state (number {numbers[latest]}; told by run numbers)", "run numbers")


def order_of(run_id: str, state: Mapping[str, Any], starts: Mapping[str, float | None],
             numbers: Mapping[str, int] | None = None, station_id: str | None = None) -> RunOrder:
    """Run `run_id` of the broker's `state` against `starts` (the state's runs: run id -> start time,
    None where not kept) or, where the state of `station_id` is numbered, `numbers` (run id -> its
    number, every one the station's state keeps)."""
    progress = state.get("progress") if isinstance(state.get("progress"), Mapping) else {}
    number = _number(progress.get("run_seq"))
    if number is not None and numbers and station_id is not None and state.get("station_id") == station_id:
        return _by_number(run_id, number, numbers)
    started = _stamp(progress.get("started_at"))
    own = {r: t for r, t in ((r, _stamp(t)) for r, t in starts.items()) if t is not None}
    if started is None:
        return RunOrder(None, f"run {run_id}'s run state carries no start time")
    if not own:
        return RunOrder(None, "this station's state keeps no start time of its runs")
    latest_run = max(own, key=lambda r: own[r])
    wrong = [f"run {r}'s start reads {_when(t)}" for r, t in ((run_id, started), *own.items()) if t < RELEASED]
    if wrong:
        return RunOrder(None, f"{', '.join(wrong)}, before this release ({_when(RELEASED)[:10]}): read from a "
                              "wrong clock (no clock battery, no network time yet), so which run began first is not told")
    if started > own[latest_run]:
        return RunOrder(True, f"run {run_id} began at {_when(started)}, after every run this station's state holds "
                              f"(the latest, {latest_run}, began at {_when(own[latest_run])}; told by start times)")
    return RunOrder(False, f"run {run_id} began at {_when(started)}, before run {latest_run} of this station's state "
                           f"(began at {_when(own[latest_run])}; told by start times)")
