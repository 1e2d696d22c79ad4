"use strict";
const KEY = "agentq-admin-key";
const REFRESH_MS = Number(document.body.dataset.refreshMs);
const DEAD_LETTERS_SHOWN = 100;
const IN_FLIGHT_CELLS = ["turns-pending", "turns-processing", "test-runs-pending", "test-runs-processing"];

const RESULT_SHOWN_MS = 15000;
let resultShownUntil = 0;

function key() { return sessionStorage.getItem(KEY) || ""; }
function say(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "muted";
}

// What an operator's action came to stays on screen for a while: the refresh that follows it, every few
// seconds, said "Updated …" over it within milliseconds.
function sayResult(text, isError) {
  say(text, isError);
  resultShownUntil = Date.now() + RESULT_SHOWN_MS;
}

async function api(method, path) {
  const response = await fetch(path, {method, headers: {"Authorization": "Bearer " + key()}});
  const body = response.status === 204 ? null : await response.json();
  if (!response.ok) {
    const error = new Error(body && body.error ? body.error.message : "HTTP " + response.status);
    error.status = response.status;
    throw error;
  }
  return body;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) { td.className = className; }
  return td;
}

const shown = {};

// Rows are rebuilt only when their data changed, so a button does not vanish under the operator's click.
function fill(tableId, items, render) {
  const data = JSON.stringify(items);
  if (shown[tableId] === data) { return; }
  shown[tableId] = data;
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren();
  for (const item of items) { render(body.insertRow(), item); }
}

function button(row, label, action, id) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = label.toLowerCase();
  b.dataset.id = id;
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await action(); sayResult(label + " of dead letter " + id + " done."); }
    catch (e) { sayResult(e.message, true); }
    finally { b.disabled = false; }
    await refresh();
  });
  row.cells[row.cells.length - 1].appendChild(b);
}

// Without a key an admin's may read them, nothing of an earlier one's stays on screen.
function clearTables() {
  for (const id of ["queues", "workers", "failure-counts", "failures", "retries", "dead-letters"]) {
    document.querySelector("#" + id + " tbody").replaceChildren();
    delete shown[id];
  }
  for (const id of IN_FLIGHT_CELLS) { document.getElementById(id).textContent = "–"; }
  document.getElementById("dead-letters-shown").textContent = "";
}

async function refresh() {
  const asked = key();
  if (!asked) { clearTables(); say("Enter an admin API key."); return; }
  try {
    const [queues, workers, failures, retries, dead] = await Promise.all([
      api("GET", "/api/admin/queues"), api("GET", "/api/admin/workers"), api("GET", "/api/admin/failures"),
      api("GET", "/api/admin/retries"), api("GET", "/api/admin/dead-letters?limit=" + DEAD_LETTERS_SHOWN)]);
    // The key was forgotten or replaced while these were asked for: they are the earlier key's to see.
    if (key() !== asked) { return; }
    fill("queues", queues.queues, (row, q) => {
      cell(row, q.name); cell(row, q.ready, "num"); cell(row, q.delayed, "num"); cell(row, q.dead_letters, "num");
    });
    // Without `seen_at`, which moves at every refresh: the rows are rebuilt only when what they show changed.
    const processes = workers.items.map((w) => [w.host, w.pid, w.threads, w.running, w.state, w.started_at]);
    fill("workers", processes, (row, w) => {
      cell(row, w[0]); cell(row, w[1], "num"); cell(row, w[2], "num"); cell(row, w[3], "num");
      cell(row, w[4], w[4] === "taking_runs" ? "" : "error"); cell(row, w[5], "muted");
    });
    for (const [kind, counts] of [["turns", queues.turns], ["test-runs", queues.test_runs]]) {
      document.getElementById(kind + "-pending").textContent = counts.pending;
      document.getElementById(kind + "-processing").textContent = counts.processing;
    }
    fill("failure-counts", Object.entries(failures.counts), (row, [status, count]) => {
      cell(row, status); cell(row, count, "num");
    });
    fill("failures", failures.items, (row, f) => {
      cell(row, f.message_id); cell(row, f.conversation_id); cell(row, f.status);
      cell(row, f.error_message, "error"); cell(row, f.updated_at, "muted");
    });
    fill("retries", retries.items, (row, w) => {
      cell(row, w.run_id); cell(row, w.actor); cell(row, w.run_status); cell(row, w.retries, "num");
      cell(row, w.error, "error"); cell(row, w.retry_at, "muted");
    });
    document.getElementById("dead-letters-shown").textContent =
      dead.next_cursor ? "(the latest " + dead.items.length + " shown)" : "";
    fill("dead-letters", dead.items, (row, d) => {
      row.id = "dead-letter-" + d.id;
      cell(row, d.id); cell(row, d.queue); cell(row, d.actor); cell(row, JSON.stringify(d.args));
      cell(row, d.retries, "num"); cell(row, d.error, "error"); cell(row, d.dead_at, "muted");
      cell(row, d.run_status); cell(row, "");
      button(row, "Requeue", () => api("POST", "/api/admin/dead-letters/" + d.id + "/requeue"), d.id);
      button(row, "Delete", () => api("DELETE", "/api/admin/dead-letters/" + d.id), d.id);
    });
    if (Date.now() > resultShownUntil) { say("Updated " + new Date().toLocaleTimeString() + "."); }
  } catch (e) {
    if (key() !== asked) { return; }
    if (e.status === 401 || e.status === 403) { clearTables(); }
    say(e.message, true);
  }
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById("api-key").value.trim());
  document.getElementById("api-key").value = "";
  refresh();
});
document.getElementById("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY); refresh(); });
document.getElementById("requeue-all").addEventListener("click", async () => {
  try {
    const r = await api("POST", "/api/admin/dead-letters/requeue-all");
    const skipped = r.skipped.map((s) => "dead letter " + s.id + ": " + s.reason);
    sayResult("Requeued " + r.requeued.length + "." + (skipped.length ? " Skipped " + skipped.length + ": "
                                                       + skipped.join("; ") : ""), skipped.length > 0);
  } catch (e) { sayResult(e.message, true); }
  delete shown["dead-letters"];
  await refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
