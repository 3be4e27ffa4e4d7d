"""How a specimen run starts and ends (`StartedBy`, `EndReason`), its open progress
(`RunProgress`, frozen) and a run that ended (`ClosedRun`): the words service.station.specimen's
runs, the live run state, the status command and the outbox file's runs share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from smearscope.service.analysis.report import Report

#: "restart": the run was left open by a process that crashed (or could not store its report at
#: stop), and the next start closed it from the outbox database (service.station.durable) rather
#: than take it back (SpecimenTracker.resume_one); a run stop_run ended is closed as "stopped".
#: "field_limit": the run reached `max_fields` fields without its target (its memory's bound).
EndReason = Literal["target_reached", "stopped", "idle_timeout", "shutdown", "restart", "field_limit"]
StartedBy = Literal["auto", "command"]


def has_states(started_by: StartedBy | None, fields: int) -> bool:
    """Whether a run publishes its live run state: from its first field, or from its start when
    start_run opened it (open with no field, then closed with none when it ends so); a run that
    opened automatically and ended without a field was never said to anyone."""
    return fields > 0 or started_by == "command"


#: A run's `progress` as its run state, the status command and `get_runs` give it (open or closed).
PROGRESS_KEYS = ("run_id", "started_by", "started_at", "fields", "classified_wbc", "target_wbc", "specimen_id",
                 "run_seq")


@dataclass(frozen=True)
class RunProgress:
    """A read-only view of the open run (status command, STATUS= line, telemetry)."""

    run_id: str
    started_by: StartedBy
    started_at: float
    fields: int
    classified_wbc: int
    target_wbc: int
    #: The lab's identifier of the specimen, as start_run gave it (None: none given).
    specimen_id: str | None = None
    #: The run's number on this station (1, 2, 3, ...; service.station.durable); None where it has none.
    run_seq: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {key: getattr(self, key) for key in PROGRESS_KEYS}


@dataclass(frozen=True)
class ClosedRun:
    """A run that ended; `report` is None when it ended without a single field."""

    run_id: str
    end_reason: EndReason
    fields: int
    classified_wbc: int
    target_wbc: int
    report: Report | None
    #: The run's cells, for a technician's verification (service.station.commands, verify_run): a
    #: service.station.specimen.SpecimenRun (typed Any here: that module imports this one).
    run: Any = field(default=None, compare=False, repr=False)
    #: When the run started (Unix time) and who started it, as its open states said; None where
    #: not known.
    started_at: float | None = None
    started_by: StartedBy | None = None
    specimen_id: str | None = None
    #: The run's number on this station (1, 2, 3, ...; service.station.durable); None where it has none.
    run_seq: int | None = None

    @property
    def complete(self) -> bool:
        return self.end_reason == "target_reached"

    def progress(self) -> dict[str, object]:
        """The closed run's `progress` in its run state and in `get_runs` (an open run's keys)."""
        return {key: getattr(self, key) for key in PROGRESS_KEYS}
