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
    const progress = document.createElement("p");
    progress.className = "progress";
    progress.hidden = true;
    progress.append(document.createElement("span"), document.createElement("progress"));
    const stats = document.createElement("p");
    stats.className = "stats";
    const view = document.createElement("figure");
    view.className = "view";
    view.hidden = true;
    message.append(progress, stats, view);
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

// The picture of one group of the last token: the values the server received, beside the
// client's own x, each a strip of its first values and a histogram over its own range.
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  return element;
}

function strip(values) {
  const picture = svg("svg", {viewBox: `0 0 ${values.length} 1`, preserveAspectRatio: "none", class: "strip",
                              "data-values": values.join(",")});
  values.forEach((v, i) => picture.append(svg("rect", {x: i, y: 0, width: 1, height: 1,
                                                        fill: `hsl(215, 60%, ${Math.round(92 - 70 * v)}%)`})));
  return picture;
}

function histogram(shares) {
  const top = Math.max(...shares, 1e-9);
  const picture = svg("svg", {viewBox: `0 0 ${shares.length} 1`, preserveAspectRatio: "none", class: "histogram"});
  shares.forEach((share, i) => picture.append(svg("rect", {x: i + 0.1, y: 1 - share / top, width: 0.8,
                                                            height: share / top, fill: "#1f5fbf"})));
  return picture;
}

function showView(element, view) {
  if (!view) return;
  const rows = [["received", view.received, "the server received"], ["activation", view.activation, "you hold"]];
  const caption = document.createElement("figcaption");
  caption.textContent = `What the server received for the last token at ${view.sites.join(" + ")} ` +
                        `(${view.message_bytes} bytes), beside what you hold:`;
  element.replaceChildren(caption, ...rows.map(([name, part, who]) => {
    const row = document.createElement("div");
    row.className = "view-row";
    row.dataset.view = name;
    row.dataset.count = part.count;
    const label = document.createElement("span");
    label.textContent = `${who}: ${part.meaning} (${part.count} values)`;
    row.append(label, strip(part.strip), histogram(part.histogram));
    return row;
  }));
  element.hidden = false;
}

// While the first token is awaited, the gateway sends SSE comments `: privlora PHASE DONE/TOTAL`.
const PHASES = {pads: "making pads on the spot", prefill: "prefill (your prompt through the model)"};

function progressOf(line) {
  const match = /^: privlora (pads|prefill) (\d+)\/(\d+)$/.exec(line);
  return match && {phase: match[1], done: Number(match[2]), total: Number(match[3])};
}

function showProgress(message, progress) {
  const line = message.querySelector(".progress");
  line.hidden = !progress;
  if (!progress) return;
  line.dataset.phase = progress.phase;
  const seen = new Set((message.dataset.phases || "").split(" ").filter(Boolean)).add(progress.phase);
  message.dataset.phases = [...seen].join(" ");  // what the wait went through, kept after it
  line.querySelector("span").textContent = `${PHASES[progress.phase]}: ${progress.done}/${progress.total} groups`;
  const bar = line.querySelector("progress");
  bar.max = progress.total;
  bar.value = progress.done;
}

// Server-Sent Events arrive in pieces; each complete event is `data: <json>` then a blank line
// (a comment line, `: ...`, is yielded as {comment}).
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
      const lines = buffer.slice(0, end).split("\n");
      const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6));
      buffer = buffer.slice(end + 2);
      for (const line of lines.filter((l) => l.startsWith(":"))) yield {comment: line};
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
    if (chunk.comment) {
      const progress = progressOf(chunk.comment);
      if (progress) showProgress(message, progress);
      continue;
    }
    if (chunk.error) throw new Error(chunk.error.message);
    const choice = chunk.choices[0];
    if (choice && choice.delta.content) {
      showProgress(message, null);
      text.textContent += choice.delta.content;
    }
    if (chunk.privlora) {
      showStats(message.querySelector(".stats"), chunk.privlora);
      showView(message.querySelector(".view"), chunk.privlora.server_view);
    }
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

// The selected model's pads pool, as the next answer will find it: warm (every group has the rows
// kept ready), being made, or cold (made on the spot, while you wait); no line for a backend
// without pads.
function showPads(model) {
  const line = $("pads");
  const pads = model && model.pads;
  line.hidden = !pads;
  if (!pads) return;
  const state = pads.kept && pads.ready >= pads.kept ? "warm" : pads.making ? "making" : pads.ready ? "some" : "cold";
  line.dataset.state = state;
  line.dataset.ready = pads.ready;
  line.textContent = {
    warm: `pads warm: ${pads.ready} rows ready per group`,
    making: `pads being made: ${pads.ready} of ${pads.kept} rows ready per group`,
    some: `pads: ${pads.ready} rows ready per group`,
    cold: "pads cold: made on the spot when you send",
  }[state];
}

let models = [];
const POLL_MS = 2000;

async function fetchModels() {
  const response = await fetch("v1/models");
  if (!response.ok) throw new Error(await errorMessage(response));
  models = (await response.json()).data;
}

function selected() {
  return models.find((m) => m.id === $("model").value);
}

async function loadModels() {
  try {
    await fetchModels();
    $("model").replaceChildren(...models.map((m) => new Option(`${m.id} (${m.backend})`, m.id)));
    $("max-tokens").max = Math.max(...models.map((m) => m.max_tokens));
    showPads(selected());
    document.body.dataset.ready = "yes";
  } catch (error) {
    showError(`could not list the models: ${error.message}`);
  }
}

// While you read or type, the gateway tops the pool up; the line follows it.
async function pollPads() {
  if (!running && document.body.dataset.ready === "yes") {
    try {
      await fetchModels();
      showPads(selected());
    } catch {
      // the next poll tries again; a request shows its own error
    }
  }
  setTimeout(pollPads, POLL_MS);
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
$("model").addEventListener("change", () => showPads(selected()));
setBusy(false);
loadModels().then(() => setTimeout(pollPads, POLL_MS));
