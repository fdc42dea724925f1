// Helpers shared by the pack's extensions, which import them with a relative ES import. ComfyUI also
// loads every .js under WEB_DIRECTORY as an extension: this module only exports, so that load is a
// no-op and both resolve to the same module instance.

/** A DOM element with inline styles and properties, e.g. el("div", { gap: "4px" }, { className: "x" }). */
export function el(tag, style = {}, props = {}) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.style, style);
  return node;
}

/** The /view address of an image the server reported ({ filename, subfolder, type }). */
export function viewUrl(item) {
  const query = new URLSearchParams({ filename: item.filename, subfolder: item.subfolder ?? "", type: item.type ?? "temp" });
  return window.comfyAPI.api.api.apiURL(`/view?${query}`);
}

/** Run `fn` after the prototype's existing `name` hook (another extension's, or the frontend's). */
export function chainHook(proto, name, fn) {
  const previous = proto[name];
  proto[name] = function (...args) {
    const result = previous?.apply(this, args);
    fn.apply(this, args);
    return result;
  };
}

/**
 * Give every node of this type a DOM widget built by `build(node)` (which returns `{ root, dispose? }`),
 * kept on the node as `node[key]`, and torn down (observers disconnected, element removed) when the
 * node is removed.
 */
export function addViewWidget(nodeType, { key, name, type, build, minHeight }) {
  chainHook(nodeType.prototype, "onNodeCreated", function () {
    this[key] = build(this);
    this.addDOMWidget(name, type, this[key].root, { serialize: false, getMinHeight: () => minHeight });
  });
  chainHook(nodeType.prototype, "onRemoved", function () {
    this[key]?.dispose?.();
    this[key]?.root.remove();
    this[key] = null;
  });
}
