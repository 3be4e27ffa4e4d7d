// smearscope dashboard: every station's status, open run, differential, morphology, flags (runview.js),
// telemetry (telemetry.js), review gallery (review.js) and the header's lists of stations that need
// someone (header.js), straight from the broker over MQTT over WebSockets (MQTT.js).
// No build step. Text from the broker is only ever set with textContent, and where it stands among
// other words, isolated (iso, isoText).
"use strict";

const SIZE_BASED = ["microcyte", "macrocyte", "spherocyte"];  // service.analysis.morphology.SIZE_BASED
const REPORTED_PRESENT = ["sickle"];  // service.analysis.morphology.REPORTED_PRESENT: never 1+ to 3+
const SEVERITY = { critical: 0, warning: 1, info: 2 };
const stations = new Map();
let client = null;
let prefix = "smearscope";
let brokerUp = false;
let runControl = false;  // config.json's runControl: `smearscope dashboard --run-control`
// Command answers reach every page subscribed to the station: each request this page sends carries
// MQTT 5 correlation data starting with this page's token, and only answers carrying it (or none,
// from a station speaking MQTT 3.1.1) change what this page shows.
const pageToken = "dashboard-" + Math.random().toString(16).slice(2, 10) + "-";
let requestSeq = 0;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// A string a person or a station gave (a specimen id, a station id, a signer's name, a flag's or a
// cell type's text) set apart from the words around it: <bdi dir=auto> takes its direction from its
// own first letter and keeps the line's order, so an Arabic or Hebrew one never carries the text
// after it along ("verified by <Hebrew name>, <date>" showed the date before the name).
function iso(text) {
  const b = el("bdi", "", String(text));
  b.dir = "auto";
  return b;
}

// The same where only plain text goes (a list's option, the tab's title, a printed page's foot):
// between FIRST STRONG ISOLATE and POP DIRECTIONAL ISOLATE.
function isoText(text) {
  return "\u2068" + String(text) + "\u2069";
}

// A time as the page's reader reads it: their local date and time with its zone named
// ("2026-12-06 22:50:13 GMT+1"), never a bare clock time that could be the station's or UTC.
function when(seconds) {
  const d = new Date(seconds * 1000);
  const two = (n) => String(n).padStart(2, "0");
  const zone = new Intl.DateTimeFormat("en-US", { timeZoneName: "short" }).formatToParts(d)
    .find((part) => part.type === "timeZoneName");
  return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " + two(d.getHours()) + ":" +
    two(d.getMinutes()) + ":" + two(d.getSeconds()) + (zone ? " " + zone.value : "");
}

// The lab's identifier of the specimen the run was started for (start_run's specimen_id), from its
// report or its progress; "" for none (a run started by its first field, or an older station's).
function specimenOf(report, progress) {
  const id = (report && report.specimen_id) || (progress && progress.specimen_id);
  return typeof id === "string" ? id : "";
}

// When the run started and what started it (progress.started_at/started_by: every run state and
// get_runs entry since they carry them; none from an older station's).
function startText(progress) {
  if (!progress || typeof progress.started_at !== "number") return "";
  return "started " + when(progress.started_at) + (progress.started_by === "command" ? " by start_run"
    : progress.started_by === "auto" ? " with its first field" : "");
}

function setBroker(state, detail) {
  const b = document.getElementById("broker");
  b.className = "badge " + state;
  b.dataset.state = state;
  b.textContent = "broker: " + state + (detail ? " (" + detail + ")" : "");
  const up = state === "connected";
  if (up !== brokerUp) {
    brokerUp = up;  // without the broker no station's status is known (its retained one comes again)
    for (const st of stations.values()) renderStatus(st);
  }
}

// `refused(err)`: the broker refused the command (MQTT 5 PUBACK reason code, e.g. not authorised
// by the dashboard account's ACL).
function sendCommand(st, name, body, refused) {
  const correlation = pageToken + ++requestSeq;
  client.publish(prefix + "/" + st.id + "/cmd/" + name, JSON.stringify(body),
                 { qos: 1, properties: { correlationData: correlation } }, (err) => { if (err && refused) refused(err); });
  return correlation;
}

// The cards' order: by station id, its numbers as numbers (scope-2 before scope-10).
const idOrder = new Intl.Collator("en", { numeric: true });
function byId(a, b) {
  return idOrder.compare(a, b) || (a < b ? -1 : a > b ? 1 : 0);
}

function station(id) {
  let st = stations.get(id);
  if (st) return st;
  const node = document.getElementById("station-template").content.firstElementChild.cloneNode(true);
  node.dataset.station = id;
  node.querySelector(".station-id").replaceChildren(iso(id));
  // a screen reader names each card's form with its station (every card's reads the same otherwise)
  node.querySelector(".run-control").setAttribute("aria-label", "run on station " + id);
  node.querySelector(".specimen-id").setAttribute("aria-label", "specimen id for a run on station " + id);
  node.querySelector(".verify").setAttribute("aria-label", "verify the run shown of station " + id);
  node.querySelector(".more").addEventListener("click", () => {
    if (st.status !== "online") {  // a get_review sent now is lost: the button would never come back
      node.querySelector(".review-note").textContent = "the station is " + (st.status || "not known to be online") +
        ": its other crops come when it is back";
      return;
    }
    node.querySelector(".review-note").textContent = "";
    st.reviewPages = (st.reviewPages || 1) + 1;  // kept when a new field refreshes the gallery
    node.querySelector(".more").hidden = true;  // until that page is in
    requestReview(st, st.reviewNext);
  });
  node.querySelector(".verify-run").addEventListener("click", () => verifyRun(st));
  node.querySelector(".print-run").addEventListener("click", () => printRun(st));
  node.querySelector(".start-run").addEventListener("click", () => startRun(st));
  node.querySelector(".stop-run").addEventListener("click", () => stopRun(st));
  // armed only while it keeps the focus: a scanner adding Tab and Enter to each label armed it with
  // one scan and confirmed it with the next
  node.querySelector(".stop-run").addEventListener("blur", () => disarmStop(st));
  node.querySelector(".specimen-id").addEventListener("keydown", (ev) => { if (ev.key === "Enter") startRun(st); });
  node.querySelector(".runs").addEventListener("change", (ev) => pickRun(st, ev.target.value));
  document.getElementById("empty")?.remove();
  const main = document.getElementById("stations");
  const after = [...main.children].find((n) => n.dataset.station && byId(n.dataset.station, id) > 0);
  main.insertBefore(node, after || null);
  st = { id, node, status: null, run: null, final: null, telemetry: null, reviewRun: null,
         reviewShown: -1, reviewNext: null, reviewTimer: null, reviewAsk: null, superseded: new Set(),
         runs: [], pinned: null };
  stations.set(id, st);
  return st;
}

function olderThanRun(st, body) {
  // The run's retained state already holds a verified report of this run: a report delivered again
  // (at least once) that is unverified, or verified earlier, does not replace it on a page opened
  // after the signing (which never saw the signed report's own message).
  const held = st.run && st.run.run_id === body.run_id ? st.run.report : null;
  const v = held && held.verification;
  if (!v || held.report_id === body.report_id) return false;
  return !body.verification || body.verification.verified_at < v.verified_at;
}

function shown(st) {
  // An earlier closed run the user picked (the station's get_runs), else the station's current run.
  if (st.pinned) {
    return { report: st.pinned.report, final: true, runId: st.pinned.run_id, grades: st.pinned.rbc_grades,
             progress: null, earlier: true, started: st.pinned.progress };
  }
  return current(st);
}

function current(st) {
  // The station's current run (its retained live state): its final specimen report once it is
  // closed (the report itself where it arrived, else the closed state's aggregates, as after a
  // reload: the report topic is not retained).
  const run = st.run, fin = st.final;
  if (fin && (!run || run.run_id === fin.run_id)) {
    return { report: fin, final: true, runId: fin.run_id, grades: run ? run.rbc_grades : null,
             progress: run ? run.progress : null, started: run ? run.progress : null };
  }
  if (run) return { report: run.report, final: run.state === "closed", runId: run.run_id, grades: run.rbc_grades,
                    progress: run.progress, state: run.state, started: run.progress, updated: run.updated_at,
                    endReason: run.end_reason };
  return null;
}

function renderStatus(st) {
  const badge = st.node.querySelector(".status");
  const value = brokerUp ? st.status || "unknown" : "unknown";
  badge.className = "badge status " + (value === "online" || value === "offline" ? value : "unknown");
  badge.dataset.status = value;
  badge.textContent = brokerUp ? value : "unknown (broker unreachable)";
  marked(st, "offline", brokerUp && st.status === "offline");
  markTelemetry(st);
  renderRunControl(st);
  if (st.run) renderRun(st);
}

// An empty message is a retained message cleared (mosquitto_pub -r -n). A station's status cleared is
// a station retired or renamed (docs/STATION.md, "Renaming or retiring a station"): its card goes, and
// the page waits for stations again when it was the last; its run state cleared, its current run goes
// (the list of its earlier runs stays, that run in it now, and an earlier run picked stays shown).
function cleared(id, kind) {
  const st = stations.get(id);
  if (!st) return;  // an empty message never makes a card
  if (kind === "status") {
    clearTimeout(st.reviewTimer);
    st.node.remove();
    stations.delete(id);
    if (stations.size === 0) {
      const empty = el("p", "", "Waiting for stations\u2026");
      empty.id = "empty";
      document.getElementById("stations").append(empty);
    }
    renderAttention();
  } else if (kind === "run") {
    st.run = null; st.final = null;
    if (!st.pinned) { st.reviewRun = null; clearReview(st); }  // the current run's gallery goes with it
    renderRun(st);
    renderRuns(st);
  }
}

// The station's last closed runs (get_runs), to show and sign one that is no longer its current run.
function requestRuns(st) {
  if (client && client.connected) sendCommand(st, "get_runs", {});
}

function renderRuns(st) {
  const select = st.node.querySelector(".runs");
  const current = st.run ? st.run.run_id : null;
  const earlier = st.runs.filter((r) => r.run_id !== current);
  const options = [el("option", "", "current run")];
  options[0].value = "";
  for (const r of earlier) {
    const v = r.report.verification;
    // when the run started (an older station's entry without it: its report's time less the run's
    // length, the same after it is signed)
    const started = r.progress && typeof r.progress.started_at === "number" ? r.progress.started_at
      : r.report.created_at - ((r.report.timing_ms || {}).run_ms || 0) / 1000;
    const specimen = specimenOf(r.report, r.progress);
    const o = el("option", "", (specimen ? isoText(specimen) + " · " : "") + "run " + r.run_id.slice(0, 8) + " · " +
      when(started) + " · " + r.progress.fields + (r.progress.fields === 1 ? " field · " : " fields · ") +
      (v ? "verified (" + isoText(v.verified_by) + ")" : "not verified"));
    o.value = r.run_id;
    options.push(o);
  }
  select.replaceChildren(...options);
  select.value = st.pinned ? st.pinned.run_id : "";
  st.node.querySelector(".runs-pick").hidden = earlier.length === 0 && !st.pinned;
}

function pickRun(st, runId) {
  st.pinned = (runId && st.runs.find((r) => r.run_id === runId)) || null;
  st.reviewRun = st.pinned ? st.pinned.run_id : st.run ? st.run.run_id : null;
  st.reviewShown = -1;
  clearReview(st);
  resetSigning(st);
  if (st.reviewRun) requestReview(st, 0);
  renderRun(st);
}

// What the card reads of a report (the run state's aggregates or a specimen report): one lacking it
// (another tool's message, a state of another version) is not taken in place of what is shown.
function readable(report) {
  return report !== null && typeof report === "object" && report.counts !== null && typeof report.counts === "object" &&
    ["wbc_differential", "rbc_morphology", "flags"].every((k) => Array.isArray(report[k]));
}

function onMessage(topic, payload, packet) {
  const parts = topic.split("/");
  if (parts[0] !== prefix || parts.length < 3) return;
  const kind = parts.slice(2).join("/");
  if (payload.length === 0) { cleared(parts[1], kind); return; }
  const st = station(parts[1]);
  const text = new TextDecoder().decode(payload);
  if (kind === "status") {
    const back = text === "online" && st.status !== "online";
    // from offline only: a status that comes with the page's (re)connection was asked for there
    // (connect), or is by the station's run state
    const restored = back && st.status === "offline";
    st.status = text;
    renderStatus(st);
    if (back) { st.heardAt = Date.now(); st.node.querySelector(".review-note").textContent = ""; }
    if (back && st.reviewRun) scheduleReview(st);  // the gallery's pages, not asked while it was away
    if (restored) requestRuns(st);  // its earlier runs (a get_runs sent while it was away was lost)
    return;
  }
  let msg;
  try { msg = JSON.parse(text); } catch (e) { console.warn("not JSON on", topic); return; }
  if (msg === null || typeof msg !== "object") { console.warn("not a JSON object on", topic); return; }
  if (kind === "run") {
    // a run start_run opened has no report until its first field (and none if it ends without one)
    const withoutFields = msg.report === null && msg.progress !== null && typeof msg.progress === "object" &&
      msg.progress.fields === 0;
    if (typeof msg.run_id !== "string" || !(withoutFields || readable(msg.report))) {
      console.warn("not a run state on", topic);
      return;
    }
    const changed = !st.run || st.run.run_id !== msg.run_id || st.run.state !== msg.state;
    st.run = msg;
    if (st.final && olderThanRun(st, st.final)) st.final = null;  // the run signed since (on another page)
    renderRun(st);
    if (changed) requestRuns(st);  // a run started or closed: the list of earlier runs moves
    if (st.pinned) return;  // an earlier run's gallery stays until the user goes back to the current run
    const cells = msg.review ? msg.review.cells : 0;
    if (msg.run_id !== st.reviewRun) { st.reviewRun = msg.run_id; st.reviewShown = -1; clearReview(st); resetSigning(st); }
    if (withoutFields) return;  // no field: no crops to ask for
    if (cells !== st.reviewShown || msg.state === "closed") { st.reviewShown = cells; scheduleReview(st); }
  } else if (kind === "report" && msg.body && msg.body.kind === "specimen" && readable(msg.body)) {
    // Reports arrive at least once: one a verified report superseded stays replaced, and a report
    // of another run than the station's current one (an older run verified) does not take its place.
    const body = msg.body;
    if (body.verification && body.verification.supersedes) st.superseded.add(body.verification.supersedes);
    if (st.superseded.has(body.report_id) || olderThanRun(st, body)) return;
    const listed = st.runs.find((r) => r.run_id === body.run_id);
    if (listed && body.verification) {  // an earlier run signed (here or on another page): its entry says so
      listed.report = body;
      renderRuns(st);
    }
    if (st.pinned && st.pinned.run_id === body.run_id) {  // the earlier run shown, signed (here or elsewhere)
      st.pinned = { ...st.pinned, report: body };
      renderRun(st);
      return;
    }
    if (st.run && st.run.run_id !== body.run_id) return;
    st.final = body;
    renderRun(st);
  } else if (kind === "telemetry") {
    st.telemetry = msg; st.telemetryLive = brokerUp && st.status === "online"; st.heardAt = Date.now();
    noteInstance(st);
    noteClock(st);
    renderTelemetry(st);
    settleHolds(st);
  } else if (kind.startsWith("cmd_response/")) {
    const cd = packet && packet.properties && packet.properties.correlationData;
    const correlation = cd ? new TextDecoder().decode(cd) : null;
    const mine = !correlation || correlation.startsWith(pageToken);
    if (kind === "cmd_response/get_review" && mine && msg.ok && msg.run_id === st.reviewRun) renderReview(st, msg);
    else if (kind === "cmd_response/get_review" && !msg.ok && correlation === st.reviewAsk) {
      // the answer to the gallery's last request: a run the station keeps no crops of empties it (none
      // is left to type); another refusal (a busy station) leaves what it shows
      const gone = msg.error === "no_review_material";
      if (gone) clearReview(st);
      st.node.querySelector(".review-count").textContent = gone
        ? "(the station keeps no crops of this run: it is older than its last 4)"
        : "(" + String(msg.message || msg.error || "refused") + ")";
    }
    else if (kind === "cmd_response/type_cells") typedAnswer(st, msg, mine);
    else if (kind === "cmd_response/verify_run" && mine) verifiedAnswer(st, msg);
    else if (kind === "cmd_response/start_run" || kind === "cmd_response/stop_run") runControlAnswer(st, kind.slice("cmd_response/".length), msg, correlation);
    else if (kind === "cmd_response/get_runs" && mine && msg.ok && Array.isArray(msg.runs)) {
      st.runs = msg.runs;
      if (st.pinned) {  // the entry again (a verified report in its place), or gone: back to the current run
        const again = st.runs.find((r) => r.run_id === st.pinned.run_id);
        if (again) { st.pinned = again; renderRun(st); } else pickRun(st, "");
      }
      renderRuns(st);
    }
  }
}

function connect(cfg, username, password, login) {
  prefix = cfg.topicPrefix;
  runControl = cfg.runControl === true;
  // timerVariant native: MQTT.js's default keepalive timers run in a worker made from a blob,
  // which the page's Content-Security-Policy refuses; without them the broker closed the page's
  // connection every keepalive period.
  client = mqtt.connect(cfg.broker, {
    protocolVersion: 5, clean: true, keepalive: 15, reconnectPeriod: 1000, connectTimeout: 5000,
    timerVariant: "native",
    clientId: "smearscope-dashboard-" + Math.random().toString(16).slice(2, 10),
    username: username || undefined, password: password || undefined,
  });
  client.on("connect", () => {
    // every station's status comes again, retained, with the subscription: until then it is not known
    // (one that died while the broker was away left no Last Will)
    for (const st of stations.values()) st.status = null;
    setBroker("connected");
    const topics = ["status", "run", "report", "telemetry", "cmd_response/get_review", "cmd_response/get_runs",
                    "cmd_response/type_cells", "cmd_response/verify_run", "cmd_response/start_run",
                    "cmd_response/stop_run"].map((t) => prefix + "/+/" + t);
    client.subscribe(topics, { qos: 1 });
    for (const st of stations.values()) {
      if (st.reviewRun) scheduleReview(st);
      requestRuns(st);
    }
  });
  client.on("reconnect", () => setBroker("reconnecting"));
  client.on("close", () => { if (document.getElementById("broker").dataset.state === "connected") setBroker("reconnecting"); });
  client.on("error", (err) => {
    const refused = err && /not authori[sz]ed|bad user ?name or password/i.test(err.message || "");
    if (refused && login) {  // a password typed wrong: ask again, rather than retry it every second
      client.end(true);
      setBroker("refused", err.message);
      login.hidden = false;
      login.elements.password.value = "";
      return;
    }
    setBroker("reconnecting", err && err.message);
  });
  // A message the page cannot show must cost only itself: an exception thrown here stops MQTT.js
  // reading the connection until its keepalive runs out, and a retained one again at every reconnect.
  client.on("message", (topic, payload, packet) => {
    try { onMessage(topic, payload, packet); } catch (err) { console.warn("message on", topic, "not shown:", err); }
  });
}

async function main() {
  const cfg = await (await fetch("config.json", { cache: "no-store" })).json();
  if (cfg.username && cfg.password === null) {
    const form = document.getElementById("login");
    form.hidden = false;
    form.elements.username.value = cfg.username;
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      form.hidden = true;
      if (client) client.end(true);
      connect(cfg, form.elements.username.value, form.elements.password.value, form);
    });
    return;
  }
  connect(cfg, cfg.username, cfg.password);
}

main().catch((err) => setBroker("disconnected", String(err)));
