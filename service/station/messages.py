"""What the station publishes for a report: a compact report, and its cells apart.

A field or specimen report is published without its per-cell detail (a 20-field specimen's cells
made a 75 KB message that a broker with a 64 KB packet limit refused, and every later message
waited behind it). The report keeps `cell_detail` (how many cells, which topic); the cells of a
field go in `cells` messages on `<prefix>/<station>/cells`, each under the packet limit, so a
large field is split into parts (docs/MQTT.md). A specimen's cells are its fields' cells messages,
joined by `run_id`, so a specimen report needs none of its own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from smearscope.service.analysis.report import CellDetail, Report

logger = logging.getLogger(__name__)

#: Bytes kept free in each cells message for the envelope, topic and MQTT 5 properties.
PACKET_OVERHEAD = 1024
CELLS_BODY_VERSION = 1


@dataclass(frozen=True)
class ReportMessages:
    """The compact report's JSON and the JSON bodies of its cells messages (in order)."""

    report: bytes
    cells: tuple[bytes, ...]


def split_cells(report: Report, max_packet_size: int) -> tuple[bytes, ...]:
    """The report's cells as `cells` message bodies, each small enough for `max_packet_size`."""
    budget = max(1024, max_packet_size - PACKET_OVERHEAD)
    field_id = report.source.frame_id if report.source is not None else None
    head = {"cells_version": CELLS_BODY_VERSION, "report_id": report.report_id,
            "run_id": report.run_id, "field_id": field_id}
    fixed = len(json.dumps({**head, "part": 999_999, "parts": 999_999, "cells": []}))
    chunks: list[list[str]] = [[]]
    size = fixed
    for cell in report.cells:
        text = cell.model_dump_json()
        if chunks[-1] and size + len(text) + 1 > budget:
            chunks.append([])
            size = fixed
        chunks[-1].append(text)
        size += len(text) + 1
    if not report.cells:
        return ()
    bodies = []
    for part, texts in enumerate(chunks, 1):
        header = json.dumps({**head, "part": part, "parts": len(chunks)})[:-1]
        bodies.append(f'{header}, "cells": [{",".join(texts)}]}}'.encode())
    return tuple(bodies)


def report_messages(report: Report, cells_topic: str, max_packet_size: int,
                    publish_cells: bool) -> ReportMessages:
    """The compact report and, for a field with `publish_cells`, its cells messages."""
    cells = split_cells(report, max_packet_size) if publish_cells and report.kind == "field" else ()
    topic = cells_topic if publish_cells else None
    detail = CellDetail(count=len(report.cells), topic=topic, parts=len(cells))
    compact = report.model_copy(update={"cells": [], "cell_detail": detail})
    return ReportMessages(compact.model_dump_json().encode(), cells)
