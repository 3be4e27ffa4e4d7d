"""Who a message is from and for (MSH-4, MSH-5, MSH-6) and whether it is production, training or debugging
(MSH-11), as the lab's interface analyst sets it up.

Apart from the message (service.hl7.oru), which pulls the report model in: the archive's settings
and command line check these without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from smearscope.service.hl7.encode import hd

logger = logging.getLogger(__name__)

#: MSH-11's processing ids (HL7 table 0103): P production, T training (a lab validating the interface), D debugging.
PROCESSING_IDS = ("P", "T", "D")


@dataclass(frozen=True)
class Addressing:
    """MSH-4 (sending facility; none: the station id), MSH-5 and MSH-6 (receiving application and
    facility; none: empty), each an HL7 HD as the lab's interface analyst gives it (checked by `hd`);
    MSH-11, the processing id (one of PROCESSING_IDS)."""

    sending_facility: str | None = None
    receiving_application: str | None = None
    receiving_facility: str | None = None
    processing_id: str = "P"

    def __post_init__(self) -> None:
        for value in (self.sending_facility, self.receiving_application, self.receiving_facility):
            if value is not None:
                hd(value)
        if self.processing_id not in PROCESSING_IDS:
            raise ValueError(f"{self.processing_id!r} is no HL7 processing id (MSH-11, table 0103: "
                             f"{', '.join(PROCESSING_IDS)})")
