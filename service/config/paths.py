"""Relative paths in a station config, which the daemon reads from its working directory.

For the systemd unit that is `/var/lib/smearscope` (systemd/smearscope.service, WorkingDirectory=);
for `validate-config` and `doctor` run from a shell it is wherever the shell stands, so with
`models_dir = "models"` in the repository they check the repository's models and say OK while the
unit looks in /var/lib/smearscope/models. Said, with both folders, so the file can be made absolute.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel

logger = logging.getLogger(__name__)

#: The station unit's working directory (systemd/smearscope.service).
UNIT_WORKING_DIRECTORY = Path("/var/lib/smearscope")


def relative_paths(model: BaseModel, prefix: str = "") -> list[tuple[str, Path]]:
    """Each relative path the config holds, by its dotted field name (sections searched)."""
    found: list[tuple[str, Path]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        where = f"{prefix}.{name}" if prefix else name
        if isinstance(value, BaseModel):
            found += relative_paths(value, where)
        elif isinstance(value, Path) and not value.is_absolute():
            found.append((where, value))
    return found


def relative_path_warnings(config: BaseModel, cwd: Path) -> list[tuple[str, str]]:
    """`(field, reason)` for each relative path that names another file here than for the unit."""
    if cwd.resolve() == UNIT_WORKING_DIRECTORY.resolve():
        return []
    return [(where, (f"{path} is relative: read from the working directory, here {cwd / path}, but "
                    f"{UNIT_WORKING_DIRECTORY / path} for the systemd unit; write it absolute "
                    "(docs/STATION.md section 3)"))
            for where, path in relative_paths(config)]
