// Shows the dataset and cache nodes' reports (images loaded, skipped and why, crop reasons, files saved;
// what the cache encoded or reused) on the node itself after a run, so a user sees them without wiring a
// text node or reading the server console. The box is there from the start, so the node keeps its size.
import { addViewWidget, chainHook, el } from "./shared/dom.js";

const { app } = window.comfyAPI.app;

const REPORT_NODES = new Set([
  "SD35TunerLoadDataset",
  "SD35TunerSmartCrop",
  "SD35TunerSaveDataset",
  "SD35TunerCacheLatents",
]);
const WIDGET = "sd35_report";
const WAITING = "(its report appears here after a run)";

function buildReport() {
  const root = el("pre", {
    margin: "0",
    padding: "4px",
    whiteSpace: "pre-wrap",
    overflowY: "auto",
    width: "100%",
    height: "100%",
    boxSizing: "border-box",
    font: "11px monospace",
    color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)",
  });
  root.className = "sd35-report";
  root.dataset.ran = "0";
  root.textContent = WAITING;
  return { root };
}

app.registerExtension({
  name: "sd35tuner.DatasetReport",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORT_NODES.has(nodeData.name)) return;
    addViewWidget(nodeType, { key: "sd35Report", name: WIDGET, type: "sd35_report", build: buildReport, minHeight: 64 });
    chainHook(nodeType.prototype, "onExecuted", function (message) {
      const lines = message?.text;
      if (!this.sd35Report || !Array.isArray(lines) || !lines.length) return;
      this.sd35Report.root.textContent = lines.join("\n");
      this.sd35Report.root.dataset.ran = "1";
      this.setDirtyCanvas(true, true);
    });
  },
});
