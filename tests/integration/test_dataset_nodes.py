"""The dataset nodes and the bundled dataset_prep workflow in a real ComfyUI server."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from dataset.buckets import scale_buckets
from dataset.manifest import Dataset
from tools.comfy_server import execution_error
from tools.sample_data import SAMPLES, photo, write_sample_folder, write_tiny_captioners
from tools.workflow_api import ui_to_api
from tools.workflow_specs import DATASET_PREP, bundled

WORKFLOW = bundled(DATASET_PREP)
NODE_IDS = (
    "SD35TunerLoadDataset",
    "SD35TunerSmartCrop",
    "SD35TunerCaption",
    "SD35TunerPreviewDataset",
    "SD35TunerImagesToDataset",
    "SD35TunerSaveDataset",
)
# The photos the bundled workflow runs on here. Not the template's placeholder (SAMPLE_FOLDER): this
# server is shared with the browser tests, which check that the frontend flags the placeholder as missing.
SAMPLE = "dataset_nodes_photos"


@pytest.fixture(scope="module")
def sample(comfy) -> Path:
    folder = Path(comfy.base_dir) / "input" / SAMPLE
    if not folder.exists():
        write_sample_folder(folder)
    return folder


@pytest.fixture(scope="module")
def captioners(comfy) -> dict[str, Path]:
    return write_tiny_captioners(Path(comfy.base_dir) / "models" / "captioners")


def workflow_prompt(comfy, save_folder: str) -> dict:
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), comfy.object_info())
    node_of(prompt, "SD35TunerLoadDataset")["inputs"]["folder"] = SAMPLE
    save = next(n for n in prompt.values() if n["class_type"] == "SD35TunerSaveDataset")
    save["inputs"]["folder"] = save_folder
    return prompt


def node_of(prompt: dict, class_type: str) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == class_type)


def run_error(comfy, prompt: dict) -> str:
    """Run a graph expected to fail; return ComfyUI's exception message."""
    entry = comfy.wait(comfy.queue(prompt), timeout=300)
    error = execution_error(entry)
    assert error is not None, "the graph ran without an error"
    return error["exception_message"]


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


def test_dataset_nodes_are_registered_with_tooltips(comfy) -> None:
    info = comfy.object_info()
    for node_id in NODE_IDS:
        assert node_id in info, node_id
        assert info[node_id]["category"].startswith("SD3.5 Tuner/")
        for name, spec in info[node_id]["input"].get("required", {}).items():
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_bundled_workflow_runs_on_the_sample_folder(comfy, sample: Path) -> None:
    folder = unique("prep")
    entry = comfy.run(workflow_prompt(comfy, folder), timeout=300)
    out = Path(comfy.base_dir) / "output" / folder
    saved = Dataset.read_jsonl(out / "dataset.jsonl")
    assert sorted(Path(i.source).name for i in saved.items) == sorted(Path(r).stem + ".png" for r, _, _ in SAMPLES)
    buckets = scale_buckets(512)
    for item in saved.items:
        assert Image.open(item.source).size == item.bucket and item.bucket in buckets
        assert Path(item.source).with_suffix(".txt").read_text(encoding="utf-8").startswith("sd35sample, ")
    reasons = {Path(i.source).stem: i.crop_reason for i in saved.items}
    assert reasons["astronaut"] == "face" and reasons["rocket"] == "saliency"
    assert {Path(i.source).stem: i.repeats for i in saved.items}["chelsea"] == 2
    previews = comfy.output_files(entry, "4")
    assert len(previews) == len(SAMPLES) and all(p.is_file() for p in previews)
    assert not any(sample.rglob("*.jsonl"))  # nothing written next to the sources


@pytest.mark.parametrize("name", ["tiny-blip", "tiny-llava", "tiny-florence2"])
def test_caption_node_generates_with_local_captioners(comfy, sample: Path, captioners, name: str) -> None:
    options = comfy.get("/object_info/SD35TunerCaption")["SD35TunerCaption"]["input"]["required"]["captioner"]
    assert name in options[0] if isinstance(options[0], list) else name in options[1]["options"]
    folder = unique(name)
    prompt = workflow_prompt(comfy, folder)
    caption = node_of(prompt, "SD35TunerCaption")["inputs"]
    caption.update(captioner=name, policy="overwrite", trigger="sks", batch_size=2, max_new_tokens=5)
    comfy.run(prompt, timeout=300)
    originals = {Path(rel).stem: text for rel, _, text in SAMPLES}
    for txt in (Path(comfy.base_dir) / "output" / folder).glob("*.txt"):
        text = txt.read_text(encoding="utf-8").strip()
        assert text.startswith("sks, ") and len(text) > len("sks, ")
        assert originals[txt.stem] not in text


def test_empty_folder_fails_with_the_folder_named(comfy) -> None:
    empty = Path(comfy.base_dir) / "input" / unique("empty")
    empty.mkdir()
    prompt = workflow_prompt(comfy, unique("never"))
    node_of(prompt, "SD35TunerLoadDataset")["inputs"]["folder"] = empty.name
    assert f"{empty.name} has no usable image" in run_error(comfy, prompt)


def test_images_smaller_than_every_bucket_fail_with_the_file_named_and_no_output(comfy) -> None:
    small = Path(comfy.base_dir) / "input" / unique("small")
    small.mkdir()
    Image.new("RGB", (96, 64), (10, 200, 30)).save(small / "thumb.png")
    folder = unique("never")
    prompt = workflow_prompt(comfy, folder)
    node_of(prompt, "SD35TunerLoadDataset")["inputs"]["folder"] = small.name
    message = run_error(comfy, prompt)
    assert "every image is too small" in message and "thumb.png" in message
    assert not (Path(comfy.base_dir) / "output" / folder).exists()


def test_saving_again_after_a_change_writes_a_new_version_and_keeps_the_first(comfy, sample: Path) -> None:
    folder = unique("twice")
    first = comfy.run(workflow_prompt(comfy, folder), timeout=300)
    out = Path(comfy.base_dir) / "output" / folder
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = workflow_prompt(comfy, folder)
    node_of(again, "SD35TunerCaption")["inputs"]["trigger"] = "edited"  # a changed graph re-runs the save node
    save_id = next(k for k, n in again.items() if n["class_type"] == "SD35TunerSaveDataset")
    second = comfy.run(again, timeout=300)
    assert second["outputs"][save_id]["text"] == [f"{len(before) // 2} image(s) saved to {out}_2"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert all(t.read_text().startswith("edited") for t in Path(f"{out}_2").glob("*.txt"))
    assert first["outputs"][save_id]["text"][0].endswith(str(out))


def test_any_image_batch_becomes_a_dataset(comfy) -> None:
    folder = unique("batch")
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 320, "height": 256, "batch_size": 2, "color": 0xFF8000}},
        "2": {
            "class_type": "SD35TunerImagesToDataset",
            "inputs": {"images": ["1", 0], "captions": "orange\nalso orange"},
        },
        "3": {
            "class_type": "SD35TunerSmartCrop",
            "inputs": {
                "dataset": ["2", 0],
                "mode": "centre",
                "resolution": 256,
                "buckets": "",
                "headroom": 0.5,
                "max_upscale": 0.0,
                "too_small": "skip",
            },
        },
        "4": {
            "class_type": "SD35TunerSaveDataset",
            "inputs": {"dataset": ["3", 0], "folder": folder, "image_format": "jpg", "if_exists": "stop"},
        },
    }
    comfy.run(prompt, timeout=120)
    saved = Dataset.read_jsonl(Path(comfy.base_dir) / "output" / folder / "dataset.jsonl")
    assert [i.caption for i in saved.items] == ["orange", "also orange"]
    for item in saved.items:
        image = Image.open(item.source)
        assert image.size == item.bucket
        r, g, b = image.convert("RGB").getpixel((10, 10))
        assert r > 240 and 110 < g < 150 and b < 20


def test_cancel_stops_the_crop_and_nothing_is_saved(comfy) -> None:
    big = Path(comfy.base_dir) / "input" / unique("many")
    big.mkdir()
    image = Image.fromarray(photo("astronaut"))
    for i in range(80):
        image.save(big / f"{i:03d}.png", compress_level=0)
    folder = unique("cancelled")
    prompt = workflow_prompt(comfy, folder)
    node_of(prompt, "SD35TunerLoadDataset")["inputs"]["folder"] = big.name
    prompt_id = comfy.queue(prompt)
    deadline = time.monotonic() + 120
    while not any(job[1] == prompt_id for job in comfy.get("/queue")["queue_running"]):
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.05)
    comfy.interrupt()
    entry = comfy.wait(prompt_id, timeout=300)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds
    assert not (Path(comfy.base_dir) / "output" / folder).exists()
