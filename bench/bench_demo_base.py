"""The demo base's pretraining at setup (target: <= 3 minutes on 2 cores), one torch thread vs two.

Setup pretrains ``tools/demo_base.py`` once. This bench encodes its corpus as setup does, then times
``--steps`` pretraining steps with one torch thread (what setup uses) and with two (torch's default on
a 2-core machine), each after a few warm-up steps, and extrapolates each to setup's full run
(``demo_base.STEPS`` steps plus the corpus encoding) against the 3-minute budget. On cores shared with
other processes two threads can spin instead of working: that is why setup uses one.

    ~/.cache/sd35-tuner/venv/bin/python -m bench.bench_demo_base [--steps 60]

Last line: one-thread/two-thread ratio of the time per step (below 1: one thread is faster).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from tools import demo_base, paths
from tools.comfy_import import import_comfy

BUDGET_S = 180.0
WARMUP = 5


def seconds_per_step(corpus: demo_base.Corpus, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    demo_base.pretrain(corpus, WARMUP)
    started = time.perf_counter()
    demo_base.pretrain(corpus, steps)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed pretraining steps per thread count")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    import_comfy()
    started = time.perf_counter()
    corpus = demo_base.build_corpus(paths.MODELS)
    encode_s = time.perf_counter() - started
    per_step = {threads: seconds_per_step(corpus, args.steps, threads) for threads in (1, 2)}
    for threads, step_s in per_step.items():
        full = encode_s + demo_base.STEPS * step_s
        print(
            f"{threads} thread(s): {step_s * 1000:.0f} ms/step; setup's {demo_base.STEPS} steps + encoding "
            f"{encode_s:.0f} s = {full:.0f} s (budget {BUDGET_S:.0f} s: {'within' if full <= BUDGET_S else 'OVER'})"
        )
    print(f"one/two threads time per step: {per_step[1] / per_step[2]:.2f}")


if __name__ == "__main__":
    main()
