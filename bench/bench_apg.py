"""APG's sampling overhead over plain CFG: the same run, same process, same model, interleaved.

Loads the built-in tiny SD3 checkpoint with ComfyUI's own loader, then times ``comfy.sample.sample`` with
a plain clone of the model and with the clone patched by the pack's APG node (paper settings: eta 0, r 15 scaled,
momentum -0.5) in back-to-back pairs, alternating which goes first, so drift in machine load hits both alike.
The last line is the median over pairs of the wall-time ratio APG / CFG (target <= 1.02).

    python bench/bench_apg.py [--size 512] [--steps 4] [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import paths  # noqa: E402
from tools.comfy_import import import_comfy  # noqa: E402


def import_pack_node_module():
    spec = importlib.util.spec_from_file_location(
        "sd35_tuner", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["sd35_tuner"] = package
    spec.loader.exec_module(package)
    import importlib as il

    return il.import_module("sd35_tuner.nodes.apg")


def report(pairs: list, hook_seconds: float, size: int, steps: int, cfg: float, threads: int) -> None:
    """Print the medians of the interleaved (CFG, APG) pairs; last line the wall-time ratio."""
    # each pair ran back to back, so a pair's ratio sees one machine load; the median drops noisy pairs
    wall_ratio = statistics.median(a[0] / c[0] for c, a in pairs)
    cpu_ratio = statistics.median(a[1] / c[1] for c, a in pairs)
    cfg_ms = statistics.median(c[0] for c, _ in pairs) * 1000
    apg_ms = statistics.median(a[0] for _, a in pairs) * 1000
    print(f"size {size}px, {steps} steps, cfg {cfg}, {len(pairs)} interleaved pairs, torch threads {threads}")
    print(f"CFG median {cfg_ms:.1f} ms per run, APG median {apg_ms:.1f} ms per run")
    apg_total = sum(a[0] for _, a in pairs)
    share = hook_seconds / apg_total
    print(f"APG hook: {hook_seconds / (len(pairs) * steps) * 1000:.2f} ms per step, {share:.2%} of APG run time")
    print(f"APG/CFG ratio implied by the hook's share: {1 / (1 - share):.3f}")
    print(f"APG/CFG CPU-time ratio (median of pairs): {cpu_ratio:.3f}")
    print(f"APG/CFG wall-time ratio (median of pairs): {wall_ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cfg", type=float, default=6.0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 keeps timings steady on a shared machine"
    )
    args = parser.parse_args()

    import_comfy()
    import comfy.sample
    import comfy.sd
    import torch

    torch.set_num_threads(args.threads)
    node_module = import_pack_node_module()
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(paths.MODELS / "checkpoints" / paths.SD3_CHECKPOINT), output_vae=False, output_clip=False
    )
    # both sides are clones of one loaded model, so switching between them costs the same either way
    cfg_model = model.clone()
    apg_model = node_module.patch_model(model, node_module.settings_from(0.0, 15.0, "scaled", -0.5, 0.0, 1.0, "steps"))

    # time spent inside APG's hook: on a shared machine this share is steadier than a wall-time difference
    hook = apg_model.model_options["sampler_cfg_function"]
    hook_seconds = [0.0]

    def timed_hook(hook_args: dict):
        start = time.perf_counter()
        out = hook(hook_args)
        hook_seconds[0] += time.perf_counter() - start
        return out

    apg_model.model_options["sampler_cfg_function"] = timed_hook

    g = torch.Generator().manual_seed(0)

    def cond(text_seed: int) -> list:
        gen = torch.Generator().manual_seed(text_seed)
        return [[torch.randn(1, 77, 4096, generator=gen), {"pooled_output": torch.randn(1, 2048, generator=gen)}]]

    positive, negative = cond(1), cond(2)
    latent = torch.zeros(1, 16, args.size // 8, args.size // 8)
    noise = torch.randn(latent.shape, generator=g)

    def run(m) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        comfy.sample.sample(
            m, noise, args.steps, args.cfg, "euler", "sgm_uniform", positive, negative, latent,
            denoise=1.0, disable_pbar=True, seed=0,
        )  # fmt: skip
        return time.perf_counter() - wall, time.process_time() - cpu

    with torch.inference_mode():
        run(cfg_model), run(apg_model)  # warm-up: weights loaded, kernels picked
        hook_seconds[0] = 0.0
        pairs: list[tuple[tuple[float, float], tuple[float, float]]] = []
        for i in range(args.repeats):
            if i % 2 == 0:
                cfg_t = run(cfg_model)
                apg_t = run(apg_model)
            else:
                apg_t = run(apg_model)
                cfg_t = run(cfg_model)
            pairs.append((cfg_t, apg_t))

    report(pairs, hook_seconds[0], args.size, args.steps, args.cfg, torch.get_num_threads())


if __name__ == "__main__":
    main()
