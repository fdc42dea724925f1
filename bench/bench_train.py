"""Trainer node vs ComfyUI core's TrainLoraNode: seconds per step and peak RSS, side by side in one run.

Both run in a real ComfyUI (CPU), each in its own fresh server so peak RSS (the server process's
VmHWM) is its own (our latent cache is built beforehand in a third server, so our peak is training,
not VAE encoding; core's graph encodes nothing either), on the same tiny SD3 checkpoint, the same 4 photos at 256x256 px (VAE-encoded
latents), the same text encoder, rank 8, batch 1, AdamW, fp32, gradient checkpointing on, all linear
layers. Seconds per step are the difference of a long and a short run divided by the extra steps,
from /history's execution timestamps, so model loading and caching cancel out. Core's node is fed
a list of latents (RebatchLatents to 1), its working input form in 0.3.75 (a batched LATENT fails
with ``UnboundLocalError: multi_res``).

    ~/.cache/sd35-tuner/venv/bin/python -m bench.bench_train [--short 5] [--long 45]

Last line: our s/step / core's s/step (target <= 0.8) and our peak RSS / core's (target <= 1.0).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.integration.test_train_node import _node
from tools import paths
from tools.comfy_server import ComfyServer
from tools.sample_data import write_sample_folder

FOLDER = "bench_train_photos"


def photos(server: ComfyServer) -> None:
    if (server.base_dir / "input" / FOLDER).exists():
        return
    folder = write_sample_folder(server.base_dir / "input" / FOLDER)
    for path in sorted(folder.rglob("*")):  # 4 photos, no repeats folder
        if path.is_file() and "cats" in str(path.relative_to(folder)):
            path.unlink()


def elapsed(entry: dict) -> float:
    stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def peak_rss_mib(server: ComfyServer) -> float:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def ours(info: dict, steps: int) -> dict:
    return {
        "1": _node(info, "SD35TunerLoadDataset", folder=FOLDER),
        "2": _node(info, "SD35TunerSmartCrop", dataset=["1", 0], resolution=256, buckets="256x256"),
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": paths.SD3_CHECKPOINT}},
        "4": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
        "5": _node(
            info, "SD35TunerCacheLatents", dataset=["2", 0], vae=["3", 2], clip=["4", 0], cache_name="sd35_cache/bench"
        ),
        "6": _node(info, "SD35TunerTrainSettings", base_dtype="fp32", save_dtype="fp32", gradient_checkpointing=True),
        "7": _node(
            info,
            "SD35TunerTrainLora",
            cache=["5", 0],
            base_model=paths.SD3_CHECKPOINT,
            lora_name=f"bench_{steps}",
            steps=steps,
            batch_size=1,
            learning_rate=5e-4,
            rank=8,
            alpha=8.0,
            preset="all_linear",
            quantization="none",
            settings=["6", 0],
        ),
    }


def core(
    info: dict,
    steps: int,
    ckpt: str = paths.SD3_CHECKPOINT,
    rank: int = 8,
    dtype: str = "fp32",
    seed: int = 0,
    latents: int = 4,
    learning_rate: float = 5e-4,
) -> dict:
    """The baseline setup TESTING.md measured: 4 latents of 256x256 px (their values do not change the speed)."""
    lora_out = info["TrainLoraNode"]["output"].index("LORA_MODEL")  # its place differs between versions
    return {
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "4": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["4", 0]}},
        "9": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": latents}},
        # a list of latents: core's node in 0.3.75 fails on a single tensor (UnboundLocalError: multi_res)
        "10": {"class_type": "RebatchLatents", "inputs": {"latents": ["9", 0], "batch_size": 1}},
        "11": _node(
            info,
            "TrainLoraNode",
            model=["3", 0],
            latents=["10", 0],
            positive=["8", 0],
            batch_size=1,
            grad_accumulation_steps=1,
            steps=steps,
            learning_rate=learning_rate,
            rank=rank,
            optimizer="AdamW",
            loss_function="MSE",
            seed=seed,
            training_dtype=dtype,
            lora_dtype="fp32",
            gradient_checkpointing=True,
        ),
        "12": {"class_type": "SaveLoRA", "inputs": {"lora": ["11", lora_out], "prefix": f"loras/core_{steps}_{seed}"}},
    }


def measure(build, short: int, long: int, prepare: bool) -> tuple[float, float]:
    """ms/step and the training server's peak RSS. ``prepare``: build the on-disk cache in a server of
    its own first, so the measured server's peak is training (reading the cache), not VAE encoding."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if prepare:
            with ComfyServer(Path(tmp)) as server:
                photos(server)
                server.run(build(server.object_info(), 1), timeout=1800)
        with ComfyServer(Path(tmp)) as server:
            photos(server)
            info = server.object_info()
            server.run(build(info, 1), timeout=1800)  # warm-up: loads and caches
            times = {n: elapsed(server.run(build(info, n), timeout=1800)) for n in (short, long)}
            return (times[long] - times[short]) / (long - short), peak_rss_mib(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=45)
    args = parser.parse_args()
    core_step, core_rss = measure(core, args.short, args.long, prepare=False)
    print(f"core TrainLoraNode: {core_step * 1000:.1f} ms/step, peak RSS {core_rss:.0f} MiB")
    our_step, our_rss = measure(ours, args.short, args.long, prepare=True)
    print(f"SD35TunerTrainLora: {our_step * 1000:.1f} ms/step, peak RSS {our_rss:.0f} MiB")
    print(
        f"s/step ours/core = {our_step / core_step:.2f} (target <= 0.8); peak RSS ours/core = {our_rss / core_rss:.2f}"
    )


if __name__ == "__main__":
    main()
