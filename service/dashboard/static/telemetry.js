// smearscope dashboard, each station's telemetry: its last sample, said stale once the station or
// the broker was away, and the station said not heard from when its samples stop coming while the
// broker still holds it online (a station that hung, or lost its network, until the broker's
// keepalive gives up on it). Loaded before dashboard.js, whose globals (stations, brokerUp, el,
// when) these functions use when called. Text from the broker is only ever set with textContent.
"use strict";

// The station's telemetry_interval_s default: the period of a station whose samples do not say
// theirs (interval_s, sent since stations carry it).
const DEFAULT_TELEMETRY_S = 30;

// Overdue after two periods without a sample (one sample lost, QoS 0, is not yet silence), counted
// from the last sample this page received, or from the station coming online; nothing is said
// before the page's first sample from the station, whose period it does not know yet.
function markSilence(st) {
  const node = st.node.querySelector(".silence");
  const t = st.telemetry;
  const every = t && typeof t.interval_s === "number" && t.interval_s > 0 ? t.interval_s : DEFAULT_TELEMETRY_S;
  const quiet = (Date.now() - st.heardAt) / 1000;
  const overdue = brokerUp && st.status === "online" && t !== null && st.heardAt !== undefined && quiet > 2 * every;
  node.hidden = !overdue;
  node.dataset.overdue = overdue ? "true" : "false";
  marked(st, "silent", overdue);
  node.textContent = overdue ? "not heard from: no telemetry for " + Math.floor(quiet) + " s, expected every " +
    (Math.round(every * 100) / 100) + " s" : "";
}

// Two stations given one station_id (a cloned config) publish under it in turn: their samples carry
// two instance ids (each process its own) and come back to one after the other, where a restarted
// station only moves on to a new one. Said while such a return was seen within four periods.
function noteInstance(st) {
  const t = st.telemetry, id = t.instance_id;
  if (typeof id !== "string") return;  // an older station's sample
  st.instances = st.instances || new Map();  // instance id -> its host, as its samples say
  const previous = st.lastInstance;
  if (previous !== undefined && previous !== id && st.instances.has(id)) {
    st.clashAt = Date.now();
    st.clashHosts = [...new Set([st.instances.get(previous), st.instances.get(id)])];
  }
  st.instances.set(id, typeof t.host === "string" ? t.host : "host not said");
  st.lastInstance = id;
  markClash(st);
}

function markClash(st) {
  const t = st.telemetry;
  const every = t && typeof t.interval_s === "number" && t.interval_s > 0 ? t.interval_s : DEFAULT_TELEMETRY_S;
  const clash = st.clashAt !== undefined && (Date.now() - st.clashAt) / 1000 < 4 * every;
  const node = st.node.querySelector(".clash");
  node.hidden = !clash;
  const hosts = st.clashHosts || [];
  node.replaceChildren(...(!clash ? [] : ["two stations publish as ", iso(st.id), " (",
    ...(hosts.length > 1 ? ["hosts ", iso(hosts[0]), " and ", iso(hosts[1])] : ["both on host ", iso(hosts[0])]),
    "): their runs, status and telemetry are mixed here; give each its own station_id"]));
  marked(st, "clash", clash);
}

setInterval(() => { for (const st of stations.values()) { markSilence(st); if (st.clashAt !== undefined) markClash(st); } },
            1000);

// Outbox messages the station holds back (its sample's `parked`): to the clinic, reports that did
// not arrive. Said on the card and named in the page's header while the station's latest sample
// counts any; a sample without `parked` (an older station) says nothing.
function noteParked(st) {
  const p = st.telemetry && typeof st.telemetry.parked === "object" ? st.telemetry.parked : null;
  const n = p && typeof p.messages === "number" ? p.messages : 0;
  const node = st.node.querySelector(".parked");
  node.hidden = n === 0;
  node.dataset.parked = String(n);
  marked(st, "parked", n > 0);
  if (n === 0) { node.textContent = ""; return; }
  const large = typeof p.too_large === "number" ? p.too_large : 0, held = n - large;
  const noun = (k) => (p.reports === n ? "report" : "message") + (k === 1 ? "" : "s");
  const o = p.oldest && typeof p.oldest === "object" ? p.oldest : null;
  const age = o && typeof o.age_s === "number" ? (o.age_s >= 7200 ? Math.round(o.age_s / 3600) + " h"
    : o.age_s >= 120 ? Math.round(o.age_s / 60) + " min" : Math.round(o.age_s) + " s") : null;
  const oldest = o ? " (oldest: " + o.kind + " " + o.report_id + (age ? ", waiting " + age : "") + ")" : "";
  const size = o && o.reason !== "held" && typeof o.bytes === "number" ? " above " + o.bytes + " bytes" : "";
  const parts = [];
  if (large && o && o.reason === "over_packet_limit") parts.push(large + " " + noun(large) + " held at the station: " +
    "over the packet limit" + (typeof o.limit === "number" ? " of " + o.limit + " bytes" : "") + " (the broker's " +
    "max_packet_size, or the station's mqtt.max_packet_size if lower) — raise it" + size +
    "; the station tries them again once it reconnects");
  else if (large) parts.push(large + " " + noun(large) + " held at the station: refused by the broker as too large — " +
    "raise message_size_limit (or max_packet_size) in the broker's configuration" + size +
    "; the station sends them once it reconnects");
  if (held) parts.push(held + " " + noun(held) + " held back at the station (its log says why)");
  node.textContent = parts.join("; ") + oldest;
}

// The station's calibration watch (its sample's `calibration_watch`: the median of its fields' own
// scale over the calibrated one, over its last checks): in words in the telemetry list, and in red
// beside the status while it puts the calibration in doubt (its reports carry
// calibration_drift_suspected), named in the header while the sample is live. Null (uncalibrated, no
// watch) or absent (an older station): nothing.
function calibrationWords(w) {
  if (!w || typeof w !== "object" || typeof w.checks !== "number") return null;
  const bounds = w.low + "–" + w.high;
  if (typeof w.median !== "number") return "no calibration check kept since the calibration was set (a right one: " + bounds + ")";
  const how = w.median < w.low ? "below" : w.median > w.high ? "above" : "within";
  const said = "median " + w.median.toFixed(2) + " (red cells' own scale / calibrated) over the last " + w.checks +
    (w.checks === 1 ? " checked field" : " checked fields") + " of " + w.runs + (w.runs === 1 ? " run" : " runs") +
    ", " + how + " " + bounds;
  return w.suspected || w.checks >= w.needs_checks && w.runs >= w.needs_runs ? said
    : said + "; judged from " + w.needs_checks + " checked fields of " + w.needs_runs + " runs";
}
function noteCalibration(st) {
  const w = st.telemetry ? st.telemetry.calibration_watch : null;
  const suspected = !!(w && typeof w === "object" && w.suspected === true);
  const node = st.node.querySelector(".calibration");
  node.hidden = !suspected;
  node.dataset.suspected = String(suspected);
  node.textContent = suspected ? "calibration drift suspected: " + calibrationWords(w) + " — sizes and size-based " +
    "morphology are not to be read until the scale is measured again (smearscope calibrate-scale)" +
    (st.telemetryLive ? "" : " (last sample)") : "";
  marked(st, "calibration", suspected && st.telemetryLive);
}

// A verify_run or stop_run answered `held` null (the station's hold not decided yet) is brought up to
// date by the station's live sample once it says `held_runs` (null until decided, then the runs it
// holds): in red as held, or as sent (the answer's line without the undecided part). awaitHold marks
// the answer's line (base: its text before " — "); any other answer there clears the mark.
const HELD_WORDS = "the report is held at the station: the broker shows this run further along, or a later run; " +
  "it is sent once the broker's retained run state is cleared and the station started again (docs/STATION.md)";
function awaitHold(node, runId, base) {
  if (runId === null) { delete node.dataset.undecidedRun; delete node.dataset.undecidedBase; return; }
  node.dataset.undecidedRun = runId;
  node.dataset.undecidedBase = base;
}
function settleHolds(st) {
  const held = st.telemetry && st.telemetryLive && Array.isArray(st.telemetry.held_runs) ? st.telemetry.held_runs : null;
  if (held === null) return;
  for (const node of st.node.querySelectorAll("[data-undecided-run]")) {
    const isHeld = held.includes(node.dataset.undecidedRun);
    node.dataset.state = isHeld ? "held" : "saved";
    node.textContent = node.dataset.undecidedBase + (isHeld ? " — not sent: " + HELD_WORDS : "");
    awaitHold(node, null);
  }
}

// A camera that is not giving frames (its sample's pipeline.source_state and camera_*: a station
// whose source is a camera), said in words beside the station's status: "camera: hung, reopening",
// "camera: reconnecting", "camera: opening"; nothing while it reads (reading, idle between reads) or
// for another source (null). While it recovers from a hang (no frame since), when it hung last and
// how often. Named in the page's header while the station's live sample says so; a stale sample's
// says it is the last sample's.
const CAMERA_WORDS = { opening: "opening", reconnect_wait: "reconnecting", closed: "closed" };
const CAMERA_HUNG_WORDS = { opening: "hung, reopening", reconnect_wait: "hung, waiting to reconnect",
                            reading: "hung, no frame since", idle: "hung, no frame since", closed: "closed" };
function noteCamera(st) {
  const p = st.telemetry && typeof st.telemetry.pipeline === "object" && st.telemetry.pipeline
    ? st.telemetry.pipeline : {};
  const state = typeof p.source_state === "string" ? p.source_state : null;
  const hung = p.camera_recovering === true;
  const words = state === null ? null : hung ? CAMERA_HUNG_WORDS[state] || "hung, " + state
    : state === "reading" || state === "idle" ? null : CAMERA_WORDS[state] || state;
  const badge = st.node.querySelector(".badge.camera");
  const stale = !st.telemetryLive;
  badge.hidden = words === null;
  badge.dataset.camera = words === null ? "none" : hung ? "hung" : state;
  badge.className = "badge camera" + (words === null ? "" : hung ? " hung" : " waiting");
  badge.textContent = words === null ? "" : "camera: " + words + (stale ? " (last sample)" : "");
  marked(st, "camera", words !== null && !stale);
  const line = st.node.querySelector(".camera-hang");
  const n = typeof p.camera_hung_calls === "number" ? p.camera_hung_calls : 0;
  const stuck = typeof p.camera_stuck_threads === "number" ? p.camera_stuck_threads : 0;
  line.hidden = !(hung && n > 0);
  line.textContent = line.hidden ? "" : "camera hung " + n + (n === 1 ? " time" : " times") +
    (typeof p.camera_last_hang_at === "number" ? ", last " + when(p.camera_last_hang_at) : "") +
    (stuck > 0 ? "; " + stuck + (stuck === 1 ? " thread" : " threads") +
      " still stuck in the driver (the station restarts itself at 4)" : "");
}

// The times a card shows (a run's start and last update, its signing, the samples' read_at) are the
// station's clock's; the page's own marks (not heard from) are its own. A station whose clock is a
// minute or more off the browser's (its live sample's read_at against the arrival: telemetry is sent
// at once, never stored) says so, so that "last update 10:02" at 10:12 is not read as a stalled run.
function noteClock(st) {
  const t = st.telemetry;
  if (!st.telemetryLive || typeof t.read_at !== "number") return;
  const off = t.read_at - Date.now() / 1000;
  const node = st.node.querySelector(".clock");
  const far = Math.abs(off) >= 60;
  node.hidden = !far;
  node.dataset.offsetS = String(Math.round(off));
  const size = Math.abs(off) >= 120 ? Math.round(Math.abs(off) / 60) + " min" : Math.round(Math.abs(off)) + " s";
  node.textContent = far ? "station clock " + size + (off < 0 ? " behind" : " ahead of") +
    " this browser's: the times on this card are the station's" : "";
}

// Telemetry is not retained: what the card holds when the station is offline, or the broker out of
// reach, is its last sample, not its state now, and says so (with the sample's time).
// A sample stays stale once the station or the broker was away, until the station sends a new one.
function markTelemetry(st) {
  if (!brokerUp || st.status !== "online") st.telemetryLive = false;
  const stale = st.telemetry !== null && !st.telemetryLive;
  const dl = st.node.querySelector(".telemetry");
  dl.dataset.stale = stale ? "true" : "false";
  const at = st.telemetry && typeof st.telemetry.read_at === "number" ? " at " + when(st.telemetry.read_at) : "";
  st.node.querySelector(".telemetry-age").textContent = !stale ? ""
    : "(last sample" + at + "; " + (!brokerUp ? "broker unreachable" : st.status === "online"
      ? "from before the station was away" : "the station is " + (st.status || "unknown")) + ")";
  markSilence(st);
  noteCamera(st);
}

function renderTelemetry(st) {
  const dl = st.node.querySelector(".telemetry");
  dl.replaceChildren();
  const flat = [];
  const walk = (obj, path) => {
    for (const [k, v] of Object.entries(obj || {})) {
      if (v !== null && typeof v === "object" && !Array.isArray(v)) { if (!path && k !== "jtop") walk(v, k); }
      else if (typeof v === "number" || typeof v === "string" || typeof v === "boolean") flat.push([path ? path + "." + k : k, v]);
    }
  };
  // jtop's raw stats (a Jetson's: dozens of keys) are summarized in the others and not listed; the
  // station's own state comes first (a full disk, an outbox backlog), then the machine's: the
  // first 14 of a Jetson's sample were all jtop's and temperatures, its pipeline never shown
  walk(st.telemetry, "");
  markTelemetry(st);
  noteParked(st);
  noteCalibration(st);
  st.node.querySelector(".telemetry-none").hidden = true;
  const watch = calibrationWords(st.telemetry.calibration_watch);  // one line in words, not its 8 keys
  const own = [...flat.filter(([k]) => k.startsWith("pipeline.") || k.startsWith("parked.")),
               ...(watch === null ? [] : [["calibration watch", watch]])];
  // the process's instance id tells two stations under one id apart (noteInstance); its host is listed
  const machine = flat.filter(([k]) => !k.startsWith("pipeline.") && !k.startsWith("parked.") &&
                                      !k.startsWith("calibration_watch.") && k !== "instance_id");
  for (const [k, v] of [...own, ...machine].slice(0, 32)) {
    // any time, 1970's too: a station whose clock was never set shows a date that says so
    const at = typeof v === "number" && k.endsWith("_at") && Math.abs(v) <= 8.64e12;
    const shownValue = at ? when(v) :
      typeof v === "number" ? String(Math.round(v * 100) / 100) : String(v);
    const dt = el("dt", "", k), dd = el("dd", "", shownValue);
    dd.dataset.key = k;
    if (k === "pipeline.disk_full" && v === true) dd.className = "alarm";  // the station stores nothing more
    if (k === "pipeline.camera_recovering" && v === true) dd.className = "alarm";  // no frame since a camera hang
    if (k === "parked.messages" && v > 0) dd.className = "alarm";  // reports that did not arrive
    if (k === "calibration watch" && st.telemetry.calibration_watch.suspected === true) dd.className = "alarm";
    dl.append(dt, dd);
  }
}

