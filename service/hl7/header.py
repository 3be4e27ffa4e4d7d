"""Who a message is from and for (MSH-4, MSH-5, MSH-6), as the lab's interface analyst sets it up.

Apart from the message (service.hl7.oru), which pulls the report model in: the archive's settings
and command line check these without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from smearscope.service.hl7.encode import hd

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Addressing:
    """MSH-4 (sending facility; none: the station id), MSH-5 and MSH-6 (receiving application and
    facility; none: empty), each an HL7 HD as the lab's interface analyst gives it (checked by `hd`)."""

    sending_facility: str | None = None
    receiving_application: str | None = None
    receiving_facility: str | None = None

    def __post_init__(self) -> None:
        for value in (self.sending_facility, self.receiving_application, self.receiving_facility):
            if value is not None:
                hd(value)
