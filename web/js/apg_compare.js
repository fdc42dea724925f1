// CFG vs APG by eye: the comparison node shows both halves stacked, with a slider that moves the
// split (CFG left, APG right) and a button that cycles split / CFG only / APG only. After a sweep
// (mode "sweep"), two pickers choose which CFG scale and which APG scale are stacked; they start on
// the highest CFG scale and the APG scale whose guidance update is closest in size (equal strength).
import { addViewWidget, chainHook, el, viewUrl } from "./shared/dom.js";

const { app } = window.comfyAPI.app;

const NODE = "SD35TunerCompareCFGAPG";
const UI_KEY = "sd35_apg_compare";
const MODES = ["split", "cfg", "apg"];

function cellText(cell) {
  return `${cell.guidance} w=${cell.scale}: saturation ${cell.saturation.toFixed(3)}, brightness ${cell.brightness.toFixed(3)}, update ${cell.update.toFixed(3)}`;
}

// The sweep's two scale pickers. `fill(result)` lists the scales and picks the default pair; every pick
// calls `onPick({cfgItem, apgItem, cfgTitle, apgTitle, line})`.
function buildSweepPicker(onPick) {
  const root = el("div", { display: "none", gap: "6px", alignItems: "center", fontSize: "11px" });
  root.className = "sd35-apg-sweep";
  const cfgSelect = el("select", { fontSize: "11px" }, { className: "sd35-apg-sweep-cfg", title: "CFG scale shown on the left" });
  const apgSelect = el("select", { fontSize: "11px" }, { className: "sd35-apg-sweep-apg", title: "APG scale shown on the right" });
  root.append(el("span", {}, { textContent: "CFG w" }), cfgSelect, el("span", {}, { textContent: "vs APG w" }), apgSelect);
  const picker = { root, figures: "", result: null };

  function cells(guidance) {
    return (picker.result?.cells ?? []).filter((c) => c.guidance === guidance);
  }
  function pick() {
    const [c, a] = [Number(cfgSelect.value), Number(apgSelect.value)];
    const [cfgCell, apgCell] = [cells("CFG")[c], cells("APG")[a]];
    if (!cfgCell || !apgCell) return;
    onPick({
      cfgItem: picker.result.cfg?.[c],
      apgItem: picker.result.apg?.[a],
      cfgTitle: cellText(cfgCell),
      apgTitle: cellText(apgCell),
      line: `left: ${cellText(cfgCell)}\nright: ${cellText(apgCell)}`,
    });
  }
  cfgSelect.addEventListener("change", pick);
  apgSelect.addEventListener("change", pick);

  picker.fill = (result, figures) => {
    picker.result = result;
    picker.figures = figures;
    for (const [select, guidance] of [[cfgSelect, "CFG"], [apgSelect, "APG"]]) {
      select.replaceChildren(...cells(guidance).map((cell, i) => el("option", {}, { value: String(i), textContent: String(cell.scale) })));
    }
    const cfgCells = cells("CFG");
    const strongest = cfgCells.length - 1;
    const target = Math.max(cfgCells[strongest]?.update ?? 0, 1e-12);
    let best = 0;
    cells("APG").forEach((cell, i) => {
      const distance = (x) => Math.abs(Math.log(Math.max(x.update, 1e-12) / target));
      if (distance(cell) < distance(cells("APG")[best])) best = i;
    });
    cfgSelect.value = String(strongest);
    apgSelect.value = String(best);
    root.style.display = "flex";
    pick();
  };
  picker.hide = () => {
    root.style.display = "none";
  };
  return picker;
}

function buildViewer() {
  const root = el("div", { display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%" });
  root.className = "sd35-apg-compare";
  root.dataset.mode = "split";
  root.dataset.split = "50";
  root.dataset.loaded = "0";

  // the frame is fitted to the picture's aspect ratio, so slider percentages are percentages of the picture
  const stage = el("div", { flex: "1 1 auto", minHeight: "64px", overflow: "hidden", display: "flex", alignItems: "center", justifyContent: "center" });
  const frame = el("div", { position: "relative", width: "100%", height: "100%", display: "none" });
  frame.className = "sd35-apg-frame";
  // before the first run: what will appear here, instead of two empty pictures
  const placeholder = el("div", { padding: "12px", textAlign: "center", fontSize: "12px", color: "#999" });
  placeholder.className = "sd35-apg-placeholder";
  placeholder.textContent = "Run the graph: the CFG and APG samples of the same seed appear here, split by the slider (CFG left, APG right).";
  const imgStyle = { position: "absolute", inset: "0", width: "100%", height: "100%" };
  const cfg = el("img", imgStyle, { alt: "CFG", className: "sd35-apg-cfg" });
  const apg = el("img", imgStyle, { alt: "APG", className: "sd35-apg-apg" });
  const line = el("div", { position: "absolute", top: "0", bottom: "0", width: "2px", background: "#fff", pointerEvents: "none" });
  frame.append(cfg, apg, line);
  stage.append(frame, placeholder);

  function fit() {
    const w = cfg.naturalWidth, h = cfg.naturalHeight;
    const W = stage.clientWidth, H = stage.clientHeight;
    if (!w || !h || !W || !H) return;
    const scale = Math.min(W / w, H / h);
    frame.style.width = `${Math.floor(w * scale)}px`;
    frame.style.height = `${Math.floor(h * scale)}px`;
  }
  const observer = new ResizeObserver(fit);
  observer.observe(stage);

  const controls = el("div", { display: "flex", gap: "6px", alignItems: "center" });
  const slider = el("input", { flex: "1 1 auto" }, { type: "range", min: "0", max: "100", value: "50", title: "Split: CFG left, APG right" });
  slider.className = "sd35-apg-slider";
  const toggle = el("button", { fontSize: "11px" }, { textContent: "split", title: "Cycle: split / CFG only / APG only" });
  toggle.className = "sd35-apg-toggle";
  controls.append(el("span", { fontSize: "11px" }, { textContent: "CFG" }), slider, el("span", { fontSize: "11px" }, { textContent: "APG" }), toggle);

  const caption = el("pre", { fontSize: "10px", margin: "0", whiteSpace: "pre-wrap", maxHeight: "72px", overflow: "auto" });
  caption.className = "sd35-apg-caption";
  root.append(stage, controls, caption);

  function render() {
    const mode = root.dataset.mode;
    const split = Number(root.dataset.split);
    const shown = mode === "split" ? split : mode === "cfg" ? 100 : 0;
    apg.style.clipPath = `inset(0 0 0 ${shown}%)`;
    line.style.display = mode === "split" ? "block" : "none";
    line.style.left = `calc(${split}% - 1px)`;
    toggle.textContent = mode;
  }
  slider.addEventListener("input", () => {
    root.dataset.split = slider.value;
    render();
  });
  toggle.addEventListener("click", () => {
    root.dataset.mode = MODES[(MODES.indexOf(root.dataset.mode) + 1) % MODES.length];
    render();
  });
  render();

  function load(cfgItem, apgItem, cfgTitle, apgTitle) {
    let pending = 2;
    const done = () => {
      pending -= 1;
      if (pending > 0) return;
      placeholder.style.display = "none";
      frame.style.display = "block";
      fit();
      root.dataset.loaded = "1";
    };
    root.dataset.loaded = "0";
    for (const [img, item] of [[cfg, cfgItem], [apg, apgItem]]) {
      if (!item) continue;
      img.onload = () => {
        fit();
        done();
      };
      img.src = viewUrl(item);
    }
    cfg.title = cfgTitle;
    apg.title = apgTitle;
  }

  const picker = buildSweepPicker((pick) => {
    load(pick.cfgItem, pick.apgItem, pick.cfgTitle, pick.apgTitle);
    caption.textContent = `${pick.line}\n${picker.figures}`;
  });
  root.insertBefore(picker.root, caption);

  function show(result, figures) {
    if (result.mode === "sweep") {
      picker.fill(result, figures ?? "");
      return;
    }
    picker.hide();
    load(result.cfg?.[0], result.apg?.[0], result.cfg_label ?? "CFG", result.apg_label ?? "APG");
    caption.textContent = figures ?? `${cfg.title}\n${apg.title}`;
  }
  return { root, show, dispose: () => observer.disconnect() };
}

app.registerExtension({
  name: "sd35tuner.APGCompare",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;

    addViewWidget(nodeType, {
      key: "sd35ApgViewer",
      name: "apg_compare",
      type: "sd35_apg_compare",
      build: buildViewer,
      minHeight: 340,
    });
    chainHook(nodeType.prototype, "onExecuted", function (message) {
      const result = message?.[UI_KEY]?.[0];
      if (result && this.sd35ApgViewer) this.sd35ApgViewer.show(result, message.text?.[0]);
    });
  },
});
