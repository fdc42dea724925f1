// The trainer node's live view. The server streams events to the client that queued the run
// (nodes/_train_events.py documents them): the loss after training steps, a "validating" state while
// validation samples are made, each labelled validation grid as it is made, and how the run ended if it
// stopped early (what happened, where the checkpoint is, how to resume). When the node finishes, its
// full loss list replaces the streamed points so the chart is complete even if events were missed.
import { addViewWidget, chainHook, el, viewUrl } from "./shared/dom.js";

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const NODE = "SD35TunerTrainLora";
const EVENTS = {
  progress: "sd35tuner.train.progress",
  validating: "sd35tuner.train.validating",
  validation: "sd35tuner.train.validation",
  stopped: "sd35tuner.train.stopped",
};
const MONO = { fontSize: "11px", fontFamily: "monospace" };

function drawChart(canvas, points, validating) {
  const w = (canvas.width = Math.max(64, canvas.clientWidth));
  const h = (canvas.height = Math.max(48, canvas.clientHeight));
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  if (points.length >= 2) {
    const losses = points.map((p) => p[1]);
    const lo = Math.min(...losses);
    const hi = Math.max(...losses);
    const first = points[0][0];
    const last = Math.max(points[points.length - 1][0], validating?.step ?? 0);
    const x = (s) => 4 + ((w - 8) * (s - first)) / Math.max(1, last - first);
    const y = (v) => h - 4 - ((h - 8) * (v - lo)) / (hi - lo || 1);
    const line = (data, color, width) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.beginPath();
      data.forEach(([s, v], i) => (i ? ctx.lineTo(x(s), y(v)) : ctx.moveTo(x(s), y(v))));
      ctx.stroke();
    };
    line(points, "#4a6a9a", 1);
    const k = Math.max(1, Math.floor(points.length / 20)); // moving average over ~5% of the run
    let sum = 0;
    const average = points.map(([s, v], i) => {
      sum += v - (i >= k ? points[i - k][1] : 0);
      return [s, sum / Math.min(i + 1, k)];
    });
    line(average, "#9cc4ff", 2);
    ctx.fillStyle = "#ccc";
    ctx.font = "10px monospace";
    ctx.fillText(hi.toPrecision(3), 6, 12);
    ctx.fillText(lo.toPrecision(3), 6, h - 6);
    if (validating) {
      const at = x(validating.step);
      ctx.fillStyle = "rgba(230, 180, 60, 0.25)";
      ctx.fillRect(at - 3, 0, 6, h);
    }
  }
  if (validating) {
    ctx.fillStyle = "#f0c060";
    ctx.font = "bold 11px sans-serif";
    ctx.textAlign = "right";
    ctx.fillText(`validating… ${validating.done}/${validating.of}`, w - 6, 14);
    ctx.textAlign = "left";
  }
}

function buildMonitor() {
  const root = el("div", { display: "flex", flexDirection: "column", gap: "3px", width: "100%", height: "100%" });
  root.className = "sd35-train-monitor";
  Object.assign(root.dataset, { points: "0", events: "0", grids: "0", state: "idle" });
  const canvas = el("canvas", { flex: "0 0 110px", width: "100%", background: "#1e1e1e" });
  const status = el("div", { ...MONO, whiteSpace: "nowrap", overflow: "hidden" }, { className: "sd35-train-status" });
  status.textContent = "not started";
  const message = el("div", {
    ...MONO,
    display: "none",
    whiteSpace: "pre-wrap",
    padding: "4px 6px",
    borderRadius: "4px",
    color: "#ffd8a8",
    background: "rgba(150, 90, 20, 0.35)",
  });
  message.className = "sd35-train-message";
  const gallery = el("div", { display: "none", flexDirection: "column", gap: "2px", flex: "1 1 160px", minHeight: "0" });
  gallery.className = "sd35-train-grids";
  const picture = el("img", { flex: "1 1 auto", minHeight: "0", objectFit: "contain", width: "100%", cursor: "zoom-in" });
  picture.className = "sd35-train-grid";
  picture.addEventListener("click", () => window.open(picture.src, "_blank")); // full size in a new tab
  const caption = el("div", { ...MONO, color: "#aaa" }, { className: "sd35-train-grid-caption" });
  const steps = el("div", { display: "flex", flexWrap: "wrap", gap: "3px" }, { className: "sd35-train-grid-steps" });
  gallery.append(picture, caption, steps);
  const plan = el("div", { ...MONO, fontSize: "10px", whiteSpace: "pre-wrap", display: "none" });
  plan.className = "sd35-train-memory"; // what memory_preset "auto" chose and why, and the memory pre-flight
  root.append(canvas, status, message, plan, gallery);

  let points = []; // [step, loss]
  let grids = []; // {step, url, rows, prompts}
  let validating = null; // {step, done, of} while validation samples are made

  const draw = () => {
    root.dataset.points = String(points.length);
    drawChart(canvas, points, validating);
  };
  const counted = () => (root.dataset.events = String(Number(root.dataset.events) + 1));

  function showGrid(index) {
    const grid = grids[index];
    picture.src = grid.url;
    picture.title = `rows: ${grid.rows.join(" / ")}; columns: ${grid.prompts.join(" | ")} (click: full size)`;
    caption.textContent = `validation at step ${grid.step}: rows ${grid.rows.join(" / ")}, one column per prompt`;
    [...steps.children].forEach((b, i) => (b.style.fontWeight = i === index ? "bold" : "normal"));
  }

  function beginIfNewRun(step) {
    const last = points.length ? points[points.length - 1][0] : 0;
    const ended = ["done", "cancelled", "failed"].includes(root.dataset.state);
    if (step <= last) points = []; // a new run; a resume after Cancel continues the curve
    if (step > last && !ended) return;
    grids = [];
    steps.replaceChildren();
    gallery.style.display = "none";
    message.style.display = "none";
    root.dataset.grids = "0";
  }

  function progress(detail) {
    beginIfNewRun(detail.step);
    validating = null;
    root.dataset.state = "training";
    points.push([detail.step, detail.loss]);
    counted();
    status.textContent = `step ${detail.step}/${detail.total}  loss ${detail.loss.toFixed(4)}  lr ${detail.lr.toExponential(2)}`;
    draw();
  }

  function validatingAt(detail) {
    validating = detail.done < detail.of ? { step: detail.step, done: detail.done, of: detail.of } : null;
    root.dataset.state = validating ? "validating" : "training";
    counted();
    status.textContent = validating
      ? `validating… step ${detail.step}/${detail.total}: sample ${detail.done}/${detail.of}`
      : `step ${detail.step}/${detail.total}: validation samples made, drawing the grid…`;
    draw();
  }

  function validation(detail) {
    validating = null;
    root.dataset.state = "training";
    grids.push({ step: detail.step, url: viewUrl(detail.image), rows: detail.rows, prompts: detail.prompts });
    root.dataset.grids = String(grids.length);
    counted();
    const more = detail.step < detail.total ? "; training goes on" : "";
    status.textContent = `step ${detail.step}/${detail.total}: validation grid below${more}`;
    const index = grids.length - 1;
    const pick = el("button", { fontSize: "10px", padding: "0 4px" }, { textContent: `step ${detail.step}` });
    pick.addEventListener("click", () => showGrid(index));
    steps.append(pick);
    gallery.style.display = "flex";
    showGrid(index);
    draw();
  }

  function stopped(detail) {
    validating = null;
    root.dataset.state = detail.reason; // "cancelled" | "failed"
    counted();
    status.textContent = `${detail.reason} at step ${detail.step}/${detail.total}`;
    message.textContent = detail.message;
    message.style.display = "block";
    draw();
  }

  function finish(losses, name, memory, notes) {
    plan.textContent = (memory ?? []).join("\n");
    plan.style.display = memory?.length ? "block" : "none";
    message.textContent = (notes ?? []).join("\n"); // e.g. where a fresh run moved the earlier run's checkpoints
    message.style.display = notes?.length ? "block" : "none";
    validating = null;
    root.dataset.state = "done";
    points = losses.map((v, i) => [i + 1, v]);
    status.textContent = `done: ${losses.length} steps, last loss ${losses[losses.length - 1]?.toFixed(4)}  → ${name ?? ""}`;
    draw();
  }

  const observer = new ResizeObserver(draw);
  observer.observe(canvas);
  return { root, progress, validatingAt, validation, stopped, finish, dispose: () => observer.disconnect() };
}

function findNode(id) {
  // unique ids of nodes inside subgraphs look like "outer:inner"; only top-level nodes are drawn
  return app.graph?.getNodeById(Number(String(id).split(":").pop()));
}

function monitorOf(detail) {
  const node = findNode(detail.node);
  return node?.comfyClass === NODE ? node.sd35Monitor : null;
}

app.registerExtension({
  name: "sd35tuner.TrainMonitor",
  setup() {
    const handlers = { progress: "progress", validating: "validatingAt", validation: "validation", stopped: "stopped" };
    for (const [event, method] of Object.entries(handlers)) {
      api.addEventListener(EVENTS[event], ({ detail }) => monitorOf(detail)?.[method](detail));
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;

    addViewWidget(nodeType, {
      key: "sd35Monitor",
      name: "loss_chart",
      type: "sd35_loss_chart",
      build: buildMonitor,
      minHeight: 420,
    });
    chainHook(nodeType.prototype, "onExecuted", function (message) {
      if (Array.isArray(message?.losses))
        this.sd35Monitor?.finish(message.losses, message.lora_name?.[0], message.memory, message.notes);
    });
  },
});
