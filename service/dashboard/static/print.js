// smearscope dashboard, a run's report on paper: "Print report" prints the run its card shows (the
// current one or an earlier one picked from the list) alone; the browser's own print (Ctrl+P) prints
// every station's, one per page. On paper a card reads as a report: what state the figures are in
// (interim, preliminary or verified, and by whom), the station, run and report ids, the models that
// made it and when it was printed; the page's live parts (status, telemetry, the latest field, the
// review gallery, buttons) are left off (dashboard.css, @media print). Loaded before dashboard.js,
// whose globals (stations, el, when, specimenOf) these functions use when called. Text from the broker is only
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
  status.textContent = !view.final
    ? "INTERIM: the run is in progress (" + r.fields_analyzed + (r.fields_analyzed === 1 ? " field" : " fields") +
      " so far); its figures will change. Not a result."
    : v ? "Verified specimen report: verified by " + v.verified_by + ", " + when(v.verified_at) + "." +
          (v.left_to_review ? " " + v.left_to_review + " cells sent to review were signed as the analyzer called them." : "")
    : "PRELIMINARY machine result, not verified: every result needs review by a qualified person.";
  const specimen = specimenOf(r, view.started);
  ids.textContent = (specimen ? "Specimen " + specimen + " · " : "") + "Station " + st.id + " · run " + (view.runId || "-") + " · report " + (r.report_id || "-") +
    (typeof r.created_at === "number" ? " of " + when(r.created_at) : "");
  const names = r.models && typeof r.models === "object" ? Object.keys(r.models).sort() : [];
  models.textContent = names.length ? "Models: " + names.map((n) => {
    const m = r.models[n] || {};
    return n + " " + String(m.sha256 || "?").slice(0, 12) + (m.backend ? " (" + m.backend + ")" : "");
  }).join(" · ") : "";
}

function stampPrinted() {
  for (const st of stations.values()) st.node.querySelector(".printed-at").textContent = "Printed " + when(Date.now() / 1000);
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
