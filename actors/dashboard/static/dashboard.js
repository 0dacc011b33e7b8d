// The meshpipe dashboard: polls the status JSON once a refresh period and redraws the page.
"use strict";
const params = new URLSearchParams(location.search);
const STATUS = "v1/pipeline/status" + (params.get("deployment") ? "?deployment=" + encodeURIComponent(params.get("deployment")) : "");
const SVG = "http://www.w3.org/2000/svg";
let chart = null, refreshMs = 1000;
const lossCharts = {};

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function busyColour(b) {  // white (idle) to blue (busy)
  const v = Math.round(255 - 150 * Math.min(1, b));
  return `rgb(${v},${Math.round(v * 0.95 + 12)},255)`;
}

function drawGraph(s) {
  const g = document.getElementById("route-graph");
  g.replaceChildren();
  const byStage = [];
  for (const r of s.replicas) (byStage[r.stage] = byStage[r.stage] || []).push(r);
  const rows = Math.max(1, ...byStage.map((x) => (x ? x.length : 0)));
  const W = 150, H = 56, left = 70, top = 14;
  g.setAttribute("viewBox", `0 0 ${left + (s.stages + 1) * W} ${top * 2 + rows * H}`);
  const pos = {};
  byStage.forEach((reps, k) => (reps || []).forEach((r, i) => { pos[r.name] = [left + k * W + 20, top + i * H]; }));
  const mid = top + (rows * H) / 2 - 10;
  const ends = { start: [10, mid], end: [left + s.stages * W + 20, mid] };
  const route = ["start", ...s.route, "end"];
  const onRoute = new Set(route.slice(1).map((n, i) => route[i] + ">" + n));
  const layers = [["start"], ...byStage.map((reps) => (reps || []).filter((r) => r.alive).map((r) => r.name)), ["end"]];
  for (let k = 0; k + 1 < layers.length; k++) {
    for (const a of layers[k]) for (const b of layers[k + 1]) {
      const [x1, y1] = pos[a] || ends[a], [x2, y2] = pos[b] || ends[b];
      const cls = onRoute.has(a + ">" + b) ? "edge route" : "edge";
      g.appendChild(svg("line", { class: cls, x1: x1 + (a === "start" ? 40 : 110), y1: y1 + 20, x2: x2, y2: y2 + 20 }));
    }
  }
  for (const [name, [x, y]] of Object.entries(ends)) {
    const n = svg("g", { class: "sentinel" });
    n.appendChild(svg("rect", { x, y, width: 40, height: 40, rx: 20, fill: "#1d2330" }));
    n.appendChild(svg("text", { x: x + 20, y: y + 24, "text-anchor": "middle", fill: "#fff" }, name));
    g.appendChild(n);
  }
  for (const r of s.replicas) {
    const [x, y] = pos[r.name];
    const n = svg("g", { class: "replica" + (r.alive ? "" : " down"), "data-name": r.name });
    n.appendChild(svg("title", {}, `${r.name}\nnode ${r.node}, ${r.device}\nbusy ${(100 * r.busy).toFixed(0)} %, queue ${r.queue}`));
    n.appendChild(svg("rect", { x, y, width: 110, height: 40, rx: 5, fill: r.alive ? busyColour(r.busy) : "#ddd" }));
    n.appendChild(svg("text", { x: x + 55, y: y + 16, "text-anchor": "middle" }, `stage ${r.stage} · replica ${r.replica}`));
    n.appendChild(svg("text", { x: x + 55, y: y + 31, "text-anchor": "middle" }, r.alive ? `${(100 * r.busy).toFixed(0)} % busy` : "down"));
    g.appendChild(n);
  }
}

function drawTable(s) {
  const body = document.querySelector("#replicas tbody");
  body.replaceChildren();
  for (const r of s.replicas) {
    const tr = el("tr", { class: r.alive ? "" : "down", "data-name": r.name });
    const cells = [r.name, r.node.slice(0, 12), r.device, `${(100 * r.busy).toFixed(0)} %`, r.queue, r.sequences,
      r.step_ms === null ? "–" : r.step_ms.toFixed(1), r.kv_blocks_used === null ? "–" : r.kv_blocks_used,
      r.restarts, r.alive ? (r.on_route ? "on the route" : "up") : "down"];
    cells.forEach((c, i) => tr.appendChild(el("td", i === 0 ? { class: "name" } : {}, String(c))));
    body.appendChild(tr);
  }
}

function drawThroughput(s) {
  const t = s.throughput.map((p) => p.t), tps = s.throughput.map((p) => p.tokens_per_s);
  const act = s.throughput.map((p) => p.active), queued = s.throughput.map((p) => p.queued);
  const data = [t, tps, act, queued];
  const box = document.getElementById("throughput-chart");
  if (!chart) {
    chart = new uPlot({ width: Math.min(1100, box.clientWidth || 900), height: 200,
      series: [{}, { label: "tokens/s", stroke: "#e4572e", width: 2 }, { label: "active sequences", stroke: "#456", scale: "n" },
        { label: "queued requests", stroke: "#9a7", scale: "n", dash: [4, 3] }],
      axes: [{}, { label: "tokens/s" }, { side: 1, scale: "n", grid: { show: false } }] }, data, box);
  } else chart.setData(data);
}

function drawEvents(s) {
  const ul = document.getElementById("events");
  if (!s.events.length) return;
  ul.replaceChildren();
  for (const e of s.events.slice().reverse()) {
    const li = el("li", { class: "event " + e.kind });
    li.appendChild(el("span", { class: "kind" }, e.kind));
    li.appendChild(document.createTextNode(` ${new Date(e.t * 1000).toLocaleTimeString()} ${e.text}`));
    ul.appendChild(li);
  }
}

function drawTraining(s) {
  document.getElementById("training").hidden = !s.training.length;
  const box = document.getElementById("training-runs");
  for (const run of s.training) {
    let div = document.getElementById("run-" + run.name);
    if (!div) {
      div = el("div", { id: "run-" + run.name, class: "run" });
      div.appendChild(el("h3", {}, run.name));
      div.appendChild(el("p", { class: "figures" }));
      div.appendChild(el("div", { class: "loss-chart" }));
      box.appendChild(div);
    }
    div.querySelector(".figures").textContent = `${run.stages} stages · step ${run.steps} · ` +
      (run.tokens_per_s === null ? "" : `${run.tokens_per_s.toFixed(0)} training tokens/s · `) +
      (run.bubble === null ? "" : `bubble ${(100 * run.bubble).toFixed(0)} %`);
    const data = [run.loss.map((p) => p[0]), run.loss.map((p) => p[1])];
    if (!lossCharts[run.name]) {
      lossCharts[run.name] = new uPlot({ width: 500, height: 160, scales: { x: { time: false } },
        series: [{ label: "step" }, { label: "loss", stroke: "#456", width: 2 }] }, data, div.querySelector(".loss-chart"));
    } else lossCharts[run.name].setData(data);
  }
}

async function refresh() {
  try {
    const r = await fetch(STATUS, { credentials: "same-origin" });
    if (r.status === 401) {
      document.getElementById("login").hidden = false;
      document.getElementById("login-error").hidden = !params.has("denied");
      return;
    }
    if (!r.ok) throw new Error(`status ${r.status}`);
    const s = await r.json();
    refreshMs = 1000 * s.refresh_s;
    document.getElementById("login").hidden = true;
    document.getElementById("error").hidden = true;
    document.getElementById("deployment").textContent = s.deployment;
    document.getElementById("model").textContent = s.model.split("/").pop();
    document.getElementById("tokens-per-s").textContent = `${s.tokens_per_s.toFixed(1)} tokens/s`;
    document.getElementById("active").textContent = `${s.throughput.length ? s.throughput[s.throughput.length - 1].active : 0} sequences`;
    document.getElementById("updated").textContent = `updated ${new Date(s.updated * 1000).toLocaleTimeString()}`;
    drawGraph(s); drawTable(s); drawThroughput(s); drawEvents(s); drawTraining(s);
  } catch (e) {
    const p = document.getElementById("error");
    p.hidden = false;
    p.textContent = `could not refresh: ${e.message}`;
  } finally {
    setTimeout(refresh, refreshMs);
  }
}
refresh();
