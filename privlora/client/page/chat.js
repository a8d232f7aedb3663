// The chat page: a conversation over the gateway's own OpenAI API (/v1/models and streamed
// /v1/chat/completions), with what each answer's privacy cost, as the gateway measured it.
"use strict";

const $ = (id) => document.getElementById(id);
let conversation = [];  // this chat's turns, sent with every request: {role, content}
let running = null;  // the AbortController of the answer being streamed

// Figures shown beside an answer: [label, value from the gateway's `privlora` object, unit, why].
const FIGURES = [
  ["first token", (r) => r.first_token_s, "s", "time to the first token: the whole prompt through the model, encrypted"],
  ["speed", (r) => r.tokens_per_second, "tokens/s", "tokens after the first, over the time they took"],
  ["online", (r) => r.online.seconds, "s", "time of the exchanges with the server and the public model parts run here"],
  ["online data", (r) => r.online.bytes_up + r.online.bytes_down, "B", "bytes sent and received during the answer"],
  ["messages", (r) => r.online.messages, "", "messages exchanged with the server during the answer"],
  ["offline", (r) => r.offline.seconds, "s", "pads made since the previous answer, ahead of need or on the spot"],
  ["offline data", (r) => r.offline.bytes_up + r.offline.bytes_down, "B", "bytes those pads took on the wire"],
  ["waited for pads", (r) => r.offline.waited_s, "s", "the part of the offline time made on the spot, while you waited"],
];

function formatted(value, unit) {
  if (value === null || value === undefined) return "-";
  if (unit === "B") {
    const [scale, name] = value >= 1e6 ? [1e6, "MB"] : value >= 1e3 ? [1e3, "kB"] : [1, "B"];
    return `${(value / scale).toFixed(scale === 1 ? 0 : 1)} ${name}`;
  }
  if (unit === "s") return `${value.toFixed(value < 10 ? 2 : 1)} s`;
  return `${Number.isInteger(value) ? value : value.toFixed(1)}${unit ? " " + unit : ""}`;
}

function showStats(element, report) {
  element.replaceChildren(...FIGURES.map(([label, pick, unit, why]) => {
    const figure = document.createElement("span");
    const value = pick(report);
    figure.dataset.stat = label;
    figure.dataset.value = value ?? "";
    figure.title = why;
    figure.textContent = `${label} ${formatted(value, unit)}`;
    return figure;
  }));
}

function showError(message) {
  const line = $("error");
  line.textContent = message.replace(/\s+/g, " ").trim();
  line.title = line.textContent;
  line.hidden = !message;
}

function addMessage(role, text) {
  const message = document.createElement("article");
  message.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  message.append(body);
  if (role === "assistant") {
    const stats = document.createElement("p");
    stats.className = "stats";
    message.append(stats);
  }
  $("conversation").append(message);
  message.scrollIntoView({block: "end"});
  return message;
}

function setBusy(busy) {
  document.body.dataset.busy = busy ? "yes" : "no";
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error.message;
  } catch {
    return `the gateway answered ${response.status} ${response.statusText}`;
  }
}

function request(turns) {
  const body = {model: $("model").value, messages: turns, stream: true,
                temperature: Number($("temperature").value || 0)};
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  return body;
}

// Server-Sent Events arrive in pieces; each complete event is `data: <json>` then a blank line.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6));
      buffer = buffer.slice(end + 2);
      if (data.join("") === "[DONE]") return;
      if (data.length) yield JSON.parse(data.join("\n"));
    }
  }
}

async function answer(turns, message, controller) {
  const text = message.querySelector(".text");
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(request(turns)),
    signal: controller.signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  for await (const chunk of events(response)) {
    if (chunk.error) throw new Error(chunk.error.message);
    const choice = chunk.choices[0];
    if (choice && choice.delta.content) text.textContent += choice.delta.content;
    if (chunk.privlora) showStats(message.querySelector(".stats"), chunk.privlora);
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (running || !prompt.trim() || !$("model").value) return;
  showError("");
  const turns = conversation;  // a new chat started meanwhile does not get this answer
  const question = addMessage("user", prompt);
  turns.push({role: "user", content: prompt});
  $("prompt").value = "";
  const message = addMessage("assistant", "");
  message.dataset.state = "streaming";
  const controller = running = new AbortController();
  setBusy(true);
  try {
    await answer(turns, message, controller);
    message.dataset.state = "done";
  } catch (error) {
    message.dataset.state = controller.signal.aborted ? "stopped" : "failed";
    if (!controller.signal.aborted) showError(error.message);
  } finally {
    const text = message.querySelector(".text").textContent;
    if (!text) {  // nothing answered: the question goes back to the box
      turns.pop();
      question.remove();
      message.remove();
      $("prompt").value = prompt;
    } else {
      turns.push({role: "assistant", content: text});
    }
    if (running === controller) {
      running = null;
      setBusy(false);
    }
  }
}

function stop() {
  if (running) running.abort();
}

function newChat() {
  stop();
  conversation = [];
  $("conversation").querySelectorAll(".message").forEach((m) => m.remove());
  showError("");
  $("prompt").focus();
}

async function loadModels() {
  try {
    const response = await fetch("v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    const models = (await response.json()).data;
    $("model").replaceChildren(...models.map((m) => new Option(`${m.id} (${m.backend})`, m.id)));
    document.body.dataset.ready = "yes";
  } catch (error) {
    showError(`could not list the models: ${error.message}`);
  }
}

$("composer").addEventListener("submit", send);
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
setBusy(false);
loadModels();
