// smearscope dashboard, a run's report on paper: "Print report" prints the run its card shows (the
// current one or an earlier one picked from the list) alone; the browser's own print (Ctrl+P) prints
// every station's, one per page. On paper a card reads as a report: what state the figures are in
// (interim, preliminary, verified or corrected, by whom, and what the technician typed), the station, run and report ids, the models that
// made it and when it was printed; the page's live parts (status, telemetry, the latest field, the
// review gallery, buttons) are left off (dashboard.css, @media print). Loaded before dashboard.js,
// whose globals (stations, el, iso, isoText, when, specimenOf, shown) and runview.js's (leftAsCalled) these functions use when called. Text from the broker is only
// ever set with textContent.
"use strict";

// What a card prints above its tables, from the report it shows (`view`: dashboard.js shown()).
function renderPrintMeta(st, view) {
  const status = st.node.querySelector(".print-status");
  const ids = st.node.querySelector(".print-ids");
  const models = st.node.querySelector(".print-models");
  st.node.querySelector(".print-run").hidden = !view;
  if (!view) { status.textContent = ids.textContent = models.textContent = ""; return; }
  const r = view.report, v = r.verification;
  status.dataset.state = !view.final ? "interim" : v ? "verified" : "preliminary";
  status.replaceChildren(...(!view.final
    ? ["INTERIM: the run is in progress (" + r.fields_analyzed + (r.fields_analyzed === 1 ? " field" : " fields") +
       " so far); its figures will change. Not a result."]
    : v ? [...(v.supersedes_verified_by
             ? ["CORRECTED specimen report: replaces the report ", iso(v.supersedes_verified_by), " signed " +
                (typeof v.supersedes_verified_at === "number" ? when(v.supersedes_verified_at) : "before") + ". Verified by "]
             : ["Verified specimen report: verified by "]),
           iso(v.verified_by), ", " + when(v.verified_at) + "." + typedText(v, r.counts) +
           (v.left_to_review ? " " + leftAsCalled(v.left_to_review) + "." : "")]
    : ["PRELIMINARY machine result, not verified: every result needs review by a qualified person."]));
  const specimen = specimenOf(r, view.started);
  // a report for the patient's file that names no specimen says so, not only by leaving it out
  ids.replaceChildren(...(specimen ? ["Specimen ", iso(specimen), " · "]
    : ["Specimen: none given (the run was not started for a specimen id) · "]), "Station ", iso(st.id),
    " · run " + (view.runId || "-") + " · report " + (r.report_id || "-") +
    (typeof r.created_at === "number" ? " of " + when(r.created_at) : ""));
  const names = r.models && typeof r.models === "object" ? Object.keys(r.models).sort() : [];
  // the software that analysed it (schema 1.5's analysis_software, else 1.2's software_version; none from an older
  // station's), and the version that signed it where another (a run verified after the station was updated)
  const made = typeof r.software_version === "string" ? r.software_version : "";
  const analysed = Array.isArray(r.analysis_software) && r.analysis_software.length ? r.analysis_software.map(String)
    : made ? [made] : [];
  // fields stored by a version that recorded none ("(not recorded)") said in words, as the FHIR Device note and the
  // HL7 SFT say them (service/fhir/bundle.py software_text)
  const known = analysed.filter((v) => v !== "(not recorded)");
  const unrecorded = known.length === analysed.length ? ""
    : known.length ? " (some fields by an earlier version that did not record its number)"
      : " (an earlier version that did not record its number)";
  const software = analysed.length ? "smearscope" + (known.length ? " " + known.join(" and ") : "") + unrecorded +
    (r.verification && made && !analysed.includes(made) ? " (verified with smearscope " + made + ")" : "") : "";
  models.textContent = [software, names.length ? "Models: " + names.map((n) => {
    const m = r.models[n] || {};
    // its calibration apart from its file (the same file recalibrated types cells otherwise), and the
    // WBC head's adaptation to this station (adapt-wbc, calibrate-atypical)
    return n + " " + String(m.sha256 || "?").slice(0, 12) + (m.backend ? " (" + m.backend + ")" : "") +
      (typeof m.manifest_sha256 === "string" ? ", calibration " + m.manifest_sha256.slice(0, 12) : "") +
      (m.station_means ? ", this station's class means " + String(m.station_means.sha256 || "?").slice(0, 12) +
       " (adapt-wbc)" : "") +
      (m.open_set_thresholds ? ", this station's open-set thresholds (calibrate-atypical)" : "");
  }).join(" · ") : ""].filter(Boolean).join(" · ");
}

// What the technician changed before signing (verification.typed_cells, reclassified; counts.artefact:
// objects typed as no cell, in no count), so a verified report's figures are read as theirs.
function typedText(v, counts) {
  const typed = v.typed_cells || 0, changed = Array.isArray(v.reclassified) ? v.reclassified.length : 0;
  const artefacts = (counts && counts.artefact) || 0;
  const parts = [typed ? "The technician typed " + typed + (typed === 1 ? " cell" : " cells") +
                   (changed ? ", " + changed + (typed === 1 ? " of it" : " of them") + " otherwise than the analyzer" : "")
                 : "The technician typed no cell"];
  if (artefacts) parts.push(artefacts + (artefacts === 1 ? " object typed as no cell (artefact) is" :
                                          " objects typed as no cell (artefact) are") + " in no count");
  return " " + parts.join("; ") + ".";
}

function stampPrinted() {
  for (const st of stations.values()) st.node.querySelector(".printed-at").textContent = "Printed " + when(Date.now() / 1000);
  pageFooters();
}

// A CSS string of any text: quotes, backslashes and control characters escaped.
function cssString(text) {
  return '"' + String(text).replace(/[\\"\u0000-\u001f\u007f]/g, (c) => "\\" + c.charCodeAt(0).toString(16) + " ") + '"';
}

// Every printed page names its specimen, station and run at its foot, and says which page of how
// many: a report's second page, apart from its first, was matched to its specimen by nothing. Each
// card prints on a page of its own name (CSS named pages), whose margin boxes say so; rules set
// through the CSSOM, which the page's Content-Security-Policy allows (no inline style).
function pageFooters() {
  const sheet = [...document.styleSheets].find((s) => s.href && s.href.endsWith("/dashboard.css"));
  if (!sheet) return;
  for (let i = sheet.cssRules.length - 1; i >= 0; i--) {
    const rule = sheet.cssRules[i];
    if (rule instanceof CSSPageRule && rule.selectorText.startsWith("station-")) sheet.deleteRule(i);
  }
  let n = 0;
  for (const st of stations.values()) {
    const name = "station-" + n++, view = shown(st);
    st.node.style.page = name;
    const specimen = view ? specimenOf(view.report, view.started) : "";
    const foot = (specimen ? "Specimen " + isoText(specimen) + " · " : "") + "station " + isoText(st.id) +
      (view ? " · run " + (view.runId || "-") : "");
    sheet.insertRule("@page " + name + " { @bottom-left { content: " + cssString(foot) + "; font: 8pt system-ui, sans-serif; }" +
      " @bottom-right { content: \"page \" counter(page) \" of \" counter(pages); font: 8pt system-ui, sans-serif; } }",
      sheet.cssRules.length);
  }
}

function printRun(st) {
  stampPrinted();
  document.body.dataset.printing = st.id;
  for (const s of stations.values()) s.node.classList.toggle("print-target", s === st);
  window.print();
}

// Whatever starts the printing (the button, Ctrl+P, the browser's menu), the paper says when.
window.addEventListener("beforeprint", stampPrinted);
window.addEventListener("afterprint", () => {
  delete document.body.dataset.printing;
  for (const st of stations.values()) st.node.classList.remove("print-target");
});
