"""bench_scale's parts that run in a real ComfyUI server (CPU) on a real-size SD3.5-Medium-shaped checkpoint.

- ``core_vs_ours``: one LoRA training step at 256² px, rank 16, all linear layers, bf16 base, gradient
  checkpointing, AdamW, batch 1, by ComfyUI core's TrainLoraNode and by our trainer on the same MODEL
  (CheckpointLoaderSimple) and the same 77-token CLIP-L conditioning; each in its own fresh server so the
  server's peak RSS (VmHWM) is its own. The seconds are those of a 1-step run once the loader's MODEL is
  cached (loading excluded; each trainer's per-run set-up and LoRA saving included: at this size a CPU
  step is minutes, so a second run to difference them out was not affordable). Our latent cache is built
  in a server of its own first (core's node gets empty latents: the values do not change speed or memory).
- ``pipeline``: the bundled pipeline workflow (photos → cache → train → CFG vs APG) pointed at the checkpoint,
  1 training step, its final validation samples in 1 sampler step, and a 1-step 64 px comparison: "before",
  the trainer re-reads the file while the graph holds the checkpoint loader's MODEL (how the workflow was
  before the MODEL input; the comparison samples the loader's MODEL), against "after", the bundled graph
  training on the loader's MODEL. The graph runs in phases (``PHASES``: each prompt the previous one plus
  the next part; ComfyUI reuses what already ran), so each phase's peak RSS is its own.

ComfyUI runs with ``--bf16-unet`` (on a CPU it would otherwise hold the model in fp32, which no GPU user has).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench import bench_train
from bench.bench_train import FOLDER, elapsed, peak_rss_mib, photos
from tests.integration.test_train_node import _node
from tools import paths
from tools.builtin import point_at_builtin_models
from tools.comfy_server import ComfyServer
from tools.workflow_api import set_inputs, ui_to_api, upstream
from tools.workflow_specs import PIPELINE, bundled

FROM_MODEL = "(use the MODEL input)"
CACHE = "sd35_cache/bench_scale"


def server(base: Path, ckpt: Path, dtype: str) -> ComfyServer:
    """A server whose checkpoints/ holds ``ckpt`` (linked, like the built-in models); ComfyUI keeps the
    MODEL in ``dtype`` (its CPU default is fp32)."""
    link = base / "models" / "checkpoints" / ckpt.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(ckpt)
    return ComfyServer(base, extra_args=("--bf16-unet",) if dtype == "bf16" else ())


def conditioning() -> dict:
    return {
        "20": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["20", 0]}},
    }


def cache_graph(info: dict) -> dict:
    return {
        **conditioning(),
        "1": _node(info, "SD35TunerLoadDataset", folder=FOLDER),
        "2": _node(info, "SD35TunerSmartCrop", dataset=["1", 0], resolution=256, buckets="256x256"),
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": paths.SD3_VAE}},
        "5": _node(info, "SD35TunerCacheLatents", dataset=["2", 0], vae=["3", 0], clip=["20", 0], cache_name=CACHE),
    }


def ours(info: dict, ckpt: str, steps: int, seed: int, dtype: str) -> dict:
    return {
        **cache_graph(info),
        "6": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "7": _node(info, "SD35TunerTrainSettings", base_dtype=dtype, save_dtype=dtype, gradient_checkpointing=True),
        "8": _node(
            info,
            "SD35TunerTrainLora",
            cache=["5", 0],
            model=["6", 0],
            base_model=FROM_MODEL,
            lora_name=f"bench_scale_{steps}_{seed}",
            steps=steps,
            batch_size=1,
            rank=16,
            alpha=16.0,
            preset="all_linear",
            quantization="none",
            seed=seed,
            validation_every=0,
            settings=["7", 0],
        ),
    }


def core(info: dict, ckpt: str, steps: int, seed: int, dtype: str) -> dict:
    return bench_train.core(info, steps, ckpt, rank=16, dtype=dtype, seed=seed, latents=2, learning_rate=1e-4)


# The bundled pipeline's parts, in the order it runs them: each phase ends with a node of this type.
PHASES = (
    ("dataset (load, crop, preview)", "SD35TunerPreviewDataset"),
    ("text encoders (CLIP-L) loaded", "CLIPLoader"),
    ("cache (VAE + CLIP encode)", "SD35TunerCacheLatents"),
    ("training + its final samples", "SD35TunerTrainLora"),
    ("CFG vs APG sampling", "SD35TunerCompareCFGAPG"),
)


def reset_peak(s: ComfyServer) -> None:
    """Start the server's peak RSS (VmHWM) afresh from its current RSS (Linux ``clear_refs`` 5)."""
    Path(f"/proc/{s.proc.pid}/clear_refs").write_text("5")


def warm_up(s: ComfyServer, graph: dict) -> float:
    """Run the graph's checkpoint loader alone (ComfyUI caches its MODEL for the next prompts), then start
    the server's peak RSS afresh (Linux ``clear_refs`` 5): ComfyUI's own loading peaks at about twice the
    model while the file is mapped, in every graph alike. Returns the peak until then, in bytes."""
    loader = next(k for k, v in graph.items() if v["class_type"] == "CheckpointLoaderSimple")
    s.run({loader: graph[loader], "98": {"class_type": "PreviewAny", "inputs": {"source": [loader, 0]}}}, 3600)
    peak = peak_rss_mib(s) * 2**20
    reset_peak(s)
    return peak


def step(build, ckpt: Path, dtype: str) -> tuple[float, float, float]:
    """(seconds of a 1-step run once the checkpoint is loaded, the server's peak RSS while loading it and
    while training, in bytes) for one of ``ours`` / ``core``, training in ``dtype``."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        if build is ours:
            with server(Path(tmp), ckpt, dtype) as prep:
                photos(prep)
                prep.run(cache_graph(prep.object_info()), timeout=1800)
        with server(Path(tmp), ckpt, dtype) as s:
            photos(s)
            info = s.object_info()
            graph = build(info, ckpt.name, 1, 1, dtype)
            loading = warm_up(s, graph)
            return elapsed(s.run(graph, timeout=3600)), loading, peak_rss_mib(s) * 2**20


def in_phases(s: ComfyServer, prompt: dict) -> list[tuple[str, float]]:
    """Run ``prompt`` phase by phase (``PHASES``); each phase's peak RSS in bytes. Every phase's prompt
    holds the nodes that ran before it (ComfyUI drops the cached outputs of nodes missing from a prompt),
    each ending node with a preview so that it runs."""
    kinds = {node["class_type"]: node_id for node_id, node in prompt.items()}
    ends = [kinds["CheckpointLoaderSimple"]]
    peaks = []
    for name, kind in PHASES:
        ends.append(kinds[kind])
        part = upstream(prompt, ends)
        for i, end in enumerate(ends):
            part[f"preview{i}"] = {"class_type": "PreviewAny", "inputs": {"source": [end, 0]}}
        reset_peak(s)
        s.run(part, timeout=3600)
        peaks.append((name, peak_rss_mib(s) * 2**20))
    return peaks


def pipeline(ckpt: Path, before: bool, quantization: str) -> tuple[float, list[tuple[str, float]]]:
    """Peak RSS (bytes) of the server running the bundled pipeline workflow on ``ckpt``: while ComfyUI
    loads the checkpoint, and in each phase of the rest of the run (the loaded MODEL included)."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp, server(Path(tmp), ckpt, "bf16") as s:
        photos(s)
        prompt = point_at_builtin_models(ui_to_api(json.loads(bundled(PIPELINE).read_text()), s.object_info()), 64)
        set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=ckpt.name)
        set_inputs(prompt, "SD35TunerLoadDataset", folder=FOLDER)
        set_inputs(prompt, "SD35TunerSmartCrop", resolution=256)
        set_inputs(prompt, "SD35TunerTrainSettings", base_dtype="bf16")
        set_inputs(prompt, "SD35TunerTrainLora", steps=1, validation_every=0, quantization=quantization)
        set_inputs(prompt, "SD35TunerTrainLora", validation_steps=1)  # the final samples: 1 step, not 20
        set_inputs(prompt, "SD35TunerTrainLora", base_model=FROM_MODEL)  # as bundled (the helper sets a file)
        set_inputs(prompt, "SD35TunerCompareCFGAPG", steps=1)
        if before:
            train = next(k for k, v in prompt.items() if v["class_type"] == "SD35TunerTrainLora")
            loader = next(k for k, v in prompt.items() if v["class_type"] == "CheckpointLoaderSimple")
            del prompt[train]["inputs"]["model"]
            prompt[train]["inputs"]["base_model"] = ckpt.name
            set_inputs(prompt, "SD35TunerCompareCFGAPG", model=[loader, 0])
        loading = warm_up(s, prompt)
        return loading, in_phases(s, prompt)
