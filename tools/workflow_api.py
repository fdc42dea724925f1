"""Turn a UI-format workflow (what the frontend saves, what example_workflows/ holds) into an API prompt.

The frontend does this in ``graphToPrompt`` before queueing; headless runs (tests, the demo job)
need the same without a browser. Widget values are matched to input names in the order the
server's ``/object_info`` declares them (required, then optional), skipping the extra
``control_after_generate`` value the frontend stores after seed widgets. Notes and reroutes are
frontend-only and dissolved; muted nodes are dropped. Subgraphs are not supported.
"""

from __future__ import annotations

from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "BOOL", "COMBO"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def _is_widget(spec: list[Any]) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_value(name: str, spec: list[Any]) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] != "INT":
        return False
    # the frontend adds the control widget when asked, or by default to inputs named seed / noise_seed
    return bool(options.get("control_after_generate", name in ("seed", "noise_seed")))


def widget_names(info: dict[str, Any]) -> list[tuple[str, bool]]:
    """(input name, followed by a control value?) for every widget input, in frontend order."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info.get("input", {}).get(section, {}).items():
            if _is_widget(spec):
                out.append((name, _has_control_value(name, spec)))
                if isinstance(spec[0], list) or spec[0] == "COMBO":
                    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    if options.get("image_upload") or options.get("video_upload"):
                        out.append(("__upload__", False))
    return out


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    if "nodes" not in workflow or "links" not in workflow:
        raise WorkflowError(
            "not a UI-format workflow (needs 'nodes' and 'links'); API-format prompts need no conversion"
        )
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {int(link[0]): link for link in workflow["links"]}

    def source_of(link_id: int) -> tuple[int, int] | None:
        link = links[link_id]
        origin, slot = int(link[1]), int(link[2])
        node = nodes[origin]
        if node["type"] == "Reroute":
            upstream = (node.get("inputs") or [{}])[0].get("link")
            return None if upstream is None else source_of(int(upstream))
        if node.get("mode") == BYPASSED:
            raise WorkflowError(f"node {origin} ({node['type']}) is bypassed; un-bypass or remove it")
        if node.get("mode") == MUTED:
            return None
        return origin, slot

    prompt: dict[str, Any] = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {node_id}: type '{kind}' is not installed on this server")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values", [])
        connected_widgets = {
            i.get("widget", {}).get("name") for i in node.get("inputs", []) if i.get("link") is not None
        }
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k not in connected_widgets})
        else:
            position = 0
            for name, has_control in widget_names(info):
                if position >= len(values):
                    break
                if name != "__upload__" and name not in connected_widgets:
                    inputs[name] = values[position]
                position += 2 if has_control else 1
        for socket in node.get("inputs", []):
            if socket.get("link") is None:
                continue
            src = source_of(int(socket["link"]))
            if src is not None:
                inputs[socket["name"]] = [str(src[0]), src[1]]
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt


def set_inputs(prompt: dict[str, Any], class_type: str, **values: Any) -> int:
    """Override widget values on every node of a type (e.g. point loaders at the built-in models)."""
    count = 0
    for node in prompt.values():
        if node["class_type"] == class_type:
            node["inputs"].update(values)
            count += 1
    return count


def upstream(prompt: dict[str, Any], node_ids: list[str]) -> dict[str, Any]:
    """The part of an API prompt that ``node_ids`` need: those nodes and every node feeding them."""
    out: dict[str, Any] = {}
    todo = list(node_ids)
    while todo:
        node_id = todo.pop()
        if node_id in out:
            continue
        out[node_id] = prompt[node_id]
        todo += [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return out
