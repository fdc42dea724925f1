"""Pack import at ComfyUI start vs a minimal V3 pack (target: the pack <= 0.05 s, ComfyUI's mark).

ComfyUI times every custom node pack it loads and logs "Import times for custom nodes" (one decimal).
This bench starts a real server on the chosen ComfyUI home and reads that line for the pack (both
log formats: 0.3.x prints bare lines, newer versions prefix them with a coloured level), then times
the same call ComfyUI times, ``nodes.load_custom_node``, to the microsecond: in fresh processes that
first load core's built-in nodes (the state a pack meets at start), on this pack and on the baseline,
a minimal V3 pack with the same pyproject.toml and one trivial node (what ComfyUI spends on any pack:
reading its pyproject, calling its entrypoint). One unmeasured run of each first writes the .pyc
files that a user's second start finds.

    ~/.cache/sd35-tuner/venv/bin/python -m bench.bench_import [--repeats 3] [--comfy-home DIR]

Last line: pack/baseline ratio of the median import times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from tools import paths
from tools.comfy_server import PACK_DIR_NAME, ComfyServer

MINIMAL_PACK = """
from comfy_api.latest import ComfyExtension, io


class Noop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="BenchNoop", category="bench", inputs=[io.Int.Input("x")], outputs=[io.Int.Output()])

    @classmethod
    def execute(cls, x):
        return io.NodeOutput(x)


class Extension(ComfyExtension):
    async def get_node_list(self):
        return [Noop]


async def comfy_entrypoint():
    return Extension()
"""

# Runs in the ComfyUI home's venv, in its source folder: load core's nodes, then time one more module.
TIMER = """
import asyncio, json, logging, os, sys, time
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args  # parses --cpu before model management looks for CUDA
import nodes
logging.disable(logging.WARNING)
asyncio.run(nodes.init_builtin_extra_nodes())
start = time.perf_counter()
ok = asyncio.run(nodes.load_custom_node(os.environ["BENCH_TARGET"], set(), module_parent=os.environ["BENCH_PARENT"]))
print(json.dumps({"seconds": time.perf_counter() - start, "ok": ok}))
"""


def time_import(home: Path, target: Path, parent: str) -> float:
    """Seconds ComfyUI's own loader takes for ``target`` in a fresh process that already loaded core's nodes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENCH_TARGET": str(target), "BENCH_PARENT": parent}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's ComfyUI caches bytecode: time a warm start
    if (home / "stubs").is_dir():
        env["PYTHONPATH"] = str(home / "stubs")
    cmd = [str(home / "venv" / "bin" / "python"), "-c", TIMER]
    result = subprocess.run(cmd, cwd=home / "comfyui", env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"timing {target} failed:\n{result.stderr[-4000:]}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    if not answer["ok"]:
        raise SystemExit(f"ComfyUI could not load {target}:\n{result.stderr[-4000:]}")
    return answer["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--comfy-home", type=Path, default=paths.COMFY_HOME, help="a ComfyUI home (comfyui/ + venv/)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with ComfyServer(Path(tmp), home=args.comfy_home) as server:
            version = ".".join(map(str, server.version))
            logged = server.import_times()
        pack = server.base_dir / "custom_nodes" / PACK_DIR_NAME
        if str(pack) not in logged:
            raise SystemExit(f"ComfyUI {version} logged no import time for {pack}:\n{server.log()[-4000:]}")
        seconds, failed = logged[str(pack)]
        print(f"ComfyUI {version}: its log says the pack imported in {seconds:.1f} s{' (FAILED)' if failed else ''}")
        minimal = Path(tmp) / "minimal_pack"
        minimal.mkdir()
        (minimal / "__init__.py").write_text(MINIMAL_PACK)
        shutil.copy(paths.REPO / "pyproject.toml", minimal / "pyproject.toml")
        ours, core = [], []
        for i in range(args.repeats + 1):
            a, b = time_import(server.home, pack, "custom_nodes"), time_import(server.home, minimal, "custom_nodes")
            if i:
                ours.append(a)
                core.append(b)
        ours_s, core_s = statistics.median(ours), statistics.median(core)
        print(f"pack {PACK_DIR_NAME}: median {ours_s * 1000:.1f} ms over {args.repeats} fresh processes")
        print(f"baseline (a minimal V3 pack, same pyproject.toml): median {core_s * 1000:.1f} ms")
        print(f"within ComfyUI's 0.05 s mark: {'yes' if ours_s <= 0.05 else 'NO'}")
        print(f"ratio pack/baseline: {ours_s / core_s:.2f}")


if __name__ == "__main__":
    main()
