"""GPU check (run on a CUDA machine as one short job): SD3.5-Large-shaped LoRA training at 1024 px.

Rank 64, batch 1, gradient checkpointing, AdamW; random weights (the shape is what costs memory, not
the values), built block by block on the GPU by the same loader path the trainer uses (no 16 GB file
to write). Each mode runs in its own process so its peak is its own:

    python -m bench.gpu_scale [--modes bf16,int8,int4,int8_offload] [--steps 4]

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


def random_base(mode: str):
    """The Large-shaped transformer with random bf16 weights, quantised block by block on the GPU."""
    from bench.bench_scale import config, mmdit_shapes
    from training.loading import InMemoryBase, load_base

    shapes = mmdit_shapes("large")

    class Lazy(dict):  # each tensor made on the GPU only when the loader reads it, freed once converted
        def __getitem__(self, key):
            if key.endswith(("ln_q.weight", "ln_k.weight")):
                return torch.ones(shapes[key], device="cuda", dtype=torch.bfloat16)
            return torch.randn(shapes[key], device="cuda", dtype=torch.bfloat16) * 0.02

    state = Lazy.fromkeys(shapes)
    quant = {"bf16": "none", "int8_offload": "int8"}.get(mode, mode)
    return load_base(InMemoryBase(state, "random Large"), "bf16", quant, device="cuda"), config("large"), quant


def child(mode: str, steps: int) -> dict:
    from training.memory import estimate
    from training.model import add_lora, lora_parameters, lora_target_modules

    model, cfg, quant = random_base(mode)
    add_lora(model, 64, 64.0, lora_target_modules(model, "attention"))
    model.enable_gradient_checkpointing()
    if mode.endswith("_offload"):
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(
            model, onload_device=torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1
        )
    model.train()
    torch.cuda.reset_peak_memory_stats()  # the training peak (the block-by-block load peaks lower)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    g = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for _ in range(steps):
        x = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        ctx = torch.randn(1, 333, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        pooled = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
        torch.cuda.synchronize()
        start = time.perf_counter()
        pred = model(
            hidden_states=x,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            timestep=torch.tensor([500.0], device="cuda"),
        ).sample
        pred.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    est = estimate(cfg, 1024, rank=64, quantization=quant, block_offload=mode.endswith("_offload"))
    return {
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
        "s_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "estimate_gb": est.total / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="bf16,int8,int4,int8_offload")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    results = {}
    for mode in args.modes.split(","):
        out = subprocess.run(
            [sys.executable, "-m", "bench.gpu_scale", "--child", mode, "--steps", str(args.steps)],
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
        target = TARGETS_GB[mode]
        print(
            f"{mode:13s} peak {r['peak_gb']:5.1f} GB (reserved {r['reserved_gb']:5.1f}, estimate {r['estimate_gb']:5.1f})"
            f"  {r['s_per_step']:6.2f} s/step" + (f"  target <= {target:.0f} GB" if target else ""),
            flush=True,
        )
    if "int8" in results:
        print(f"int8 peak VRAM = {results['int8']['peak_gb']:.1f} GB (target <= 14)")


if __name__ == "__main__":
    main()
