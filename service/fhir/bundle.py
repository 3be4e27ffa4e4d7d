"""A report as a FHIR R4 `Bundle` (type `collection`): DiagnosticReport, Specimen, Device and one
Observation per result. Plain dicts, ready for `json.dumps`; docs/FHIR.md documents the mapping.

Everything is `preliminary`, a machine's result, until a technician verifies the run
(`Report.verification`, command verify_run): that report's bundle is `final`, names who verified
it (`performer`: a Practitioner in the bundle, named as they signed, on the DiagnosticReport and on every
Observation, so a system that stores results one by one keeps who verified each) and the report it replaces; a run
signed again is `corrected`. No patient is
named: the only identifiers are those the station was given (station id, run id, frame id) and
the report id. Resource ids are UUIDs derived from the report id, so the same report always
gives the same bundle (consumers dedupe by `Bundle.identifier`); the Device's is derived from what it says
(station, the software versions and models that analysed the run), so every report of an unchanged station names
one Device, and a run verified after an update still names the Device that analysed it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from datetime import datetime, timezone
from typing import Any

from smearscope.service.analysis.report import NOT_RECORDED, ClassShare, Flag, Report
from smearscope.service.analysis.wording import counted
from smearscope.service.fhir import codes, report_view
from smearscope.service.fhir.codes import Code

logger = logging.getLogger(__name__)

Resource = dict[str, Any]
#: Namespace of the resource UUIDs derived from a report id.
_NAMESPACE = uuid.UUID("6b1f3c52-58a4-4d0e-9a8e-2f1d1e7c0a20")
_UNIDENTIFIED = "unidentified"


def _instant(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _uuid(report_id: str, name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{report_id}/{name}"))


def _concept(*found: Code | None, text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": [c.coding() for c in found if c is not None]}
    if text:
        out["text"] = text
    return out


#: Decimals of every share, interval bound, ratio and size sent: one, as the printed report, `smearscope analyze`
#: and the dashboard read them (the report keeps two, three for sizes, for audit). FHIR's decimal keeps its
#: precision, so 10.53 % of 19 red cells or a diameter of 8.156 um (a pixel is about 0.1 um) would claim one the
#: count does not have, and a chart would show other figures than the page the technician signed.
DECIMALS = 1
def _read(value: float) -> float:
    """A value as the report's readers print it (Python's formatting: 96.25 reads 96.2, as runview.js tenth())."""
    return float(f"{value:.{DECIMALS}f}")


def _quantity(value: float, unit: str, code: str, count: int | None = None, of: int | None = None) -> dict[str, Any]:
    """A Quantity at the precision sent; a share of `count` cells of `of` (none: not a share of cells, or an
    interval's bound, a SimpleQuantity) as report_view.share_read() reads it: one that reads 0 with some cell
    counted is "< 0.1" (0 would read as none seen), one that reads 100 with not every cell "> 99.9"."""
    if count is None:
        return {"value": _read(value), "unit": unit, "system": codes.UCUM, "code": code}
    comparator, shown = report_view.share_read(value, count, of)
    return {"value": shown, **({"comparator": comparator} if comparator else {}),
            "unit": unit, "system": codes.UCUM, "code": code}


def _component(code: str, **value: Any) -> dict[str, Any]:
    return {"code": _concept(codes.local(code)), **value}


def _share_components(share: ClassShare, denominator: int) -> list[dict[str, Any]]:
    out = [_component("count", valueInteger=share.count),
           _component("denominator", valueInteger=denominator)]
    if share.ci95_low is not None and share.ci95_high is not None:  # rounded outward: 0 of 10 000 is 0.0 to 0.1
        low, high = report_view.interval_shown(share.ci95_low, share.ci95_high)
        out.append(_component("ci95", valueRange={"low": _quantity(low, "%", "%"), "high": _quantity(high, "%", "%")}))
    return out


class _Builder:
    """Collects the bundle's entries for one report."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.rid = report.report_id
        self.entries: list[dict[str, Any]] = []
        self.by_name: dict[str, Resource] = {}  # each resource by the name its id derives from
        self.results: list[dict[str, str]] = []
        self.issued = _instant(report.created_at)
        run_ms = report.timing_ms.get("run_ms")
        self.effective = _instant(report.created_at - run_ms / 1000.0) if run_ms else self.issued
        if report.source is not None:
            self.effective = _instant(report.source.captured_at)
        self.specimen_ref = f"urn:uuid:{_uuid(self.rid, 'specimen')}"
        self.device_ref = ""  # _device's: the same for every report of one station, software and models
        self.performer: list[dict[str, str]] = []  # _verifier's: who verified the run, none before
        # what a result's identifier is made of: the run, which every report of it shares (a verified one,
        # a new report, updates the preliminary one's results: never a second copy of each), else the report
        self.result_key = report.run_id if report.kind == "specimen" and report.run_id else report.report_id
        # signed again: corrected (FHIR: a final report modified to correct its results, a kind of amended), what
        # HL7's v2-to-FHIR mapping makes of the message's C, so a lab reading both feeds stores one status
        v = report.verification
        self.status = "preliminary" if v is None else "corrected" if v.supersedes_verified_by is not None else "final"

    def add(self, name: str, resource: Resource, resource_id: str | None = None) -> str:
        full_url = f"urn:uuid:{resource_id or _uuid(self.rid, name)}"
        resource = {"resourceType": resource.pop("resourceType"), "id": full_url[9:], **resource}
        self.entries.append({"fullUrl": full_url, "resource": resource})
        self.by_name[name] = resource
        return full_url

    def observation(self, name: str, code: dict[str, Any], result: str | None = None, **fields: Any) -> None:
        """An Observation; `result` names it in its identifier where `name` (its resource id's) would not
        be the same result in another report of the run (a flag's place among the flags)."""
        ref = self.add(name, {
            "resourceType": "Observation",
            "identifier": [{"system": codes.ID_RESULT, "value": f"{self.result_key}/{result or name}"}],
            "status": self.status,
            "category": [_concept(codes.Code(codes.OBSERVATION_CATEGORY, "laboratory", "Laboratory"))],
            "code": code, "effectiveDateTime": self.effective, "issued": self.issued,
            "specimen": {"reference": self.specimen_ref}, "device": {"reference": self.device_ref},
            **({"performer": [dict(p) for p in self.performer]} if self.performer else {}), **fields})
        self.results.append({"reference": ref})


def _signed_before(v) -> str:
    """The signature a run signed again amends, as the conclusion names it."""
    if v.supersedes_verified_by is None:
        return ""
    when = "" if v.supersedes_verified_at is None else f" at {_instant(v.supersedes_verified_at)}"
    return f", verified by {v.supersedes_verified_by}{when} (amended)"


def flags_by_severity(report: Report) -> list[Flag]:
    """The report's flags, critical first, then warnings, then info (each kind in the report's order):
    the order of the bundle's conclusion and conclusionCode, and of the HL7 message's flag rows."""
    return sorted(report.flags, key=lambda f: ("critical", "warning", "info").index(f.severity))


def report_bundle(report: Report) -> Resource:
    """The FHIR R4 Bundle (collection) of one field or specimen report."""
    b = _Builder(report)
    _specimen(b)
    _device(b)
    _verifier(b)
    _differential(b)
    _morphology(b)
    _sizes_and_counts(b)
    flags = flags_by_severity(report)
    _interpretations(b, flags)
    _flags(b, flags)
    conclusion = "; ".join(f"{f.severity}: {f.message}" for f in flags) or "no flags"
    v = report.verification
    # the cells left to a technician, in the words the printed report uses (none said for a report
    # from before they were counted): the conclusion is free text, no coded element holds it
    waiting = f" {text[0].upper()}{text[1:]}." if (text := report_view.awaiting_review(report)) else ""
    b.entries.insert(0, {"fullUrl": f"urn:uuid:{_uuid(b.rid, 'report')}", "resource": {
        "resourceType": "DiagnosticReport", "id": _uuid(b.rid, "report"),
        # a run's reports share its run identifier: a verified one and the one it supersedes
        "identifier": [{"system": codes.ID_REPORT, "value": b.rid}]
        + ([{"system": codes.ID_RUN, "value": report.run_id}] if report.kind == "specimen" and report.run_id else []),
        "status": b.status,
        "category": [_concept(codes.Code(codes.DIAGNOSTIC_SERVICE, "HM", "Hematology"))],
        "code": _concept(codes.PANEL, text="Automated differential and red-cell morphology "
                         + ("(digital smear analysis, verified by a technician)" if v is not None
                            else "(digital smear analysis, not reviewed)")),
        "effectiveDateTime": b.effective, "issued": b.issued,
        "specimen": [{"reference": b.specimen_ref}], "result": b.results,
        "conclusion": (f"Preliminary, machine result; a qualified person must review it.{waiting} {conclusion}" if v is None
                       else f"Verified by {v.verified_by}: {report_view.verified_review(report)}; "
                       f"{len(v.reclassified)} reclassified; replaces report {v.supersedes}{_signed_before(v)}. "
                       f"{conclusion}"),
    }})
    if b.performer:
        b.entries[0]["resource"]["performer"] = [dict(p) for p in b.performer]
    if flags:
        b.entries[0]["resource"]["conclusionCode"] = [
            _concept(codes.flag(f.code), text=f.message) for f in flags]
    return {"resourceType": "Bundle", "id": _uuid(b.rid, "bundle"),
            "identifier": {"system": codes.ID_REPORT, "value": b.rid},
            "type": "collection", "timestamp": b.issued, "entry": b.entries}


def _interpretations(b: _Builder, flags: list[Flag]) -> None:
    """A flag that says a finding is there (codes.FINDING_FLAGS) marks that finding's Observation with its
    severity (critical AA, warning A), the HL7 message's OBX-8 of the flag's row; none on a value left out."""
    for f in flags:
        observation = b.by_name.get(codes.FINDING_FLAGS.get(f.code, ""))
        severity = codes.SEVERITY_INTERPRETATION.get(f.severity)
        if observation is None or severity is None or "dataAbsentReason" in observation:
            continue
        if "interpretation" not in observation:  # the first flag on it is the most severe (flags_by_severity)
            observation["interpretation"] = [_concept(severity)]


def _flags(b: _Builder, flags: list[Flag]) -> None:
    """Each flag an Observation of its own, critical first: the flag's code, its message as the value, its
    severity as the interpretation (codes.SEVERITY_INTERPRETATION; an info flag none), as the HL7 message's row
    for it with OBX-8."""
    for i, f in enumerate(flags):
        severity = codes.SEVERITY_INTERPRETATION.get(f.severity)
        # identified by its code: the verified report's flag updates the same flag's, whatever its place
        repeated = sum(g.code == f.code for g in flags[:i])
        b.observation(f"flag/{i}", _concept(codes.flag(f.code)),
                      result=f"flag/{f.code}" + (f"/{repeated + 1}" if repeated else ""), valueString=f.message,
                      **({"interpretation": [_concept(severity)]} if severity is not None else {}))


def _specimen(b: _Builder) -> None:
    r = b.report
    identifiers = []
    if r.run_id:
        identifiers.append({"system": codes.ID_RUN, "value": r.run_id})
    if r.source is not None:
        identifiers.append({"system": codes.ID_FRAME, "value": r.source.frame_id})
    # No collection time: when the blood was drawn is not known to the station.
    specimen: Resource = {"resourceType": "Specimen",
                          "type": {"coding": [codes.SPECIMEN_TYPE.coding()], "text": "Peripheral blood smear, stained"},
                          "note": [{"text": f"{counted(r.fields_analyzed, 'field')} analysed"}]}
    if identifiers:  # FHIR JSON has no empty arrays
        specimen["identifier"] = identifiers
    if r.specimen_id:  # the lab's own identifier of the specimen (start_run): its system is the lab's, not known here
        specimen["accessionIdentifier"] = {"value": r.specimen_id}
    b.add("specimen", specimen)


#: Base32 characters of the device key (55 bits of a SHA-256): the few configurations of one lab's stations never
#: share one in practice, and HL7's OBX-18 has 11 characters for it before `^smearscope` (docs/HL7.md).
DEVICE_KEY_LENGTH = 11


def device_key(device: Resource) -> tuple[str, str]:
    """(resource id, identifier value) of a Device from all it says (station id, software version, each model's
    name, file and manifest sha256, backend, station means): every report of one station with one software and one
    set of models names the same Device, resent or not; an update of either makes another, and the results made
    before keep pointing at the device that made them."""
    digest = hashlib.sha256(json.dumps(device, sort_keys=True, separators=(",", ":")).encode()).digest()
    return (str(uuid.uuid5(_NAMESPACE, f"device/{digest.hex()}")),
            base64.b32encode(digest).decode()[:DEVICE_KEY_LENGTH])


def analysis_software(report: Report) -> list[str]:
    """The smearscope versions whose analysis the report's results are: a specimen report's `analysis_software`,
    else (a field report, or one from before schema 1.5) the version that made it; none when it names none."""
    if report.analysis_software:
        return list(report.analysis_software)
    return [report.software_version] if report.software_version else []


def software_text(versions: list[str]) -> str:
    """The versions that analysed a report as a reader takes them ("smearscope 0.0.9 and 0.1.0"), fields stored by
    a version that recorded none said in words, never as a version named `(not recorded)`: the Device note's, the
    HL7 SFT-5's and the printed report's (print.js) words."""
    known = [v for v in versions if v != NOT_RECORDED]
    if len(known) == len(versions):
        return "smearscope " + " and ".join(known)
    if not known:
        return "smearscope (an earlier version that did not record its number)"
    return f"smearscope {' and '.join(known)} (some fields by an earlier version that did not record its number)"


def open_set_text(thresholds: dict[str, float]) -> str:
    """A station's open-set thresholds as the Device and the HL7 SFT segment say them: each test by name, in order."""
    return ", ".join(f"{test} {threshold!r}" for test, threshold in sorted(thresholds.items()))


def _device(b: _Builder) -> None:
    r = b.report
    device: Resource = {"resourceType": "Device",
                        "deviceName": [{"name": "smearscope", "type": "model-name"}]}
    # the software first: with the models below, what made these results (ISO 15189 traceability); a verified
    # report's are the analysis', whatever version signed it, and a run whose fields two versions analysed names both
    software = analysis_software(r)
    versions = [{"type": {"text": "software"}, "value": v} for v in software]
    if r.models:
        versions += [{"type": {"text": role}, "value": f"{m.name} sha256:{m.sha256} ({m.backend})"
                      + (f" manifest sha256:{m.manifest_sha256}" if m.manifest_sha256 else "")}
                     for role, m in sorted(r.models.items())]
        # a head adapted to this station (smearscope adapt-wbc): which class means typed the cells
        versions += [{"type": {"text": f"{role} station means"}, "value": f"sha256:{m.station_means.sha256}"}
                     for role, m in sorted(r.models.items()) if m.station_means is not None]
        # the station's own open-set thresholds (calibrate-atypical): they send other white cells to review
        versions += [{"type": {"text": f"{role} open-set thresholds"}, "value": open_set_text(m.open_set_thresholds)}
                     for role, m in sorted(r.models.items()) if m.open_set_thresholds]
    if versions:  # FHIR JSON has no empty arrays
        device["version"] = versions
    if r.station_id:
        device["identifier"] = [{"system": codes.ID_STATION, "value": r.station_id}]
    if len(software) > 1:
        device["note"] = [{"text": f"The run's fields were analysed by {software_text(software)}, a run taken back "
                                   "by a station updated meanwhile, under the same models"}]
    resource_id, key = device_key(device)
    device["identifier"] = [*device.get("identifier", []), {"system": codes.ID_DEVICE, "value": key}]
    b.device_ref = b.add("device", device, resource_id)


def _verifier(b: _Builder) -> None:
    """The technician who verified the run (a Practitioner named as they signed; its id the report's: the
    station knows no more of them than that name), the performer of the report and of each result; none
    before a technician verified it."""
    v = b.report.verification
    if v is None:
        return
    ref = b.add("verifier", {"resourceType": "Practitioner", "name": [{"text": v.verified_by}]})
    b.performer = [{"reference": ref, "display": v.verified_by}]


#: Too few cells for what they are a share of: the dashboard's words above the table they concern (runview.js
#: fewNote), here a note on each result (and so an NTE under its HL7 row): the info flag in the conclusion alone let
#: "Neutrophils 8.8 %" of 11 white cells read as a differential in a chart that shows each result on its own.
FEW_CELLS = {"too_few_wbc_for_differential": ("Not a differential: ", ". Read each share with its 95 % interval."),
             "too_few_rbc_for_morphology": ("Grades on few red cells: ", ".")}


def _few_cells(report: Report, code: str) -> dict[str, Any]:
    """The `note` of a result the flag `code` (FEW_CELLS) concerns, none without the flag."""
    f = next((f for f in report.flags if f.code == code), None)
    if f is None:
        return {}
    before, after = FEW_CELLS[code]
    return {"note": [{"text": f"{before}{f.message}{after}"}]}


def _differential(b: _Builder) -> None:
    r = b.report
    total = r.counts.wbc
    of = report_view.differential_of(r)
    few = _few_cells(r, "too_few_wbc_for_differential")
    for share in r.wbc_differential:
        loinc = codes.WBC_LOINC.get(share.label)
        if share.label == report_view.NRBC_LABEL:
            continue  # reported per 100 WBC below
        local = codes.local("wbc-unidentified") if share.label == _UNIDENTIFIED else \
            codes.local(share.label, codes.LOCAL_WBC_CLASS, share.label)
        b.observation(f"wbc/{share.label}", _concept(loinc, local),
                      valueQuantity=_quantity(share.percent, "%", "%", share.count, of),
                      component=_share_components(share, total), **few)
    nrbc = report_view.nrbc_per_100_wbc(r)
    if nrbc is not None:
        value, count, leukocytes = nrbc
        b.observation("nrbc", _concept(codes.NRBC), valueQuantity=_quantity(value, "/100 WBC", "/100{WBCs}", count),
                      component=[_component("count", valueInteger=count),
                                 _component("denominator", valueInteger=leukocytes)], **few)
    elif r.counts.nrbc:  # nucleated red cells seen, no white cell to count them per 100 of: said, with no number
        b.observation("nrbc", _concept(codes.NRBC), component=[_component("count", valueInteger=r.counts.nrbc)],
                      dataAbsentReason=_concept(*codes.absent("no-wbc-seen")))
    atypical = report_view.atypical_wbc_present(r)
    if atypical or (r.counts.wbc and not report_view.untyped_wbc(r)):
        b.observation("atypical-wbc", _concept(codes.local("atypical-wbc")), valueBoolean=atypical)
    else:  # no white cell seen, or untyped ones too few for the flag: nothing says there are none atypical
        b.observation("atypical-wbc", _concept(codes.local("atypical-wbc")),
                      dataAbsentReason=_concept(*codes.absent("wbc-left-for-review" if r.counts.wbc else "no-wbc-seen")))


def _morphology(b: _Builder) -> None:
    r = b.report
    few = _few_cells(r, "too_few_rbc_for_morphology")
    for share in report_view.morphology_rows(r):  # every size-based class when sizes cannot be read
        if share.label == "normal":
            continue
        loinc = codes.RBC_LOINC.get(share.label)
        if share.label == _UNIDENTIFIED:
            local = codes.local("rbc-unidentified")
        elif share.label == "other_poikilocyte":
            local = codes.local("rbc-other-poikilocyte")
        else:
            local = codes.local(share.label, codes.LOCAL_RBC_MORPHOLOGY, share.label)
        of = share.of_cells or r.counts.rbc  # of_cells: a mixed run's sizes
        components = [_component("percent", valueQuantity=_quantity(share.percent, "%", "%", share.count, of)),
                      *_share_components(share, of)]  # of_cells: a mixed run's sizes
        grade = report_view.grade(share)
        interval = report_view.grade_interval(share)
        grade_components = [_component("grade-ci95", valueString=f"{interval[0]} to {interval[1]}")] \
            if interval else []
        if share.graded_count is not None:  # the grade rests on fewer cells than the count (sure sickle or schistocyte calls)
            grade_components.append(_component("graded-count", valueInteger=share.graded_count))
        if not report_view.assessable(r, share):  # count: cells the head gave this class, for audit
            why = ("rbc-out-of-focus" if report_view.out_of_focus(r, share) else "no-rbc-measured"
                   if report_view.no_whole_rbc_sized(r) else "size-not-assessable")
            b.observation(f"rbc/{share.label}", _concept(loinc, local),
                          component=[_component("count", valueInteger=share.count)],
                          dataAbsentReason=_concept(*codes.absent(why)))
            continue
        value: dict[str, Any] = ({"valueCodeableConcept": _concept(codes.grade(grade))} if grade
                                 else {"valueQuantity": _quantity(share.percent, "%", "%", share.count, of)})
        # LOINC's [Presence] terms are ordinal: a finding not graded keeps its share under its local code alone
        b.observation(f"rbc/{share.label}", _concept(loinc if grade else None, local), **value,
                      component=components + grade_components, **few)


def _sizes_and_counts(b: _Builder) -> None:
    r = b.report
    s = r.rbc_size
    code = _concept(codes.local("rbc-diameter"))
    if not r.counts.rbc:  # nothing to measure, at whatever scale (an estimated one is not why)
        b.observation("rbc-diameter", code, dataAbsentReason=_concept(*codes.absent("no-rbc-seen")))
    elif not s.calibrated or report_view.calibration_in_doubt(r):  # circular, or a calibration in doubt: left out
        b.observation("rbc-diameter", code, component=[_component("n", valueInteger=s.n)],
                      dataAbsentReason=_concept(*codes.absent("size-not-assessable")))
    elif s.n and s.mean_diameter_um is not None:
        comps = [_component("n", valueInteger=s.n)]
        for name, v, unit in (("sd", s.sd_um, "um"), ("cv", s.cv_percent, "%"), ("median", s.median_diameter_um, "um")):
            if v is not None:
                comps.append(_component(name, valueQuantity=_quantity(v, unit, unit)))
        if s.histogram is not None:  # one component per bin: code text names the bin, value counts it
            edges = s.histogram.bin_edges_um
            for i, count in enumerate(s.histogram.counts):
                lo = f"{edges[i - 1]:g}" if i > 0 else ""
                hi = f"{edges[i]:g}" if i < len(edges) else ""
                label = f"< {hi} um" if not lo else f">= {lo} um" if not hi else f"{lo} to < {hi} um"
                comps.append({"code": _concept(codes.local("diameter-bin"), text=label), "valueInteger": count})
        b.observation("rbc-diameter", code, valueQuantity=_quantity(s.mean_diameter_um, "um", "um"), component=comps)
    else:  # red cells counted at a calibrated scale, none whole to measure (each cut by the image's edge)
        b.observation("rbc-diameter", code, component=[_component("n", valueInteger=s.n)],
                      dataAbsentReason=_concept(*codes.absent("no-rbc-measured")))
    b.observation("cells-counted", _concept(codes.local("cells-counted")), component=[
        _component(k, valueInteger=v) for k, v in r.counts.model_dump().items()])
