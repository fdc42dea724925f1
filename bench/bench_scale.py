"""Real-size load / quantise / train benchmark: SD3.5-Medium- and Large-shaped random checkpoints.

Writes the checkpoints in Stability's single-file layout (and ComfyUI's fp8-scaled variant) straight to
disk tensor by tensor (never whole in RAM), cached under ``$SD35_TUNER_HOME/bench/``. Each measurement
runs in a fresh Python process (or a fresh ComfyUI server), so its peak RSS (VmHWM) is its own.

    ~/.cache/sd35-tuner/venv/bin/python -m bench.bench_scale [--size medium|large] [--modes none,int8,int4]
        [--compare OLD_CHECKOUT] [--from-model] [--vs-core fp32] [--pipeline none,int8] [--step 256]

Prints per mode the load + quantise seconds and peak RSS / bf16 size: from the file (``--compare``: an
older checkout's rows beside), and ``--from-model`` from a MODEL that ComfyUI loaded (the trainer's MODEL
input). ComfyUI reads only full-depth files, so the MODEL, ``--vs-core`` and ``--pipeline`` parts use the
full 24-block Medium shape (with a VAE, as Stability ships it): ``--vs-core`` one 256 px rank-16 training
step by ComfyUI core's TrainLoraNode and by our trainer on the same MODEL in real servers (s/step and
peak RSS ratios), ``--pipeline`` the bundled pipeline workflow's peak RSS, phase by phase, before (trainer
re-reading the file) and after (training on the MODEL) — see ``scale_server``. Last line: the int8 ratio
from the file.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from tools import paths
from tools.comfy_import import import_comfy

REPO = Path(__file__).resolve().parents[1]
PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# SD3.5 Medium's block shape (hidden 1536, qk RMS-norm, dual attention) with 12 of its 24 blocks; Medium and
# Large in full. ComfyUI's own loader only reads files whose depth equals hidden / 64 (medium_full, large):
# use those with --from-model.
SHAPES = {
    "medium": dict(num_layers=12, num_attention_heads=24, dual_attention_layers=tuple(range(12)), pos=384),
    "medium_full": dict(num_layers=24, num_attention_heads=24, dual_attention_layers=tuple(range(13)), pos=384),
    "large": dict(num_layers=38, num_attention_heads=38, dual_attention_layers=(), pos=192),
}


def config(size: str) -> dict:
    s = SHAPES[size]
    hidden = 64 * s["num_attention_heads"]
    return dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=s["num_layers"],
        attention_head_dim=64,
        num_attention_heads=s["num_attention_heads"],
        joint_attention_dim=4096,
        caption_projection_dim=hidden,
        pooled_projection_dim=2048,
        pos_embed_max_size=s["pos"],
        dual_attention_layers=s["dual_attention_layers"],
        qk_norm="rms_norm",
    )


def mmdit_shapes(size: str) -> dict[str, tuple[int, ...]]:
    from diffusers import SD3Transformer2DModel

    from training.loading.mmdit import diffusers_to_mmdit

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config(size))
    return {k: tuple(v.shape) for k, v in diffusers_to_mmdit(model.state_dict()).items()}


def _random(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key.endswith(("ln_q.weight", "ln_k.weight")):
        return torch.ones(shape)
    std = 0.02 if key.endswith(".weight") or key.endswith("pos_embed") else 0.01
    return torch.randn(shape, generator=g) * std


def checkpoint(size: str, fp8: bool = False, vae: bool = False) -> Path:
    """The cached random checkpoint (bf16, or ComfyUI fp8-scaled), written on first use. ``vae``: with the
    built-in random SD3 VAE as ``first_stage_model.*``, as Stability's single files carry theirs (what
    CheckpointLoaderSimple's VAE output needs)."""
    name = f"sd35_{size}_shaped{'_fp8_scaled' if fp8 else ''}{'_vae' if vae else ''}.safetensors"
    path = paths.HOME / "bench" / name
    if path.exists():
        return path
    from tools.model_formats import FP8_MAX, is_quantisable, write_streamed  # (--compare children import none)

    shapes = mmdit_shapes(size)
    specs = [(PREFIX + "scaled_fp8", (0,), torch.float8_e4m3fn)] if fp8 else []
    vae_file = safe_open(str(paths.MODELS / "vae" / paths.SD3_VAE), "pt") if vae else None
    for k in vae_file.keys() if vae_file else ():
        specs.append((VAE_PREFIX + k, tuple(vae_file.get_slice(k).get_shape()), torch.float32))
    for k, shape in shapes.items():
        if fp8 and is_quantisable(k, shape):
            specs += [
                (PREFIX + k, shape, torch.float8_e4m3fn),
                (PREFIX + k[: -len(".weight")] + ".scale_weight", (), torch.float32),
            ]
        else:
            specs.append((PREFIX + k, shape, torch.bfloat16))

    def make(key: str, shape, dtype) -> torch.Tensor:
        if key.startswith(VAE_PREFIX):
            return vae_file.get_tensor(key.removeprefix(VAE_PREFIX)).float()
        if key.endswith("scaled_fp8"):
            return torch.empty(0, dtype=dtype)
        if key.endswith(".scale_weight"):
            w = _random(
                key.removeprefix(PREFIX).removesuffix(".scale_weight") + ".weight",
                shapes[key.removeprefix(PREFIX).removesuffix(".scale_weight") + ".weight"],
            )
            return (w.bfloat16().float().abs().max() / FP8_MAX[torch.float8_e4m3fn]).reshape(())
        w = _random(key.removeprefix(PREFIX), shape).to(torch.bfloat16)
        if dtype == torch.float8_e4m3fn:
            scale = w.float().abs().max() / FP8_MAX[dtype]
            return (w.float() / scale).to(dtype)
        return w

    print(f"writing {path} ...", flush=True)
    return write_streamed(path, specs, make, {"sd35_tuner": f"random SD3.5-{size}-shaped benchmark model"})


def transformer_bytes(path: Path) -> int:
    """Bytes of the checkpoint's MMDiT tensors (the "bf16 size" ratios divide by; a bundled VAE not counted)."""
    with safe_open(str(path), "pt") as f:
        return sum(2 * math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(PREFIX))


def peak_rss() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child_load(path: str, mode: str) -> dict:
    """Runs in a fresh process: load + quantise the base as the trainer does; seconds and peak RSS. The
    libraries are imported first and timed apart (optimum-quanto alone takes ~30 s here: it imports
    transformers' model code; in a ComfyUI server most of that is already imported)."""
    start = time.perf_counter()
    import diffusers.models  # noqa: F401

    if mode != "none":
        import optimum.quanto  # noqa: F401
    import_s = time.perf_counter() - start
    try:
        from training.loading import load_base
    except ImportError:  # an older checkout (--compare): load, then quantise the whole model
        from training.model import load_transformer, quantize_base

        start = time.perf_counter()
        model = load_transformer(path, "bf16")
        mid = time.perf_counter()
        quantize_base(model, mode)
        quantise_s = time.perf_counter() - mid
    else:
        build = sys.modules["training.loading.build"]
        quantise_s, quantize_linear = 0.0, build.quantize_linear

        def timed(*args, **kwargs) -> None:  # the seconds spent quantising, out of the block-by-block load
            nonlocal quantise_s
            began = time.perf_counter()
            quantize_linear(*args, **kwargs)
            quantise_s += time.perf_counter() - began

        build.quantize_linear = timed
        start = time.perf_counter()
        load_base(path, "bf16", mode)
    total_s = time.perf_counter() - start
    return {"total_s": total_s, "quantise_s": quantise_s, "import_s": import_s, "rss": peak_rss()}


def child_model(path: str, mode: str) -> dict:
    """Fresh process: ComfyUI loads the checkpoint (as CheckpointLoaderSimple does, under inference mode),
    then the trainer builds its base from that MODEL's tensors, as the node does with a MODEL input."""
    import_comfy("--bf16-unet")
    import comfy.sd

    from training.loading import DTYPES, InMemoryBase, load_base

    start = time.perf_counter()
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    comfy_s, dtype = time.perf_counter() - start, model.model.get_dtype()
    state = dict(model.model.diffusion_model.state_dict())  # (a bf16 file: no fp8 marker to hand over)
    name = next((n for n, d in DTYPES.items() if d == dtype), "bf16")
    ours = load_base(InMemoryBase(state, "MODEL"), name, mode)
    assert ours is not None
    return {"total_s": time.perf_counter() - start, "comfy_s": comfy_s, "rss": peak_rss(), "dtype": str(dtype)}


def child_step(path: str, mode: str, resolution: str) -> dict:
    """Fresh process: load + one LoRA training step (rank 16, attention, gradient checkpointing, AdamW)
    on CPU at ``resolution``; peak RSS next to the memory estimator's CPU prediction."""
    from training.loading import load_base, read_config
    from training.memory import estimate
    from training.model import add_lora, lora_parameters, lora_target_modules

    res = int(resolution)
    model = load_base(path, "bf16", mode)
    add_lora(model, 16, 16.0, lora_target_modules(model, "attention"))
    model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    pred = model(
        hidden_states=torch.randn(1, 16, res // 8, res // 8, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 333, 4096, generator=g).bfloat16(),
        pooled_projections=torch.randn(1, 2048, generator=g).bfloat16(),
        timestep=torch.tensor([500.0]),
    ).sample
    pred.float().square().mean().backward()
    opt.step()
    est = estimate(read_config(path), res, rank=16, quantization=mode, base_dtype="bf16", device="cpu")
    return {"step_s": time.perf_counter() - start, "rss": peak_rss(), "estimate": est.total, "parts": est.text()}


def run_child(*args: str, repo: Path = REPO) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_scale", "--child", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="medium")
    parser.add_argument("--modes", default="none,int8,int4")
    parser.add_argument("--compare", type=Path, help="an older checkout to measure side by side (e.g. main)")
    parser.add_argument("--from-model", action="store_true", help="also: ComfyUI loads it, we train on its MODEL")
    parser.add_argument("--step", type=int, nargs="*", help="also one CPU training step at these resolutions")
    parser.add_argument("--step-mode", default="int8")
    parser.add_argument("--vs-core", help="also: a 256 px step, ours vs core's TrainLoraNode, in fp32 or bf16")
    parser.add_argument("--pipeline", help="also: the bundled pipeline, before vs after, at these quantizations")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps({"load": child_load, "model": child_model, "step": child_step}[kind](*rest)))
        return
    path = checkpoint(args.size)
    size = transformer_bytes(path)
    print(f"{path.name}: {size / 2**30:.2f} GiB (bf16)", flush=True)
    ratios = file_rows(path, size, args.modes.split(","), args.compare)
    # ComfyUI reads only full-depth files (blocks = width / 64): the full Medium, with a VAE as Stability ships it
    full = checkpoint(args.size if args.size != "medium" else "medium_full", vae=True)
    if args.from_model or args.vs_core or args.pipeline:
        print(f"{full.name}: {transformer_bytes(full) / 2**30:.2f} GiB (bf16), ComfyUI with --bf16-unet", flush=True)
    if args.from_model:
        model_rows(full, transformer_bytes(full), args.modes.split(","))
    for res in args.step or ():
        r = run_child("step", str(path), args.step_mode, str(res))
        print(
            f"step  {args.step_mode:5s} {res} px  {r['step_s']:6.1f} s/step  peak RSS {r['rss'] / 2**30:5.2f} GiB, "
            f"estimated {r['estimate'] / 2**30:5.2f} GiB ({r['rss'] / r['estimate']:.2f}x): {r['parts']}",
            flush=True,
        )
    if args.vs_core:
        vs_core(full, args.vs_core)
    if args.pipeline:
        pipeline_rows(full, args.pipeline.split(","))
    if "int8" in ratios:
        print(f"int8 peak RSS / bf16 size = {ratios['int8']:.2f} (target <= 0.65)")


def file_rows(path: Path, size: int, modes: list[str], compare: Path | None) -> dict[str, float]:
    ratios = {}
    for mode in modes:
        seconds = {}
        for label, repo in (("before", compare), ("now", REPO)):
            if repo is None:
                continue
            r = run_child("load", str(path), mode, repo=repo)
            ratios[mode], seconds[label] = r["rss"] / size, r["quantise_s"]
            print(
                f"file  {mode:5s} {label:6s} load+quantise {r['total_s']:6.1f} s, of which quantise "
                f"{r['quantise_s']:5.1f} s (+ imports {r['import_s']:4.1f} s)  "
                f"peak RSS {r['rss'] / 2**30:5.2f} GiB = {ratios[mode]:.2f} x bf16",
                flush=True,
            )
        if mode != "none" and len(seconds) == 2:
            print(
                f"file  {mode:5s} quantising {seconds['before'] / seconds['now']:.1f}x faster than before", flush=True
            )
    return ratios


def model_rows(path: Path, size: int, modes: list[str]) -> None:
    for mode in modes:
        r = run_child("model", str(path), mode)
        print(
            f"MODEL {mode:5s} now    ComfyUI load + ours {r['total_s']:6.1f} s (ComfyUI {r['comfy_s']:.1f} s, "
            f"{r['dtype']})  peak RSS {r['rss'] / 2**30:5.2f} GiB = {r['rss'] / size:.2f} x bf16",
            flush=True,
        )


def vs_core(path: Path, dtype: str) -> None:
    from bench.scale_server import core, ours, step

    size = transformer_bytes(path)
    (core_s, core_load, core_rss), (our_s, our_load, our_rss) = step(core, path, dtype), step(ours, path, dtype)
    for name, sec, load, rss in (
        ("core TrainLoraNode", core_s, core_load, core_rss),
        ("our trainer (MODEL)", our_s, our_load, our_rss),
    ):
        print(
            f"step  256 px r16 {dtype} {name:20s} {sec:6.1f} s (1-step run)  peak RSS training "
            f"{rss / 2**30:5.2f} GiB = {rss / size:.2f} x bf16 (ComfyUI loading it: {load / 2**30:5.2f} GiB)"
        )
    print(f"step  ours / core: {our_s / core_s:.2f} x seconds, {our_rss / core_rss:.2f} x peak RSS", flush=True)


def pipeline_rows(path: Path, modes: list[str]) -> None:
    from bench.scale_server import pipeline

    size = transformer_bytes(path)
    for mode in modes:
        for label, before in (("before: trainer re-reads the file", True), ("after: trains on the MODEL", False)):
            load, phases = pipeline(path, before, mode)
            for phase, peak in phases:
                print(f"pipeline {mode:5s}   {phase:32s} peak RSS {peak / 2**30:5.2f} GiB = {peak / size:.2f} x bf16")
            rss = max(peak for _, peak in phases)
            print(
                f"pipeline {mode:5s} {label:34s} peak RSS after loading {rss / 2**30:5.2f} GiB = "
                f"{rss / size:.2f} x bf16 (target <= 1.3; ComfyUI loading the checkpoint: {load / size:.2f} x)",
                flush=True,
            )


if __name__ == "__main__":
    main()
