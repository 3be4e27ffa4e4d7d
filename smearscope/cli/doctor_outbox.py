"""`smearscope doctor`'s one open of the station's outbox file: its counts for the outbox line, or
that a running station holds it (each open beside one waits out the station's lock), which also
decides whether the parked line (smearscope.cli.doctor_parked) is said."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smearscope.service.mqtt.outbox import OutboxCounts


@dataclass(frozen=True)
class OutboxLook:
    """What opening the outbox file found: `exists` False (not created yet, nothing opened), its
    `counts`, `held` by a running station, or the `error` that stopped the open."""

    exists: bool
    counts: OutboxCounts | None = None
    held: bool = False
    error: Exception | None = None


def look_at_outbox(path: Path) -> OutboxLook:
    """Open the outbox file at `path` once (when it exists), read its counts and close it."""
    from smearscope.service.mqtt.outbox import Outbox, OutboxLockedError

    if not path.exists():
        return OutboxLook(exists=False)
    try:
        with Outbox(path) as box:
            return OutboxLook(exists=True, counts=box.counts())
    except OutboxLockedError:
        return OutboxLook(exists=True, held=True)
    except Exception as exc:  # noqa: BLE001 - the outbox line says what is wrong with the file
        return OutboxLook(exists=True, error=exc)
