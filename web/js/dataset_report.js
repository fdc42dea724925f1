// Shows the dataset nodes' reports (images loaded, skipped and why, crop reasons, files saved)
// on the node itself after a run, so a user sees a skipped file without wiring a text node.
const { app } = window.comfyAPI.app;

const REPORT_NODES = new Set(["SD35TunerLoadDataset", "SD35TunerSmartCrop", "SD35TunerSaveDataset"]);
const WIDGET = "sd35_report";

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const el = document.createElement("pre");
    Object.assign(el.style, {
      margin: "0",
      padding: "4px",
      whiteSpace: "pre-wrap",
      overflowY: "auto",
      maxHeight: "120px",
      font: "11px monospace",
      color: "var(--input-text, #ddd)",
      background: "var(--comfy-input-bg, #222)",
    });
    widget = node.addDOMWidget(WIDGET, "sd35_report", el, { serialize: false });
    widget.sd35El = el;
  }
  widget.sd35El.textContent = text;
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "sd35tuner.DatasetReport",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const lines = message?.text;
      if (Array.isArray(lines) && lines.length) showReport(this, lines.join("\n"));
    };
  },
});
