// smearscope dashboard, the run a card shows (dashboard.js shown()): its line (specimen, run, start,
// fields, and whether the figures are interim, final or verified), its progress toward the WBC
// target, the cells counted, the differential with its 95% intervals, the red-cell morphology with
// its ICSH grades, and the flags; a run start_run opened with no field has a line and nothing else.
// Loaded before dashboard.js, whose globals (SIZE_BASED, REPORTED_PRESENT, SEVERITY, brokerUp, el,
// when, specimenOf, startText, shown, current, showCritical) and print.js's and runcontrol.js's
// (renderPrintMeta, renderRunControl) these functions use when called. Text from the broker is only
// ever set with textContent.
"use strict";

// A report from before NRBC were counted apart (schema 1.0) lists erythroblasts as a row of its
// differential, among counts.wbc, and has no counts.nrbc: they are nucleated red cells, per 100 of
// the other white cells (service.fhir.report_view.nrbc_per_100_wbc, as the FHIR export reads them).
const NRBC_LABEL = "erythroblast";

// A share or NRBC per 100 WBC as read: to one decimal ("53.6", "0.0"), where
// the report keeps two for audit; as Python formats it for `smearscope analyze` (an exact tie, 96.25,
// goes to the even digit, 96.2, where toFixed would go up).
function tenth(value) {
  const v = Number(value);
  if (Number.isInteger(v * 4) && !Number.isInteger(v * 2)) {  // x.25 or x.75, exactly
    const down = Math.floor(v * 10);
    return ((down % 2 === 0 ? down : down + 1) / 10).toFixed(1);
  }
  return v.toFixed(1);
}

// A share of `count` cells of `of` as read (service.fhir.report_view.share_read, as FHIR and HL7 send it and
// `smearscope analyze` prints it): tenth(), but where one decimal would say none or all, some cell's share that
// reads 0.0 is "<0.1" ("0.0" beside a count of 1 reads as none seen) and one that reads 100.0 with not every cell
// of that type (9999 of 10 000) ">99.9". `of` absent (NRBC per 100 WBC, which may pass 100): the first alone.
function shareText(percent, count, of) {
  const shown = tenth(percent);
  if (count > 0 && shown === "0.0") return "<0.1";
  if (of != null && count < of && Number(shown) >= 100) return ">99.9";
  return shown;
}

// A 95 % interval as read: its bounds to one decimal rounded outward, the lower down and the upper up
// (service.fhir.report_view.interval_shown, as FHIR, HL7 and `smearscope analyze` send and print it): 0 of
// 10 000 red cells (0 to 0.04 %) reads 0.0–0.1, never 0.0–0.0, a certainty the count does not have. The
// report's two decimals are read to a millionth first, so 0.3 stays 0.3 (0.3 * 10 is 3.0000000000000004).
function intervalText(low, high) {
  const tenths = (v) => Number((Number(v) * 10).toFixed(6));
  return (Math.floor(tenths(low)) / 10).toFixed(1) + "–" + (Math.ceil(tenths(high)) / 10).toFixed(1);
}

// Where the run's scale came from and, at a calibrated one, its red cells' size (report.rbc_size), as
// `smearscope analyze` prints it: a run at an estimated scale read like a calibrated one but for a
// grey info flag. The CV is of diameters, about half an analyzer's RDW-CV (whose range does not apply).
function sizeText(r) {
  const s = r.rbc_size || {}, flagged = (code) => r.flags.some((f) => f.code === code);
  const unread = "red-cell sizes, microcytes, macrocytes and spherocytes";
  if (flagged("calibration_suspect") || flagged("calibration_drift_suspected") || flagged("rbc_size_implausible"))
    return "Scale: calibrated, in doubt (see the flags): " + unread + " not read";
  if (flagged("size_not_assessable_without_calibration") || (s.calibrated === false && r.counts.rbc > 0))
    return "Scale: estimated from the red cells (not calibrated): " + unread + " not assessable";
  if (!r.counts.rbc) return "";
  const scale = flagged("sizes_from_calibrated_fields_only")
    ? "Scale: calibrated on some fields, estimated on others (sizes from the calibrated fields' red cells)"
    : "Scale: calibrated";
  if (!s.n || typeof s.mean_diameter_um !== "number") return scale + "; no whole red cell to size";
  const um = (v) => typeof v === "number" ? tenth(v) + " µm" : "–";  // 7.250 reads 7.2, as analyze prints it
  return scale + " · red-cell diameter mean " + um(s.mean_diameter_um) + ", SD " + um(s.sd_um) + ", median " +
    um(s.median_diameter_um) + ", " + s.n + " cells sized" +
    (typeof s.cv_percent === "number" ? "; CV of diameters " + tenth(s.cv_percent) + " % (not an RDW)" : "");
}

// A verified report's cells sent to review, in the one wording every view of it uses (the run's line,
// its review line, the printed status, Verify's answer; `smearscope analyze`, FHIR and HL7 say the
// same: service.fhir.report_view.left_as_called and verified_review): "3 cells left as the analyzer
// called them", never "await review", which would read as cells still waiting on a signed report.
function leftAsCalled(n) {
  return n === 1 ? n + " cell left as the analyzer called it" : n + " cells left as the analyzer called them";
}

function verifiedReview(r) {
  const v = r.verification, rv = r.review;
  const num = (x) => (typeof x === "number" ? x : 0);
  const left = num(v.left_to_review), typed = num(v.typed_cells);
  // the reasons where the report's review counts the same cells the signature left
  const reasons = rv && typeof rv === "object" && num(rv.cells) === left ? reviewReasons(rv) : "";
  const text = left ? leftAsCalled(left) + (reasons ? " (" + reasons + ")" : "")
    : typed ? "every cell sent to review was typed" : "no cell was sent to review";
  return text + (typed ? "; " + typed + " typed by a technician" : "");
}

// What the cells awaiting review are, reason by reason (service.fhir.report_view.review_reasons).
function reviewReasons(rv) {
  const n = (k) => (typeof rv[k] === "number" ? rv[k] : 0);
  const plural = (k, what) => k + " " + what + (k === 1 ? "" : "s");
  return [[n("wbc_unidentified"), "white cell", " unidentified"], [n("wbc_atypical"), "white cell", " atypical"],
          [n("wbc_rare"), "white cell", " of a rare class (ig)"], [n("nrbc"), "nucleated red cell", ""],
          [n("rbc_unidentified"), "red cell", " unidentified"],
          [n("rbc_flagged"), "red cell", " called sickle or schistocyte"]]
    .filter(([k]) => k).map(([k, what, how]) => plural(k, what) + how).join(", ");
}

// The line below a run's figures, as `smearscope analyze` prints it (service.fhir.report_view.review_line):
// a verified report's cells left and typed (verifiedReview); else the cells awaiting a technician's
// review (report.review, schema 1.4) and why, "Preliminary: 41 white cells and 3 red cells await
// review (...)" ("Interim" while the run is open). An older report counted none: "not counted", never 0.
function reviewText(r, final) {
  if (r.verification) return "Verified: " + verifiedReview(r);
  const rv = r.review;
  if (!rv || typeof rv !== "object") {
    return "Cells awaiting review: not counted (report schema " + (r.schema_version || "unknown") + ")";
  }
  const n = (k) => (typeof rv[k] === "number" ? rv[k] : 0);
  const plural = (k, what) => k + " " + what + (k === 1 ? "" : "s");
  const named = [[n("wbc_unidentified") + n("wbc_atypical") + n("wbc_rare"), "white cell"],
                 [n("nrbc"), "nucleated red cell"], [n("rbc_unidentified") + n("rbc_flagged"), "red cell"]]
    .filter(([k]) => k).map(([k, what]) => plural(k, what));
  const listed = named.length > 1 ? named.slice(0, -1).join(", ") + " and " + named[named.length - 1] : named[0];
  const text = named.length ? listed + (n("cells") === 1 ? " awaits review" : " await review") : "no cell awaits review";
  const reasons = reviewReasons(rv);
  return (final ? "Preliminary" : "Interim") + ": " + text + (reasons ? " (" + reasons + ")" : "");
}

function renderRun(st) {
  const view = shown(st);
  const line = st.node.querySelector(".run-line");
  const tbody = st.node.querySelector(".differential tbody");
  const morph = st.node.querySelector(".morphology tbody");
  const flags = st.node.querySelector(".flags");
  tbody.replaceChildren(); morph.replaceChildren(); flags.replaceChildren();
  st.node.querySelector(".counts").textContent = "";
  st.node.querySelector(".counts-line").hidden = !view;
  const reviewLine = st.node.querySelector(".review-line");
  reviewLine.textContent = view && view.report ? reviewText(view.report, view.final) : "";
  reviewLine.hidden = !reviewLine.textContent;
  const sizeLine = st.node.querySelector(".size-line");
  sizeLine.textContent = view && view.report ? sizeText(view.report) : "";
  sizeLine.hidden = !sizeLine.textContent;
  // too few cells for a differential or for grades: the flag's words above the table they concern
  // (an info flag at the foot of the other column let "neutrophil 8.8 %" of 11 cells read as a result)
  const fewFlag = (code) => (view && view.report ? view.report.flags : []).find((f) => f.code === code);
  const fewNote = (cls, code, before, after) => {
    const node = st.node.querySelector(cls), f = fewFlag(code);
    node.replaceChildren(...(f ? [before, iso(f.message), after] : []));
    node.hidden = !f;
  };
  fewNote(".diff-note", "too_few_wbc_for_differential", "Not a differential: ", ". Read each share with its 95 % interval.");
  fewNote(".morph-note", "too_few_rbc_for_morphology", "Grades on few red cells: ", ".");
  // the current run's critical flags stay said while an earlier run is shown
  const now = view && view.earlier ? current(st) : null;
  showCritical(st, view && view.report ? view.report.flags : [],
               now && now.report && now.runId !== view.runId ? now.report.flags : []);
  renderPrintMeta(st, view && view.report ? view : null);  // a run with no field has nothing to print
  renderRunControl(st);
  if (!view) { line.textContent = "no specimen run yet"; st.node.querySelector(".verify").hidden = true; return; }
  const r = view.report;
  st.node.dataset.runId = view.runId || "";
  st.node.dataset.shown = !r ? "none" : view.final ? "final" : "interim";
  const started = startText(view.started);
  st.node.dataset.startedAt = view.started && typeof view.started.started_at === "number" ? view.started.started_at : "";
  const specimen = specimenOf(r, view.started);
  st.node.dataset.specimen = specimen;
  // the run line's opening, with or without fields: its specimen, run and start
  const head = [...(specimen ? ["specimen ", iso(specimen), " · "] : []),
    (view.earlier ? "earlier run " : "run ") + (view.runId || "-").slice(0, 8) + " · " + (started ? started + " · " : "")];
  const halted = !view.final && brokerUp && st.status === "offline";
  st.node.dataset.halted = halted ? "true" : "false";
  if (!r) { renderRunWithoutFields(st, view, head, halted); return; }
  const v = r.verification;
  line.replaceChildren(...head, r.fields_analyzed + (r.fields_analyzed === 1 ? " field · " : " fields · "),
    ...(view.final ? (v ? ["verified specimen report (verified by ", iso(v.verified_by), ", " + when(v.verified_at) +
                           (v.left_to_review ? "; " + leftAsCalled(v.left_to_review) : "") +
                           (v.supersedes_verified_by ? "; corrected: replaces the report " : ""),
                           ...(v.supersedes_verified_by ? [iso(v.supersedes_verified_by), " signed " +
                             (typeof v.supersedes_verified_at === "number" ? when(v.supersedes_verified_at) : "before")] : []),
                           ")"]
                        : ["final specimen report (preliminary, needs review)"])
      : [halted ? "halted: the station went offline (the run goes on if it restarts within its idle timeout)"
         : "in progress (" + (view.state || "open") + ")"]),
    // an open run's figures are as of its last state: a run that stopped moving shows it
    !view.final && typeof view.updated === "number" ? " · last update " + when(view.updated) : "");
  st.node.dataset.verifiedBy = r.verification ? r.verification.verified_by : "";
  st.node.querySelector(".verify").hidden = !view.final;
  st.node.querySelector(".verify-run").textContent = r.verification ? "Sign again" : "Verify run";
  st.node.querySelector(".diff-source").textContent =
    view.final ? (r.verification ? "verified" : "final, preliminary (not verified)") : "interim";
  const p = view.progress;
  const bar = st.node.querySelector(".progress-bar");
  const text = st.node.querySelector(".progress-text");
  if (p) {
    bar.style.width = Math.min(100, 100 * p.classified_wbc / Math.max(1, p.target_wbc)) + "%";
    text.textContent = p.classified_wbc + " / " + p.target_wbc + " WBC classified";
  } else {
    bar.style.width = "0%";  // no target to measure against (an earlier run, or a report alone)
    text.textContent = r.counts.wbc + " WBC";
  }
  const c = r.counts;  // what a count reads beside the differential: cells counted, NRBC per 100 WBC
  const older = !c.nrbc && r.nrbc_per_100_wbc == null ? r.wbc_differential.find((s) => s.label === NRBC_LABEL) : null;
  const among = older && older.count ? older.count : 0, others = c.wbc - among;
  st.node.querySelector(".counts").textContent = "RBC " + c.rbc + " · WBC " + c.wbc + " · platelets " + c.platelet +
    // none is a count too, where the report counted them (nrbc_per_100_wbc; an older report's has none)
    (c.nrbc || typeof r.nrbc_per_100_wbc === "number"
     ? " · NRBC " + c.nrbc + (r.nrbc_per_100_wbc != null ? " (" + shareText(r.nrbc_per_100_wbc, c.nrbc) + " per 100 WBC)" : "")
     : among ? " · NRBC " + among + " (" + (others > 0 ? shareText(100 * among / others, among) + " per 100 WBC; " : "") +
       "this older report counts them among the " + c.wbc + " WBC)" : "");
  const ofWbc = r.wbc_differential.reduce((n, s) => n + s.count, 0);  // report_view.differential_of: what its shares are of
  for (const s of r.wbc_differential) {
    const tr = el("tr");
    tr.dataset.label = s.label;
    tr.append(el("td", "label", s.label + (s.label === NRBC_LABEL ? " (NRBC, not a white cell)" : "")),
              el("td", "count", String(s.count)), el("td", "percent", shareText(s.percent, s.count, ofWbc)));
    const hasCi = s.ci95_low !== null && s.ci95_high !== null;
    tr.append(el("td", "ci95", hasCi ? intervalText(s.ci95_low, s.ci95_high) : "–"));
    const cell = el("td", "bar"), ci = el("div", "ci"), point = el("div", "point"), interval = el("div", "interval");
    point.style.width = s.percent + "%";
    if (hasCi) { interval.style.left = s.ci95_low + "%"; interval.style.width = (s.ci95_high - s.ci95_low) + "%"; }
    ci.append(point, interval); cell.append(ci); tr.append(cell);
    tbody.append(tr);
  }
  const grades = view.grades || {};
  // a calibration in doubt (flags rbc_size_implausible, calibration_suspect): size-based grades not read
  const sizesOff = r.flags.some((f) => ["rbc_size_implausible", "calibration_suspect",
    "calibration_drift_suspected"].includes(f.code));
  // sizes unread (also at an estimated scale): every size-based class is a row, not assessable; a
  // report from before each was listed has none for a class no cell was given (service.fhir.
  // report_view.morphology_rows), which would read as "none seen"
  const sizesUnread = sizesOff || r.flags.some((f) => f.code === "size_not_assessable_without_calibration");
  const listed = new Set(r.rbc_morphology.map((s) => s.label));
  const missing = sizesUnread ? SIZE_BASED.filter((l) => !listed.has(l)).sort()
    .map((label) => ({ label, count: 0, percent: 0, assessable: false })) : [];
  for (const s of [...r.rbc_morphology, ...missing]) {
    const tr = el("tr");
    tr.dataset.label = s.label;
    // ICSH's "none" is a share below its 1+ threshold, not an absence: said so beside a count; a
    // grade whose 95% interval spans others (few red cells: 2 schistocytes of 91 read 3+) shows it.
    // Sickle cells are reported present or none, never graded (a report from when they were
    // graded reads "present" for its 1+ to 3+), with no interval's grades.
    const presence = REPORTED_PRESENT.includes(s.label);
    const shown = (g) => g === "none" ? (presence ? "none" : "below 1+") : g;
    // a row the report marks not assessable (red cells too blurred to judge, flag rbc_morphology_out_of_focus)
    let grade = (sizesOff && SIZE_BASED.includes(s.label)) || s.assessable === false ? "not assessable"
      : s.grade || grades[s.label] || "";
    if (presence && grade && grade !== "none" && grade !== "not assessable") grade = "present";
    const spans = !presence && grade !== "not assessable" && grade && s.grade_ci_low && s.grade_ci_high &&
      s.grade_ci_low !== s.grade_ci_high;
    const off = grade === "not assessable";  // its count and share are placeholders: not shown as 0
    // a sickle or schistocyte grade rests on the calls at its flag's confidence (graded_count),
    // fewer than the count beside it: "4.0 %, 1+" would read as a grade below its own share
    const sure = !off && grade && s.graded_count != null
      ? " on " + s.graded_count + " of " + s.count + " calls at its flag's confidence" : "";
    // a share of fewer red cells than the run counted (of_cells: a mixed run's size-based classes are
    // of its calibrated fields' red cells, every row of its sharp fields' when some were blurred) says so
    const of = s.of_cells != null && s.of_cells !== c.rbc ? " of " + s.of_cells + " RBC" : "";
    tr.append(el("td", "label", s.label), el("td", "count", off ? "–" : String(s.count)),
              el("td", "percent", off ? "–" : shareText(s.percent, s.count, s.of_cells || c.rbc) + of),
              el("td", "grade", shown(grade) + (spans ? " (" + shown(s.grade_ci_low) + " to " +
                                                 shown(s.grade_ci_high) + ")" : "") + sure));
    morph.append(tr);
  }
  const sorted = [...r.flags].sort((a, b) => SEVERITY[a.severity] - SEVERITY[b.severity]);
  for (const f of sorted) {
    const li = el("li", "flag " + f.severity);
    li.dataset.code = f.code;
    li.append(el("strong", "", f.severity + ": "), iso(f.message));
    flags.append(li);
  }
}

// A run start_run opened, with no field yet (open) or none at all (closed): its state carries no
// report (docs/MQTT.md): said so, with its target, and nothing to sign or print.
function renderRunWithoutFields(st, view, head, halted) {
  const p = view.progress || {};
  st.node.querySelector(".run-line").replaceChildren(...head, view.final
    ? "closed (" + (view.endReason || "ended") + ") before any field: no report"
    : halted ? "no field yet; halted: the station went offline" : "open, no field yet");
  st.node.dataset.verifiedBy = "";
  st.node.querySelector(".verify").hidden = true;
  st.node.querySelector(".counts-line").hidden = true;
  st.node.querySelector(".diff-source").textContent = "";
  st.node.querySelector(".progress-bar").style.width = "0%";
  st.node.querySelector(".progress-text").textContent = typeof p.target_wbc === "number" ? "0 / " + p.target_wbc + " WBC classified" : "";
}
