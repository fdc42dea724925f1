"""The memory pre-flight estimate against a measured CPU training step, on SD3.5-Large-shaped blocks at 1024².

A whole SD3.5 Large (38 blocks, 16 GB in bf16) stepping at 1024² on a CPU does not fit a small machine, so
this measures Large's block shape (width 2432, 38 heads, qk RMS-norm, 1024² = 4096 image + 333 context
tokens) with fewer blocks, and asks the estimator about the same config (it counts the blocks from the
config, like the trainer's pre-flight does). Each step runs in a fresh process (``bench_scale --child
step``): load + quantise as the trainer does, rank 16 attention LoRA, gradient checkpointing, AdamW, one
step; its peak RSS (VmHWM) is what the estimator predicts with ``device="cpu"``.

    ~/.cache/sd35-tuner/venv/bin/python -m bench.bench_estimate [--blocks 2] [--resolution 1024] [--modes none,int8]

Last line: the worst measured / estimated ratio (target: within 0.8 .. 1.2).
"""

from __future__ import annotations

import argparse

from bench.bench_scale import SHAPES, checkpoint, run_child

GiB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="joint blocks of the Large-shaped model")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--modes", default="none,int8")
    args = parser.parse_args()
    size = f"large_{args.blocks}blocks"
    SHAPES.setdefault(size, {**SHAPES["large"], "num_layers": args.blocks})
    path = checkpoint(size)
    print(f"{path.name}: {path.stat().st_size / GiB:.2f} GiB (bf16), {args.resolution} px, rank 16, CPU")
    ratios = []
    for mode in args.modes.split(","):
        r = run_child("step", str(path), mode, str(args.resolution))
        ratios.append(r["rss"] / r["estimate"])
        print(
            f"{mode:5s} measured peak RSS {r['rss'] / GiB:5.2f} GiB, estimated {r['estimate'] / GiB:5.2f} GiB "
            f"(measured / estimated {ratios[-1]:.2f}; step {r['step_s']:.0f} s): {r['parts']}",
            flush=True,
        )
    worst = max(ratios, key=lambda x: abs(x - 1))
    print(f"measured / estimated peak memory, worst of {args.modes} = {worst:.2f} (target 0.8 .. 1.2)")


if __name__ == "__main__":
    main()
