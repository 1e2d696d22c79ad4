// The chat page: plain JavaScript over the public API. The key and the answer being streamed live in
// sessionStorage, so a reload picks the stream up again with Last-Event-ID.
"use strict";

const state = { key: sessionStorage.getItem("agentq_key") || "", conversationId: null, streaming: null };
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
  state.key = $("api-key").value.trim() || state.key;
  sessionStorage.setItem("agentq_key", state.key);
  const me = await api("GET", "/api/me");
  $("whoami").textContent = `${me.name} · balance ${me.balance}`;
  const agents = await api("GET", "/api/agents");
  $("agent").replaceChildren(...agents.items.map((a) => {
    const option = document.createElement("option");
    option.value = a.id;
    option.textContent = a.name;
    return option;
  }));
  await loadConversations();
  const saved = JSON.parse(sessionStorage.getItem("agentq_streaming") || "null");
  if (saved) {
    await openConversation(saved.conversationId);
    follow(saved.messageId, saved.lastEventId, saved.text);
  }
}

async function loadConversations() {
  const list = await api("GET", "/api/conversations?limit=50");
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
  state.conversationId = id;
  $("messages").innerHTML = "";
  const list = await api("GET", `/api/conversations/${id}/messages`);
  list.items.forEach(renderMessage);
}

async function newConversation() {
  const conversation = await api("POST", "/api/conversations", { agent_id: Number($("agent").value) });
  await openConversation(conversation.id);
}

async function send(event) {
  event.preventDefault();
  const content = $("content").value;
  if (!content.trim()) return;
  if (!state.conversationId) await newConversation();
  try {
    const turn = await api("POST", `/api/conversations/${state.conversationId}/messages`, { content });
    $("content").value = "";
    renderMessage(turn.user_message);
    renderMessage(turn.assistant_message);
    follow(turn.assistant_message.id, null, "");
  } catch (error) {
    say(error.message);
  }
}

// Reads the answer's event stream with fetch (EventSource cannot send the Authorization header).
async function follow(messageId, lastEventId, text) {
  state.streaming = { conversationId: state.conversationId, messageId, lastEventId, text };
  sessionStorage.setItem("agentq_streaming", JSON.stringify(state.streaming));
  $("stop").disabled = false;
  const box = document.querySelector(`[data-message-id="${messageId}"]`);
  if (box) box.querySelector(".text").textContent = text;
  const headers = { "Authorization": "Bearer " + state.key };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const response = await fetch(`/api/messages/${messageId}/stream`, { headers });
  if (!response.ok) {
    const refusal = await response.json().catch(() => null);
    finish();
    say(refusal?.error?.message || `The answer's stream was refused (HTTP ${response.status}).`);
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (handleFrame(frame, messageId)) return finish();
    }
  }
  finish();
}

function handleFrame(frame, messageId) {
  let event = "message", data = "", id = null;
  for (const line of frame.split("\n")) {
    if (line.startsWith("event: ")) event = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
    else if (line.startsWith("id: ")) id = line.slice(4);
  }
  if (!data) return false;
  const payload = JSON.parse(data);
  const stream = state.streaming;
  const box = document.querySelector(`[data-message-id="${messageId}"]`);
  if (id) stream.lastEventId = id;
  if (event === "delta") {
    stream.text += payload.text;
    if (box) box.querySelector(".text").textContent = stream.text;
  } else if (event === "status") {
    if (payload.restart) stream.text = "";
    say(`${payload.status}${payload.model ? " · " + payload.model : ""}`);
    if (box) box.querySelector(".meta").textContent = payload.status;
  } else if (event === "done") {
    renderMessage(payload);
    const user = document.querySelector(`[data-message-id="${payload.id - 1}"]`);
    if (user) api("GET", `/api/messages/${payload.id - 1}`).then(renderMessage);
    return true;
  }
  sessionStorage.setItem("agentq_streaming", JSON.stringify(stream));
  return false;
}

function finish() {
  state.streaming = null;
  sessionStorage.removeItem("agentq_streaming");
  $("stop").disabled = true;
  say("");
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
