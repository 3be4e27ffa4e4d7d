"""`[commands]`: what the station's MQTT commands may reach on its disk."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, field_validator

from smearscope.service.config.base import StationBaseModel

logger = logging.getLogger(__name__)


class CommandsConfig(StationBaseModel):
    """Limits of the commands a broker account may send (cmd/analyze_file)."""

    analyze_file_folders: tuple[Path, ...] = Field(
        default=(),
        title="Folders analyze_file may read",
        description=(
            "Absolute folders whose files (in them or below) the analyze_file command may analyse; a path "
            "elsewhere, also one reached through a symbolic link, is refused (path_not_allowed) before the "
            "file is touched, so its answer tells nothing of it; the file opened is judged again, so a link "
            "swapped in after the check is refused too. Empty (the default): any file the "
            "station's user can read, for whoever may publish the station's cmd/analyze_file."
        ),
    )

    @field_validator("analyze_file_folders")
    @classmethod
    def _absolute(cls, folders: tuple[Path, ...]) -> tuple[Path, ...]:
        relative = [str(f) for f in folders if not f.is_absolute()]
        if relative:
            raise ValueError(f"not absolute: {', '.join(relative)}")
        return folders
