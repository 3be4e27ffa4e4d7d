"""How a specimen run starts and ends (`StartedBy`, `EndReason`) and its open progress
(`RunProgress`, frozen): the words service.station.specimen's runs, the live run state, the
status command and the outbox file's runs share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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

    def as_dict(self) -> dict[str, object]:
        return {"run_id": self.run_id, "started_by": self.started_by, "started_at": self.started_at,
                "fields": self.fields, "classified_wbc": self.classified_wbc,
                "target_wbc": self.target_wbc, "specimen_id": self.specimen_id}
