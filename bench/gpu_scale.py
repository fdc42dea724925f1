"""GPU check (run on a CUDA machine as one short job): SD3.5-Large-shaped LoRA training at 1024 px.

Rank 64, batch 1, gradient checkpointing, AdamW; random weights (the shape is what costs memory, not
the values), built block by block on the GPU by the trainer's own ``prepare_model`` (the same loader,
quantisation and block offload code; no 16 GB file to write). Each mode runs in its own process so
its peak is its own:

    python -m bench.gpu_scale [--modes bf16,int8,int4,int8_offload] [--steps 4]
    python -m bench.gpu_scale --device cpu --size medium --resolution 256 --steps 2   # a CPU smoke run

Prints per mode peak VRAM (torch.cuda.max_memory_allocated and reserved) and s/step (mean of the steps
after the first), the memory estimator's prediction next to it, and as last line the int8 peak in GB
against its target (<= 14 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGETS_GB = {"bf16": None, "int8": 14.0, "int4": 10.0, "int8_offload": 8.0}


def random_base(size: str, device: str):
    """A random bf16 base of ``size``'s shape, each tensor made on ``device`` only when the loader reads
    it (the loader then quantises it there, block by block, as it does a file's)."""
    from bench.bench_scale import mmdit_shapes
    from training.loading import InMemoryBase

    shapes = mmdit_shapes(size)

    class Lazy(dict):
        def __getitem__(self, key):
            if key.endswith(("ln_q.weight", "ln_k.weight")):
                return torch.ones(shapes[key], device=device, dtype=torch.bfloat16)
            return torch.randn(shapes[key], device=device, dtype=torch.bfloat16) * 0.02

    return InMemoryBase(Lazy.fromkeys(shapes), f"random {size}")


def peak_gb(device: str) -> tuple[float, float]:
    """(peak allocated, peak reserved) GB on a GPU; on a CPU the process's peak RSS twice."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    from bench.bench_scale import peak_rss

    return (peak_rss() / 2**30,) * 2


def child(mode: str, steps: int, size: str, device: str, res: int) -> dict:
    """One mode in this process: the trainer's own ``prepare_model`` (quantisation, LoRA, block offload)."""
    from bench.bench_scale import config
    from training.config import TrainConfig
    from training.memory import estimate
    from training.model import lora_parameters
    from training.run import prepare_model

    quant = {"bf16": "none", "int8_offload": "int8"}.get(mode, mode)
    offload = mode.endswith("_offload")
    cfg = TrainConfig(
        rank=64, alpha=64, base_dtype="bf16", quantization=quant, gradient_checkpointing=True, block_offload=offload
    )
    model, _ = prepare_model(random_base(size, device), cfg, device)
    model.enable_gradient_checkpointing()
    model.train()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the training peak (the block-by-block load peaks lower)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(steps):
        x = torch.randn(1, 16, res // 8, res // 8, device=device, dtype=torch.bfloat16, generator=g)
        ctx = torch.randn(1, 333, 4096, device=device, dtype=torch.bfloat16, generator=g)
        pooled = torch.randn(1, 2048, device=device, dtype=torch.bfloat16, generator=g)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        pred = model(
            hidden_states=x,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            timestep=torch.tensor([500.0], device=device),
        ).sample
        pred.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    est = estimate(config(size), res, rank=64, quantization=quant, block_offload=offload, device=device)
    peak, reserved = peak_gb(device)
    return {
        "peak_gb": peak,
        "reserved_gb": reserved,
        "s_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "estimate_gb": est.total / 2**30,
    }


def main() -> None:
    from bench.bench_scale import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="bf16,int8,int4,int8_offload")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", choices=sorted(SHAPES), default="large")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.size, args.device, args.resolution)))
        return
    results = {}
    shape = ["--steps", str(args.steps), "--size", args.size, "--device", args.device, "--resolution"]
    for mode in args.modes.split(","):
        out = subprocess.run(
            [sys.executable, "-m", "bench.gpu_scale", "--child", mode, *shape, str(args.resolution)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            print(
                f"{mode:13s} FAILED: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
            )
            continue
        r = results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        target = TARGETS_GB[mode] if (args.size, args.resolution) == ("large", 1024) else None
        print(
            f"{mode:13s} peak {r['peak_gb']:5.1f} GB (reserved {r['reserved_gb']:5.1f}, estimate {r['estimate_gb']:5.1f})"
            f"  {r['s_per_step']:6.2f} s/step" + (f"  target <= {target:.0f} GB" if target else ""),
            flush=True,
        )
    if "int8" in results:
        print(
            f"int8 peak {'VRAM' if args.device == 'cuda' else 'RSS'} = {results['int8']['peak_gb']:.1f} GB (target <= 14)"
        )


if __name__ == "__main__":
    main()
