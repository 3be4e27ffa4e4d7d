"""A classified cell as the station's durable state keeps it (service.station.durable's
specimen_fields rows): the cell's record plus what `aggregate` needs beside it, and back."""

from __future__ import annotations

from smearscope.service.analysis.records import Box, CellDetection, CellKind, ClassifiedCell
from smearscope.service.analysis.report import CellRecord


def cell_json(cell: ClassifiedCell, record: CellRecord) -> dict[str, object]:
    """A field's cell as the station's state keeps it: its record and what aggregate needs beside it."""
    detected_as = cell.detected_as.value if cell.detected_as is not None else None
    return {**record.model_dump(), "touches_frame_edge": cell.touches_frame_edge,
            "detected_as": detected_as, "size_calibrated": cell.size_calibrated, "shape_judged": cell.shape_judged}


def cell_from_json(item: dict[str, object], field_id: str) -> tuple[ClassifiedCell, CellRecord]:
    """The cell as `aggregate` needs it (its box in input pixels: sizes come from the mask area,
    kept as `area_um2`), and its record."""
    edge = bool(item.pop("touches_frame_edge", False))
    detected_as = item.pop("detected_as", None)
    calibrated = bool(item.pop("size_calibrated", False))
    judged = bool(item.pop("shape_judged", True))  # stored before red-cell focus was judged: judged
    record = CellRecord.model_validate({**item, "field_id": field_id})
    detection = CellDetection(kind=CellKind(record.kind), box=Box(*record.bbox), score=record.score)
    cell = ClassifiedCell(detection=detection, label=record.label, label_score=record.label_score,
                          diameter_um=record.diameter_um, area_um2=record.area_um2,
                          touches_frame_edge=edge, size_calibrated=calibrated, atypical=record.atypical, shape_judged=judged,
                          unassessed_label=record.unassessed_label,
                          detected_as=CellKind(str(detected_as)) if detected_as else None)
    return cell, record
