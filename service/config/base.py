"""The strict base of every station configuration section."""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)


class StationBaseModel(BaseModel):
    """Strict base: unknown keys are errors and a loaded config is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
