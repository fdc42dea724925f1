"""APG nodes through a real ComfyUI server with the built-in tiny SD3 model (CPU, 64 px, few steps)."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest
from PIL import Image

from tools import paths
from tools.comfy_server import ComfyError

W = 6.0
IDENTITY = {"eta": 1.0, "norm_threshold": 0.0, "threshold_mode": "absolute", "momentum": 0.0}
PAPER = {"eta": 0.0, "norm_threshold": 15.0, "threshold_mode": "scaled", "momentum": -0.5}
WINDOW = {"window_start": 0.0, "window_end": 1.0, "window_unit": "steps"}
SAMPLING = {"sampler_name": "euler", "scheduler": "sgm_uniform"}


def base_graph(width: int = 64, height: int = 64) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": paths.SD3_CHECKPOINT}},
        # CLIP-L alone is SD3 CLIP; three files would build a 10 GB random CLIP-G + T5 (see tools/builtin.py)
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["clip", 0]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, grey", "clip": ["clip", 0]}},
        "latent": {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": width, "height": height, "batch_size": 1},
        },
        "msd3": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["ckpt", 0], "shift": 3.0}},
    }


def apg_node(settings: dict, window: dict = WINDOW, model: str = "msd3") -> dict:
    return {"class_type": "SD35TunerAPG", "inputs": {"model": [model, 0], **settings, **window}}


def ksampler(model: str, cfg: float = W, steps: int = 6, seed: int = 7) -> dict:
    return {
        "class_type": "KSampler",
        "inputs": {
            "model": [model, 0],
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            **SAMPLING,
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "latent_image": ["latent", 0],
            "denoise": 1.0,
        },
    }


def ksampler_advanced(model: str, cfg: float = W) -> dict:
    return {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "model": [model, 0],
            "add_noise": "enable",
            "noise_seed": 7,
            "steps": 6,
            "cfg": cfg,
            **SAMPLING,
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "latent_image": ["latent", 0],
            "start_at_step": 0,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
        },
    }


def sampler_custom(graph: dict, model: str, cfg: float = W) -> dict:
    graph["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    graph["sigmas"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": [model, 0], "scheduler": "sgm_uniform", "steps": 6, "denoise": 1.0},
    }
    return {
        "class_type": "SamplerCustom",
        "inputs": {
            "model": [model, 0],
            "add_noise": True,
            "noise_seed": 7,
            "cfg": cfg,
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0],
        },
    }


def finish(graph: dict, samples: str, prefix: str, slot: int = 0) -> dict:
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [samples, slot], "vae": ["ckpt", 2]}}
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    return graph


def pixels(comfy, entry: dict, node: str = "save") -> np.ndarray:
    files = comfy.output_files(entry, node)
    assert len(files) == 1, entry["outputs"]
    return np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.int16)


def run_image(comfy, graph: dict, node: str = "save") -> np.ndarray:
    return pixels(comfy, comfy.run(graph), node)


def unique(name: str) -> str:
    return f"apg_{name}_{uuid.uuid4().hex[:8]}"


def plain_ksampler_image(comfy, cfg: float = W, width: int = 64, height: int = 64) -> np.ndarray:
    graph = base_graph(width, height)
    graph["ks"] = ksampler("msd3", cfg)
    return run_image(comfy, finish(graph, "ks", unique("cfg")))


def apg_ksampler_image(comfy, settings: dict, cfg: float = W, window: dict = WINDOW, **size) -> np.ndarray:
    graph = base_graph(**size)
    graph["apg"] = apg_node(settings, window)
    graph["ks"] = ksampler("apg", cfg)
    return run_image(comfy, finish(graph, "ks", unique("apg")))


def node_errors(comfy, graph: dict) -> str:
    with pytest.raises(ComfyError) as info:
        comfy.queue(graph)
    return str(info.value)


def test_nodes_are_registered_with_tooltips(comfy):
    info = comfy.object_info()
    for node_id in ("SD35TunerAPG", "SD35TunerAPGGuider", "SD35TunerCompareCFGAPG"):
        node = info[node_id]
        assert node["category"].startswith("SD3.5 Tuner/")
        for name in ("eta", "norm_threshold", "threshold_mode", "momentum", "window_start", "window_end"):
            spec = node["input"]["required"][name]
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert "Default" in node["input"]["required"]["eta"][1]["tooltip"]
    assert info["SD35TunerAPGGuider"]["output"] == ["GUIDER"]
    assert info["SD35TunerCompareCFGAPG"]["output"] == ["IMAGE", "STRING", "IMAGE", "IMAGE"]


@pytest.mark.parametrize("sampler", ["KSampler", "KSamplerAdvanced", "SamplerCustom"])
def test_identity_settings_equal_plain_cfg_and_paper_settings_differ(comfy, sampler):
    def image(model_settings: dict | None) -> np.ndarray:
        graph = base_graph()
        model = "msd3"
        if model_settings is not None:
            graph["apg"] = apg_node(model_settings)
            model = "apg"
        if sampler == "KSampler":
            graph["ks"] = ksampler(model)
        elif sampler == "KSamplerAdvanced":
            graph["ks"] = ksampler_advanced(model)
        else:
            graph["ks"] = sampler_custom(graph, model)
        return run_image(comfy, finish(graph, "ks", unique(sampler)))

    cfg_img = image(None)
    identity = image(IDENTITY)
    paper = image(PAPER)
    assert np.abs(identity - cfg_img).max() <= 1  # <= 1/255
    assert np.abs(paper - cfg_img).max() > 8 and np.abs(paper - cfg_img).mean() > 1.0  # a different picture


def add_custom_advanced(graph: dict, steps: int) -> None:
    """SamplerCustomAdvanced ("sca") driven by the graph's "guider" node: euler, sgm_uniform, noise seed 7."""
    graph["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    graph["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    graph["sigmas"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": ["msd3", 0], "scheduler": "sgm_uniform", "steps": steps, "denoise": 1.0},
    }
    graph["sca"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {
            "noise": ["noise", 0],
            "guider": ["guider", 0],
            "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0],
        },
    }


def test_guider_identity_equals_cfg_guider_and_paper_differs(comfy):
    def image(guider: dict) -> np.ndarray:
        graph = base_graph()
        graph["guider"] = guider
        add_custom_advanced(graph, steps=6)
        return run_image(comfy, finish(graph, "sca", unique("guider")))

    conds = {"model": ["msd3", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": W}
    cfg_img = image({"class_type": "CFGGuider", "inputs": conds})
    identity = image({"class_type": "SD35TunerAPGGuider", "inputs": {**conds, **IDENTITY, **WINDOW}})
    paper = image({"class_type": "SD35TunerAPGGuider", "inputs": {**conds, **PAPER, **WINDOW}})
    assert np.abs(identity - cfg_img).max() <= 1
    assert np.abs(paper - cfg_img).max() > 8 and np.abs(paper - cfg_img).mean() > 1.0
    # the guider and the model patch are the same APG
    assert np.abs(paper - apg_ksampler_image(comfy, PAPER)).max() <= 1


def test_window_outside_the_run_is_plain_cfg_and_partial_window_is_between(comfy):
    cfg_img = plain_ksampler_image(comfy)
    full = apg_ksampler_image(comfy, PAPER)
    for unit in ("steps", "sigma"):
        empty = apg_ksampler_image(comfy, PAPER, window={"window_start": 1.0, "window_end": 1.0, "window_unit": unit})
        assert np.abs(empty - cfg_img).max() <= 1
        late = apg_ksampler_image(comfy, PAPER, window={"window_start": 0.5, "window_end": 1.0, "window_unit": unit})
        assert np.abs(late - cfg_img).max() > 2  # APG acted in the second half...
        assert np.abs(late - full).max() > 2  # ...and only there


def test_two_consecutive_prompts_of_different_sizes_both_succeed(comfy):
    # the same APG node (cached between prompts, so the same momentum state) at two latent sizes
    first = apg_ksampler_image(comfy, PAPER, width=64, height=64)
    second = apg_ksampler_image(comfy, PAPER, width=96, height=64)
    assert first.shape == (64, 64, 3) and second.shape == (64, 96, 3)
    # and the second equals a fresh run at that size: nothing leaked from the first
    again = apg_ksampler_image(comfy, PAPER, width=64, height=64)
    assert np.array_equal(first, again)


def watch_progress(comfy, node: str, min_value: int, ready: threading.Event, hit: threading.Event) -> None:
    import websocket

    ws = websocket.create_connection(f"ws://127.0.0.1:{comfy.port}/ws?clientId={comfy.client_id}", timeout=120)
    ready.set()
    try:
        while not hit.is_set():
            message = ws.recv()
            if not isinstance(message, str):
                continue
            event = json.loads(message)
            data = event.get("data", {})
            if event.get("type") == "progress" and data.get("node") == node and data.get("value", 0) >= min_value:
                hit.set()
    finally:
        ws.close()


def cloned_after_apg(graph: dict) -> str:
    """APG on the raw model, then ModelSamplingSD3: a node that clones the patched model (as LoRA loaders do)."""
    graph["apg"] = apg_node(PAPER, model="ckpt")
    graph["msd3_after"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["apg", 0], "shift": 3.0}}
    return "msd3_after"


def test_cancelled_run_then_new_run_equals_fresh_run(comfy):
    fresh_graph = base_graph()
    fresh_graph["ks"] = ksampler(cloned_after_apg(fresh_graph))
    fresh = run_image(comfy, finish(fresh_graph, "ks", unique("fresh")))

    # the same (cached) patched model and size, a long run: cancel it a few steps in, momentum mid-flight
    long_graph = base_graph()
    long_graph["long"] = ksampler(cloned_after_apg(long_graph), steps=2000)
    finish(long_graph, "long", unique("cancelled"))
    ready, hit = threading.Event(), threading.Event()
    watcher = threading.Thread(target=watch_progress, args=(comfy, "long", 3, ready, hit), daemon=True)
    watcher.start()
    assert ready.wait(30)
    prompt_id = comfy.queue(long_graph)
    assert hit.wait(300), "the long run never reported progress"
    comfy.interrupt()
    entry = comfy.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])

    again = run_image(comfy, finish(fresh_graph, "ks", unique("after")))
    assert np.array_equal(again, fresh)


def test_negative_threshold_and_reversed_window_are_refused_before_running(comfy):
    graph = base_graph()
    graph["apg"] = apg_node({**PAPER, "norm_threshold": -1.0})
    graph["ks"] = ksampler("apg")
    errors = node_errors(comfy, finish(graph, "ks", unique("bad")))
    assert "norm_threshold must be between 0 and 1000" in errors

    graph["apg"] = apg_node(PAPER, window={"window_start": 0.8, "window_end": 0.2, "window_unit": "steps"})
    errors = node_errors(comfy, graph)
    assert "window_start (0.8) is after window_end (0.2)" in errors

    guider = {
        "class_type": "SD35TunerAPGGuider",
        "inputs": {
            "model": ["msd3", 0],
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "cfg": 0.5,
            **PAPER,
            **WINDOW,
        },
    }
    graph = base_graph()
    graph["guider"] = guider
    add_custom_advanced(graph, steps=2)
    errors = node_errors(comfy, finish(graph, "sca", unique("bad")))
    assert "cfg must be between 1 and 100" in errors


@pytest.mark.parametrize("cfg", [1.0, 0.5], ids=["cfg1-unguided", "cfg-below-1"])
def test_sampler_cfg_at_or_below_one_is_a_documented_no_op(comfy, cfg):
    # cfg = 1: ComfyUI skips the negative pass, APG returns the conditional prediction;
    # cfg < 1: APG falls back to plain CFG. Either way: the image plain sampling gives, no crash.
    assert np.abs(apg_ksampler_image(comfy, PAPER, cfg=cfg) - plain_ksampler_image(comfy, cfg=cfg)).max() <= 1


def test_compare_node_returns_labelled_grid_figures_and_both_halves(comfy):
    graph = base_graph()
    graph["cmp"] = {
        "class_type": "SD35TunerCompareCFGAPG",
        "inputs": {
            "model": ["msd3", 0],
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "latent_image": ["latent", 0],
            "vae": ["ckpt", 2],
            "seed": 7,
            "steps": 6,
            "cfg": W,
            **SAMPLING,
            "denoise": 1.0,
            **PAPER,
            **WINDOW,
        },
    }
    prefix = unique("cmp")
    for slot, name in ((0, "grid"), (2, "cfg"), (3, "apg")):
        graph[name] = {"class_type": "SaveImage", "inputs": {"images": ["cmp", slot], "filename_prefix": prefix}}
    entry = comfy.run(graph)
    grid, cfg_half, apg_half = (pixels(comfy, entry, n) for n in ("grid", "cfg", "apg"))
    # the halves are exactly what the stock KSampler gives, with and without the APG node
    assert np.abs(cfg_half - plain_ksampler_image(comfy)).max() <= 1
    assert np.abs(apg_half - apg_ksampler_image(comfy, PAPER)).max() <= 1
    band = grid.shape[0] - 64
    assert band > 0 and grid.shape[1] == 2 * 64 + 4
    assert np.abs(grid[band:, :64] - cfg_half).max() <= 1
    assert np.abs(grid[band:, 68:] - apg_half).max() <= 1

    shown = entry["outputs"]["cmp"]
    text = shown["text"][0]
    assert "left: CFG w=6" in text and "right: APG w=6 eta=0 r=15 (scaled) beta=-0.5" in text
    assert "saturation CFG" in text and "APG/CFG" in text
    halves = shown["sd35_apg_compare"][0]
    for key in ("cfg", "apg"):
        item = halves[key][0]
        assert item["type"] == "temp"
        path = comfy.base_dir / "temp" / item["subfolder"] / item["filename"]
        assert np.array_equal(
            np.asarray(Image.open(path).convert("RGB"), dtype=np.int16), {"cfg": cfg_half, "apg": apg_half}[key]
        )
