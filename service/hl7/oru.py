"""A report as an HL7 v2.5.1 ORU^R01 message (docs/HL7.md): MSH, ORC, OBR with its notes, one OBX
per FHIR Observation and per component, one OBX per flag, SPM.

The message is made from the report's FHIR bundle (service.fhir.bundle): its codes, units, values,
statuses and reasons for an absent value are the bundle's, read off it, so the two can never say
different things and there is one code table (service.fhir.codes). The status maps as the bundle's:
preliminary P, final F (a verified run), corrected C (a run signed again, correcting a verified
result). No patient is named (the bundle has no subject): the message has no PID; the lab's
specimen id is the placer order number and SPM's, the run id the filler order number, so the lab
system files the result under its own order. Each field built from an id keeps to its v2.5.1 length
as sent: an id too long for it goes as a short, deterministic form of it (placer_order_number,
filler_order_number, equipment_id), the whole id in a note under OBR. The same report always gives
the same message.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from smearscope.service.analysis.report import NOT_RECORDED, Report
from smearscope.service.fhir import codes
from smearscope.service.fhir.bundle import (
    analysis_software,
    open_set_text,
    report_bundle,
    software_text,
)
from smearscope.service.hl7.encode import (
    ENCODING_CHARACTERS,
    FT,
    ID,
    IS,
    REPETITION,
    SEGMENT_END,
    code,
    components,
    dtm,
    hd,
    number,
    segment,
    subcomponents,
    text,
)
from smearscope.service.hl7.header import Addressing
from smearscope.service.hl7.identifiers import (
    EQUIPMENT_LENGTH,
    FILLER_LENGTH,
    NAMESPACE,
    PLACER_LENGTH,
    equipment_id,
    filler_order_number,
    placer_order_number,
)

logger = logging.getLogger(__name__)

VERSION = "2.5.1"
CHARSET = "UNICODE UTF-8"
SENDING_APPLICATION = "smearscope"
#: FHIR status -> OBR-25 / OBX-11 (HL7 table 0123 / 0085).
RESULT_STATUS = {"preliminary": "P", "final": "F", "corrected": "C"}
#: OBX-11 of an observation without a value (FHIR dataAbsentReason): results cannot be obtained.
NO_RESULT = "X"
#: The FHIR code systems as HL7 coding system names (table 0396: LN, UCUM; 99zzz for local ones).
CODING_SYSTEM = {codes.LOINC: "LN", codes.UCUM: "UCUM", codes.LOCAL_OBSERVATION: "99SSO",
                 codes.LOCAL_WBC_CLASS: "99SSW", codes.LOCAL_RBC_MORPHOLOGY: "99SSR",
                 codes.LOCAL_GRADE: "99SSG", codes.LOCAL_FLAG: "99SSF", codes.SPECIMEN_TYPES: "HL70487"}
#: SFT-1, the software's vendor (XON-1, organization name), and SFT-3, its product name.
VENDOR = PRODUCT = "smearscope"
#: SFT-2 and SFT-3/SFT-4 lengths in v2.5.1 (ST 15, 20, 20); SFT-5 (TX) 1024.
SFT_VERSION, SFT_NAME, SFT_INFO = 15, 20, 1024
#: The first note of every message: the README's "Not for clinical diagnosis".
NOT_FOR_DIAGNOSIS = ("Not for clinical diagnosis: smearscope is a research prototype without regulatory "
                     "clearance; every result needs review by a qualified person.")
#: NTE-2 (table 0105): L, the filler (the analyzer); NTE-4 (table 0364): RE, remark.
NOTE_SOURCE, NOTE_TYPE = "L", "RE"


def control_id(report_id: str, processing_id: str = "P") -> str:
    """MSH-10: 20 hex digits of the report id's SHA-256, so the same report always has the same one
    (a lab system drops a message it has seen) and two reports never share one in practice. A training
    or debugging message (MSH-11 T or D) hashes the report id with its processing id: the production
    message of a report sent in training before is not dropped by a lab system as one it has seen."""
    key = report_id if processing_id == "P" else f"{report_id}/{processing_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:ID].upper()


def _ce(concept: dict[str, Any]) -> str:
    """A FHIR CodeableConcept as CE (OBX-3, OBR-4 and the coded values of OBX-5 in v2.5.1, which have no
    original text: the concept's text says it after the first coding's display): the first coding,
    the second as the alternate."""
    parts: list[str] = []
    extra = concept.get("text", "")
    for i, coding in enumerate(concept.get("coding", [])[:2]):
        display = coding.get("display", "")
        if i == 0 and extra:
            display = f"{display}: {extra}"
        parts += [code(coding["code"]), text(display), CODING_SYSTEM[coding["system"]]]
    return components(*parts)


def _specimen_type(concept: dict[str, Any]) -> str:
    """SPM-4, a CWE: the bundle's Specimen type (table 0487: BLD, whole blood), its text ("Peripheral blood
    smear, stained") as the original text (CWE-9)."""
    coding = concept["coding"][0]
    return components(code(coding["code"]), text(coding["display"]), CODING_SYSTEM[coding["system"]],
                      "", "", "", "", "", text(concept["text"]))


def _station_facility(station_id: str) -> str:
    """MSH-4 without a sending facility given: the station id as the HD's namespace id (IS, 20 characters),
    or, a longer one (station ids take 64), whole as its universal id of type L (local): never cut."""
    if len(station_id) <= IS:
        return code(station_id)
    return components("", text(station_id), "L")


def _units(quantity: dict[str, Any]) -> str:
    return components(code(quantity["code"]), text(quantity["unit"]), CODING_SYSTEM[quantity["system"]])


def _software(report: Report) -> list[str]:
    """SFT segments (after MSH): smearscope and the version that analysed the results (a verified report's too:
    bundle.analysis_software; one each where two versions analysed the run's fields), then one per model, as the
    FHIR Device's versions name them (role, file sha256, backend, manifest sha256, station means, open-set
    thresholds), released with the version that analysed most recently (a recorded one where any is); none for a
    report that names no software version (made before reports carried it)."""
    analysed = analysis_software(report)
    if not analysed:
        return []
    out = [segment("SFT", VENDOR, text(version, SFT_VERSION), PRODUCT, text(version, SFT_NAME),
                   text(software_text([version]), SFT_INFO)) for version in analysed]
    # the version that analysed the latest field (analysis_software's last), a placeholder only where none is known
    release = text(next((v for v in reversed(analysed) if v != NOT_RECORDED), analysed[-1]), SFT_VERSION)
    for role, m in sorted(report.models.items()):
        info = f"{role}: {m.name} sha256:{m.sha256} ({m.backend})"
        info += f" manifest sha256:{m.manifest_sha256}" if m.manifest_sha256 else ""
        info += f"; station means sha256:{m.station_means.sha256}" if m.station_means is not None else ""
        info += f"; open-set thresholds {open_set_text(m.open_set_thresholds)}" if m.open_set_thresholds else ""
        # SFT-3 the model's role, SFT-4 (binary id) the first 20 hex digits of its file's sha256
        out.append(segment("SFT", VENDOR, release, text(role, SFT_NAME), text(m.sha256, SFT_NAME),
                           text(info, SFT_INFO)))
    return out


def _value(element: dict[str, Any]) -> tuple[str, str, str]:
    """(OBX-2, OBX-5, OBX-6) of an Observation or component: ("", "", "") when it has no value."""
    if "valueQuantity" in element:
        q = element["valueQuantity"]
        if "comparator" in q:  # "< 0.1" / "> 99.9": a share one decimal would read as none or all, SN "<^0.1" / ">^99.9"
            return "SN", components(text(q["comparator"]), number(q["value"])), _units(q)
        return "NM", number(q["value"]), _units(q)
    if "valueInteger" in element:
        return "NM", number(int(element["valueInteger"])), ""
    if "valueCodeableConcept" in element:
        return "CE", _ce(element["valueCodeableConcept"]), ""
    if "valueBoolean" in element:  # OBX-2: v2.5.1's table 0125 has CE, no CWE
        return "CE", "Y^Yes^HL70136" if element["valueBoolean"] else "N^No^HL70136", ""
    if "valueString" in element:
        return "ST", text(element["valueString"]), ""
    if "valueRange" in element:  # SN: the interval's ends, "^50^-^69"
        low, high = element["valueRange"]["low"], element["valueRange"]["high"]
        return "SN", components("", number(low["value"]), "-", number(high["value"])), _units(low)
    return "", "", ""


class _Message:
    """The segments of one message, numbering OBX (OBX-1) and the notes under each segment (NTE-1)."""

    def __init__(self, report: Report, bundle: dict[str, Any], whole_ids: bool = False) -> None:
        self.report = report
        resources = [e["resource"] for e in bundle["entry"]]
        self.diagnostic = resources[0]
        self.specimen = next(r for r in resources if r["resourceType"] == "Specimen")
        observations = [r for r in resources if r["resourceType"] == "Observation"]
        # the flags' own Observations (bundle._flags) are the flag rows, after the results
        self.flags = [o for o in observations if o["code"]["coding"][0]["system"] == codes.LOCAL_FLAG]
        self.observations = [o for o in observations if o["code"]["coding"][0]["system"] != codes.LOCAL_FLAG]
        self.status = RESULT_STATUS[self.diagnostic["status"]]
        self.effective = dtm(self.diagnostic["effectiveDateTime"])
        self.issued = dtm(self.diagnostic["issued"])
        # OBX-18: the station, then the FHIR Device's own identifier (one station, software and set of models:
        # bundle.device_key), so an LIS (or a v2-to-FHIR mapping) keeps one equipment per configuration, as FHIR
        # does; a run sent with whole ids keeps the station alone, as the LIS received its first message
        device = next(r for r in resources if r["resourceType"] == "Device")
        key = next(i["value"] for i in device["identifier"] if i["system"] == codes.ID_DEVICE)
        self.equipment = components(equipment_id(report.station_id or ""), NAMESPACE) + (
            "" if whole_ids else REPETITION + components(text(key), NAMESPACE))
        # OBX-16 (XCN, its family name part): who verified the run, as OBR-32 names them, on every row of a
        # verified report, the bundle's performer of each Observation; none on a preliminary one
        v = report.verification
        self.observer = components("", text(v.verified_by)) if v is not None else ""
        self.segments: list[str] = []
        self._obx = 0
        self._notes = 0

    def note(self, comment: str) -> None:
        self._notes += 1
        self.segments.append(segment("NTE", str(self._notes), NOTE_SOURCE, text(comment, FT), NOTE_TYPE))

    def obx(self, group: int, concept: str, value: tuple[str, str, str], status: str, abnormal: str = "") -> None:
        self._obx += 1
        self._notes = 0
        kind, shown, units = value
        self.segments.append(segment(
            "OBX", str(self._obx), kind, concept, str(group), shown, units, "", abnormal, "", "", status, "", "",
            self.effective, "", self.observer, "", self.equipment, self.issued))

    def observation(self, group: int, obs: dict[str, Any]) -> None:
        absent = obs.get("dataAbsentReason")
        # OBX-8: the finding's interpretation (a flag saying it is there: sickle cells present AA), as the bundle's
        abnormal = obs["interpretation"][0]["coding"][0]["code"] if "interpretation" in obs else ""
        self.obx(group, _ce(obs["code"]), _value(obs), NO_RESULT if absent else self.status, abnormal)
        if absent:
            reason = absent["coding"][0]
            self.note(f"Not assessable ({reason['code']}): {reason['display']}")
        for annotation in obs.get("note", []):  # too few cells for a differential or for grades, at the result
            self.note(annotation["text"])
        for comp in obs.get("component", []):
            self.obx(group, _ce(comp["code"]), _value(comp), self.status)


def oru_r01(report: Report, addressing: Addressing | None = None, whole_ids: bool = False) -> str:
    """The ORU^R01 message of one report, segments ended by a carriage return (docs/HL7.md). `whole_ids`: ORC-2/3,
    OBR-2/3 and SPM-2 carry the specimen and run ids whole, as smearscope sent them before it kept to their
    lengths, for a run an earlier report of which went so (the archive's index knows: store.whole_ids_run), so
    that the LIS matches its amended report with the one it received."""
    m = _Message(report, report_bundle(report), whole_ids)
    r, v = report, report.verification
    a = addressing or Addressing()
    facility = hd(a.sending_facility) if a.sending_facility else _station_facility(r.station_id or "")
    receiver = hd(a.receiving_application) if a.receiving_application else ""
    receiving_facility = hd(a.receiving_facility) if a.receiving_facility else ""
    run = r.run_id or r.report_id  # a report of no run (the analyzer's) is its own order
    if whole_ids:
        placer, filler_id = text(r.specimen_id or ""), text(run)
    else:
        placer = placer_order_number(r.specimen_id) if r.specimen_id else ""
        filler_id = filler_order_number(run)
    filler = components(filler_id, NAMESPACE)
    m.segments.append(segment(
        "MSH", ENCODING_CHARACTERS, SENDING_APPLICATION, facility, receiver, receiving_facility, m.issued, "",
        "ORU^R01^ORU_R01", control_id(r.report_id, a.processing_id), a.processing_id, VERSION, "", "", "", "", "", CHARSET))
    m.segments += _software(r)
    m.segments.append(segment("ORC", "RE", placer, filler, "", "", "", "", "", m.issued))
    interpreter = subcomponents("", text(v.verified_by)) if v is not None else ""
    m.segments.append(segment(
        "OBR", "1", placer, filler, _ce(m.diagnostic["code"]), "", "", m.effective, *[""] * 14, m.issued, "",
        "HM", m.status, *[""] * 6, interpreter))
    m.note(NOT_FOR_DIAGNOSIS)
    m.note(m.diagnostic["conclusion"])
    if r.specimen_id and placer != text(r.specimen_id):  # shortened: the whole id where no length cuts it
        m.note(f"Specimen id: {r.specimen_id} (ORC-2, OBR-2 and SPM-2 carry {placer}: HL7 v2.5.1 gives a "
               f"placer order number {PLACER_LENGTH} characters)")
    if filler_id != text(run):
        m.note(f"{'Run' if r.run_id else 'Report'} id: {run} (ORC-3, OBR-3 and SPM-2 carry {filler_id}^{NAMESPACE}: "
               f"HL7 v2.5.1 gives a filler order number {FILLER_LENGTH} characters, its namespace included)")
    if r.station_id and equipment_id(r.station_id) != text(r.station_id):
        m.note(f"Station id: {r.station_id} (OBX-18 carries {equipment_id(r.station_id)}^{NAMESPACE} first: HL7 v2.5.1 "
               f"gives an equipment instance identifier {EQUIPMENT_LENGTH} characters, its namespace included)")
    for group, obs in enumerate(m.observations, start=1):
        m.observation(group, obs)
    for group, flag in enumerate(m.flags, start=len(m.observations) + 1):  # critical first, as conclusionCode
        # OBX-8 (table 0078) the flag Observation's interpretation: critical AA, warning A, info empty
        message = text(flag["valueString"])
        abnormal = flag["interpretation"][0]["coding"][0]["code"] if "interpretation" in flag else ""
        m.obx(group, _ce(flag["code"]), ("ST", message, ""), m.status, abnormal)
        if message != text(flag["valueString"], FT):  # cut to ST's length: the whole message in a note
            m.note(flag["valueString"])
    m.segments.append(segment(
        "SPM", "1", components(placer, subcomponents(filler_id, NAMESPACE)),
        "", _specimen_type(m.specimen["type"])))
    return SEGMENT_END.join(m.segments) + SEGMENT_END
