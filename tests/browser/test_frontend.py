"""The real ComfyUI frontend, in headless Chromium, with the pack installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import paths
from tools.browser import frontend
from tools.comfy_server import PACK_DIR_NAME
from tools.workflow_api import ui_to_api

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted(paths.WORKFLOWS.glob("*.json"))
SCRIPTS = sorted(p.relative_to(REPO / "web" / "js").as_posix() for p in (REPO / "web" / "js").rglob("*.js"))
SHARED = [s for s in SCRIPTS if s.startswith("shared/")]  # imported by the extensions; register nothing
EXTENSIONS = [s for s in SCRIPTS if s not in SHARED]


@pytest.fixture(scope="module")
def ui(comfy):
    with frontend(comfy) as session:
        yield session


def test_the_pack_extensions_load_without_errors(ui, comfy):
    served = [e for e in comfy.get("/extensions") if e.startswith(f"/extensions/{PACK_DIR_NAME}/")]
    assert sorted(e.split(f"/extensions/{PACK_DIR_NAME}/", 1)[1] for e in served) == SCRIPTS
    registered = ui.page.evaluate("() => window.app.extensions.map((e) => e.name)")
    ours = [name for name in registered if name.startswith("sd35tuner.")]
    assert len(ours) == len(EXTENSIONS), f"one extension per script outside shared/ expected, got {ours}"
    assert len(set(ours)) == len(ours)
    assert ui.unexpected_errors() == []


def test_shared_helpers_are_one_module_the_extensions_use(ui):
    """ComfyUI loads shared/*.js as extensions too; the extensions' relative imports reach the same module."""
    assert SHARED, "web/js/shared/ holds the helpers the extensions share"
    for script in EXTENSIONS:  # no extension keeps its own copy of a shared helper
        source = (REPO / "web" / "js" / script).read_text()
        assert "function el(" not in source and "const onExecuted = nodeType" not in source, script
    url = f"/extensions/{PACK_DIR_NAME}/shared/dom.js"
    exports = ui.page.evaluate("async (url) => Object.keys(await import(url)).sort()", url)
    assert exports == ["addViewWidget", "chainHook", "el", "viewUrl"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_bundled_workflow_loads_with_no_missing_nodes_and_no_overlaps(ui, path, tmp_path):
    missing = ui.load_workflow(json.loads(path.read_text()), path.name)
    assert missing == []
    assert len(ui.node_types()) == len([n for n in json.loads(path.read_text())["nodes"]])
    # as drawn: the frontend grows a node to fit its widgets, so check the live boxes, title bars included
    clashes = ui.page.evaluate(
        """() => {
            const nodes = window.app.graph.nodes;
            const box = (n) => { const [x, y, w, h] = n.getBounding(); return [x, y, x + w, y + h]; };
            const hit = (a, b) => a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3];
            const out = [];
            nodes.forEach((a, i) => nodes.slice(i + 1).forEach((b) => hit(box(a), box(b)) && out.push([a.title, b.title])));
            return out;
        }"""
    )
    assert clashes == []
    ui.screenshot(tmp_path / f"{path.stem}.png")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_headless_conversion_matches_the_frontends_own(ui, comfy, path):
    """tools.workflow_api (used by the main job and the tests) queues exactly what the Queue button would."""
    workflow = json.loads(path.read_text())
    ui.load_workflow(workflow, path.name)
    theirs = ui.page.evaluate("async () => (await window.app.graphToPrompt()).output")
    ours = ui_to_api(workflow, comfy.object_info())
    assert {k: (v["class_type"], v["inputs"]) for k, v in ours.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in theirs.items()
    }
