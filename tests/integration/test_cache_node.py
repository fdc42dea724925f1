"""The cache node through a real ComfyUI server with the built-in SD3 VAE and CLIP-L (as SD3 CLIP).

Reference values come from ComfyUI core's own MakeTrainingDataset + SaveTrainingDataset, run in
the same server on the same rendered pixels: ``vae.encode`` and ``clip.encode_from_tokens``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dataset.images import render_item
from dataset.manifest import CropBox, DatasetItem
from tests.cache_checks import cached_text, neighbourhood, raw_latent, verify
from tools import paths
from tools.comfy_server import ComfyError, ComfyServer, execution_error
from training import folder_lock
from training.cache import CacheReader

NODE = "SD35TunerCacheLatents"
LONG = " ".join(f"word{i}" for i in range(120))
CAPTIONS = {"astronaut": "an astronaut in a white suit", "coffee": "a cup of coffee", "rocket": LONG}
SIZES = {"astronaut": (160, 160), "coffee": (192, 96), "rocket": (96, 144)}


def write_images(folder: Path, specs: dict[str, tuple[tuple[int, int], str]]) -> None:
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name, (size, caption) in specs.items():
        photo = getattr(data, name.split("_")[0])()
        Image.fromarray(photo).convert("RGB").resize(size).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")


def graph(comfy, folder: str, cache_name: str, vae: str = paths.SD3_VAE, location: str = "output", **opts) -> dict:
    return with_defaults(
        comfy,
        {
            "load": {
                "class_type": "SD35TunerLoadDataset",
                "inputs": {
                    "folder": folder,
                    "recursive": False,
                    "repeats": 0,
                    "caption_extension": ".txt",
                    "strict": True,
                },
            },
            "crop": {
                "class_type": "SD35TunerSmartCrop",
                "inputs": {
                    "dataset": ["load", 0],
                    "mode": "centre",
                    "resolution": 256,
                    "buckets": "512x512, 512x256, 256x512",  # x 256/1024: 128x128, 128x64, 64x128
                    "headroom": 0.5,
                    "max_upscale": 0.0,
                    "too_small": "keep",
                },
            },
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
            "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
            "cache": {
                "class_type": NODE,
                "inputs": {
                    "dataset": ["crop", 0],
                    "vae": ["vae", 0],
                    "clip": ["clip", 0],
                    "cache_name": cache_name,
                    "location": location,
                    "random_flip": opts.get("flip", False),
                    "tile_above": 0,
                    "batch_size": opts.get("batch_size", 2),
                },
            },
        },
    )


_INFO: dict = {}


def with_defaults(comfy, prompt: dict) -> dict:
    """Fill the widget inputs a graph leaves out with their /object_info defaults (other nodes' inputs may grow)."""
    for node in prompt.values():
        if node["class_type"] not in _INFO:
            _INFO.update(comfy.get(f"/object_info/{node['class_type']}"))
        for name, spec in _INFO[node["class_type"]]["input"].get("required", {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if name in node["inputs"]:
                continue
            if "default" in options:
                node["inputs"][name] = options["default"]
            elif isinstance(spec[0], list) and spec[0]:
                node["inputs"][name] = spec[0][0]
            elif options.get("options"):
                node["inputs"][name] = options["options"][0]
    return prompt


def error_of(comfy, prompt: dict) -> str:
    """Queue a graph that must fail at execution; return ComfyUI's exception message."""
    error = execution_error(comfy.wait(comfy.queue(prompt)))
    assert error is not None, "the graph ran without an error"
    return f"{error['exception_type']}: {error['exception_message']}"


def summary(entry: dict) -> str:
    return entry["outputs"]["cache"]["text"][0]


def counts(text: str) -> dict[str, tuple[int, int]]:
    return {
        kind: tuple(int(x) for x in re.search(rf"{kind}: (\d+) encoded, (\d+) reused", text).groups())
        for kind in ("latents", "texts")
    }


def item_of(entry: dict) -> DatasetItem:
    left, top, right, bottom = entry["crop"]
    return DatasetItem(
        entry["source"], entry["caption"], CropBox(left, top, right - left, bottom - top), tuple(entry["bucket"])
    )


def core_dataset_shard(comfy, folder: str) -> Path:
    """Core's SaveTrainingDataset shard: in output/ up to ComfyUI 0.3.x, in its own datasets/ folder since."""
    found = [
        path
        for root in ("output", "datasets")
        if (path := comfy.base_dir / root / folder / "shard_0000.pkl").is_file()
    ]
    assert len(found) == 1, f"core's SaveTrainingDataset wrote no single shard_0000.pkl for {folder}: {found}"
    return found[0]


def references(comfy, reader: CacheReader, tag: str) -> list[dict]:
    """Core's MakeTrainingDataset on the same rendered pixels and captions; returns latent/cond/pooled per item."""
    prompt = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": paths.SD3_VAE}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
    }
    for i, entry in enumerate(reader.items):
        name = f"sd35cache_{tag}_{i}.png"
        render_item(item_of(entry)).save(comfy.base_dir / "input" / name)
        prompt[f"img{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        prompt[f"make{i}"] = {
            "class_type": "MakeTrainingDataset",
            "inputs": {"images": [f"img{i}", 0], "vae": ["vae", 0], "clip": ["clip", 0], "texts": entry["caption"]},
        }
        prompt[f"save{i}"] = {
            "class_type": "SaveTrainingDataset",
            "inputs": {
                "latents": [f"make{i}", 0],
                "conditioning": [f"make{i}", 1],
                "folder_name": f"sd35cache_ref_{tag}_{i}",
                "shard_size": 1000,
            },
        }
    comfy.run(prompt)
    out = []
    for i in range(len(reader.items)):
        # core's reference output is a torch.save shard; weights_only=True loads tensors without unpickling code
        shard = torch.load(core_dataset_shard(comfy, f"sd35cache_ref_{tag}_{i}"), weights_only=True)
        [[cond, extra]] = shard["conditioning"][0]
        out.append({"latent": shard["latents"][0]["samples"][0], "cond": cond, "pooled": extra["pooled_output"]})
    return out


@pytest.fixture(scope="module")
def dataset_folder(comfy) -> str:
    specs = {name: (SIZES[name], CAPTIONS[name]) for name in CAPTIONS}
    write_images(comfy.base_dir / "input" / "sd35cache_ds", specs)
    return "sd35cache_ds"


@pytest.fixture(scope="module")
def first(comfy, dataset_folder) -> dict:
    entry = comfy.run(graph(comfy, dataset_folder, "sd35cache/main"))
    reader = CacheReader(comfy.base_dir / "output" / "sd35cache" / "main")
    return {"summary": summary(entry), "reader": reader, "refs": references(comfy, reader, "main")}


@pytest.fixture(scope="module")
def other_vaes(comfy) -> dict[str, str]:
    """A second SD3 VAE with different weights, and a 4-channel (SDXL-shaped) one, next to the built-in VAE."""
    state = load_file(paths.MODELS / "vae" / paths.SD3_VAE)
    folder = comfy.base_dir / "models" / "vae"
    other = {k: v * 1.05 if k.startswith("encoder.conv_out") else v for k, v in state.items()}
    save_file(other, folder / "sd3_vae_other.safetensors")
    four = dict(state)
    four["encoder.conv_out.weight"] = state["encoder.conv_out.weight"][:8].clone()
    four["encoder.conv_out.bias"] = state["encoder.conv_out.bias"][:8].clone()
    four["decoder.conv_in.weight"] = state["decoder.conv_in.weight"][:, :4].clone()
    save_file(four, folder / "vae_4ch.safetensors")
    return {"other": "sd3_vae_other.safetensors", "four": "vae_4ch.safetensors"}


def test_cached_entries_equal_comfyui_vae_encode_and_clip_encode(first):
    reader, refs = first["reader"], first["refs"]
    assert counts(first["summary"]) == {"latents": (3, 0), "texts": (4, 0)}  # 3 captions and ""
    assert "3 items (3 with repeats) in 3 bucket(s): 128x128: 1, 128x64: 1, 64x128: 1" in first["summary"]
    for i, entry in enumerate(reader.items):
        ref = refs[i]
        latent = raw_latent(reader, i)
        w, h = entry["bucket"]
        assert latent.shape == ref["latent"].shape == (16, h // 8, w // 8)
        torch.testing.assert_close(latent, ref["latent"].float(), rtol=0, atol=1e-5)
        cond, pooled = cached_text(reader, entry["caption"])
        assert cond.shape == (1, 77, 4096) and pooled.shape == (1, 2048)
        if entry["caption"] == LONG:  # ComfyUI encodes it as two 77-token chunks; the cache keeps the first
            assert ref["cond"].shape[1] >= 154 and entry["truncated"]
            torch.testing.assert_close(cond, ref["cond"][:, :77].float(), rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(pooled, ref["pooled"].float(), rtol=1e-3, atol=1e-3)
        else:
            torch.testing.assert_close(cond, ref["cond"].float(), rtol=0, atol=1e-5)
            torch.testing.assert_close(pooled, ref["pooled"].float(), rtol=0, atol=1e-5)
    assert "1 caption(s) longer than 77 tokens were truncated to 77 tokens" in first["summary"]


def test_batches_are_sd3_scaled_and_shaped(first):
    reader = first["reader"]
    batch = next(reader.batches(1, seed=0, epoch=0))
    i = next(n for n, e in enumerate(reader.items) if e["latent"] == batch.keys[0])
    torch.testing.assert_close(batch.latents[0], (raw_latent(reader, i) - 0.0609) * 1.5305)
    assert batch.cond.shape == (1, 77, 4096) and batch.pooled.shape == (1, 2048)


def test_rerun_encodes_nothing_and_caption_edit_encodes_one_text(comfy, dataset_folder, first):
    folder = comfy.base_dir / "input" / dataset_folder
    os.utime(folder / "coffee.png")  # touched, same bytes: the loader re-runs, the cache finds every key
    entry = comfy.run(graph(comfy, dataset_folder, "sd35cache/main"))
    assert counts(summary(entry)) == {"latents": (0, 3), "texts": (0, 4)}
    (folder / "coffee.txt").write_text("a cup of black coffee on a saucer", encoding="utf-8")
    entry = comfy.run(graph(comfy, dataset_folder, "sd35cache/main"))
    assert counts(summary(entry)) == {"latents": (0, 3), "texts": (1, 3)}
    assert "removed 1 stale entry" in summary(entry)
    (folder / "coffee.txt").write_text(CAPTIONS["coffee"], encoding="utf-8")
    entry = comfy.run(graph(comfy, dataset_folder, "sd35cache/main"))
    assert counts(summary(entry)) == {"latents": (0, 3), "texts": (1, 3)}


def test_truncated_shard_is_repaired_on_the_next_run(comfy, dataset_folder, first):
    cache = comfy.base_dir / "output" / "sd35cache" / "main"
    comfy.run(graph(comfy, dataset_folder, "sd35cache/main"))
    shard = next((cache / "latents").rglob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-64])
    entry = comfy.run(
        graph(comfy, dataset_folder, "sd35cache/main")
    )  # same graph: the fingerprint sees the shard change
    text = summary(entry)
    assert "repaired 1 damaged shard" in text and counts(text)["latents"][0] >= 1
    reader = CacheReader(cache)
    verify(reader, deep=True)
    for i, ref in enumerate(first["refs"]):
        torch.testing.assert_close(raw_latent(reader, i), ref["latent"].float(), rtol=0, atol=1e-5)


def test_vae_swap_reencodes_every_latent_and_no_text(comfy, dataset_folder, first, other_vaes):
    entry = comfy.run(graph(comfy, dataset_folder, "sd35cache/main", vae=other_vaes["other"]))
    assert counts(summary(entry)) == {"latents": (3, 0), "texts": (0, 4)}
    reader = CacheReader(comfy.base_dir / "output" / "sd35cache" / "main")
    assert not torch.allclose(raw_latent(reader, 0), first["refs"][0]["latent"].float(), atol=1e-3)


def test_four_channel_vae_is_refused_with_a_clear_message(comfy, dataset_folder, other_vaes):
    message = error_of(comfy, graph(comfy, dataset_folder, "sd35cache/four", vae=other_vaes["four"]))
    assert "ValueError: The connected VAE produces 4-channel latents, but SD3/SD3.5 needs a 16-channel VAE" in message


def test_unbucketed_dataset_is_refused_with_a_clear_message(comfy, dataset_folder):
    prompt = graph(comfy, dataset_folder, "sd35cache/unbucketed")
    prompt["cache"]["inputs"]["dataset"] = ["load", 0]
    message = error_of(comfy, prompt)
    assert re.search(
        r"ValueError: \S+astronaut.png: item has no bucket; pass the dataset through 'Smart Crop", message
    )


def test_cache_name_outside_the_output_folder_is_refused(comfy, dataset_folder):
    with pytest.raises(ComfyError, match=r"cache_name '\.\./escape' may not contain '\.\.'"):
        comfy.run(graph(comfy, dataset_folder, "../escape"))


def test_unwritable_cache_folder_gives_a_clear_error(comfy, dataset_folder):
    """A file where the cache folder should be: unwritable for every user, root included (the read-only
    flavours of the same error are unit tests, tests/unit/test_cache_library.py)."""
    blocked = comfy.base_dir / "output" / "sd35cache" / "blocked"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"a file, not a folder")
    message = error_of(comfy, graph(comfy, dataset_folder, "sd35cache/blocked"))
    assert re.search(r"CacheWriteError: .*cannot write the cache at \S*blocked: a file is in the way", message), (
        message
    )
    assert blocked.read_bytes() == b"a file, not a folder"
    blocked.unlink()
    assert counts(summary(comfy.run(graph(comfy, dataset_folder, "sd35cache/blocked"))))["latents"] == (3, 0)


def test_server_killed_mid_run_then_rerun_gives_a_complete_correct_cache(comfy, tmp_path, first):
    """SIGKILL a second server (same input/output folders) once the first latent shard exists; rerun.

    The coffee image and the captions are the main dataset's, so what the killed run left behind is
    checked against core's reference encodings from ``first``.
    """
    suit = CAPTIONS["astronaut"]
    specs = {"coffee": (SIZES["coffee"], CAPTIONS["coffee"])}
    specs.update({f"astronaut_{i}": ((128 + 8 * i, 128), suit) for i in range(4)})
    write_images(comfy.base_dir / "input" / "sd35cache_kill", specs)
    cache = comfy.base_dir / "output" / "sd35cache" / "killed"
    victim = ComfyServer(
        tmp_path / "victim",
        extra_args=(
            "--output-directory",
            str(comfy.base_dir / "output"),
            "--input-directory",
            str(comfy.base_dir / "input"),
        ),
    )
    victim.start()
    try:
        victim.queue(graph(comfy, "sd35cache_kill", "sd35cache/killed", batch_size=1))
        deadline = time.monotonic() + 300
        while not list((cache / "latents").rglob("*.safetensors")):  # the 128x64 bucket (coffee) is done first
            assert time.monotonic() < deadline, "the first latent shard never appeared"
            assert victim.proc.poll() is None
            time.sleep(0.05)
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=30)
    finally:
        victim.stop()
    with pytest.raises(ValueError, match="incomplete"):
        CacheReader(cache)
    entry = comfy.run(graph(comfy, "sd35cache_kill", "sd35cache/killed", batch_size=1))
    latents, texts = counts(summary(entry))["latents"], counts(summary(entry))["texts"]
    assert latents[1] >= 1 and latents[0] >= 1 and sum(latents) == 5 and texts == (0, 3), summary(entry)
    resumed = CacheReader(cache)
    verify(resumed, deep=True)
    refs = {e["caption"]: ref for e, ref in zip(first["reader"].items, first["refs"], strict=True)}
    coffee = next(i for i, e in enumerate(resumed.items) if e["source"].endswith("coffee.png"))
    torch.testing.assert_close(
        raw_latent(resumed, coffee), refs[CAPTIONS["coffee"]]["latent"].float(), rtol=0, atol=1e-5
    )
    for caption in (CAPTIONS["coffee"], suit):
        cond, pooled = cached_text(resumed, caption)
        torch.testing.assert_close(cond, refs[caption]["cond"].float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, refs[caption]["pooled"].float(), rtol=0, atol=1e-5)
    for i in range(len(resumed.items)):
        assert torch.isfinite(raw_latent(resumed, i)).all()


def test_cancel_mid_run_keeps_whole_shards_and_the_rerun_completes(comfy):
    """POST /interrupt (the UI's Cancel) once the first latent shard exists: noticed at the next progress update."""
    specs = {"coffee": (SIZES["coffee"], "a cancelled cup")}
    specs.update({f"astronaut_{i}": ((128 + 8 * i, 128), f"astronaut {i}") for i in range(4)})
    write_images(comfy.base_dir / "input" / "sd35cache_cancel", specs)
    cache = comfy.base_dir / "output" / "sd35cache" / "cancelled"
    prompt_id = comfy.queue(graph(comfy, "sd35cache_cancel", "sd35cache/cancelled", batch_size=1))
    deadline = time.monotonic() + 300
    while not list((cache / "latents").rglob("*.safetensors")):
        assert time.monotonic() < deadline, "the first latent shard never appeared"
        time.sleep(0.05)
    comfy.interrupt()
    entry = comfy.wait(prompt_id)
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    with pytest.raises(ValueError, match="incomplete"):
        CacheReader(cache)
    entry = comfy.run(graph(comfy, "sd35cache_cancel", "sd35cache/cancelled", batch_size=1))
    latents = counts(summary(entry))["latents"]
    assert latents[1] >= 1 and sum(latents) == 5 and counts(summary(entry))["texts"] == (0, 6), summary(entry)
    verify(CacheReader(cache), deep=True)


# -- issue 11: crafted, deleted, damaged and contended caches through the real server --------------------


def _outside_cache(comfy, cache: Path) -> dict[str, str]:
    """Hashes of everything a cache run could wrongly touch: input/, output/ (minus the cache), the victims."""
    return {name: neighbourhood(comfy.base_dir / name, cache) for name in ("input", "output", "victims")}


def test_a_crafted_index_cannot_touch_files_outside_the_cache(comfy, dataset_folder, first):
    cache = comfy.base_dir / "output" / "sd35cache" / "crafted"
    comfy.run(graph(comfy, dataset_folder, "sd35cache/crafted"))
    victims = comfy.base_dir / "victims"
    (victims / "128x128").mkdir(parents=True, exist_ok=True)
    (victims / "victim.safetensors").write_bytes(b"precious")
    (victims / "128x128" / "v.safetensors").write_bytes(b"precious too")
    (cache / "latents" / "evil").symlink_to(victims, target_is_directory=True)
    index = json.loads((cache / "index.json").read_text())
    for rel in ("../../../victims/victim.safetensors", "latents/evil/128x128/v.safetensors"):
        index["shards"][rel] = {"bytes": 8, "kind": "latent", "identity": "x"}
    (cache / "index.json").write_text(json.dumps(index))
    before = _outside_cache(comfy, cache)
    text = summary(comfy.run(graph(comfy, dataset_folder, "sd35cache/crafted")))  # index changed: re-executed
    assert _outside_cache(comfy, cache) == before
    # the two planted entries, and the file the planted link exposes to the folder scan
    assert "refused 3 index entries (left untouched)" in text and "'../../../victims/victim.safetensors'" in text
    assert "'latents/evil/128x128/v.safetensors' resolves to" in text and "'latents/evil/victim.safetensors'" in text
    assert counts(text) == {"latents": (0, 3), "texts": (0, 4)}
    verify(CacheReader(cache), deep=True)


def test_a_cache_deleted_while_comfyui_runs_is_rebuilt_on_the_next_queue(comfy, dataset_folder, first):
    cache = comfy.base_dir / "output" / "sd35cache" / "deleted"
    assert counts(summary(comfy.run(graph(comfy, dataset_folder, "sd35cache/deleted"))))["latents"] == (3, 0)
    shutil.rmtree(cache)
    comfy.run(graph(comfy, dataset_folder, "sd35cache/deleted"))  # same graph, nothing else changed
    verify(CacheReader(cache), deep=True)
    (cache / "index.json").unlink()
    text = summary(comfy.run(graph(comfy, dataset_folder, "sd35cache/deleted")))
    assert counts(text) == {"latents": (0, 3), "texts": (0, 4)}  # rebuilt from the shards it found
    verify(CacheReader(cache), deep=True)


@pytest.mark.parametrize("damage", [b"\xff" * 64, bytes(range(64))], ids=["nan_after_0xff", "finite_bytes"])
def test_shard_bytes_changed_with_size_and_mtime_kept_are_repaired_on_the_next_queue(
    comfy, dataset_folder, first, damage
):
    name = f"sd35cache/flipped_{damage[0]}"
    cache = comfy.base_dir / "output" / name
    comfy.run(graph(comfy, dataset_folder, name))
    shard = next((cache / "latents").rglob("*.safetensors"))
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(st.st_size - len(damage))
        f.write(damage)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match=rf"{shard.name}: content hash does not match"):
        CacheReader(cache)
    text = summary(comfy.run(graph(comfy, dataset_folder, name)))
    assert "repaired 1 damaged shard" in text and "content hash does not match" in text
    reader = CacheReader(cache)
    for i, ref in enumerate(first["refs"]):
        torch.testing.assert_close(raw_latent(reader, i), ref["latent"].float(), rtol=0, atol=1e-5)


def test_a_cache_in_use_by_another_process_is_refused_naming_it(comfy, dataset_folder, first):
    cache = comfy.base_dir / "output" / "sd35cache" / "busy"
    with folder_lock.folder_lock(cache, "another cache build"):
        message = error_of(comfy, graph(comfy, dataset_folder, "sd35cache/busy"))
    assert re.search(rf"FolderInUseError: \S*busy is in use by process {os.getpid()} on host .*another cache", message)
    assert counts(summary(comfy.run(graph(comfy, dataset_folder, "sd35cache/busy"))))["latents"] == (3, 0)
