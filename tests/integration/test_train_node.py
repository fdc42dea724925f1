"""The training node in a real ComfyUI: dataset → cache → train on the built-in tiny SD3, then its outputs."""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from tests.integration.test_train_workflow import sample_photos
from tools import paths
from tools.comfy_server import execution_error


def _node(info: dict, class_type: str, **values) -> dict:
    """An API node with every widget at its /object_info default, then ``values`` on top (links included)."""
    inputs = {}
    for section in ("required", "optional"):
        for name, spec in info[class_type]["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in options:
                inputs[name] = options["default"]
            elif isinstance(spec[0], list) and spec[0]:
                inputs[name] = spec[0][0]
    inputs.update(values)
    return {"class_type": class_type, "inputs": inputs}


@pytest.fixture(scope="module")
def base_prompt(comfy) -> dict:
    folder = sample_photos(comfy)
    info = comfy.object_info()
    return {
        "1": _node(info, "SD35TunerLoadDataset", folder=folder),
        "2": _node(info, "SD35TunerSmartCrop", dataset=["1", 0], resolution=256),
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": paths.SD3_VAE}},
        "4": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
        "5": _node(
            info,
            "SD35TunerCacheLatents",
            dataset=["2", 0],
            vae=["3", 0],
            clip=["4", 0],
            cache_name=f"sd35_cache/{folder}",
        ),
        "6": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": paths.SD3_CHECKPOINT}},
        "7": _node(
            info,
            "SD35TunerTrainSettings",
            base_dtype="fp32",
            save_dtype="fp32",
            gradient_checkpointing=False,
            checkpoint_every=2,
        ),
        "8": _node(
            info,
            "SD35TunerTrainLora",
            cache=["5", 0],
            base_model=paths.SD3_CHECKPOINT,
            steps=4,
            learning_rate=1e-3,
            rank=4,
            alpha=8.0,
            quantization="none",
            validation_steps=2,
            settings=["7", 0],
        ),
    }


class Events:
    """Our trainer's websocket events (``sd35tuner.train.*``) sent to the test client, in order of arrival."""

    def __init__(self, comfy) -> None:
        import websocket

        self.ws = websocket.create_connection(f"ws://127.0.0.1:{comfy.port}/ws?clientId={comfy.client_id}")
        self.seen: list[tuple[str, dict]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.ws.recv()
            except Exception:  # closed
                return
            if (
                isinstance(message, str)
                and message
                and (event := json.loads(message))["type"].startswith("sd35tuner.train.")
            ):
                self.seen.append((event["type"].removeprefix("sd35tuner.train."), event["data"]))

    def since(self, mark: int, kind: str) -> list[dict]:
        return [data for name, data in self.seen[mark:] if name == kind]

    def wait_for(self, mark: int, kind: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while not self.since(mark, kind):
            assert time.monotonic() < deadline, f"no {kind} event"
            time.sleep(0.05)
        return self.since(mark, kind)[0]


@pytest.fixture(scope="module")
def events(comfy):
    watcher = Events(comfy)
    yield watcher
    watcher.ws.close()


def _pixels(comfy, image: dict) -> np.ndarray:
    return np.asarray(Image.open(Path(comfy.base_dir) / image["type"] / image["subfolder"] / image["filename"]))


def _loras(comfy) -> set[str]:
    return {p.name for p in (comfy.base_dir / "models" / "loras").rglob("*") if p.is_file()}


def _prompt(base: dict, name: str, **train) -> dict:
    prompt = copy.deepcopy(base)
    prompt["8"]["inputs"].update({"lora_name": name, **train})
    return prompt


def test_without_a_settings_node_the_trainer_uses_the_defaults_that_node_shows(comfy, base_prompt):
    info = comfy.object_info()
    seed = info["SD35TunerTrainLora"]["input"]["required"]["seed"]
    assert seed[1]["control_after_generate"] is False  # re-running trains the same run, not a new one
    shown = {name: spec[1]["default"] for name, spec in info["SD35TunerTrainSettings"]["input"]["required"].items()}
    assert shown["gradient_checkpointing"] is True and shown["max_grad_norm"] == 0.1 and shown["base_dtype"] == "auto"
    name = f"defaults_{uuid.uuid4().hex[:6]}"
    prompt = _prompt(base_prompt, name, steps=1)
    del prompt["8"]["inputs"]["settings"], prompt["7"]
    comfy.run(prompt, timeout=600)
    with safe_open(str(comfy.base_dir / "models" / "loras" / f"{name}.safetensors"), "pt") as f:
        used = json.loads(f.metadata()["sd35_tuner.config"])
    assert {**shown, "base_dtype": "fp32"} == {k: used[k] for k in shown}  # auto is fp32 on this CPU


def test_training_node_writes_a_versioned_lora_and_returns_its_outputs(comfy, base_prompt, events):
    name = f"node_{uuid.uuid4().hex[:6]}"
    loras = comfy.base_dir / "models" / "loras"
    (loras / f"{name}.safetensors").write_bytes(b"an older LoRA with the same name")
    validation = {"validation_prompts": "a tabby cat\n\n  a red car ", "validation_every": 2, "clip": ["4", 0]}
    prompt = _prompt(
        base_prompt, name, vae=["3", 0], model=["6", 0], class_cache=["5", 0], memory_preset="auto", **validation
    )
    prompt["9"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt["10"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a tabby cat", "clip": ["4", 0]}}
    prompt["11"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": ["8", 1],
            "seed": 0,
            "steps": 2,
            "cfg": 3.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": ["10", 0],
            "negative": ["10", 0],
            "latent_image": ["9", 0],
            "denoise": 1.0,
        },
    }
    prompt["12"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": f"latents/{name}"}}
    mark = len(events.seen)
    entry = comfy.run(prompt, timeout=600)

    panel = entry["outputs"]["8"]
    grids = events.since(mark, "validation")  # every grid reaches the node as it is made, labelled
    assert [g["step"] for g in grids] == [2, 4] and all(g["prompts"] == ["a tabby cat", "a red car"] for g in grids)
    assert grids[0]["rows"] == ["CFG w=4", "APG w=4 eta=0 r=15 (scaled) beta=-0.5"]
    assert np.array_equal(_pixels(comfy, grids[-1]["image"]), _pixels(comfy, panel["images"][0]))  # = the output
    validating = events.since(mark, "validating")
    assert {v["step"] for v in validating} == {2, 4} and validating[-1]["done"] == validating[-1]["of"] == 2 * 2
    assert panel["lora_name"] == [f"{name}_2.safetensors"]
    assert len(panel["losses"]) == 4 and all(isinstance(v, float) for v in panel["losses"])
    assert panel["images"], "the node shows the validation grid"
    assert panel["memory"][0] == "memory_preset auto: no GPU (cpu), the settings are used as set"
    assert panel["memory"][1].startswith("memory: needs ~")  # the pre-flight's verdict, shown in the node
    assert (loras / f"{name}.safetensors").read_bytes() == b"an older LoRA with the same name"
    with safe_open(str(loras / f"{name}_2.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert meta["sd35_tuner.steps"] == "4" and meta["sd35_tuner.base_model"] == paths.SD3_CHECKPOINT
    assert json.loads(meta["sd35_tuner.config"])["rank"] == 4
    assert json.loads(meta["sd35_tuner.config"])["prior_loss_weight"] == 1.0
    run_dir = comfy.base_dir / "output" / "sd35_tuner_runs" / name
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    assert len(list((run_dir / "validation").glob("*_cfg_*.png"))) == 2 * 2  # 2 validations x 2 prompts
    assert len(list((run_dir / "validation").glob("*_apg_*.png"))) == 2 * 2
    assert comfy.output_files(entry, "12", "latents")[0].is_file()  # the returned MODEL samples


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"base_model": "flux_like.safetensors"}, "Flux"),
        ({"batch_size": 64}, "one step needs batch_size x grad_accum = 64"),
        # fp16 base weights overflow within a few steps at this rate (fp32 ones saturate without NaN)
        ({"learning_rate": 1.0, "steps": 20, "preset": "all_linear"}, "try a lower learning rate or max_grad_norm"),
    ],
)
def test_bad_runs_fail_with_a_clear_message_and_write_no_lora(comfy, base_prompt, events, change, message):
    import torch
    from safetensors.torch import save_file

    flux = comfy.base_dir / "models" / "checkpoints" / "flux_like.safetensors"
    if not flux.exists():
        save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(flux))
    before = _loras(comfy)
    prompt = _prompt(base_prompt, f"bad_{uuid.uuid4().hex[:6]}", **change)
    prompt["7"]["inputs"].update(max_grad_norm=0.0, base_dtype="fp16")
    mark = len(events.seen)
    entry = comfy.wait(comfy.queue(prompt), timeout=600)
    error = execution_error(entry)
    assert error is not None and message in error["exception_message"], error
    assert _loras(comfy) == before
    (stopped,) = events.since(mark, "stopped")  # the node says it failed, why, and what a resume would use
    assert stopped["reason"] == "failed" and message in stopped["message"]
    saved = stopped["checkpoint"]  # checkpoint_every=2: a run that failed after step 2 has one to resume from
    assert f"output/{saved}" in stopped["message"] if saved else "No checkpoint was written" in stopped["message"]


def test_cancel_keeps_a_checkpoint_and_resume_finishes_the_run(comfy, base_prompt, events):
    name = f"cancel_{uuid.uuid4().hex[:6]}"
    run_dir = comfy.base_dir / "output" / "sd35_tuner_runs" / name
    before = _loras(comfy)
    prompt = _prompt(base_prompt, name, steps=100_000)
    prompt["7"]["inputs"].update(checkpoint_every=1, keep_checkpoints=2)
    mark = len(events.seen)
    prompt_id = comfy.queue(prompt)
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoint-*")):  # training has started and finished a step
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    comfy.interrupt()
    entry = comfy.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    assert _loras(comfy) == before  # nothing half-written in models/loras
    kept = sorted(run_dir.glob("checkpoint-*"))
    stopped_at = int(kept[-1].name.split("-")[1])
    assert 1 <= len(kept) <= 2 and stopped_at >= 1
    (stopped,) = events.since(mark, "stopped")  # the node says where the checkpoint is and how to resume
    assert stopped["reason"] == "cancelled" and stopped["checkpoint"] == f"sd35_tuner_runs/{name}/{kept[-1].name}"
    assert f"output/sd35_tuner_runs/{name}/{kept[-1].name}" in stopped["message"]
    assert f"tick 'resume' with lora_name '{name}'" in stopped["message"]

    resumed = _prompt(base_prompt, name, steps=stopped_at + 2)
    resumed["7"]["inputs"].update(checkpoint_every=1, keep_checkpoints=2)
    resumed["8"]["inputs"]["resume"] = True
    panel = comfy.run(resumed, timeout=600)["outputs"]["8"]
    assert len(panel["losses"]) == stopped_at + 2  # the losses before the cancel came back from the checkpoint
    assert panel["lora_name"] == [f"{name}.safetensors"]


def test_cancel_is_noticed_between_validation_samples(comfy, base_prompt, events):
    name = f"cancel_validation_{uuid.uuid4().hex[:6]}"
    validation = {"validation_prompts": "a tabby cat", "validation_steps": 200, "clip": ["4", 0], "vae": ["3", 0]}
    prompt = _prompt(base_prompt, name, steps=100_000, validation_every=1, **validation)
    mark = len(events.seen)
    prompt_id = comfy.queue(prompt)
    while not [v for v in events.since(mark, "validating") if v["done"] >= 1]:  # sampling has started
        events.wait_for(mark, "validating")
        time.sleep(0.05)
    comfy.interrupt()
    entry = comfy.wait(prompt_id, timeout=300)
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    (stopped,) = events.since(mark, "stopped")
    assert stopped["reason"] == "cancelled" and stopped["step"] == 1
    assert events.since(mark, "validation") == []  # stopped inside the first validation, before its grid


def test_a_fresh_run_says_where_it_moved_the_earlier_runs_checkpoints(comfy, base_prompt):
    name = f"again_{uuid.uuid4().hex[:6]}"
    run_dir = comfy.base_dir / "output" / "sd35_tuner_runs" / name
    (run_dir / "checkpoint-000003").mkdir(parents=True)  # what an earlier run of this name left
    entry = comfy.run(_prompt(base_prompt, name, steps=1), timeout=600)
    (archive,) = run_dir.glob("previous-*")
    assert (archive / "checkpoint-000003").is_dir()
    (note,) = entry["outputs"]["8"]["notes"]  # shown in the node's message box
    assert f"moved to output/sd35_tuner_runs/{name}/{archive.name}/" in note and "tick resume" in note


def test_a_run_folder_in_use_stops_saying_only_that(comfy, base_prompt, events):
    from training.folder_lock import folder_lock

    name = f"busy_{uuid.uuid4().hex[:6]}"
    run_dir = comfy.base_dir / "output" / "sd35_tuner_runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint-000002").mkdir()  # the other run's: not this run's to resume
    mark = len(events.seen)
    with folder_lock(run_dir, "a test's own run"):
        entry = comfy.wait(comfy.queue(_prompt(base_prompt, name)), timeout=600)
    assert "is in use by" in execution_error(entry)["exception_message"]
    (stopped,) = events.since(mark, "stopped")
    assert stopped["message"].startswith("Not started: ") and "a test's own run" in stopped["message"]
    assert "resume" not in stopped["message"] and stopped["checkpoint"] is None


def test_resume_with_nothing_to_resume_points_at_earlier_runs_moved_aside(comfy):
    from tests.integration.test_node_validation import refusal

    name = f"moved_{uuid.uuid4().hex[:6]}"
    (comfy.base_dir / "output" / "sd35_tuner_runs" / name / "previous-20260101T000000Z" / "checkpoint-000004").mkdir(
        parents=True
    )
    errors = refusal(comfy, "SD35TunerTrainLora", {"lora_name": name, "resume": True})
    (error,) = [e for e in errors if e["extra_info"]["input_name"] == "resume"]
    assert "no checkpoint of" in error["details"] and "previous-20260101T000000Z" in error["details"], error
