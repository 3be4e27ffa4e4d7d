// smearscope dashboard: the page's header lists of stations that need someone (a critical finding,
// one station id used by two stations, offline, not heard from, a camera not giving frames, reports
// held at the station), a card's critical alert, and the header's height kept for scrolling. Loaded
// before dashboard.js, whose stations, el, iso, isoText and byId these use when called.
"use strict";

// A critical flag (sickle cells) of the run shown cannot be missed: said above the card's tables,
// the card outlined, and the station named in the page's header (a card may be scrolled away).
function showCritical(st, flags, currentFlags) {
  const critical = [...flags.filter((f) => f.severity === "critical").map((f) => [f, "CRITICAL: "]),
                    ...currentFlags.filter((f) => f.severity === "critical").map((f) => [f, "CRITICAL (current run): "])];
  const alert = st.node.querySelector(".critical-alert");
  alert.replaceChildren(...critical.map(([f, what]) => {
    const p = el("p", "", what);
    p.append(iso(f.message));
    p.dataset.code = f.code;
    p.dataset.run = currentFlags.includes(f) ? "current" : "shown";  // another run's: not on this run's paper
    return p;
  }));
  alert.hidden = critical.length === 0;
  alert.dataset.shownRun = critical.some(([f]) => !currentFlags.includes(f)) ? "critical" : "none";
  st.node.dataset.critical = critical.length ? "true" : "false";
  renderAttention();
}

// The page's header names the stations that need someone: a critical finding, and a station id that
// two stations publish under (telemetry.js); a click scrolls to the card.
function renderAttention() {
  const named = (id, what, mark) => {
    const summary = document.getElementById(id);
    const flagged = [...stations.values()].filter((s) => s.node.dataset[mark] === "true")
      .sort((a, b) => byId(a.id, b.id));  // in the cards' order
    summary.replaceChildren(document.createTextNode(what), ...flagged.map((s) => {
      const b = el("button");
      b.type = "button";
      b.append(iso(s.id));
      b.addEventListener("click", () => s.node.scrollIntoView({ block: "start" }));
      return b;
    }));
    summary.hidden = flagged.length === 0;
    return flagged;
  };
  const flagged = named("critical", "critical finding: ", "critical");
  named("clash", "one station id, two stations: ", "clash");
  named("offline", "offline: ", "offline");
  named("silent", "not heard from: ", "silent");
  named("camera", "camera not giving frames: ", "camera");
  named("parked", "reports held at the station: ", "parked");
  named("calibration", "calibration drift suspected: ", "calibration");
  fitHeader();
  // ... and in the tab's title, for a page in a background tab
  document.title = (flagged.length ? "CRITICAL: " + flagged.map((s) => isoText(s.id)).join(", ") + " · " : "") + "smearscope: stations";
}

// The header wraps when it names many, and when the scanner's note (runcontrol.js) or a narrower
// window makes it taller: a card scrolled to, or a control the focus reaches, stops below it
// (dashboard.css, --header-height).
function fitHeader() {
  const header = document.querySelector("header");
  document.documentElement.style.setProperty("--header-height", header.offsetHeight + 8 + "px");
}
new ResizeObserver(fitHeader).observe(document.querySelector("header"));

// A card's mark the header lists (renderAttention), set and the header redrawn when it changes.
function marked(st, mark, on) {
  if ((st.node.dataset[mark] === "true") === on) return;
  st.node.dataset[mark] = on ? "true" : "false";
  renderAttention();
}
