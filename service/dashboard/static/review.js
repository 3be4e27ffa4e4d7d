// smearscope dashboard, the technician's review: each station's gallery of the cells the analyzer
// did not decide (cmd/get_review, paged), a type picked under a crop (cmd/type_cells) and the run
// signed (cmd/verify_run). Loaded before dashboard.js, whose globals (client, el, sendCommand...)
// these functions use when called. Text from the broker is only ever set with textContent.
"use strict";

function renderReview(st, answer) {
  const gallery = st.node.querySelector(".gallery");
  // pages come in order from the first: an answer delivered twice, or one not asked for, is not added
  if (answer.offset !== 0 && answer.offset !== st.reviewNext) return;
  // A refresh (a new field) gathers the pages the technician opened apart and swaps them in at
  // once: the gallery never shrinks to its first page under their eyes (nor the page's scroll with it)
  if (answer.offset === 0) st.incoming = el("div");
  const into = st.incoming || gallery;
  for (const c of answer.cells) {
    const fig = el("figure", "cell");
    const img = el("img");
    img.src = "data:image/jpeg;base64," + c.jpeg;
    img.alt = c.kind + " " + (c.label || "");
    // an unidentified cell's score is the head's best guess's, not a certainty of "unidentified"
    const why = c.label !== "unidentified" ? (c.label_score !== null ? " " + Math.round(100 * c.label_score) + "%" : "")
      : c.atypical ? " (unlike every trained type)" : " (no type sure enough" +
        (c.label_score !== null ? ": best " + Math.round(100 * c.label_score) + "%" : "") + ")";
    const caption = c.kind + ": " + (c.label || "?") + why;
    const figcaption = el("figcaption", "", c.kind + ": ");
    figcaption.append(iso(c.label || "?"), why);  // "87%" stays after an Arabic or Hebrew type's name
    fig.append(img, figcaption);
    // a white cell takes the WBC head's types, a red cell to review the RBC head's
    const types = c.types || (c.kind === "rbc" ? answer.rbc_types : answer.wbc_types);
    if (c.typeable && Array.isArray(types)) {
      const select = typeSelect(st, answer.run_id, c, types);
      // a screen reader names each list by its crop's caption (the title, the same for all, describes)
      select.setAttribute("aria-label", "type of cell " + (into.children.length + 1) + ", " + caption);
      const note = el("span", "type-state");
      note.setAttribute("role", "status");
      fig.append(select, note);
      typeState(select, select.dataset.state);
    }
    into.append(fig);
  }
  if (answer.typed_per_type) showTyped(st, answer.typed_per_type);
  st.reviewNext = answer.next_offset;
  // a refresh (a new field) starts at the first page: the pages the technician opened are asked
  // again, "More" hidden until they are in
  st.reviewLoaded = answer.offset === 0 ? 1 : (st.reviewLoaded || 1) + 1;
  const refetching = st.reviewLoaded < (st.reviewPages || 1) && answer.next_offset !== null;
  if (st.incoming && !refetching) { gallery.replaceChildren(...st.incoming.children); st.incoming = null; }
  st.node.querySelector(".review-count").textContent =
    "(" + gallery.children.length + " of " + answer.total + (answer.not_kept ? ", " + answer.not_kept + " more not kept" : "") + ")";
  st.node.querySelector(".more").hidden = answer.next_offset === null || refetching;
  if (refetching) requestReview(st, answer.next_offset);
  if (answer.overlay) {
    const img = st.node.querySelector(".overlay");
    img.src = "data:image/jpeg;base64," + answer.overlay.jpeg;
    img.alt = "overlay of field " + answer.overlay.field_id;
    img.hidden = false;
    st.node.querySelector(".overlay-none").hidden = true;
  }
}

// A white cell's type as the technician sees it (station means: smearscope adapt-wbc --station).
function typeSelect(st, runId, c, types) {
  const select = el("select", "type");
  select.title = c.kind === "rbc" ? "type this red cell (counted when the run is verified)"
    : "type this white cell (kept for the station's own class means, counted when the run is verified)";
  select.dataset.field = c.field_id;
  select.dataset.cell = String(c.cell);
  select.dataset.kind = c.kind === "rbc" ? "rbc" : "wbc";
  select.dataset.state = c.typed ? "saved" : "untyped";  // said under it once in its figure (typeState)
  select.append(el("option", "", "type…"));
  select.firstChild.value = "";
  for (const t of types) {
    const o = el("option", "", t);
    o.value = t;
    select.append(o);
  }
  select.value = c.typed || "";
  select.addEventListener("change", () => {
    select.blur();  // the gallery may refresh again (it waits while a type is being picked)
    if (!client || !client.connected) { typeState(select, "error", "not connected"); select.title = "not connected"; return; }
    if (st.status !== "online") {  // a command to an offline station is lost
      const away = "the station is " + (st.status || "not known to be online");
      typeState(select, "error", away);
      select.title = away + ": the type was not saved";
      return;
    }
    typeState(select, "saving");
    sendCommand(st, "type_cells", {
      run_id: runId, cells: [{ field_id: c.field_id, cell: c.cell, type: select.value || null }] });
    setTimeout(() => {
      if (select.dataset.state === "saving") { typeState(select, "error", "no answer from the station"); select.title = "no answer from the station"; }
    }, 15000);
  });
  return select;
}

// A type's state (data-state: untyped, saving, saved, error) said in words under its crop too: the
// list's colour alone said it to no one who cannot tell pink from green, and its reason was a
// tooltip, which a tablet never shows.
function typeState(select, state, why) {
  select.dataset.state = state;
  const note = select.parentNode && select.parentNode.querySelector(".type-state");
  if (note) note.textContent = state === "saving" ? "saving…" : state === "saved" ? "saved"
    : state === "error" ? "not saved: " + why : "";
}

function typedAnswer(st, msg, mine) {
  if (msg.typed_per_type) showTyped(st, msg.typed_per_type);  // the station's counts, whoever typed
  if (!mine) return;
  // A refusal of the whole command (typing off, a busy station...): every pick waiting fails.
  if (!msg.ok && !Array.isArray(msg.errors)) {
    for (const s of st.node.querySelectorAll(".gallery select.type[data-state='saving']")) {
      s.title = String(msg.message || msg.error || "refused");
      typeState(s, "error", s.title);
    }
    return;
  }
  // The station answers per cell: stored or removed (`cells`), or refused (`errors`).
  const find = (c) => [...st.node.querySelectorAll(".gallery select.type")]
    .find((s) => s.dataset.field === c.field_id && s.dataset.cell === String(c.cell));
  if (msg.run_id === st.reviewRun) {
    for (const c of msg.cells || []) { const s = find(c); if (s) typeState(s, c.type ? "saved" : "untyped"); }
    for (const e of msg.errors || []) {
      const s = e.field_id !== undefined && find(e);
      if (s) { s.title = String(e.message || e.error); typeState(s, "error", s.title); }
    }
  }
}

function showTyped(st, counts) {
  const typed = Object.entries(counts).flatMap(([k, v], i) => [i ? ", " : "", iso(k), " " + v]);
  st.node.querySelector(".typed-count").replaceChildren("white cells typed on this station: ",
                                                        ...(typed.length ? typed : ["none"]));
}

// The technician signs the run: the station publishes its report again with their types counted.
function verifyRun(st) {
  const by = st.node.querySelector(".verify-by").value.trim();
  const state = st.node.querySelector(".verify-state");
  const view = shown(st);
  if (!by || !view || !view.final) { state.dataset.state = "error"; state.textContent = "initials needed"; return; }
  if (!client || !client.connected) { state.dataset.state = "error"; state.textContent = "not connected"; return; }
  if (st.status !== "online") {  // it keeps no session: a command sent now is lost, not queued
    state.dataset.state = "error";
    state.textContent = "the station is " + (st.status || "not known to be online") + ": it cannot sign the run now";
    return;
  }
  state.dataset.state = "saving";
  state.textContent = "verifying…";
  sendCommand(st, "verify_run", { run_id: view.runId, verified_by: by });
  setTimeout(() => {  // an offline station gets no command: say so rather than wait for ever
    if (state.dataset.state === "saving") { state.dataset.state = "error"; state.textContent = "no answer from the station"; }
  }, 15000);
}

// A run held at the station (`held`: the broker shows it further along) is signed, but its signed
// report does not go out until the broker's retained run state is cleared: said, not shown as sent.
// `held` null (the station's first broker connection not settled): not known yet, said as such.
function verifiedAnswer(st, msg) {
  if (msg.ok) requestRuns(st);  // the signed run's list entry
  const state = st.node.querySelector(".verify-state");
  state.dataset.state = !msg.ok ? "error" : msg.held ? "held" : msg.held === null ? "undecided" : "saved";
  const base = "verified: " + msg.typed_cells + " typed, " + msg.reclassified + " reclassified" +
      (msg.left_to_review ? "; " + leftAsCalled(msg.left_to_review) : "");  // runview.js
  state.textContent = msg.ok ? base +
      (msg.held ? " — not sent: " + String(msg.message || "the signed report is held at the station") :
       msg.held === null ? " — " + String(msg.message || "whether it is held at the station is not decided yet") : "")
    : String(msg.message || msg.error || "refused");
  // telemetry.js: settled by a sample that comes after this answer only; one before it that says
  // held_runs is another station process's (this one had not decided), not this signature's fate
  awaitHold(state, msg.ok && msg.held === null ? String(msg.run_id) : null, base);
}

// Another run shown: the last one's signature is not carried over. Its "verified" line would read as
// this run's, and initials left in the box would sign this run under the last signer's name (or,
// typed after, as "ABCD").
function resetSigning(st) {
  const state = st.node.querySelector(".verify-state");
  state.textContent = "";
  delete state.dataset.state;
  awaitHold(state, null);
  st.node.querySelector(".verify-by").value = "";
}

function clearReview(st) {
  st.reviewPages = 1;
  st.incoming = null;
  st.node.querySelector(".gallery").replaceChildren();
  st.node.querySelector(".review-count").textContent = "";
  st.node.querySelector(".more").hidden = true;
  const img = st.node.querySelector(".overlay");
  img.hidden = true;
  img.removeAttribute("src");
  st.node.querySelector(".overlay-none").hidden = false;
}

function requestReview(st, offset) {
  // an offline station keeps no session: asked again when it is back online (its status)
  if (!client || !client.connected || !st.reviewRun || st.status !== "online") return;
  st.reviewAsk = sendCommand(st, "get_review", { run_id: st.reviewRun, offset: offset || 0 });
}

function typing(st) {
  // A type being picked or saved: the gallery is not rebuilt under the technician's hand.
  const gallery = st.node.querySelector(".gallery");
  return (gallery.contains(document.activeElement) && document.activeElement.tagName === "SELECT")
    || gallery.querySelector("select.type[data-state='saving']") !== null;
}

function scheduleReview(st) {
  clearTimeout(st.reviewTimer);
  st.reviewTimer = setTimeout(() => (typing(st) ? scheduleReview(st) : requestReview(st, 0)), 800);
}

