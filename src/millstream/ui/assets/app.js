// Millstream dashboard: plain JavaScript, no build step, no network beyond this server.
// Pages read /api/... as JSON and redraw when /api/events says the state changed.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";

// ------------------------------------------------------------------ DOM helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVGNS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}
function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}
function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

// ------------------------------------------------------------------ formatting
function num(n) {
  if (n === null || n === undefined) return "–";
  const units = ["", "K", "M", "G", "T"];
  let i = 0, x = Number(n);
  while (Math.abs(x) >= 1000 && i < units.length - 1) { x /= 1000; i++; }
  return (i === 0 ? String(Math.round(x)) : x.toFixed(1)) + units[i];
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, x = Number(n);
  while (Math.abs(x) >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  return (i === 0 ? String(Math.round(x)) : x.toFixed(1)) + " " + units[i];
}
function secs(x) {
  if (x === null || x === undefined) return "–";
  if (x < 1) return (x * 1000).toFixed(0) + " ms";
  if (x < 60) return x.toFixed(x < 10 ? 2 : 1) + " s";
  if (x < 3600) return Math.floor(x / 60) + " min " + Math.round(x % 60) + " s";
  return (x / 3600).toFixed(1) + " h";
}
function rate(x) { return x === null || x === undefined ? "–" : num(x) + "/s"; }
function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(0) + "%"; }
function clock(ts) {
  if (!ts) return "–";
  const d = new Date(ts * 1000);
  return d.toLocaleTimeString([], {hour12: false});
}
function when(ts) {
  if (!ts) return "–";
  const d = new Date(ts * 1000);
  return d.toLocaleDateString() + " " + d.toLocaleTimeString([], {hour12: false});
}
function eventTime(iso) { return iso ? iso.replace("T", " ").replace("Z", " UTC") : "–"; }
function badge(status) { return h("span", {class: "badge " + status, text: status}); }
function kv(k, v, id) { return h("div", {class: "kv"}, h("div", {class: "k", text: k}),
                                 h("div", {class: "v", id: id, text: v})); }
function firstLine(t) { return t ? String(t).split("\n")[0] : ""; }

// ------------------------------------------------------------------ data and routing
async function getJSON(path) {
  const r = await fetch(path, {credentials: "same-origin", cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

const route = (() => {
  const m = location.pathname.match(/^\/jobs\/([^/]+)\/?$/);
  return m ? {page: "job", id: decodeURIComponent(m[1])} : {page: "jobs"};
})();

let rendering = false, again = false, failures = 0;
async function refresh() {
  if (rendering) { again = true; return; }
  rendering = true;
  try {
    const app = document.getElementById("app");
    const view = route.page === "job" ? await jobPage(route.id) : await jobsPage();
    const y = window.scrollY;
    const open = new Set([...app.querySelectorAll("details[open]")].map(d => d.dataset.key));
    app.replaceChildren(view);
    for (const d of app.querySelectorAll("details")) if (open.has(d.dataset.key)) d.open = true;
    window.scrollTo(0, y);
    document.body.dataset.loaded = "1";
    failures = 0;
  } catch (e) {
    document.getElementById("app").replaceChildren(h("p", {class: "card error", text: String(e)}));
    // a finished job sends no more updates: try again (1 s, 2 s, ... up to 30 s) so a
    // passing failure (the server busy, a restart) does not leave the page on an error
    failures++;
    setTimeout(refresh, Math.min(30000, 1000 * 2 ** Math.min(failures - 1, 5)));
  } finally {
    rendering = false;
    if (again) { again = false; setTimeout(refresh, 300); }
  }
}

function follow() {
  const dot = document.getElementById("live");
  let polling = null;
  const poll = () => { if (!polling) polling = setInterval(refresh, 2000); };
  if (!window.EventSource) return poll();
  const es = new EventSource("/api/events");
  let pending = null;
  es.addEventListener("update", () => {
    dot.classList.add("on");
    if (!pending) pending = setTimeout(() => { pending = null; refresh(); }, 400);
  });
  es.onerror = () => { dot.classList.remove("on"); poll(); };
  es.onopen = () => { dot.classList.add("on"); if (polling) { clearInterval(polling); polling = null; } };
}

async function header() {
  try {
    const info = await getJSON("/api/info");
    document.getElementById("mode").textContent =
      info.mode === "history" ? "history: " + (info.history || "") : "live";
    if (info.ray_dashboard) {
      document.getElementById("ray-link").replaceChildren(
        h("a", {href: info.ray_dashboard, target: "_blank", rel: "noopener", text: "Ray dashboard ↗"}));
    }
  } catch (e) { /* the page still works */ }
}

// ------------------------------------------------------------------ jobs page
async function jobsPage() {
  const data = await getJSON("/api/jobs");
  const jobs = data.jobs;
  const count = st => jobs.filter(j => j.status === st).length;
  const root = h("div", {id: "jobs-page"},
    h("h1", {text: "Jobs"}),
    h("div", {class: "cards"},
      kv("running", count("running")), kv("succeeded", count("succeeded") + count("finished")),
      kv("failed", count("failed")), kv("jobs", jobs.length)));
  if (!jobs.length) {
    root.append(h("p", {class: "muted", text: "No jobs yet: run an action or start a streaming job."}));
    return root;
  }
  const rows = jobs.map(j => h("tr", {class: "job-row", "data-job": j.id, "data-kind": j.kind,
                                      "data-status": j.status},
    h("td", {}, h("a", {href: "/jobs/" + encodeURIComponent(j.id), text: j.id})),
    h("td", {text: j.name}),
    h("td", {text: j.kind === "batch" ? "batch" : "streaming"}),
    h("td", {}, badge(j.status)),
    h("td", {text: when(j.start)}),
    h("td", {class: "num", text: secs(j.seconds)}),
    h("td", {class: "num", text: num(j.rows_in) + (j.bytes_in ? " / " + bytes(j.bytes_in) : "")}),
    h("td", {class: "num", text: num(j.rows_out) + (j.bytes_out ? " / " + bytes(j.bytes_out) : "")}),
    h("td", {class: "num", text: j.kind === "batch"
      ? `${j.tasks_done}/${j.tasks} tasks, ${j.stages} stages`
      : `${rate(j.in_rate)} in, ${rate(j.out_rate)} out, ${j.checkpoints || 0} checkpoints`}),
    h("td", {class: "small", text: firstLine(j.error)})));
  root.append(h("table", {id: "jobs"},
    h("thead", {}, h("tr", {}, ["Job", "Name", "Kind", "Status", "Started", "Duration",
      "In (rows / bytes)", "Out (rows / bytes)", "Progress", "Error"].map(
        (t, i) => h("th", {class: i >= 5 && i <= 8 ? "num" : null, text: t})))),
    h("tbody", {}, rows)));
  return root;
}

// ------------------------------------------------------------------ a job
async function jobPage(id) {
  const data = await getJSON("/api/jobs/" + encodeURIComponent(id));
  const job = data.job;
  document.title = `${job.kind === "batch" ? "Job" : "Stream"} ${job.id} · Millstream`;
  const head = h("div", {},
    h("p", {class: "small"}, h("a", {href: "/", text: "← Jobs"})),
    h("h1", {}, `${job.kind === "batch" ? "Batch job" : "Streaming job"} ${job.id} `,
      h("span", {id: "job-status"}, badge(job.status))),
    h("p", {class: "muted", id: "job-name", text: job.name}));
  const body = job.kind === "batch" ? batchJob(job) : streamJob(job);
  const err = job.error ? h("div", {class: "card error", id: "job-error"},
    h("b", {text: "Error"}), h("pre", {text: job.error})) : null;
  return h("div", {id: "job-page", "data-kind": job.kind, "data-status": job.status}, head, err, body);
}

function batchJob(job) {
  const stages = job.stages;
  const out = [h("div", {class: "cards"},
    kv("duration", secs(job.seconds)),
    kv("stages", stages.length, "stage-count"),
    kv("tasks", `${stages.reduce((a, s) => a + s.done, 0)}/${stages.reduce((a, s) => a + s.total, 0)}`,
       "task-count"),
    kv("rows in", num(job.rows_in)), kv("bytes in", bytes(job.bytes_in)),
    kv("rows out", num(job.rows_out)), kv("bytes out", bytes(job.bytes_out)),
    kv("runner", (job.runner || "") + (job.in_driver ? " (in the driver)" : "")
       + (job.parallelism ? `, ${job.parallelism} workers` : "")))];
  out.push(h("h2", {text: "Stages"}), h("div", {class: "graph"}, dag(stages.map(st => ({
    id: st.id, deps: st.deps, status: st.status,
    title: `Stage ${st.id}` + (st.purpose ? ` · ${st.purpose}` : ""),
    lines: [...(st.pipelines || []).flatMap(p => p.ports.map(x => x.text)),
            ...(st.pipelines || []).flatMap(p => p.ops.map(o => "→ " + o)),
            "⇒ " + (st.output_text || st.output || "")],
    foot: st.status === "skipped" ? `skipped (${st.why || "cached"})` :
      `${st.done}/${st.total} tasks · ${num(st.rows_read)} rows read · ${num(st.rows_out)} out`,
  })), "stage-graph")));
  const plan = job.plan || {};
  const rules = plan.rules || [];
  const pushed = stages.flatMap(st => (st.pipelines || []).flatMap(p => p.ports))
    .filter(p => p.kind === "source").map(p => p.text);
  out.push(h("h2", {text: "Plan"}), h("div", {class: "card", id: "plan"},
    h("div", {}, h("b", {text: "Rules applied: "}),
      rules.length ? [...new Set(rules)].map(r => h("span", {class: "chip rule", text: r}))
                   : h("span", {class: "muted", text: "none"})),
    h("div", {}, h("b", {text: "Scans (with what was pushed down): "}),
      pushed.length ? h("ul", {}, pushed.map(t => h("li", {class: "scan", text: t})))
                    : h("span", {class: "muted", text: "none"})),
    plan.optimized ? h("details", {"data-key": "optimized"}, h("summary", {text: "Optimized plan"}),
      h("pre", {class: "plain", text: plan.optimized})) : null,
    plan.logical ? h("details", {"data-key": "logical"}, h("summary", {text: "Logical plan"}),
      h("pre", {class: "plain", text: plan.logical})) : null,
    h("details", {"data-key": "physical"}, h("summary", {text: "Physical plan"}),
      h("pre", {class: "plain", text: stages.map(s => s.text || "").join("\n")}))));
  if (job.counters && Object.keys(job.counters).length) {
    out.push(h("h2", {text: "Counters"}), h("table", {id: "counters"}, h("tbody", {},
      Object.entries(job.counters).map(([k, v]) => h("tr", {}, h("td", {text: k}),
                                                       h("td", {class: "num", text: num(v)}))))));
  }
  out.push(h("h2", {text: "Tasks by stage"}));
  for (const st of stages) out.push(stageSection(st));
  return out;
}

function stageSection(st) {
  const sk = st.skew;
  const skewText = sk ? `slowest ${secs(sk.max_s)} vs median ${secs(sk.median_s)}` +
    (sk.ratio ? ` (${sk.ratio.toFixed(1)}×)` : "") +
    `; largest input ${num(sk.max_rows)} vs median ${num(sk.median_rows)} rows` : "–";
  const section = h("div", {class: "stage", id: "stage-" + st.id, "data-stage": st.id,
                            "data-total": st.total, "data-done": st.done, "data-status": st.status},
    h("div", {class: "stage-head"}, h("h3", {text: `Stage ${st.id}` + (st.purpose ? ` (${st.purpose})` : "")}),
      badge(st.status),
      h("span", {class: "muted small stage-counts",
                 text: `${st.done}/${st.total} tasks done · ${st.failed_attempts} failed attempts · ` +
                       `${st.speculative_attempts} speculative · ${num(st.rows_read)} rows, ` +
                       `${bytes(st.bytes_read)} read · ${num(st.rows_out)} rows out · ` +
                       `${st.retries} retries`})),
    h("div", {class: "small"}, h("b", {text: "Skew: "}),
      h("span", {class: sk && sk.ratio > 3 ? "skew-high" : "", text: skewText})));
  if (st.status === "skipped") return section;
  if (st.attempts.length) {
    section.append(h("div", {class: "timeline"}, timeline(st)));
    section.append(h("details", {"data-key": "tasks-" + st.id, open: st.attempts.length <= 16},
      h("summary", {text: `${st.attempts.length} task attempts`}),
      h("table", {class: "tasks"}, h("thead", {}, h("tr", {}, ["Task", "Attempt", "Worker", "Status",
        "Duration", "Rows in", "Rows out", "Bytes in", "Bytes out", "Shuffle read", "Shuffle write",
        "Spills", "Note"].map((t, i) => h("th", {class: i >= 4 && i <= 11 ? "num" : null, text: t})))),
        h("tbody", {}, st.attempts.map(a => h("tr", {class: "attempt", "data-status": a.status},
          h("td", {text: a.task}), h("td", {text: a.attempt}), h("td", {text: a.worker}),
          h("td", {}, badge(a.status)),
          h("td", {class: "num", text: secs((a.end || Date.now() / 1000) - a.start)}),
          h("td", {class: "num", text: num(a.rows_in !== undefined ? a.rows_in : a.rows_read)}),
          h("td", {class: "num", text: num(a.rows_out)}),
          h("td", {class: "num", text: bytes(a.bytes_in !== undefined ? a.bytes_in : a.bytes_read)}),
          h("td", {class: "num", text: bytes(a.bytes_out)}),
          h("td", {class: "num", text: bytes(a.shuffle_read)}),
          h("td", {class: "num", text: bytes(a.shuffle_write)}),
          h("td", {class: "num", text: a.spills === undefined ? "–" : a.spills}),
          h("td", {class: "small", text: (a.speculative ? "speculative copy. " : "") + firstLine(a.error)})))))));
  }
  return section;
}

const STATUS_COLOR = {succeeded: "#2e7d32", finished: "#2e7d32", completed: "#2e7d32",
                      failed: "#c62828", running: "#1565c0", killed: "#9aa5b1",
                      skipped: "#9aa5b1", pending: "#c5ced8"};

function timeline(st) {
  const atts = st.attempts;
  const now = Date.now() / 1000;
  const t0 = Math.min(...atts.map(a => a.start));
  const t1 = Math.max(...atts.map(a => a.end || now), t0 + 0.001);
  const workers = [...new Set(atts.map(a => a.worker || "?"))].sort();
  const left = 120, width = 860, lane = 20, top = 18;
  const height = top + workers.length * lane + 6;
  const x = t => left + (t - t0) / (t1 - t0) * width;
  const svg = s("svg", {width: left + width + 10, height, class: "timeline-svg",
                        "data-stage": st.id});
  for (let i = 0; i <= 4; i++) {
    const t = t0 + (t1 - t0) * i / 4;
    svg.append(s("line", {x1: x(t), x2: x(t), y1: top - 4, y2: height, stroke: "#e3e8ee"}),
               s("text", {x: x(t), y: 11, "font-size": 10, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle",
                          fill: "#667485", text: "+" + secs(t - t0)}));
  }
  workers.forEach((w, i) => {
    const y = top + i * lane;
    svg.append(s("rect", {x: left, y: y + 2, width, height: lane - 4, class: "bar-bg"}),
               s("text", {x: 4, y: y + lane / 2 + 4, "font-size": 11, fill: "#1d2733", text: w}));
  });
  for (const a of atts) {
    const y = top + workers.indexOf(a.worker || "?") * lane;
    const x0 = x(a.start), x1 = x(a.end || now);
    const bar = s("rect", {x: x0, y: y + 3, width: Math.max(2, x1 - x0), height: lane - 6, rx: 2,
                           fill: STATUS_COLOR[a.status] || "#999", "fill-opacity": a.speculative ? 0.55 : 0.9,
                           class: "task-bar", "data-status": a.status},
      s("title", {text: `task ${a.task} attempt ${a.attempt} (${a.status})${a.speculative ? ", speculative" : ""}\n` +
                        `${a.worker}\n${secs((a.end || now) - a.start)}, ${num(a.rows_in || a.rows_read)} rows in` +
                        (a.error ? "\n" + firstLine(a.error) : "")}));
    svg.append(bar);
    if (x1 - x0 > 26) svg.append(s("text", {x: x0 + 3, y: y + lane / 2 + 4, "font-size": 10, fill: "#fff",
                                             text: `${a.task}.${a.attempt}`}));
  }
  return svg;
}

// A left-to-right graph of boxes (stages, or a streaming job's stages with their operators).
function dag(nodes, id) {
  const byId = new Map(nodes.map(n => [n.id, n]));
  const depth = new Map();
  const depthOf = n => {
    if (depth.has(n.id)) return depth.get(n.id);
    depth.set(n.id, 0);
    const d = Math.max(-1, ...n.deps.filter(x => byId.has(x)).map(x => depthOf(byId.get(x)))) + 1;
    depth.set(n.id, d);
    return d;
  };
  nodes.forEach(depthOf);
  const cols = [];
  for (const n of nodes) (cols[depth.get(n.id)] = cols[depth.get(n.id)] || []).push(n);
  const boxW = 340, gapX = 60, lineH = 15, pad = 8, gapY = 18;
  const maxChars = 54;
  const cut = (t, n) => t.length > n ? t.slice(0, n - 1) + "…" : t;
  const pos = new Map();
  let height = 0;
  cols.forEach((col, c) => {
    let y = 10;
    for (const n of col) {
      const lines = n.lines.map(t => cut(t, maxChars));
      const hgt = pad * 2 + lineH * (lines.length + 2) + 4;
      pos.set(n.id, {x: 10 + c * (boxW + gapX), y, h: hgt, lines});
      y += hgt + gapY;
    }
    height = Math.max(height, y);
  });
  const width = 20 + cols.length * (boxW + gapX) - gapX;
  const svg = s("svg", {width, height, id, class: "dag"});
  svg.append(s("defs", {}, s("marker", {id: id + "-arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse"},
    s("path", {d: "M 0 0 L 10 5 L 0 10 z", fill: "#8d99a6"}))));
  for (const n of nodes) {
    const p = pos.get(n.id);
    for (const d of n.deps) {
      const q = pos.get(d);
      if (!q) continue;
      const x0 = q.x + boxW, y0 = q.y + q.h / 2, x1 = p.x, y1 = p.y + p.h / 2;
      svg.append(s("path", {d: `M ${x0} ${y0} C ${x0 + gapX / 2} ${y0}, ${x1 - gapX / 2} ${y1}, ${x1} ${y1}`,
                            fill: "none", stroke: "#8d99a6", "stroke-width": 1.5,
                            "marker-end": `url(#${id}-arrow)`}));
    }
  }
  for (const n of nodes) {
    const p = pos.get(n.id);
    const g = s("g", {class: "node", "data-id": n.id, "data-status": n.status});
    g.append(s("rect", {x: p.x, y: p.y, width: boxW, height: p.h, rx: 6, fill: "#fff",
                        stroke: STATUS_COLOR[n.status] || "#8d99a6", "stroke-width": 2}),
             s("rect", {x: p.x, y: p.y, width: 6, height: p.h, rx: 2, fill: STATUS_COLOR[n.status] || "#8d99a6"}),
             s("text", {x: p.x + 14, y: p.y + pad + 11, "font-size": 13, "font-weight": 600, fill: "#1d2733",
                        text: cut(n.title, maxChars - 8)}));
    p.lines.forEach((t, i) => g.append(s("text", {x: p.x + 14, y: p.y + pad + 11 + lineH * (i + 1),
      "font-size": 11, fill: "#334155", text: t}, s("title", {text: n.lines[i]}))));
    g.append(s("text", {x: p.x + 14, y: p.y + pad + 11 + lineH * (p.lines.length + 1) + 2,
                        "font-size": 11, fill: "#1f4e79", "font-weight": 600, text: cut(n.foot, maxChars - 4)},
                        s("title", {text: n.foot})));
    svg.append(g);
  }
  return svg;
}

// ------------------------------------------------------------------ a streaming job
function streamJob(job) {
  const m = job.metrics || {};
  const last = job.checkpoints.find(c => c.status === "completed");
  const series = job.series || [];
  const lastRate = series.length ? series[series.length - 1] : {};
  const out = [h("div", {class: "cards"},
    kv("records in", num(m.records_in), "records-in"), kv("records out", num(m.records_out), "records-out"),
    kv("in rate", rate(lastRate.in)), kv("out rate", rate(lastRate.out)),
    kv("watermark", eventTime(job.watermark), "stream-watermark"),
    kv("lag", m.watermark_lag_s === null || m.watermark_lag_s === undefined ? "–" : secs(m.watermark_lag_s), "stream-lag"),
    kv("epoch", m.epoch), kv("checkpoints", job.completed_checkpoints, "checkpoint-count"),
    kv("last checkpoint", last ? `#${last.epoch}, ${secs(last.seconds)}` : "none yet"),
    kv("restarts", m.restarts || 0, "restart-count"), kv("late records", num(job.late_records)),
    kv("executor", `${job.executor || "?"}, ${job.parallelism || "?"} per stage`))];
  out.push(h("div", {class: "charts"},
    chart("Throughput (records/s), last minutes", series, [["in", "#1565c0", "in"], ["out", "#2e7d32", "out"]], "chart-throughput"),
    chart("Watermark lag (s)", series, [["lag", "#ef6c00", "lag"]], "chart-lag")));
  out.push(h("h2", {text: "Operators"}), h("div", {class: "graph"}, dag(job.stages.map(st => ({
    id: st.id, deps: st.inputs, status: job.status === "running" ? "running" : job.status,
    title: `Stage ${st.id}` + (st.purpose ? ` · ${st.purpose}` : "") + ` · ${st.tasks.length} task(s)`,
    lines: [...(st.source ? ["source: " + st.source] : []),
            ...st.ops.map(o => `${o.name}: ${rate(o.in_rate)} in, ${rate(o.out_rate)} out` +
                               (o.state_bytes ? `, state ${bytes(o.state_bytes)}` : "")),
            "⇒ " + st.output],
    foot: `watermark ${st.watermark ? eventTime(st.watermark).slice(11) : "–"} · lag ${secs(st.lag_s)}` +
          ` · backpressure ${pct(st.backpressure)}`,
  })), "operator-graph")));
  out.push(h("table", {id: "operators"}, h("thead", {}, h("tr", {}, ["Stage", "Operator", "Records in",
    "Records out", "In/s", "Out/s", "State", "Watermark", "Lag", "Backpressure"].map(
      (t, i) => h("th", {class: i >= 2 ? "num" : null, text: t})))),
    h("tbody", {}, job.stages.flatMap(st => st.ops.map(o => h("tr", {class: "operator", "data-operator": o.name},
      h("td", {text: st.id}), h("td", {title: o.text, text: o.name}),
      h("td", {class: "num", text: num(o.records_in)}), h("td", {class: "num", text: num(o.records_out)}),
      h("td", {class: "num", text: rate(o.in_rate)}), h("td", {class: "num", text: rate(o.out_rate)}),
      h("td", {class: "num", text: bytes(o.state_bytes)}),
      h("td", {class: "num watermark", text: eventTime(st.watermark)}),
      h("td", {class: "num", text: secs(st.lag_s)}),
      h("td", {class: "num", text: pct(st.backpressure)})))))));
  out.push(h("h2", {text: "Checkpoints"}));
  const ckHead = () => h("thead", {}, h("tr", {}, ["Epoch", "Status", "When", "Duration", "Size",
    "Incremental", "Alignment", "Note"].map((t, i) => h("th", {class: i >= 3 && i <= 6 ? "num" : null, text: t}))));
  const ckRow = c => h("tr", {class: "checkpoint", "data-status": c.status, "data-epoch": c.epoch},
    h("td", {text: c.epoch}), h("td", {}, badge(c.status)), h("td", {text: clock(c.ts)}),
    h("td", {class: "num", text: secs(c.seconds)}), h("td", {class: "num", text: bytes(c.bytes)}),
    h("td", {class: "num", text: bytes(c.incremental_bytes)}),
    h("td", {class: "num", text: secs(c.alignment_s)}),
    h("td", {class: "small", text: (c.final ? "final. " : "") + firstLine(c.error)}));
  const recent = job.checkpoints.slice(0, 10), older = job.checkpoints.slice(10);
  out.push(job.checkpoints.length ? h("table", {id: "checkpoints"}, ckHead(), h("tbody", {}, recent.map(ckRow)))
    : h("p", {class: "muted", text: job.checkpoint_location ? "No checkpoint yet." :
                                     "No checkpoint location: epochs only commit the sink."}));
  if (older.length) out.push(h("details", {"data-key": "older-checkpoints"},
    h("summary", {text: `${older.length} older checkpoints`}),
    h("table", {}, ckHead(), h("tbody", {}, older.map(ckRow)))));
  out.push(h("h2", {text: "Restarts"}));
  out.push(job.restarts.length ? h("table", {id: "restarts"}, h("tbody", {}, job.restarts.map(r =>
    h("tr", {}, h("td", {text: "#" + r.restart}), h("td", {text: clock(r.ts)}), h("td", {text: r.cause})))))
    : h("p", {class: "muted", text: "None."}));
  out.push(h("h2", {text: "Source offsets"}), job.positions.length ? h("table", {id: "offsets"},
    h("thead", {}, h("tr", {}, ["Source", "Partition", "Position"].map(t => h("th", {text: t})))),
    h("tbody", {}, job.positions.map(p => h("tr", {}, h("td", {text: p.source}),
      h("td", {text: p.partition}), h("td", {text: JSON.stringify(p.position)})))))
    : h("p", {class: "muted", text: "–"}));
  out.push(h("h2", {text: "Tasks"}), h("table", {id: "stream-tasks"}, h("thead", {}, h("tr", {},
    ["Task", "Stage", "Partition", "Watermark", "Records in", "Records out", "Backpressure",
     "Blocked", "Idle"].map((t, i) => h("th", {class: i >= 4 && i <= 7 ? "num" : null, text: t})))),
    h("tbody", {}, job.task_list.map(t => h("tr", {},
      h("td", {text: t.index}), h("td", {text: t.stage}), h("td", {text: t.partition}),
      h("td", {text: eventTime(t.watermark)}), h("td", {class: "num", text: num(t.records_in)}),
      h("td", {class: "num", text: num(t.records_out)}), h("td", {class: "num", text: pct(t.backpressure)}),
      h("td", {class: "num", text: secs(t.blocked_s)}), h("td", {text: t.idle ? "idle" : ""}))))));
  const groups = Object.entries(job.state_groups || {});
  if (groups.length) {
    out.push(h("h2", {text: "State by key group (last checkpoint)"}), h("table", {id: "key-groups"},
      h("thead", {}, h("tr", {}, ["Operator", "Key groups", "Total", "Largest group", "Median group"].map(
        t => h("th", {text: t})))),
      h("tbody", {}, groups.map(([op, gs]) => {
        const sizes = Object.values(gs).sort((a, b) => a - b);
        return h("tr", {}, h("td", {text: op}), h("td", {text: sizes.length}),
          h("td", {text: bytes(sizes.reduce((a, b) => a + b, 0))}),
          h("td", {text: bytes(sizes[sizes.length - 1])}),
          h("td", {text: bytes(sizes[Math.floor(sizes.length / 2)])}));
      }))));
  }
  if (job.user_traceback) out.push(h("details", {"data-key": "tb"}, h("summary", {text: "User traceback"}),
                                     h("pre", {text: job.user_traceback})));
  return out;
}

function chart(title, series, lines, id) {
  const W = 560, H = 170, L = 48, R = 10, T = 10, B = 22;
  const svg = s("svg", {width: W, height: H, id, class: "chart-svg", viewBox: `0 0 ${W} ${H}`});
  const box = h("div", {class: "chart"}, h("h3", {text: title}), svg,
    h("div", {class: "legend"}, lines.map(([, color, label]) =>
      [h("span", {class: "sw", style: `background:${color}`}), label])));
  const pts = series.filter(p => lines.some(([k]) => p[k] !== null && p[k] !== undefined));
  if (pts.length < 2) {
    svg.append(s("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#667485", "font-size": 12,
                          text: "collecting samples…"}));
    return box;
  }
  const t0 = pts[0].ts, t1 = pts[pts.length - 1].ts;
  const ymax = Math.max(1e-9, ...pts.flatMap(p => lines.map(([k]) => p[k] || 0))) * 1.1;
  const x = t => L + (t - t0) / Math.max(1e-9, t1 - t0) * (W - L - R);
  const y = v => T + (1 - v / ymax) * (H - T - B);
  for (let i = 0; i <= 3; i++) {
    const v = ymax * i / 3;
    svg.append(s("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e3e8ee"}),
               s("text", {x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#667485",
                          text: num(v)}));
  }
  svg.append(s("text", {x: L, y: H - 6, "font-size": 10, fill: "#667485", text: clock(t0)}),
             s("text", {x: W - R, y: H - 6, "font-size": 10, "text-anchor": "end", fill: "#667485",
                        text: clock(t1)}));
  for (const [k, color] of lines) {
    const d = pts.filter(p => p[k] !== null && p[k] !== undefined)
      .map((p, i) => `${i ? "L" : "M"} ${x(p.ts).toFixed(1)} ${y(p[k]).toFixed(1)}`).join(" ");
    if (d) svg.append(s("path", {d, fill: "none", stroke: color, "stroke-width": 2, class: "series-" + k}));
  }
  return box;
}

header();
refresh();
follow();
