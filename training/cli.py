"""Command line: train a LoRA outside ComfyUI, on the same code path as the node.

    python -m training train --config run.toml [--set steps=2000 --set rank=32]
    accelerate launch --num_processes 2 -m training train --config run.toml   # data-parallel

The config file (JSON or TOML) names the inputs at the top level and the training settings
(``training.config.TrainConfig`` fields) under ``train``::

    base_model = "/models/checkpoints/sd3.5_large.safetensors"   # file or diffusers folder
    cache = "/data/sd35_cache/my_dataset"      # a cache folder from the cache node, or
    # tensors = "/data/pre_encoded.safetensors"  # latents/cond/pooled in one file
    output = "/models/loras/my_style.safetensors"
    work_dir = "/runs/my_style"               # checkpoints + validation images (default: next to output)
    resume = false                            # true: newest intact checkpoint in work_dir; or a checkpoint path
    prior = { cache = "/data/sd35_cache/class_images" }   # optional DreamBooth class data (prior_loss_weight)

    [train]
    steps = 1000
    rank = 16
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .config import TrainConfig, read_config_file

logger = logging.getLogger("training")

TOP_LEVEL = {"base_model", "cache", "tensors", "prior", "output", "work_dir", "resume", "train"}


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value typed like the TrainConfig field."""
    key, sep, raw = text.partition("=")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    if not sep or key not in types:
        raise SystemExit(f"--set {text!r}: expected key=value with key one of {sorted(types)}")
    kind = types[key]
    if kind == "bool":
        return key, raw.lower() in ("1", "true", "yes", "on")
    if kind in ("int", "float"):
        return key, {"int": int, "float": float}[kind](raw)
    return key, raw


def load_source(spec: dict[str, Any], where: str):
    if ("cache" in spec) == ("tensors" in spec):
        raise SystemExit(f"{where}: give exactly one of 'cache' (a cache folder) or 'tensors' (a safetensors file)")
    if "cache" in spec:
        from .cache import CacheReader

        return CacheReader(spec["cache"])
    from .data import load_tensor_source

    return load_tensor_source(spec["tensors"])


def cmd_train(args: argparse.Namespace) -> int:
    spec = read_config_file(args.config)
    unknown = sorted(set(spec) - TOP_LEVEL)
    if unknown:
        raise SystemExit(f"{args.config}: unknown key(s) {unknown}; top-level keys are {sorted(TOP_LEVEL)}")
    for key in ("base_model", "output"):
        if key not in spec:
            raise SystemExit(f"{args.config}: '{key}' is required")
    cfg = TrainConfig.from_dict({**spec.get("train", {}), **dict(map(parse_override, args.set))}, str(args.config))
    output = Path(spec["output"])
    work_dir = Path(spec.get("work_dir") or output.with_name(output.stem + "_run"))

    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not _cuda())  # CPU processes talk over gloo
        if accelerator.is_main_process:
            logger.info(
                "data-parallel: %d processes (%s), %d samples each per batch",
                accelerator.num_processes,
                accelerator.distributed_type,
                cfg.batch_size // accelerator.num_processes,
            )
    main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else ("cuda" if _cuda() else "cpu")

    def on_step(info) -> None:
        if main and (info.step % args.log_every == 0 or info.step == info.total_steps):
            logger.info(
                "step %d/%d loss %.5f lr %.3g grad %.3g", info.step, cfg.steps, info.loss, info.lr, info.grad_norm
            )

    from .run import run_training

    out = run_training(
        spec["base_model"],
        load_source(spec, str(args.config)),
        cfg,
        output,
        work_dir,
        on_step=on_step,
        resume=spec.get("resume") or None,
        info={"trained_with": "python -m training"},
        device=device,
        accelerator=accelerator,
        prior=load_source(spec["prior"], f"{args.config}: prior") if "prior" in spec else None,
    )
    if main:
        logger.info(
            "wrote %s (%d trainable parameters, final loss %.5f)", out.lora_path, out.trainable, out.losses[-1]
        )
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description="SD3/SD3.5 LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a LoRA from a config file")
    train.add_argument("--config", required=True, type=Path, help="JSON or TOML run description")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a [train] setting")
    train.add_argument("--log-every", type=int, default=10, help="log every N steps (default 10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cmd_train(args)
