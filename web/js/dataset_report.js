// Shows the dataset nodes' reports (images loaded, skipped and why, crop reasons, files saved)
// on the node itself after a run, so a user sees a skipped file without wiring a text node.
import { chainHook, el } from "./shared/dom.js";

const { app } = window.comfyAPI.app;

const REPORT_NODES = new Set(["SD35TunerLoadDataset", "SD35TunerSmartCrop", "SD35TunerSaveDataset"]);
const WIDGET = "sd35_report";

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const pre = el("pre", {
      margin: "0",
      padding: "4px",
      whiteSpace: "pre-wrap",
      overflowY: "auto",
      maxHeight: "120px",
      font: "11px monospace",
      color: "var(--input-text, #ddd)",
      background: "var(--comfy-input-bg, #222)",
    });
    widget = node.addDOMWidget(WIDGET, "sd35_report", pre, { serialize: false });
    widget.sd35El = pre;
  }
  widget.sd35El.textContent = text;
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "sd35tuner.DatasetReport",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORT_NODES.has(nodeData.name)) return;
    chainHook(nodeType.prototype, "onExecuted", function (message) {
      const lines = message?.text;
      if (Array.isArray(lines) && lines.length) showReport(this, lines.join("\n"));
    });
  },
});
