// smearscope dashboard, a run started and stopped from the page: the technician types (or scans)
// the slide's specimen id and starts the station's run for it (cmd/start_run with `specimen_id`),
// and stops an open run (cmd/stop_run; a second click confirms, so one stray click does not end a
// slide's run). Only on a page served with `smearscope dashboard --run-control` (config.json's
// runControl); the form's field and buttons only while the station is online and the broker
// reachable: a station keeps no session, so a command sent while it is away is lost. The
// dashboard's broker account needs write access to these two commands (docs/MQTT.md); a broker
// that refuses them says so here. Loaded before dashboard.js, whose globals (brokerUp, runControl,
// client, current, iso, sendCommand, specimenOf) these functions use when called. Text from the broker is only ever
// set with textContent.
"use strict";

const MAX_SPECIMEN_ID = 64;  // service.analysis.report.MAX_SPECIMEN_ID, in characters (code points)
const CONTROL_TIMEOUT_MS = 15000;

// The station's run that is open, as this page knows it: none once this page's stop was answered
// (its closed state may come a moment later). A run the station's answer said it started, or said
// was open (run_open), has no state until its first field: open all the same (`st.toldOpen`, its
// id and specimen where the answer gave them), so a run started for a wrongly scanned label can be
// stopped before any field joins it.
function openRun(st) {
  const run = current(st);
  if (run !== null && !run.final && run.runId !== st.stoppedRun) return run;
  const told = st.toldOpen;
  return told ? { runId: told.runId, report: null, started: { specimen_id: told.specimenId }, final: false } : null;
}

// What the station's answers said of a run with no state yet, forgotten once its state speaks for it
// (it came, or it closed), or once the station is offline.
function settleToldOpen(st) {
  const run = current(st), told = st.toldOpen;
  // a clean stop closes a run with no field (one a crash interrupted is taken back: Start is then
  // refused run_open, which offers Stop again)
  if (st.status === "offline") st.toldOpen = null;
  if (!told || run === null) return;
  if (told.runId ? run.runId === told.runId : !run.final) st.toldOpen = null;  // run_open's run: the open one
}

function renderRunControl(st) {
  const box = st.node.querySelector(".run-control");
  settleToldOpen(st);
  const open = openRun(st) !== null;
  const up = brokerUp && st.status === "online";
  const had = document.activeElement;
  box.hidden = !runControl;
  // the field stays while a run is open: a label scanned then is answered, and keeps the focus
  const field = st.node.querySelector(".specimen-id");
  field.hidden = !up;
  st.node.querySelector(".start-run").hidden = !up || open;
  const stop = st.node.querySelector(".stop-run");
  if (stop.hidden !== (!up || !open)) { stop.hidden = !up || !open; disarmStop(st); }
  // the button just pressed that goes (Start once the run is open, Stop once it is stopped) hands
  // the focus to the field, where the next scan is typed
  if (had && had !== field && box.contains(had) && had.hidden && !field.hidden) field.focus();
  const state = st.node.querySelector(".run-control-state");
  if (!up && st.controlAsk) {  // its answer cannot come: what happened is the run line's, once it is back
    st.controlAsk = null;
    controlState(st, "error", (brokerUp ? "the station went away before answering"
      : "the broker went out of reach before the station answered") + ": " +
      "its run line says whether the command was done once it is back online");
  } else if (!up && state.dataset.state !== "error") {
    controlState(st, "away", !brokerUp ? "the broker is unreachable: runs are started and stopped when it is back"
      : "the station is " + (st.status || "not known to be online") + ": runs are started and stopped when it is back online");
  } else if (up && state.dataset.state === "away") {
    controlState(st, "", "");
  } else if (state.dataset.aboutRun && !st.controlAsk && (openRun(st) || {}).runId !== state.dataset.aboutRun) {
    controlState(st, "", "");  // what it said of an open run, once that run is no longer open
  } else if (state.dataset.whileShown && !st.controlAsk &&
             !JSON.parse(state.dataset.whileShown).includes(shownRunId(st))) {
    controlState(st, "", "");  // what it said of a stopped run, once another run is the card's (or none)
  }
}

function shownRunId(st) {
  const run = current(st);
  return run ? String(run.runId || "") : "";
}

// `aboutRun`: the open run the text speaks of; the text goes when that run is no longer open.
// `whileShown`: the runs the text may stand beside as the card's current run ("" for none); it goes
// when another run is the card's.
function controlState(st, state, text, aboutRun, whileShown) {
  const node = st.node.querySelector(".run-control-state");
  node.dataset.state = state;
  node.dataset.aboutRun = aboutRun || "";
  node.dataset.whileShown = whileShown ? JSON.stringify(whileShown) : "";
  node.replaceChildren(...[].concat(text));  // a string, or its parts with the specimen id isolated (iso)
  awaitHold(node, null);  // telemetry.js: marked again by a stop answered `held` null
}

// " for specimen <id>", the id isolated (dashboard.js iso); nothing for none.
function forSpecimen(id) {
  return id ? [" for specimen ", iso(id)] : [];
}

function sendControl(st, name, body, what) {
  if (!client || !client.connected || st.status !== "online") {
    controlState(st, "error", "the station is " + (st.status || "not known to be online") + ": it cannot " + what + " now");
    return false;
  }
  if (st.controlAsk) {  // one command at a time: a second scan or click is not sent
    controlState(st, "saving", ["still waiting for the station's answer to " + st.controlWhat, ...forSpecimen(st.controlFor),
                                ": nothing more sent"]);
    return false;
  }
  controlState(st, "saving", what + "…");
  const ask = sendCommand(st, name, body, (err) => {
    if (st.controlAsk !== ask) return;
    st.controlAsk = null;
    controlState(st, "error", "the broker refused the command (" + (err.message || err) + "): this dashboard's account may not " + what);
  });
  st.controlAsk = ask;
  st.controlName = name;
  st.controlWhat = what;
  st.controlFor = body.specimen_id;
  setTimeout(() => {  // an answer that never comes: said, not waited for
    if (st.controlAsk === ask) { st.controlAsk = null; controlState(st, "error", "no answer from the station"); }
  }, CONTROL_TIMEOUT_MS);
  return true;
}

function startRun(st) {
  const input = st.node.querySelector(".specimen-id");
  const id = input.value.trim();  // a barcode scanner's trailing space or newline is no part of the id
  const length = [...id].length;  // as the station counts: a character outside the BMP is one, not two
  input.select();  // the next scan replaces what is there, never adds to it
  if (!id || length > MAX_SPECIMEN_ID || /[\u0000-\u001f\u007f]/.test(id)) {
    controlState(st, "error", (length > MAX_SPECIMEN_ID ? "specimen id too long (" + length + " characters): "
      : "specimen id needed: ") + "the slide's accession number or label, 1 to " + MAX_SPECIMEN_ID + " characters");
    input.focus();
    return;
  }
  const open = openRun(st);
  if (open && !st.controlAsk) {  // the station would refuse it: said here with the run's specimen
    const was = specimenOf(open.report, open.started);
    const which = open.runId ? "run " + String(open.runId).slice(0, 8) : "a run";  // run_open names none
    controlState(st, was === id ? "saved" : "error", was === id
      ? [which + " is already running", ...forSpecimen(id)]
      : [which, ...forSpecimen(was), " is still open: stop it (Stop run) before starting specimen ", iso(id),
         "; nothing sent"], open.runId || "");
    return;
  }
  if (sendControl(st, "start_run", { specimen_id: id }, "start a run")) st.stoppedRun = null;
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
  if (!msg.ok) {  // a run open (started on another page, or by its first field): said until it is not
    // the station knows better than this page whether a run is open: Stop offered, or taken back
    if (msg.error === "run_open" && !openRun(st)) st.toldOpen = { runId: "", specimenId: "" };
    else if (msg.error === "no_run_open") st.toldOpen = null;
    const open = msg.error === "run_open" ? openRun(st) : null;
    controlState(st, "error", String(msg.message || msg.error || "refused"), open ? open.runId : "");
    renderRunControl(st);
    return;
  }
  if (name === "start_run") {
    st.toldOpen = { runId: String(msg.run_id), specimenId: typeof msg.specimen_id === "string" ? msg.specimen_id : "" };
    st.node.querySelector(".specimen-id").value = "";
    // said while that run is open: beside a run closed since (its target reached) it read as running
    controlState(st, "saved", ["run " + String(msg.run_id).slice(0, 8) + " started", ...forSpecimen(msg.specimen_id)],
                 String(msg.run_id));
    // Stop from now on, before the run's first field; the line goes at once where the run's closed
    // state came before this answer (a target of a few cells reached on the first field)
    renderRunControl(st);
  } else {
    st.stoppedRun = String(msg.run_id);
    st.toldOpen = null;
    // said until another run is the card's (started elsewhere or by its first field, or the run
    // state cleared): the stopped run's closed state, or the run shown when the answer came, keep it
    // a message on an ok answer: the run's end could not be kept (a full disk), or its report held at
    // the station, said in red beside it; `held` null (the station's hold not decided yet): said in amber,
    // unless the end was not kept too (`kept` false: one message says both)
    const told = typeof msg.message === "string" && msg.message ? " — " + msg.message : "";
    const base = "run " + String(msg.run_id).slice(0, 8) + " stopped: " + msg.fields +
      (msg.fields === 1 ? " field" : " fields") + ", " + msg.classified_wbc + " of " + msg.target_wbc + " WBC";
    const undecided = msg.held === null && msg.kept !== false;  // an end not kept stays said in red
    controlState(st, undecided ? "undecided" : told ? "held" : "saved", base + told,
      "", [String(msg.run_id), shownRunId(st)]);
    // the station's next telemetry sample says whether it holds the run (telemetry.js); not the last
    // one before this answer: one that said held_runs was an earlier process's (this one had not decided)
    if (undecided) awaitHold(st.node.querySelector(".run-control-state"), String(msg.run_id), base);
    renderRunControl(st);  // the next specimen can be started now
  }
}

// A barcode scanner types into whatever has the focus: its label typed while a button or the page
// itself has it (after a click on Stop run, Print report, a table) would be lost and its Enter would
// press that button. The label goes instead to the run form's field of the card that has the focus,
// or of the only card showing one. Typing in a field or a cell's type list is left alone; the
// list of earlier runs is not (its type-ahead picked the earlier run whose specimen id the label
// began with).
document.addEventListener("keydown", (ev) => {
  if (!runControl || ev.key.length !== 1 || ev.key === " " || ev.ctrlKey || ev.altKey || ev.metaKey) return;
  const at = document.activeElement;
  if (at && (at.isContentEditable || at.matches("input, textarea, select:not(.runs)"))) return;
  const card = at && at.closest ? at.closest("section.station") : null;
  const fields = [...document.querySelectorAll(".run-control .specimen-id")].filter((n) => n.getClientRects().length > 0);
  const field = card ? fields.find((n) => card.contains(n)) : fields.length === 1 ? fields[0] : undefined;
  if (field) { field.value = ""; field.focus(); }  // the key's character then goes into it
  else if (fields.length) scanLost(true);  // several cards, none in use: said, not lost in silence
}, true);

function scanLost(lost) {
  const note = document.getElementById("scan-note");
  note.hidden = !lost;
  note.textContent = lost ? "typed keys reached no station: tap the specimen field of the slide's station, then scan again" : "";
}

document.addEventListener("focusin", (ev) => { if (ev.target.matches(".specimen-id")) scanLost(false); });
