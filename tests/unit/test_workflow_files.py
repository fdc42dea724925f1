"""The bundled workflows as a user first sees them: no node covers another, every node sits in a group,
wires run left to right, each template explains itself in a note, and every model file it names
carries the folder and address the frontend's missing-models dialog needs."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from tools import paths
from tools.workflow_specs import PIPELINE, bundled, workflows

WORKFLOWS = sorted(paths.WORKFLOWS.glob("*.json"))
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above a node's pos
NOTES = {"Note", "MarkdownNote"}
Box = tuple[float, float, float, float]  # left, top, right, bottom


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def node_box(node: dict) -> Box:
    (x, y), (w, h) = node["pos"], node["size"]
    return (x, y - TITLE_HEIGHT, x + w, y + h)


def overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(inner: Box, outer: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def group_box(group: dict) -> Box:
    x, y, w, h = group["bounding"]
    return (x, y, x + w, y + h)


def test_the_bundled_workflows_are_the_specs():
    assert [p.name for p in WORKFLOWS] == sorted(f"{w.name}.json" for w in workflows())
    assert not (paths.REPO / "workflows").exists(), "one folder of bundled workflows: example_workflows/"


def test_overlap_check_sees_a_title_bar():
    """The title bar counts: a node placed just under another's body but over its title collides."""
    upper = {"pos": [0, 100], "size": [200, 100]}
    assert not overlap(node_box(upper), node_box({"pos": [0, 231], "size": [200, 50]}))
    assert overlap(node_box(upper), node_box({"pos": [0, 220], "size": [200, 50]}))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_two_nodes_overlap(path):
    nodes = load(path)["nodes"]
    clashes = [
        (a.get("title", a["type"]), b.get("title", b["type"]))
        for a, b in combinations(nodes, 2)
        if overlap(node_box(a), node_box(b))
    ]
    assert clashes == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_node_but_the_note_sits_in_exactly_one_group(path):
    workflow = load(path)
    groups = [group_box(g) for g in workflow["groups"]]
    assert groups, "grouped by stage"
    assert not any(overlap(a, b) for a, b in combinations(groups, 2))
    for node in workflow["nodes"]:
        homes = [g for g in groups if inside(node_box(node), g)]
        assert len(homes) == (0 if node["type"] in NOTES else 1), node.get("title", node["type"])


def test_the_pipeline_is_grouped_data_cache_train_compare():
    workflow = load(bundled(PIPELINE))
    assert [g["title"] for g in sorted(workflow["groups"], key=lambda g: g["bounding"][0])] == [
        "Data",
        "Cache",
        "Train",
        "Compare",
    ]
    nodes = {n["id"]: n["type"] for n in workflow["nodes"]}
    sources = {(nodes[link[1]], nodes[link[3]]) for link in workflow["links"]}
    assert ("SD35TunerCaption", "SD35TunerPreviewDataset") in sources, "a Preview Dataset step before training"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_wires_run_left_to_right(path):
    """Each link leaves its node's right edge for a node further right: the flow reads left to right."""
    workflow = load(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    backwards = [
        (nodes[origin]["type"], nodes[target]["type"])
        for _, origin, _, target, *_ in workflow["links"]
        if node_box(nodes[origin])[2] >= node_box(nodes[target])[0]
    ]
    assert backwards == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_a_note_explains_the_template(path):
    workflow = load(path)
    [note] = [n for n in workflow["nodes"] if n["type"] in NOTES]
    text = note["widgets_values"][0]
    assert len(text) > 300
    if any(n["type"] == "SD35TunerTrainLora" for n in workflow["nodes"]):
        assert "output/sd35_tuner_runs/<lora_name>/" in text and "models/loras/" in text and "resume" in text
    for name in model_files(workflow):
        assert name in text, f"the note names {name} and its folder"


def model_files(workflow: dict) -> set[str]:
    return {v for n in workflow["nodes"] for v in n.get("widgets_values", []) if str(v).endswith(".safetensors")}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_model_file_carries_its_folder_for_the_missing_models_dialog(path):
    """The frontend lists a node's ``properties.models`` entry whose name is a widget value and whose file is
    not in ``directory`` (it skips entries without a url)."""
    for node in load(path)["nodes"]:
        named = {str(v) for v in node.get("widgets_values", []) if str(v).endswith(".safetensors")}
        entries = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
        assert named == set(entries), node["type"]
        for entry in entries.values():
            assert entry["directory"] in {"checkpoints", "diffusion_models", "text_encoders", "vae", "loras"}
            assert entry["url"].startswith("https://huggingface.co/") and entry["url"].endswith(entry["name"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_node_names_its_pack(path):
    """With ``cnr_id`` set the frontend knows each node's pack; without it, it asks the registry node by node."""
    for node in load(path)["nodes"]:
        if node["type"] in NOTES:
            continue
        pack = node.get("properties", {}).get("cnr_id")
        assert pack == ("sd35-tuner" if node["type"].startswith("SD35Tuner") else "comfy-core"), node["type"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_template_has_a_rendered_thumbnail_of_the_same_name(path):
    """The Templates dialog asks for ``<name>.jpg`` next to each workflow (``python -m tools.thumbnails``
    renders them from the demo models): a real JPEG, dialog-sized, with a picture in it (not one colour)."""
    from PIL import Image, ImageStat

    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} is missing: run python -m tools.thumbnails"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and 128 <= max(image.size) <= 512, (image.format, image.size)
        assert min(ImageStat.Stat(image.convert("L")).stddev[0], 255) > 20
    assert thumbnail.stat().st_size < 100_000
