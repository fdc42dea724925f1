// Live loss chart inside the SD3.5 LoRA trainer node. The server streams one event per step (at most
// five a second) to the client that queued the run; when the node finishes, its full loss list
// replaces the streamed points so the chart is complete even if events were missed.
import { addViewWidget, chainHook, el } from "./shared/dom.js";

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const NODE = "SD35TunerTrainLora";
const EVENT = "sd35tuner.train.progress";

function buildMonitor() {
  const root = el("div", { display: "flex", flexDirection: "column", gap: "2px", width: "100%", height: "100%" });
  root.className = "sd35-train-monitor";
  root.dataset.points = "0";
  root.dataset.events = "0";
  const canvas = el("canvas", { flex: "1 1 auto", width: "100%", minHeight: "80px", background: "#1e1e1e" });
  const status = el("div", { fontSize: "11px", fontFamily: "monospace", whiteSpace: "nowrap", overflow: "hidden" });
  status.className = "sd35-train-status";
  status.textContent = "not started";
  const plan = el("div", { fontSize: "10px", fontFamily: "monospace", whiteSpace: "pre-wrap", display: "none" });
  plan.className = "sd35-train-memory"; // what memory_preset "auto" chose and why, and the memory pre-flight
  root.append(canvas, status, plan);
  let points = []; // [step, loss]

  function draw() {
    const w = (canvas.width = Math.max(64, canvas.clientWidth));
    const h = (canvas.height = Math.max(48, canvas.clientHeight));
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, w, h);
    root.dataset.points = String(points.length);
    if (points.length < 2) return;
    const losses = points.map((p) => p[1]);
    const lo = Math.min(...losses);
    const hi = Math.max(...losses);
    const first = points[0][0];
    const last = points[points.length - 1][0];
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
    line(
      points.map(([s, v], i) => {
        sum += v - (i >= k ? points[i - k][1] : 0);
        return [s, sum / Math.min(i + 1, k)];
      }),
      "#9cc4ff",
      2,
    );
    ctx.fillStyle = "#ccc";
    ctx.font = "10px monospace";
    ctx.fillText(hi.toPrecision(3), 6, 12);
    ctx.fillText(lo.toPrecision(3), 6, h - 6);
  }

  function push(detail) {
    const last = points.length ? points[points.length - 1][0] : 0;
    if (detail.step <= last) points = []; // a new run (or a resume) started
    points.push([detail.step, detail.loss]);
    root.dataset.events = String(Number(root.dataset.events) + 1);
    status.textContent = `step ${detail.step}/${detail.total}  loss ${detail.loss.toFixed(4)}  lr ${detail.lr.toExponential(2)}`;
    draw();
  }

  function finish(losses, name, memory) {
    plan.textContent = (memory ?? []).join("\n");
    plan.style.display = memory?.length ? "block" : "none";
    points = losses.map((v, i) => [i + 1, v]);
    status.textContent = `done: ${losses.length} steps, last loss ${losses[losses.length - 1]?.toFixed(4)}  → ${name ?? ""}`;
    draw();
  }

  const observer = new ResizeObserver(draw);
  observer.observe(canvas);
  return { root, push, finish, dispose: () => observer.disconnect() };
}

function findNode(id) {
  // unique ids of nodes inside subgraphs look like "outer:inner"; only top-level nodes are drawn
  return app.graph?.getNodeById(Number(String(id).split(":").pop()));
}

app.registerExtension({
  name: "sd35tuner.TrainMonitor",
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = findNode(detail.node);
      if (node?.comfyClass === NODE) node.sd35Monitor?.push(detail);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;

    addViewWidget(nodeType, {
      key: "sd35Monitor",
      name: "loss_chart",
      type: "sd35_loss_chart",
      build: buildMonitor,
      minHeight: 140,
    });
    chainHook(nodeType.prototype, "onExecuted", function (message) {
      if (Array.isArray(message?.losses))
        this.sd35Monitor?.finish(message.losses, message.lora_name?.[0], message.memory);
    });
  },
});
