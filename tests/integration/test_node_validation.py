"""Bad widget values sent through the API are refused by ComfyUI's validation, before anything runs, with a
message that names the input and what it accepts, pinned on that input."""

from __future__ import annotations

import json
import math
import urllib.error
from pathlib import Path

import pytest

from tools import paths

FOLDER = "validation_sample"
SOURCES: dict[str, tuple[str, dict]] = {  # a valid upstream node for each linked input type
    "SD35_DATASET": ("SD35TunerLoadDataset", {"folder": FOLDER}),
    "SD35_CACHE": ("SD35TunerCacheLatents", {"cache_name": ""}),  # refused too: an output node, it would run
    "VAE": ("VAELoader", {"vae_name": paths.SD3_VAE}),
    "CLIP": ("CLIPLoader", {"clip_name": paths.CLIP_L, "type": "sd3"}),
    "MODEL": ("CheckpointLoaderSimple", {"ckpt_name": paths.SD3_CHECKPOINT}),
    "CONDITIONING": ("CLIPTextEncode", {"text": "a cat"}),
    "LATENT": ("EmptySD3LatentImage", {"width": 64, "height": 64, "batch_size": 1}),
    "IMAGE": ("EmptyImage", {"width": 64, "height": 64, "batch_size": 1, "color": 0}),
}


class Graph:
    """An API prompt built from /object_info: every required input at its default or a valid source."""

    def __init__(self, info: dict) -> None:
        self.info, self.prompt = info, {}

    def add(self, class_type: str, **values) -> str:
        inputs = {}
        for name, spec in self.info[class_type]["input"]["required"].items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if name in values:
                continue
            if "default" in options:
                inputs[name] = options["default"]
            elif isinstance(kind, list) or options.get("options"):
                inputs[name] = (kind if isinstance(kind, list) else options["options"])[0]
            else:
                source, preset = SOURCES[kind]
                inputs[name] = [self.add(source, **preset), 0]
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": {**inputs, **values}}
        return node_id


def refusal(comfy, class_type: str, values: dict) -> list[dict]:
    """Post a graph whose only output shows ``class_type`` with ``values``; return that node's errors."""
    graph = Graph(comfy.object_info())
    node_id = graph.add(class_type, **values)
    graph.add("PreviewAny", source=[node_id, 0])
    try:
        answer = comfy.post("/prompt", {"prompt": graph.prompt, "client_id": comfy.client_id})
    except urllib.error.HTTPError as err:
        answer = json.loads(err.read())
    assert "prompt_id" not in answer, f"{class_type} {values} was accepted"
    return answer["node_errors"][node_id]["errors"]


CHOICES = [  # ComfyUI's own option check on every version (0.3.75 skips V3 combos; see nodes/_validation.py)
    ("SD35TunerLoadDataset", "background", "purple", "'white', 'black', 'grey'"),
    ("SD35TunerLoadDataset", "caption_extension", ".exe", "'.txt', '.caption'"),
    ("SD35TunerSmartCrop", "mode", "zoom", "'face_then_saliency'"),
    ("SD35TunerCaption", "policy", "append", "'fill_missing'"),
    ("SD35TunerSaveDataset", "image_format", "gif", "'png', 'jpg', 'webp'"),
    ("SD35TunerTrainSettings", "optimizer", "sgd", "'adamw'"),
    ("SD35TunerTrainLora", "quantization", "int2", "'none', 'int8', 'int4', 'fp8'"),
    ("SD35TunerTrainLora", "base_model", "sd3.5_large.safetensors", paths.SD3_CHECKPOINT),
    ("SD35TunerAPG", "threshold_mode", "relative", "'absolute', 'scaled'"),
]
RANGES = [  # ComfyUI's own min/max check: our validate_inputs does not name these
    ("SD35TunerLoadDataset", "repeats", 1_000_000, "bigger than max of 1000"),
    ("SD35TunerTrainLora", "rank", 0, "smaller than min of 1"),
    ("SD35TunerCacheLatents", "batch_size", 0, "smaller than min of 1"),
]
CHECKS = [  # our validate_inputs, through the library check of each concern
    ("SD35TunerLoadDataset", "folder", "no_such_folder", "not found"),
    ("SD35TunerLoadDataset", "folder", "/etc", "outside ComfyUI's input folder"),
    ("SD35TunerSaveDataset", "folder", "../escape", "may not contain '..'"),
    ("SD35TunerSaveDataset", "folder", "/tmp/escape", "not absolute"),
    ("SD35TunerSmartCrop", "buckets", "1024x1000", "multiples of 64"),
    ("SD35TunerSaveDataset", "if_exists", "replace", "if_exists must be one of ['new version', 'overwrite', 'stop']"),
    ("SD35TunerSaveDataset", "if_exists", "stop", "exists already and if_exists is 'stop'"),
    ("SD35TunerCaption", "captioner", "missing-captioner", "missing-captioner"),
    ("SD35TunerCacheLatents", "cache_name", "../outside", "may not contain '..'"),
    ("SD35TunerCacheLatents", "location", "home", "must be one of ['output', 'temp']"),
    ("SD35TunerTrainSettings", "blocks", "12-x", "block indices like '12-24,30'"),
    ("SD35TunerTrainLora", "lora_name", "../escape", "not a plain file name"),
    ("SD35TunerTrainLora", "resume", True, "no checkpoint of 'never_trained'"),
    ("SD35TunerTrainLora", "validation_cfg", math.nan, "validation_cfg must be a finite number"),
    ("SD35TunerTrainLora", "apg_momentum", -2.0, "apg_momentum must be between -0.99 and 0.99"),
    ("SD35TunerAPG", "eta", math.nan, "eta must be a finite number"),
    ("SD35TunerAPGGuider", "momentum", math.inf, "momentum must be a finite number"),
    ("SD35TunerAPGGuider", "cfg", math.nan, "cfg must be a finite number"),
    ("SD35TunerCompareCFGAPG", "norm_threshold", -1.0, "norm_threshold must be between 0 and 1000"),
    ("SD35TunerAPG", "window_start", 0.8, "window_start (0.8) is after window_end"),
]
EXTRA = {  # the other values a case needs
    ("SD35TunerTrainLora", "resume"): {"lora_name": "never_trained"},
    ("SD35TunerAPG", "window_start"): {"window_end": 0.5},
    ("SD35TunerSaveDataset", "if_exists"): {"folder": FOLDER},  # output/validation_sample exists (fixture)
}


@pytest.fixture(scope="module", autouse=True)
def sample_folder(comfy) -> None:
    for base in ("input", "output"):
        (Path(comfy.base_dir) / base / FOLDER).mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize(("class_type", "field", "value", "allowed"), CHOICES + RANGES)
def test_comfyui_refuses_a_bad_value_on_that_input_alone(comfy, class_type, field, value, allowed):
    errors = refusal(comfy, class_type, {field: value})
    assert [e["extra_info"]["input_name"] for e in errors] == [field]
    assert field in errors[0]["details"] + errors[0]["message"] and allowed in json.dumps(errors[0])


@pytest.mark.parametrize(("class_type", "field", "value", "message"), CHECKS)
def test_our_checks_refuse_a_bad_value_with_one_message_naming_it(comfy, class_type, field, value, message):
    errors = refusal(comfy, class_type, {field: value, **EXTRA.get((class_type, field), {})})
    assert field in {e["extra_info"]["input_name"] for e in errors}
    # ComfyUI repeats a validate_inputs message on each input the function names: one problem, one text
    (text,) = {e["details"].split(" - ", 1)[1] for e in errors}
    assert field in text and message in text
    assert not Path("/tmp/escape").exists() and not (Path(comfy.base_dir) / "outside").exists()
