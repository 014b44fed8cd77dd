// The broker's dashboard: it reads /api/overview every two seconds and
// draws it.  Everything it shows comes from the broker's JSON API
// (docs/http.rst); acting (cancel, retry) needs the site's token, which
// the URL the broker logs carries.
"use strict";

const REFRESH_MS = 2000;
const HISTORY = 150;  // points: five minutes at one every two seconds
const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];

const token = (() => {
  const url = new URL(window.location.href);
  const given = url.searchParams.get("token");
  if (given) {
    sessionStorage.setItem("taskbroker-token", given);
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search);
  }
  return sessionStorage.getItem("taskbroker-token");
})();

const samples = [];  // {time, ended, queued}

function api(path, options = {}) {
  const headers = {"Accept": "application/json"};
  if (token) headers["Authorization"] = "Bearer " + token;
  return fetch(path, {...options, headers}).then(async (response) => {
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  });
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = cell instanceof Node ? element("td") : element("td", cell);
    if (cell instanceof Node) td.appendChild(cell);
    if (typeof cell === "number") td.className = "number";
    tr.appendChild(td);
  }
  return tr;
}

function replaceRows(table, rows) {
  const body = table.querySelector("tbody");
  body.replaceChildren(...rows);
}

function say(text) {
  document.getElementById("message").textContent = text || "";
}

function counted(number, noun) {
  return `${number} ${noun}${number === 1 ? "" : "s"}`;
}

function percent(fraction) {
  return Math.round(fraction * 100) + "%";
}

function progressOf(fraction, message) {
  const line = element("span", null, "task-line");
  if (fraction !== null && fraction !== undefined) {
    const bar = element("progress");
    bar.max = 1;
    bar.value = fraction;
    line.appendChild(bar);
    line.appendChild(element("span", percent(fraction), "percent"));
  }
  if (message) line.appendChild(element("span", message, "progress-message"));
  return line;
}

function act(taskId, action) {
  api(`api/tasks/${taskId}/${action}`, {method: "POST"})
    .then((body) => { say(`task ${taskId}: ${body.task.state}`); refresh(); })
    .catch((error) => say(`task ${taskId}: ${error.message}`));
}

function actionButton(taskId, action) {
  const button = element("button", action, "action-" + action);
  button.type = "button";
  button.addEventListener("click", () => act(taskId, action));
  return button;
}

function drawQueues(stats) {
  const table = document.getElementById("queues");
  const head = element("tr");
  head.appendChild(element("th", "priority"));
  for (const state of STATES) head.appendChild(element("th", state));
  table.querySelector("thead").replaceChildren(head);
  const rows = stats.priorities.map((level) => {
    const tr = row([level, ...STATES.map(
      (state) => (stats.tasks[state] || {})[level] || 0)]);
    tr.dataset.level = level;
    return tr;
  });
  replaceRows(table, rows);
  document.getElementById("summary").textContent =
    `${counted(stats.workers, "worker")}, ${counted(stats.slots, "slot")}, ` +
    `${stats.free_slots} free` +
    (stats.delayed ? `; ${stats.delayed} delayed` : "") +
    (stats.unserved.length ? `; no worker for ${stats.unserved.join(", ")}` : "");
}

function drawChart(id, values) {
  const line = document.querySelector(`#${id} polyline`);
  const top = Math.max(1, ...values);
  line.setAttribute("points", values.map((value, i) =>
    `${(i * 300 / (HISTORY - 1)).toFixed(1)},${(58 - value * 56 / top).toFixed(1)}`
  ).join(" "));
}

function drawCharts(stats) {
  const ended = stats.counters.completed || 0;
  const queued = Object.values(stats.tasks.queued || {}).reduce((a, b) => a + b, 0);
  samples.push({time: Date.now(), ended, queued});
  if (samples.length > HISTORY) samples.shift();
  const rates = samples.map((point, i) => {
    if (i === 0) return 0;
    const before = samples[i - 1];
    const seconds = (point.time - before.time) / 1000;
    return seconds > 0 ? Math.max(0, point.ended - before.ended) / seconds : 0;
  });
  document.getElementById("rate").textContent = rates[rates.length - 1].toFixed(1);
  document.getElementById("depth").textContent = queued;
  drawChart("throughput-chart", rates);
  drawChart("depth-chart", samples.map((point) => point.queued));
}

function drawWorkers(workers) {
  replaceRows(document.getElementById("workers"), workers.map((worker) => {
    const running = element("div");
    for (const task of worker.running) {
      const line = element("div", null, "running-task");
      line.dataset.task = task.id;
      line.appendChild(element("span", `task ${task.id}: ${task.handler} `));
      line.appendChild(progressOf(task.progress, task.message));
      running.appendChild(line);
    }
    const tr = row([worker.name, `${worker.busy}/${worker.slots}`,
                    worker.priorities.join(","), running]);
    tr.dataset.worker = worker.name;
    return tr;
  }));
}

function drawFailures(failures) {
  replaceRows(document.getElementById("failures"), failures.map((task) => {
    const tr = row([task.id, task.handler, task.priority,
                    (task.finished_at || "").replace("T", " ").slice(0, 19),
                    element("span", task.error, "error"),
                    actionButton(task.id, "retry")]);
    tr.dataset.task = task.id;
    return tr;
  }));
}

function showTask(task) {
  const box = document.getElementById("task");
  const list = element("dl");
  for (const key of ["id", "handler", "priority", "state", "attempts",
                     "worker", "created_at", "finished_at", "error"]) {
    list.appendChild(element("dt", key));
    list.appendChild(element("dd", task[key] === null ? "–" : task[key]));
  }
  if (task.progress) {
    list.appendChild(element("dt", "progress"));
    const dd = element("dd");
    dd.appendChild(progressOf(task.progress.fraction, task.progress.message));
    list.appendChild(dd);
  }
  box.replaceChildren(list);
  if (task.state === "queued" || task.state === "running") {
    box.appendChild(actionButton(task.id, "cancel"));
  } else if (task.state === "failed" || task.state === "cancelled") {
    box.appendChild(actionButton(task.id, "retry"));
  }
}

function refresh() {
  return api("api/overview").then((overview) => {
    const stats = overview.stats;
    const health = document.getElementById("health");
    health.textContent = stats.accepting_work
      ? (stats.dispatch_paused ? "dispatch paused" : "accepting work")
      : "cannot write its database: " + stats.write_error;
    health.className = stats.accepting_work && !stats.dispatch_paused ? "ok" : "trouble";
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString();
    drawQueues(stats);
    drawCharts(stats);
    drawWorkers(overview.workers);
    drawFailures(overview.failures);
    const shown = document.getElementById("task").dataset.task;
    if (shown) find(shown);
  }).catch((error) => {
    const health = document.getElementById("health");
    health.textContent = "no answer: " + error.message;
    health.className = "trouble";
  });
}

function find(taskId) {
  return api(`api/tasks/${encodeURIComponent(taskId)}`).then((body) => {
    document.getElementById("task").dataset.task = taskId;
    showTask(body.task);
  }).catch((error) => {
    const box = document.getElementById("task");
    delete box.dataset.task;
    box.replaceChildren(element("p", error.message, "error"));
  });
}

document.getElementById("search").addEventListener("submit", (event) => {
  event.preventDefault();
  find(document.getElementById("search-id").value);
});

refresh();
setInterval(refresh, REFRESH_MS);
