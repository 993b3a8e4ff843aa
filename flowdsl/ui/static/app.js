// flowdsl inspector: the run list and one run's page, over the inspector's JSON API.
//
// Hand-written, no dependencies.  Everything read from the server is stored data: it is
// put on the page with textContent and SVG attributes only, never as HTML.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  // --- small helpers --------------------------------------------------------------------

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function when(at) {
    return at ? new Date(at * 1000).toLocaleString() : "";
  }

  function seconds(s) {
    if (s === null || s === undefined) return "";
    if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
    if (s < 0.01) return (s * 1000).toFixed(2) + " ms";
    if (s < 1) return (s * 1000).toFixed(s < 0.1 ? 1 : 0) + " ms";
    if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
    return (s / 60).toFixed(1) + " min";
  }

  function pretty(value) {
    if (value === null || value === undefined) return "null";
    return typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  function usageText(usage) {
    if (!usage || Object.keys(usage).length === 0) return "";
    const parts = [];
    if (usage.input_tokens !== undefined || usage.output_tokens !== undefined) {
      parts.push((usage.input_tokens || 0) + " in + " + (usage.output_tokens || 0) + " out tokens");
    }
    if (usage.calls !== undefined) parts.push(usage.calls + (usage.calls === 1 ? " call" : " calls"));
    if (typeof usage.cost === "number") parts.push("$" + usage.cost.toFixed(6));
    return parts.join(", ");
  }

  function statusClass(status) {
    return "st-" + String(status).replace(/[^a-z]+/g, "-");
  }

  async function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin" }, options || {});
    if (opts.method === "POST") {
      // The custom header is what tells the server this request comes from this page.
      opts.headers = Object.assign(
        { "X-Flowdsl-Request": "1", "Content-Type": "application/json" },
        opts.headers || {}
      );
    }
    const response = await fetch(path, opts);
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) {
      const message = (data && data.message) || response.status + " " + response.statusText;
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function showError(message) {
    const box = $("page-error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  // --- routing ----------------------------------------------------------------------------

  let stopPage = () => {};

  function route() {
    stopPage();
    stopPage = () => {};
    showError("");
    const hash = location.hash || "#/";
    const match = hash.match(/^#\/runs\/(.+)$/);
    if (match) {
      $("runs-page").hidden = true;
      $("run-page").hidden = false;
      stopPage = openRun(decodeURIComponent(match[1]));
    } else {
      $("run-page").hidden = true;
      $("runs-page").hidden = false;
      stopPage = openRuns();
    }
  }

  // --- the run list -----------------------------------------------------------------------

  const listState = { page: 1 };

  function openRuns() {
    let timer = null;
    let stopped = false;
    const load = async () => {
      const params = new URLSearchParams();
      const status = $("filter-status").value;
      const flow = $("filter-flow").value;
      const q = $("filter-q").value.trim();
      if (status) params.set("status", status);
      if (flow) params.set("flow", flow);
      if (q) params.set("q", q);
      params.set("page", String(listState.page));
      try {
        const data = await api("/api/runs?" + params.toString());
        if (!stopped) renderRuns(data);
        showError("");
      } catch (e) {
        showError(e.message);
      }
    };
    const reload = () => {
      listState.page = 1;
      load();
    };
    const onPrev = () => {
      if (listState.page > 1) {
        listState.page -= 1;
        load();
      }
    };
    const onNext = () => {
      listState.page += 1;
      load();
    };
    const form = $("filters");
    form.addEventListener("change", reload);
    form.addEventListener("input", reload);
    form.addEventListener("submit", (e) => e.preventDefault());
    $("page-prev").addEventListener("click", onPrev);
    $("page-next").addEventListener("click", onNext);
    load();
    timer = setInterval(load, 3000);
    return () => {
      stopped = true;
      clearInterval(timer);
      form.removeEventListener("change", reload);
      form.removeEventListener("input", reload);
      $("page-prev").removeEventListener("click", onPrev);
      $("page-next").removeEventListener("click", onNext);
    };
  }

  function renderRuns(data) {
    const flowSelect = $("filter-flow");
    const chosen = flowSelect.value;
    const known = new Set(Array.from(flowSelect.options).map((o) => o.value));
    for (const flow of data.flows) {
      if (!known.has(flow)) flowSelect.appendChild(el("option", { value: flow }, flow));
    }
    flowSelect.value = chosen;
    const body = $("runs-body");
    clear(body);
    for (const run of data.runs) {
      const row = el("tr", { "data-run-id": run.run_id, "data-status": run.status });
      row.appendChild(el("td", { class: "mono" }, run.run_id));
      row.appendChild(el("td", {}, run.flow));
      const cell = el("td");
      cell.appendChild(el("span", { class: "badge " + statusClass(run.status) }, run.status));
      row.appendChild(cell);
      row.appendChild(el("td", {}, when(run.created_at)));
      row.appendChild(el("td", {}, seconds(run.duration)));
      row.addEventListener("click", () => {
        location.hash = "#/runs/" + encodeURIComponent(run.run_id);
      });
      body.appendChild(row);
    }
    $("runs-empty").hidden = data.runs.length > 0;
    $("page-prev").disabled = data.page <= 1;
    $("page-next").disabled = data.next_page === null;
    $("page-info").textContent =
      "page " + data.page + " · " + data.total + " run" + (data.total === 1 ? "" : "s");
  }

  // --- one run ----------------------------------------------------------------------------

  function openRun(runId) {
    const state = { view: null, selected: null, source: null, clock: null, stopped: false };
    const base = "/api/runs/" + encodeURIComponent(runId);

    const connect = () => {
      if (state.source) state.source.close();
      const source = new EventSource(base + "/stream");
      state.source = source;
      $("live").hidden = false;
      source.addEventListener("run", (e) => {
        state.view = JSON.parse(e.data);
        state.receivedAt = Date.now() / 1000;
        renderRun(state);
      });
      source.addEventListener("patch", (e) => {
        applyPatch(state, JSON.parse(e.data));
        state.receivedAt = Date.now() / 1000;
        renderRun(state);
      });
      source.addEventListener("end", () => {
        source.close();
        $("live").hidden = true;
      });
      source.addEventListener("gone", (e) => {
        source.close();
        $("live").hidden = true;
        showError(JSON.parse(e.data).message);
      });
      source.onerror = () => {
        if (source.readyState === EventSource.CLOSED) {
          $("live").hidden = true;
          // Say why: an unknown run or a missing token answers the stream with an error.
          api(base).catch((err) => showError(err.message));
        }
      };
    };

    const act = async (name, body) => {
      $("action-note").textContent = name + "…";
      try {
        const reply = await api(base + "/" + name, {
          method: "POST",
          body: JSON.stringify(body || {}),
        });
        $("action-note").textContent = reply.note || name + ": done";
        connect(); // a resumed run is live again
      } catch (e) {
        $("action-note").textContent = e.message;
      }
    };
    const onResume = () => act("resume");
    const onCancel = () => act("cancel");
    const onSignal = (e) => {
      e.preventDefault();
      let value;
      try {
        value = JSON.parse($("signal-value").value);
      } catch (err) {
        $("action-note").textContent = "the value must be JSON";
        return;
      }
      act("signal", { name: $("signal-name").value, value: value });
    };
    $("act-resume").addEventListener("click", onResume);
    $("act-cancel").addEventListener("click", onCancel);
    $("signal-form").addEventListener("submit", onSignal);
    $("action-note").textContent = "";
    clear($("graph"));
    clear($("timeline"));
    $("run-title").textContent = runId;
    connect();
    // Running bars grow with the clock between two updates.
    state.clock = setInterval(() => {
      if (state.view && state.view.timeline.end === null) renderTimeline(state);
    }, 1000);
    return () => {
      state.stopped = true;
      if (state.source) state.source.close();
      clearInterval(state.clock);
      $("act-resume").removeEventListener("click", onResume);
      $("act-cancel").removeEventListener("click", onCancel);
      $("signal-form").removeEventListener("submit", onSignal);
    };
  }

  function applyPatch(state, patch) {
    if (patch.full) {
      state.view = patch.full;
      return;
    }
    const view = state.view;
    for (const key of ["run", "edges", "timeline", "dead_letters", "actions"]) {
      if (key in patch) view[key] = patch[key];
    }
    const byId = new Map(view.nodes.map((n) => [n.id, n]));
    for (const node of patch.nodes || []) byId.set(node.id, node);
    for (const id of patch.removed || []) byId.delete(id);
    const order = patch.order || view.nodes.map((n) => n.id).filter((id) => byId.has(id));
    for (const id of byId.keys()) if (!order.includes(id)) order.push(id);
    view.nodes = order.filter((id) => byId.has(id)).map((id) => byId.get(id));
  }

  function renderRun(state) {
    const view = state.view;
    const run = view.run;
    const badge = $("run-status");
    badge.textContent = run.status;
    badge.className = "badge " + statusClass(run.status);
    document.title = run.run_id + " · flowdsl";
    const facts = $("run-facts");
    clear(facts);
    const add = (k, v) => {
      if (v === "" || v === null || v === undefined) return;
      facts.appendChild(el("dt", {}, k));
      facts.appendChild(el("dd", {}, v));
    };
    add("flow", run.flow + " (" + run.flow_ref + ")");
    add("started", when(run.created_at));
    add("duration", seconds(run.duration));
    add("tokens and cost", usageText(run.usage));
    add("failed node", run.failed_node);
    $("act-resume").hidden = !view.actions.resume;
    $("act-cancel").hidden = !view.actions.cancel;
    $("signal-form").hidden = !view.actions.signal;
    const waiting = view.nodes.find((n) => n.status === "waiting" && n.dynamic && n.dynamic.signal);
    if (waiting && !$("signal-name").value) $("signal-name").value = waiting.dynamic.signal;
    const err = $("run-error");
    const inspectorError = view.inspector && view.inspector.error;
    err.textContent = inspectorError || run.error || "";
    err.hidden = !err.textContent;
    $("graph-note").textContent =
      run.graph === "flow"
        ? ""
        : "(nodes from the journal: start the inspector with --import for this flow's graph)";
    $("run-inputs").textContent = pretty(run.inputs);
    $("run-result").textContent = pretty(run.result);
    renderGraph(state);
    renderTimeline(state);
    renderDetail(state);
    renderDead(view.dead_letters);
  }

  // --- the graph: layered by depth, drawn as SVG --------------------------------------------

  const NODE_W = 168;
  const NODE_H = 40;
  const GAP_X = 28;
  const GAP_Y = 54;

  function layout(nodes, edges) {
    const parents = new Map(nodes.map((n) => [n.id, []]));
    for (const e of edges) if (parents.has(e.dst)) parents.get(e.dst).push(e.src);
    const layers = [];
    const depthOf = new Map();
    for (const n of nodes) {
      const d = typeof n.depth === "number" ? n.depth : 0;
      depthOf.set(n.id, d);
      (layers[d] = layers[d] || []).push(n);
    }
    const pos = new Map();
    let width = 0;
    layers.forEach((layer, d) => {
      // One barycentre pass: a node sits under the average position of its parents.
      if (d > 0) {
        const key = (n) => {
          const xs = parents.get(n.id).filter((p) => pos.has(p)).map((p) => pos.get(p).x);
          return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : Infinity;
        };
        layer.sort((a, b) => key(a) - key(b));
      }
      layer.forEach((n, i) => {
        pos.set(n.id, { x: i * (NODE_W + GAP_X), y: d * (NODE_H + GAP_Y) });
      });
      width = Math.max(width, layer.length * (NODE_W + GAP_X) - GAP_X);
    });
    // Centre each layer under the widest.
    layers.forEach((layer) => {
      const w = layer.length * (NODE_W + GAP_X) - GAP_X;
      const shift = (width - w) / 2;
      for (const n of layer) pos.get(n.id).x += shift;
    });
    return { pos, width: Math.max(width, NODE_W), height: layers.length * (NODE_H + GAP_Y) - GAP_Y };
  }

  function shorten(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  function renderGraph(state) {
    const view = state.view;
    const box = $("graph");
    const pad = 16;
    const { pos, width, height } = layout(view.nodes, view.edges);
    const root = svg("svg", {
      width: width + 2 * pad,
      height: Math.max(height, NODE_H) + 2 * pad,
      role: "img",
      "aria-label": "graph of run " + view.run.run_id,
    });
    const g = svg("g", { transform: "translate(" + pad + "," + pad + ")" });
    root.appendChild(g);
    for (const e of view.edges) {
      const a = pos.get(e.src);
      const b = pos.get(e.dst);
      if (!a || !b) continue;
      const x1 = a.x + NODE_W / 2;
      const y1 = a.y + NODE_H;
      const x2 = b.x + NODE_W / 2;
      const y2 = b.y;
      const my = (y1 + y2) / 2;
      const path = svg("path", {
        d: "M" + x1 + "," + y1 + " C" + x1 + "," + my + " " + x2 + "," + my + " " + x2 + "," + y2,
        class: "edge " + (e.kind || "data"),
        "marker-end": "url(#arrow)",
      });
      g.appendChild(path);
      if (e.kind === "case" && e.case) {
        g.appendChild(svg("text", { x: (x1 + x2) / 2, y: my - 3, class: "edge-label" }, shorten(e.case, 24)));
      }
    }
    const defs = svg("defs");
    const marker = svg("marker", {
      id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto",
    });
    marker.appendChild(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#9aa3b2" }));
    defs.appendChild(marker);
    root.insertBefore(defs, g);
    for (const n of view.nodes) {
      const p = pos.get(n.id);
      const group = svg("g", {
        class: "node " + statusClass(n.status) + " kind-" + n.kind + (state.selected === n.id ? " selected" : ""),
        transform: "translate(" + p.x + "," + p.y + ")",
        "data-node-id": n.id,
        "data-status": n.status,
        tabindex: 0,
      });
      const dyn = n.dynamic;
      if (dyn && dyn.kind === "map") {
        // A map is drawn as a stack: one node of the graph, many items.
        group.appendChild(svg("rect", { class: "stack", x: 6, y: -6, width: NODE_W, height: NODE_H, rx: 6 }));
        group.appendChild(svg("rect", { class: "stack", x: 3, y: -3, width: NODE_W, height: NODE_H, rx: 6 }));
      }
      group.appendChild(svg("rect", { width: NODE_W, height: NODE_H, rx: 6 }));
      if (dyn) {
        group.setAttribute("data-kind", dyn.kind);
        group.setAttribute("data-label", dyn.label);
        group.appendChild(svg("text", { x: NODE_W / 2, y: 14 }, shorten(n.id, 24)));
        group.appendChild(svg("text", { x: NODE_W / 2, y: 29, class: "dyn" }, shorten(dyn.label, 30)));
        if (dyn.kind === "loop") group.appendChild(svg("text", { x: NODE_W - 5, y: 12, class: "glyph" }, "↻"));
        if (dyn.kind === "wait") {
          // A small clock, drawn: an emoji may be missing from the fonts at hand.
          group.appendChild(svg("circle", { class: "clock", cx: NODE_W - 11, cy: 11, r: 6 }));
          group.appendChild(svg("path", { class: "clock", d: "M" + (NODE_W - 11) + ",7 v4 h3" }));
        }
        if (dyn.kind === "map" && dyn.total) {
          const w = Math.round((NODE_W - 8) * Math.min(1, dyn.done / dyn.total));
          group.appendChild(svg("rect", { class: "progress", x: 4, y: NODE_H - 5, width: w, height: 3, rx: 1 }));
        }
      } else {
        group.appendChild(svg("text", { x: NODE_W / 2, y: NODE_H / 2 }, shorten(n.id, 24)));
      }
      group.appendChild(svg("title", {}, n.id + " · " + n.status + (dyn ? " · " + dyn.label : "")));
      const select = () => {
        state.selected = n.id;
        renderGraph(state);
        renderDetail(state);
      };
      group.addEventListener("click", select);
      group.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter" || ev.key === " ") select();
      });
      g.appendChild(group);
    }
    clear(box);
    box.appendChild(root);
  }

  // --- a node's details -----------------------------------------------------------------

  function renderDetail(state) {
    const view = state.view;
    const node = view.nodes.find((n) => n.id === state.selected);
    $("node-hint").hidden = !!node;
    const facts = $("node-facts");
    clear(facts);
    const boxes = ["node-error-box", "node-traceback-box", "node-items-box", "node-args-box", "node-result-box"];
    for (const id of boxes) $(id).hidden = true;
    if (!node) {
      $("node-title").textContent = "Node";
      return;
    }
    $("node-title").textContent = node.id;
    const add = (k, v) => {
      if (v === "" || v === null || v === undefined) return;
      facts.appendChild(el("dt", {}, k));
      facts.appendChild(el("dd", { "data-fact": k }, v));
    };
    add("status", node.status);
    add("kind", node.kind + (node.name !== node.id ? " " + node.name : ""));
    add("attempts", node.attempts);
    add(node.estimated_start ? "ready at" : "started", when(node.started_at));
    add("finished", node.status === "running" ? "" : when(node.finished_at));
    add("duration", seconds(node.duration));
    add("tokens and cost", usageText(node.usage));
    const dyn = node.dynamic;
    if (dyn) {
      add(dyn.kind === "wait" ? "signal" : dyn.kind, dyn.label);
      if (dyn.body) add("body", dyn.body);
      if (dyn.kind === "wait" && dyn.timeout) add("timeout", seconds(dyn.timeout));
      if (dyn.deadline) add("deadline", when(dyn.deadline));
      if (dyn.kind === "loop") add("max iterations", dyn.max_iterations);
    }
    if (node.error) {
      $("node-error").textContent = node.error;
      $("node-error-box").hidden = false;
    }
    if (node.traceback) {
      $("node-traceback").textContent = node.traceback;
      $("node-traceback-box").hidden = false;
    }
    if (dyn && dyn.kind !== "wait") renderItems(dyn);
    if (node.arguments) {
      $("node-args").textContent = pretty(node.arguments);
      $("node-args-box").hidden = false;
    }
    if (node.status === "finished" || node.status === "cached") {
      $("node-result").textContent = pretty(node.result);
      $("node-result-box").hidden = false;
    }
  }

  function renderItems(dyn) {
    $("node-items-title").textContent = dyn.kind === "map" ? "Items" : "Iterations";
    const body = $("node-items");
    clear(body);
    for (const item of dyn.items) {
      const row = el("tr", { "data-item": item.id, "data-status": item.status });
      row.appendChild(el("td", { class: "mono" }, (dyn.kind === "loop" ? "@" : "") + item.index));
      const cell = el("td");
      cell.appendChild(el("span", { class: "badge " + statusClass(item.status) }, item.status));
      row.appendChild(cell);
      row.appendChild(el("td", {}, seconds(item.duration)));
      const inner = item.inner_done ? item.inner_done + " nodes done" : "";
      row.appendChild(el("td", { class: "result" }, item.result !== undefined ? item.result : inner));
      body.appendChild(row);
    }
    const more = $("node-items-more");
    more.textContent = dyn.more ? "and " + dyn.more + " more" : "";
    more.hidden = !dyn.more;
    $("node-items-box").hidden = dyn.items.length === 0;
  }

  // --- the timeline: a Gantt chart of the nodes ---------------------------------------------

  function renderTimeline(state) {
    const view = state.view;
    const tl = view.timeline;
    const box = $("timeline");
    const bars = tl.bars;
    clear(box);
    if (!bars.length) {
      box.appendChild(el("p", { class: "muted" }, "No node has started yet."));
      return;
    }
    // The server's clock, moved on by the time since the last update.
    const now = tl.now + (Date.now() / 1000 - (state.receivedAt || Date.now() / 1000));
    const start = Math.min(tl.start, ...bars.map((b) => b.start));
    const end = Math.max(tl.end || now, ...bars.map((b) => b.end || now), start + 0.001);
    const labelW = 180;
    const chartW = Math.max(320, (box.clientWidth || 900) - labelW - 48);
    const rowH = 20;
    const height = bars.length * rowH + 24;
    const x = (t) => labelW + ((t - start) / (end - start)) * chartW;
    const root = svg("svg", { width: labelW + chartW + 32, height: height, "aria-label": "timeline" });
    for (let i = 0; i <= 4; i++) {
      const t = start + ((end - start) * i) / 4;
      root.appendChild(svg("line", { x1: x(t), x2: x(t), y1: 0, y2: height - 14, class: "tl-grid" }));
      root.appendChild(svg("text", { x: x(t), y: height - 2, class: "tl-axis", "text-anchor": "middle" }, seconds(t - start)));
    }
    bars.forEach((b, i) => {
      const y = i * rowH + 2;
      root.appendChild(svg("text", { x: 0, y: y + rowH / 2 - 1, class: "tl-label" }, shorten(b.id, 28)));
      const x1 = x(b.start);
      const x2 = Math.max(x(b.end || now), x1 + 2);
      const rect = svg("rect", {
        x: x1, y: y, width: x2 - x1, height: rowH - 6,
        class: "bar " + statusClass(b.status) + (b.estimated_start ? " estimated" : ""),
        "data-node-id": b.id,
      });
      rect.appendChild(svg("title", {}, b.id + ": " + seconds((b.end || now) - b.start)));
      root.appendChild(rect);
    });
    box.appendChild(root);
  }

  function renderDead(letters) {
    $("dead-box").hidden = !letters || letters.length === 0;
    const body = $("dead-body");
    clear(body);
    for (const letter of letters || []) {
      const row = el("tr");
      row.appendChild(el("td", { class: "mono" }, letter.node_id || "?"));
      row.appendChild(el("td", {}, typeof letter.at === "number" ? when(letter.at) : ""));
      row.appendChild(el("td", {}, letter.reason || ""));
      body.appendChild(row);
    }
  }

  window.addEventListener("hashchange", route);
  route();
})();
