// Flags, when a workflow opens, the choices on our nodes that this ComfyUI does not have — a dataset
// folder under input/, a base model file — on the node itself (saying where the file or folder goes)
// and in one warning toast, before anything runs; the toast is taken back once they are all there.
// The frontend's own missing-models check covers model loaders that carry a download address; no
// frontend check covers a folder of pictures.
import { chainHook, el } from "./shared/dom.js";

const { app } = window.comfyAPI.app;

const PREFIX = "SD35Tuner";
const WIDGET = "sd35_missing";
const WHERE = {
  folder: "put your pictures in a folder inside ComfyUI/input/, press R to refresh, and pick it",
  base_model: "put the SD3 / SD3.5 .safetensors file in ComfyUI/models/checkpoints/ (or diffusion_models/), press R",
  captioner: "put the captioning model's folder in ComfyUI/models/captioners/, press R",
};

function choices(widget) {
  const values = widget.options?.values;
  return typeof values === "function" ? values() : values;
}

function linked(node, widget) {
  return node.inputs?.some((i) => i.widget?.name === widget.name && i.link != null);
}

/** [widget name, value] for every combo whose value is not one of its choices (and not fed by a link). */
function missingChoices(node) {
  return (node.widgets ?? [])
    .filter((w) => w.type === "combo" && typeof w.value === "string" && w.value && !linked(node, w))
    .filter((w) => Array.isArray(choices(w)) && !choices(w).includes(w.value))
    .map((w) => [w.name, w.value]);
}

function hintText(missing) {
  return missing
    .map(([name, value]) => `⚠ ${name} '${value}' is not on this ComfyUI: ${WHERE[name] ?? "pick one it has"}.`)
    .join("\n");
}

function wrappedLines(text, width) {
  const perLine = Math.max(20, Math.floor(width / 6)); // ~6 px per character at 11 px
  return text.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / perLine)), 0);
}

function showHint(node, missing) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget && !missing.length) return;
  if (!widget) {
    const box = el("div", {
      padding: "4px 6px",
      whiteSpace: "pre-wrap",
      font: "11px sans-serif",
      color: "#ffb4a8",
      background: "rgba(160, 40, 30, 0.35)",
      borderRadius: "4px",
    });
    box.className = "sd35-missing-hint";
    widget = node.addDOMWidget(WIDGET, "sd35_missing", box, {
      serialize: false,
      getMinHeight: () => (box.textContent ? 12 + 15 * wrappedLines(box.textContent, node.size[0] - 30) : 0),
    });
    widget.sd35El = box;
  }
  if (missing.length && !widget.sd35El.textContent) widget.sd35HeightBefore = node.size[1];
  widget.sd35El.textContent = hintText(missing);
  widget.sd35El.style.display = missing.length ? "block" : "none";
  const fit = node.computeSize()[1]; // grow for the hint; back to the height it had once it is gone
  node.setSize([node.size[0], missing.length ? Math.max(node.size[1], fit) : Math.max(widget.sd35HeightBefore ?? 0, fit)]);
  node.setDirtyCanvas?.(true, true);
}

let warning = null; // the toast shown when the workflow opened, taken back once nothing is missing

function check(node) {
  const missing = missingChoices(node);
  showHint(node, missing);
  return missing;
}

const ourNodes = () => app.graph.nodes.filter((n) => n.comfyClass?.startsWith(PREFIX));

function withdrawWarning() {
  if (!warning || ourNodes().some((n) => missingChoices(n).length)) return;
  app.extensionManager?.toast?.remove?.(warning);
  warning = null;
}

app.registerExtension({
  name: "sd35tuner.MissingInputs",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith(PREFIX)) return;
    chainHook(nodeType.prototype, "onWidgetChanged", function () {
      check(this);
      withdrawWarning();
    });
  },
  async refreshComboInNodes() {
    ourNodes().forEach(check); // R reloads the choices: a folder or file added since is found now
    withdrawWarning();
  },
  async afterConfigureGraph() {
    if (warning) app.extensionManager?.toast?.remove?.(warning); // another workflow's
    warning = null;
    const found = ourNodes().flatMap((n) => check(n).map(([name, value]) => `${n.title}: ${name} '${value}'`));
    if (!found.length) return;
    warning = {
      severity: "warn",
      summary: "This workflow names files or folders this ComfyUI does not have",
      detail: `${found.join("\n")}\nThe nodes say where each one goes.`,
      life: 15000,
    }; // taken back earlier once everything it names is there (withdrawWarning)
    app.extensionManager?.toast?.add(warning);
  },
});
