// smearscope dashboard, a run started and stopped from the page: the technician types (or scans)
// the slide's specimen id and starts the station's run for it (cmd/start_run with `specimen_id`),
// and stops an open run (cmd/stop_run; a second click confirms, so one stray click does not end a
// slide's run). Only on a page served with `smearscope dashboard --run-control` (config.json's
// runControl), and only while the station is online and the broker reachable: a station keeps no
// session, so a command sent while it is away is lost. The dashboard's broker account needs write
// access to these two commands (docs/MQTT.md); a broker that refuses them says so here.
// Loaded before dashboard.js, whose globals (brokerUp, runControl, client, current, sendCommand) these
// functions use when called. Text from the broker is only ever set with textContent.
"use strict";

const MAX_SPECIMEN_ID = 64;  // service.station.commands.MAX_SPECIMEN_ID
const CONTROL_TIMEOUT_MS = 15000;

function renderRunControl(st) {
  const box = st.node.querySelector(".run-control");
  const run = current(st);
  const open = run !== null && !run.final;
  box.hidden = !(runControl && brokerUp && st.status === "online");
  st.node.querySelector(".start-run").hidden = open;
  st.node.querySelector(".specimen-id").hidden = open;
  const stop = st.node.querySelector(".stop-run");
  if (stop.hidden !== !open) { stop.hidden = !open; disarmStop(st); }
}

function controlState(st, state, text) {
  const node = st.node.querySelector(".run-control-state");
  node.dataset.state = state;
  node.textContent = text;
}

function sendControl(st, name, body, what) {
  if (!client || !client.connected || st.status !== "online") {
    controlState(st, "error", "the station is " + (st.status || "not known to be online") + ": it cannot " + what + " now");
    return;
  }
  controlState(st, "saving", what + "…");
  const ask = sendCommand(st, name, body, (err) => {
    if (st.controlAsk !== ask) return;
    st.controlAsk = null;
    controlState(st, "error", "the broker refused the command (" + (err.message || err) + "): this dashboard's account may not " + what);
  });
  st.controlAsk = ask;
  st.controlName = name;
  setTimeout(() => {  // an answer that never comes: said, not waited for
    if (st.controlAsk === ask) { st.controlAsk = null; controlState(st, "error", "no answer from the station"); }
  }, CONTROL_TIMEOUT_MS);
}

function startRun(st) {
  const input = st.node.querySelector(".specimen-id");
  const id = input.value.trim();  // a barcode scanner's trailing space or newline is no part of the id
  if (!id || id.length > MAX_SPECIMEN_ID || /[\u0000-\u001f\u007f]/.test(id)) {
    controlState(st, "error", "specimen id needed: the slide's accession number or label (1 to " + MAX_SPECIMEN_ID +
      " characters)");
    input.focus();
    return;
  }
  sendControl(st, "start_run", { specimen_id: id }, "start a run");
}

function stopRun(st) {
  const stop = st.node.querySelector(".stop-run");
  if (stop.dataset.armed !== "true") {  // the first click asks; the second, within 5 s, stops
    stop.dataset.armed = "true";
    stop.textContent = "Confirm stop";
    clearTimeout(st.stopTimer);
    st.stopTimer = setTimeout(() => disarmStop(st), 5000);
    return;
  }
  disarmStop(st);
  sendControl(st, "stop_run", {}, "stop the run");
}

function disarmStop(st) {
  const stop = st.node.querySelector(".stop-run");
  clearTimeout(st.stopTimer);
  stop.dataset.armed = "false";
  stop.textContent = "Stop run";
}

// The station's answer: this page's own request's (its correlation data), or one without any
// (a station on MQTT 3.1.1) while this page waits for one.
function runControlAnswer(st, name, msg, correlation) {
  if (!st.controlAsk || name !== st.controlName || (correlation && correlation !== st.controlAsk)) return;
  st.controlAsk = null;
  if (!msg.ok) { controlState(st, "error", String(msg.message || msg.error || "refused")); return; }
  if (name === "start_run") {
    st.node.querySelector(".specimen-id").value = "";
    controlState(st, "saved", "run " + String(msg.run_id).slice(0, 8) + " started" +
      (msg.specimen_id ? " for specimen " + msg.specimen_id : ""));
  } else {
    controlState(st, "saved", "run " + String(msg.run_id).slice(0, 8) + " stopped: " + msg.fields +
      (msg.fields === 1 ? " field" : " fields") + ", " + msg.classified_wbc + " of " + msg.target_wbc + " WBC");
  }
}
