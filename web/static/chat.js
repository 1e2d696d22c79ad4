// The chat page: plain JavaScript over the public API. The key and the answer being streamed live in
// sessionStorage, so a reload picks the stream up again with Last-Event-ID.
"use strict";

// `keyEpoch` counts the keys connected with: an answer fetched under an earlier key, arriving after another
// was connected, is dropped rather than drawn on the new user's screen.
const state = { key: sessionStorage.getItem("agentq_key") || "", keyEpoch: 0, conversationId: null, streaming: null };
const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "Authorization": "Bearer " + state.key, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error((data && data.error && data.error.message) || response.statusText);
  return data;
}

function say(text) { $("status-line").textContent = text || ""; }

// Whether the page is still where it was when it asked: the same key and, when one is given, the same
// conversation. An answer that comes back after the user moved on is dropped, not drawn on the new screen.
function stillAt(epoch, conversationId) {
  return epoch === state.keyEpoch && (conversationId === undefined || conversationId === state.conversationId);
}

// What the followed stream last said on the status line (a reconnection, a refusal): only that is cleared
// when the stream reads again or ends, never an answer to something else the user did meanwhile (a 409 for a
// message sent while the answer streamed).
let streamNotice = "";
function sayOfStream(text) { streamNotice = text; say(text); }
function clearStreamNotice() {
  if (streamNotice && $("status-line").textContent === streamNotice) say("");
  streamNotice = "";
}

function renderMessage(m) {
  let box = document.querySelector(`[data-message-id="${m.id}"]`);
  if (!box) {
    box = document.createElement("div");
    box.dataset.messageId = m.id;
    box.innerHTML = '<div class="text"></div><div class="meta"></div>';
    $("messages").appendChild(box);
  }
  box.className = `msg ${m.role}` + (["success", "pending", "processing"].includes(m.status) ? "" : " failed");
  box.dataset.status = m.status;
  box.querySelector(".text").textContent = m.content;
  const meta = [m.status];
  if (m.model) meta.push(m.model);
  if (m.error_display) meta.push(m.error_display);
  box.querySelector(".meta").textContent = meta.join(" · ");
  $("messages").scrollTop = $("messages").scrollHeight;
  return box;
}

async function connect() {
  const entered = $("api-key").value.trim();
  if (entered && entered !== state.key) {
    // Another user's key: nothing of the previous one's stays on screen or is sent to.
    stopFollowing();
    sessionStorage.removeItem("agentq_streaming");
    state.conversationId = null;
    $("messages").replaceChildren();
    state.key = entered;
    state.keyEpoch += 1;
  }
  sessionStorage.setItem("agentq_key", state.key);
  const epoch = state.keyEpoch;
  const me = await api("GET", "/api/me");
  if (!stillAt(epoch)) return;
  $("whoami").textContent = `${me.name} · balance ${me.balance}`;
  const agents = await api("GET", "/api/agents");
  if (!stillAt(epoch)) return;
  $("agent").replaceChildren(...agents.items.map((a) => {
    const option = document.createElement("option");
    option.value = a.id;
    option.textContent = a.name;
    return option;
  }));
  await loadConversations();
  const saved = JSON.parse(sessionStorage.getItem("agentq_streaming") || "null");
  if (saved && stillAt(epoch)) {
    await openConversation(saved.conversationId);
    if (stillAt(epoch, saved.conversationId)) follow(saved);
  }
}

async function loadConversations() {
  const epoch = state.keyEpoch;
  const list = await api("GET", "/api/conversations?limit=50");
  if (!stillAt(epoch)) return;
  $("conversations").innerHTML = "";
  for (const c of list.items) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = c.title || `Conversation ${c.id}`;
    button.onclick = () => openConversation(c.id);
    $("conversations").appendChild(button);
  }
}

async function openConversation(id) {
  if (state.streaming && state.streaming.conversationId !== id) stopFollowing();
  state.conversationId = id;
  $("messages").innerHTML = "";
  const epoch = state.keyEpoch;
  const list = await api("GET", `/api/conversations/${id}/messages`);
  if (!stillAt(epoch, id)) return;  // its messages must not join another conversation's
  list.items.forEach(renderMessage);
}

// Whether the new conversation is the one on screen (not when another key was connected meanwhile).
async function newConversation() {
  const epoch = state.keyEpoch;
  const conversation = await api("POST", "/api/conversations", { agent_id: Number($("agent").value) });
  if (!stillAt(epoch)) return false;
  await openConversation(conversation.id);
  return stillAt(epoch, conversation.id);
}

async function send(event) {
  event.preventDefault();
  const content = $("content").value;
  if (!content.trim()) return;
  const epoch = state.keyEpoch;
  try {
    if (!state.conversationId && !(await newConversation())) return;
    const conversationId = state.conversationId;
    const turn = await api("POST", `/api/conversations/${conversationId}/messages`, { content });
    if (!stillAt(epoch, conversationId)) return;  // the turn runs on; this screen is another's now
    $("content").value = "";
    renderMessage(turn.user_message);
    renderMessage(turn.assistant_message);
    follow({ conversationId, messageId: turn.assistant_message.id,
             questionId: turn.user_message.id, lastEventId: null, text: "" });
  } catch (error) {
    if (stillAt(epoch)) say(error.message);
  }
}

// The answer being followed, one at a time: opening another conversation, following another answer or
// connecting with another key stops following it (the turn itself goes on).
function stopFollowing() {
  if (!state.streaming) return;
  state.streaming.abort.abort();
  state.streaming = null;
  $("stop").disabled = true;
}

const RETRY_MS = [1000, 2000, 5000];

// Reads the answer's event stream with fetch (EventSource cannot send the Authorization header). A stream
// that closes without `done` (the server restarting, the stream's time limit, a network error, a 429 or 503)
// is opened again with its Last-Event-ID, as EventSource would; only `done` or a refusal that a retry cannot
// change ends it.
async function follow(saved) {
  stopFollowing();
  const stream = { ...saved, abort: new AbortController() };
  state.streaming = stream;
  remember(stream);
  $("stop").disabled = false;
  const box = document.querySelector(`[data-message-id="${stream.messageId}"]`);
  if (box) box.querySelector(".text").textContent = stream.text;
  let failures = 0;
  while (state.streaming === stream) {
    try {
      if (await readStream(stream)) return finish(stream);
      failures = 0;  // it was open, then closed without `done`: reopen after the server's `retry` (1 s)
    } catch (error) {
      if (error.name === "AbortError") return;
      if (error.final) {
        finish(stream);
        sayOfStream(error.message);
        return;
      }
      failures += 1;
      sayOfStream(`${error.message} Reconnecting…`);
    }
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS[Math.min(failures, RETRY_MS.length - 1)]));
  }
}

// One response of the stream: true once `done` was read.
async function readStream(stream) {
  const headers = { "Authorization": "Bearer " + state.key };
  if (stream.lastEventId) headers["Last-Event-ID"] = stream.lastEventId;
  const response = await fetch(`/api/messages/${stream.messageId}/stream`, { headers, signal: stream.abort.signal });
  if (!response.ok) {
    const refusal = await response.json().catch(() => null);
    const error = new Error(refusal?.error?.message || `The answer's stream was refused (HTTP ${response.status}).`);
    error.final = ![429, 502, 503, 504].includes(response.status);
    throw error;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (handleFrame(frame, stream)) return true;
    }
  }
}

function handleFrame(frame, stream) {
  let event = "message", data = "", id = null;
  for (const line of frame.split("\n")) {
    if (line.startsWith("event: ")) event = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
    else if (line.startsWith("id: ")) id = line.slice(4);
  }
  if (!data) return false;
  clearStreamNotice();
  const payload = JSON.parse(data);
  const box = document.querySelector(`[data-message-id="${stream.messageId}"]`);
  if (id) stream.lastEventId = id;
  if (event === "delta") {
    stream.text += payload.text;
    if (box) box.querySelector(".text").textContent = stream.text;
  } else if (event === "status") {
    if (payload.restart) stream.text = "";
    if (box) box.querySelector(".meta").textContent = payload.status + (payload.model ? ` · ${payload.model}` : "");
  } else if (event === "done") {
    renderMessage(payload);
    if (stream.questionId) {
      // Redrawn only while still on screen: the page may have moved to another conversation or key meanwhile.
      const onScreen = () => document.querySelector(`[data-message-id="${stream.questionId}"]`);
      if (onScreen()) api("GET", `/api/messages/${stream.questionId}`).then((m) => { if (onScreen()) renderMessage(m); });
    }
    return true;
  }
  remember(stream);
  return false;
}

function remember(stream) {
  const { abort, ...kept } = stream;
  sessionStorage.setItem("agentq_streaming", JSON.stringify(kept));
}

function finish(stream) {
  if (state.streaming !== stream) return;
  state.streaming = null;
  sessionStorage.removeItem("agentq_streaming");
  $("stop").disabled = true;
  clearStreamNotice();
  loadConversations();
}

async function stop() {
  if (state.streaming) await api("POST", `/api/messages/${state.streaming.messageId}/cancel`);
}

$("api-key").value = state.key;
$("connect").onclick = () => connect().catch((e) => say(e.message));
$("new-conversation").onclick = () => newConversation().catch((e) => say(e.message));
$("composer").onsubmit = send;
$("stop").onclick = () => stop().catch((e) => say(e.message));
if (state.key) connect().catch((e) => say(e.message));
