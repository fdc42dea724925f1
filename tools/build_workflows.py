"""Write the bundled workflows (``example_workflows/*.json``) from ``tools/workflow_specs.py``.

The real frontend builds each graph (a real ComfyUI with this pack, in headless Chromium): it creates
the nodes with their schema defaults, takes the widget values by name, sizes every node for its
widgets, and serialises the graph exactly as a user's "Save" would. Layout is computed here: groups
side by side in flow order, columns inside a group, nodes stacked in a column, the note on the left;
nothing overlaps by construction (``tests/unit/test_workflow_files.py`` checks it on the files).

    python -m tools.build_workflows            # rewrite every bundled workflow
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from . import paths
from .comfy_server import PACK_DIR_NAME as PACK
from .workflow_api import FRONTEND_ONLY
from .workflow_specs import Node, Workflow, workflows

GAP = 40  # between columns, and between a node's bottom and the next node's title bar
PAD = 24  # inside a group, around its nodes
GROUP_TITLE = 50  # the group's title band above its nodes
NOTE_WIDTH = 460

CREATE_JS = """([specs, noteSpec]) => {
    const graph = window.app.graph;
    graph.clear();
    const make = (spec) => {
        const node = window.LiteGraph.createNode(spec.type);
        if (!node) throw new Error(`node type ${spec.type} is not registered`);
        graph.add(node);
        for (const [name, value] of Object.entries(spec.values)) {
            const widget = node.widgets?.find((w) => w.name === name);
            if (!widget) throw new Error(`${spec.type} has no widget '${name}'`);
            widget.value = value;
        }
        if (spec.title) node.title = spec.title;
        if (spec.models.length) node.properties.models = spec.models;
        if (spec.pack) node.properties.cnr_id = spec.pack; // the frontend then asks no registry which pack it is
        const min = node.computeSize();
        node.setSize([Math.max(min[0], spec.width), Math.max(min[1], spec.height)]);
        return [node.id, node.size[0], node.size[1]];
    };
    return [specs.map(make), make(noteSpec), window.LiteGraph.NODE_TITLE_HEIGHT];
}"""

FINISH_JS = """([positions, links, groups]) => {
    const graph = window.app.graph;
    for (const [id, x, y] of positions) graph.getNodeById(id).pos = [x, y];
    for (const [from, output, to, input] of links) {
        const src = graph.getNodeById(from), dst = graph.getNodeById(to);
        const out = src.outputs.findIndex((o) => o.name === output);
        const inp = dst.inputs.findIndex((i) => i.name === input);
        if (out < 0 || inp < 0) throw new Error(`no socket for ${src.type}.${output} -> ${dst.type}.${input}`);
        if (!src.connect(out, dst, inp)) throw new Error(`cannot connect ${src.type}.${output} -> ${dst.type}.${input}`);
    }
    for (const [title, color, x, y, w, h] of groups) {
        const group = new window.LiteGraph.LGraphGroup(title);
        group.color = color;
        graph.add(group);
        group.pos = [x, y];
        group.size = [w, h];
    }
    return JSON.stringify(graph.serialize());
}"""


def _node_spec(node: Node) -> dict[str, Any]:
    return {
        "type": node.type,
        "values": node.values,
        "title": node.title,
        "width": node.width,
        "height": node.height,
        "models": node.models,
        "pack": None if node.type in FRONTEND_ONLY else PACK if node.type.startswith("SD35Tuner") else "comfy-core",
    }


def layout(
    workflow: Workflow, sizes: dict[str, tuple[float, float]], note_size: tuple[float, float], title: float
) -> tuple[dict[str, tuple[float, float]], tuple[float, float], list[tuple[str, str, float, float, float, float]]]:
    """Positions of every node (its body's top-left; the title bar sits above), the note's, and group boxes."""
    top = GROUP_TITLE + PAD + title  # y of the node bodies in the first row of every group
    note_pos = (0.0, top)
    x = note_size[0] + GAP + PAD
    positions: dict[str, tuple[float, float]] = {}
    groups = []
    for group in workflow.groups:
        left, bottom = x - PAD, top
        for column in group.columns:
            y = top
            for node in column:
                positions[node.key] = (x, y)
                y += sizes[node.key][1] + GAP + title
                bottom = max(bottom, positions[node.key][1] + sizes[node.key][1])
            x += max(sizes[n.key][0] for n in column) + GAP
        right = x - GAP + PAD
        groups.append((group.title, group.color, left, 0.0, right - left, bottom + PAD))
        x = right + GAP + PAD
    return positions, note_pos, groups


def build(page: Any, workflow: Workflow) -> dict[str, Any]:
    nodes = workflow.nodes()
    note = Node("note", "MarkdownNote", {"text": workflow.note}, "Read me", width=NOTE_WIDTH)
    note.height = 13 * sum(1 + len(line) // 90 for line in workflow.note.splitlines()) + 80
    created, note_created, title = page.evaluate(CREATE_JS, [[_node_spec(n) for n in nodes], _node_spec(note)])
    ids = {n.key: c[0] for n, c in zip(nodes, created, strict=True)}
    sizes = {n.key: (c[1], c[2]) for n, c in zip(nodes, created, strict=True)}
    positions, note_pos, groups = layout(workflow, sizes, (note_created[1], note_created[2]), title)
    placed = [[ids[k], *xy] for k, xy in positions.items()] + [[note_created[0], *note_pos]]
    links = []
    for src, dst in workflow.links:
        (a, output), (b, inp) = src.split(".", 1), dst.split(".", 1)
        links.append([ids[a], output, ids[b], inp])
    data = json.loads(page.evaluate(FINISH_JS, [placed, links, groups]))
    data["extra"]["ds"] = {"scale": 0.7, "offset": [115, 130]}  # opens on the note and the first group, readable
    return data


def main() -> int:
    from .browser import frontend
    from .comfy_server import ComfyServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=paths.WORKFLOWS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base)) as server, frontend(server) as ui:
        for workflow in workflows():
            path = args.out / f"{workflow.name}.json"
            path.write_text(json.dumps(build(ui.page, workflow), indent=1) + "\n")
            print(path)
        if ui.unexpected_errors():
            raise SystemExit(f"frontend errors: {ui.unexpected_errors()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
