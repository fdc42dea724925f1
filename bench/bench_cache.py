"""Cache node: a second run over an unchanged dataset vs the first run (target: <= 2% of its time).

A real ComfyUI server (CPU) with the built-in SD3 VAE and CLIP-L runs the graph load -> crop ->
cache twice on N photos. A warm-up graph loads the models first, so neither timed run pays for
loading weights from disk. Times are the cache node's own (``took`` in its summary) and the whole
prompt's (from /history timestamps, which include the dataset nodes).

    ~/.cache/sd35-tuner/venv/bin/python -m bench.bench_cache [--images 16] [--size 128]

Last line: the second/first ratio of the cache node's time.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from tests.integration.test_cache_node import counts, graph, summary, write_images
from tools.comfy_server import ComfyServer

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def run(comfy: ComfyServer, prompt: dict) -> dict:
    """Queue and wait; on a loaded machine /history can be slow to answer, so timeouts are retried."""
    prompt_id = comfy.queue(prompt)
    while True:
        try:
            entry = comfy.get(f"/history/{prompt_id}", timeout=120).get(prompt_id)
        except (TimeoutError, OSError):
            entry = None
        if entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"].get("status_str") != "success":
                raise SystemExit(f"prompt failed: {entry['status'].get('messages')}")
            return entry
        if comfy.proc is not None and comfy.proc.poll() is not None:
            raise SystemExit(f"ComfyUI died:\n{comfy.log()[-4000:]}")
        time.sleep(0.5)


def prompt_seconds(entry: dict) -> float:
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"] if "timestamp" in data}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def node_seconds(text: str) -> float:
    return float(re.search(r"took ([0-9.]+) s", text).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="short side of the photos (px)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        comfy = ComfyServer(Path(tmp))
        comfy.start()
        try:
            specs = {
                f"{PHOTOS[i % len(PHOTOS)]}_{i}": ((args.size + 8 * i, args.size), f"photo {i} of a {PHOTOS[i % 4]}")
                for i in range(args.images)
            }
            write_images(comfy.base_dir / "input" / "bench_ds", specs)
            write_images(comfy.base_dir / "input" / "bench_warm", {"coffee_warm": ((args.size, args.size), "warm")})
            run(comfy, graph(comfy, "bench_warm", "bench/warm", validation=""))
            first = run(comfy, graph(comfy, "bench_ds", "bench/cache", validation=""))
            second = run(comfy, graph(comfy, "bench_ds", "bench/cache", validation=""))
        finally:
            comfy.stop()
    s1, s2 = summary(first), summary(second)
    if counts(s2)["latents"][0] or counts(s2)["texts"][0]:
        raise SystemExit(f"second run encoded something:\n{s2}")
    t1, t2 = node_seconds(s1), node_seconds(s2)
    p1, p2 = prompt_seconds(first), prompt_seconds(second)
    print(f"dataset: {args.images} photos, buckets from {args.size}px, CPU")
    print(f"first run:  cache node {t1:.3f} s, prompt {p1:.3f} s  ({counts(s1)})")
    print(f"second run: cache node {t2:.4f} s, prompt {p2:.3f} s  ({counts(s2)})")
    print(f"prompt ratio second/first: {p2 / p1:.4f}")
    print(f"ratio second/first (cache node time): {t2 / t1:.4f} (target <= 0.02)")


if __name__ == "__main__":
    main()
