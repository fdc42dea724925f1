"""training.cache without ComfyUI: real photos, real rendering, small deterministic fake encoders."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.images import render_item
from dataset.manifest import CropBox, Dataset, DatasetItem
from tests.cache_checks import cached_text, raw_latent, verify
from training.cache import (
    CacheReader,
    CacheWriteError,
    LatentEncoder,
    TextEncoder,
    TextEncoding,
    build_cache,
    cache_fingerprint,
    state_dict_identity,
    truncate_tokens,
)
from training.cache.builder import SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR

_MIX = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))


class FakeVAE:
    """8x8 average pool + a fixed 3->16 channel mix: deterministic, position-dependent, fast."""

    def __init__(self, identity: str = "vae-a", channels: int = 16):
        self.calls: list[int] = []
        self.identity = identity
        self.channels = channels

    def encode(self, pixels: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
        self.calls.append(pixels.shape[0])
        assert pixels.shape[1:] == (bucket[1], bucket[0], 3)
        pooled = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.einsum("oc,bchw->bohw", _MIX, pooled) + (0.1 if self.identity == "vae-b" else 0.0)

    def encoder(self) -> LatentEncoder:
        return LatentEncoder(self.identity, self.encode, self.channels)


class FakeCLIP:
    def __init__(self, identity: str = "te-a", length: int = 77):
        self.calls: list[str] = []
        self.identity = identity
        self.length = length

    def encode(self, text: str) -> TextEncoding:
        self.calls.append(text)
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        return TextEncoding(
            torch.randn(1, self.length, 4096, generator=g), torch.randn(1, 2048, generator=g), len(text) > 300
        )

    def encoder(self) -> TextEncoder:
        return TextEncoder(self.identity, self.encode)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((160, 120)).save(path)
        out[name] = path
    return out


def make_dataset(folder: Path, photos: dict[str, Path], **captions: str) -> Dataset:
    """Copies of the photos in ``folder`` (so tests can edit them), in two buckets."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    layout = {
        "astronaut": (CropBox(10, 0, 120, 120), (64, 64), 1),
        "coffee": (CropBox(0, 0, 160, 120), (64, 48), 2),
        "chelsea": (None, (64, 48), 1),
        "rocket": (CropBox(40, 0, 60, 120), (32, 64), 3),
    }
    for name, (crop, bucket, repeats) in layout.items():
        dst = folder / photos[name].name
        if not dst.exists():
            dst.write_bytes(photos[name].read_bytes())
        items.append(DatasetItem(str(dst), captions.get(name, f"a photo of {name}"), crop, bucket, repeats=repeats))
    return Dataset(tuple(items), str(folder))


def build(ds: Dataset, cache: Path, vae: FakeVAE, clip: FakeCLIP, **kw):
    return build_cache(ds, cache, vae.encoder(), clip.encoder(), render=render_item, **kw)


def assert_cache_holds(cache: Path, ds: Dataset, vae: FakeVAE) -> None:
    """The cache matches ``ds`` (every shard re-hashed) and holds exactly ``vae``'s latents of its items."""
    reader = CacheReader(cache)
    verify(reader, ds, deep=True)
    for i, item in enumerate(ds.items):
        torch.testing.assert_close(raw_latent(reader, i), expected_latent(vae, item), rtol=0, atol=1e-6)


def expected_latent(vae: FakeVAE, item: DatasetItem, flip: bool = False) -> torch.Tensor:
    px = torch.from_numpy(np.asarray(render_item(item), dtype=np.float32) / 255.0)
    px = px.flip(1) if flip else px
    return FakeVAE(vae.identity).encode(px[None], item.bucket)[0]


# -- building -----------------------------------------------------------------------------------


def test_first_run_encodes_everything_and_entries_equal_direct_encoding(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    vae, clip = FakeVAE(), FakeCLIP()
    report = build(ds, tmp_path / "cache", vae, clip, batch_size=2, validation_prompts=["a red car", " "])
    assert (report.latents_encoded, report.latents_reused) == (4, 0)
    assert (report.texts_encoded, report.texts_reused) == (6, 0)  # 4 captions + "" + 1 validation prompt
    assert report.buckets == {"32x64": 3, "64x48": 3, "64x64": 1}
    assert sum(vae.calls) == 4 and max(vae.calls) <= 2
    reader = CacheReader(tmp_path / "cache")
    assert len(reader) == 7
    for i, item in enumerate(ds.items):
        torch.testing.assert_close(raw_latent(reader, i), expected_latent(vae, item), rtol=0, atol=1e-6)
        cond, pooled = cached_text(reader, item.caption)
        ref = FakeCLIP().encode(item.caption)
        assert torch.equal(cond, ref.cond) and torch.equal(pooled, ref.pooled)
    assert reader.meta["latent_space"] == "sd3_scaled" and reader.meta["text_len"] == 77
    assert [p for p, _, _ in reader.validation_prompts()] == ["a red car"]
    cond, pooled = reader.empty_text()
    assert torch.equal(cond, FakeCLIP().encode("").cond) and pooled.shape == (1, 2048)
    assert "4 items (7 with repeats) in 3 bucket(s)" in report.summary()


def test_second_run_encodes_nothing_and_does_not_rehash_images(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    vae, clip = FakeVAE(), FakeCLIP()
    report = build(ds, tmp_path / "cache", vae, clip)
    assert (report.latents_encoded, report.texts_encoded, report.images_hashed) == (0, 0, 0)
    assert (report.latents_reused, report.texts_reused) == (4, 5)
    assert vae.calls == [] and clip.calls == []


def test_one_caption_changed_encodes_one_text_and_no_latent(tmp_path, photos):
    build(make_dataset(tmp_path / "ds", photos), tmp_path / "cache", FakeVAE(), FakeCLIP())
    ds = make_dataset(tmp_path / "ds", photos, coffee="a cup of coffee on a saucer")
    vae, clip = FakeVAE(), FakeCLIP()
    report = build(ds, tmp_path / "cache", vae, clip)
    assert (report.texts_encoded, report.latents_encoded) == (1, 0)
    assert clip.calls == ["a cup of coffee on a saucer"]
    assert report.stale_removed == 1  # the old coffee caption
    reader = CacheReader(tmp_path / "cache")
    assert torch.equal(cached_text(reader, "a cup of coffee on a saucer")[0], FakeCLIP().encode(clip.calls[0]).cond)
    with pytest.raises(KeyError):
        cached_text(reader, "a photo of coffee")


def test_vae_swap_reencodes_all_latents_no_texts_and_collects_old_shards(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    vae_b, clip = FakeVAE("vae-b"), FakeCLIP()
    report = build(ds, tmp_path / "cache", vae_b, clip)
    assert (report.latents_encoded, report.texts_encoded) == (4, 0)
    assert report.stale_removed == 4
    assert sorted(p.name for p in (tmp_path / "cache" / "latents").iterdir()) == ["vae-b"]
    reader = CacheReader(tmp_path / "cache")
    torch.testing.assert_close(raw_latent(reader, 0), expected_latent(vae_b, ds.items[0]), rtol=0, atol=1e-6)


def test_flip_caches_mirrored_latents_too(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    vae = FakeVAE()
    report = build(ds, tmp_path / "cache", vae, FakeCLIP(), flip=True)
    assert report.latents_encoded == 8
    reader = CacheReader(tmp_path / "cache")
    flipped = raw_latent(reader, 3, flipped=True)
    torch.testing.assert_close(flipped, expected_latent(vae, ds.items[3], flip=True), rtol=0, atol=1e-6)
    assert not torch.allclose(flipped, raw_latent(reader, 3))
    seen = {k for epoch in range(8) for b in reader.batches(1, seed=0, epoch=epoch) for k in b.keys}
    assert seen == {e["latent"] for e in reader.items} | {e["latent_flip"] for e in reader.items}


def test_truncated_shard_is_detected_and_repaired(tmp_path, photos, caplog):
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    shard = next((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cache shard is .* bytes, the index says"):
        CacheReader(tmp_path / "cache")
    vae = FakeVAE()
    with caplog.at_level(logging.WARNING):
        report = build(ds, tmp_path / "cache", vae, FakeCLIP())
    assert "damaged" in caplog.text and shard.name in caplog.text
    assert report.latents_encoded == sum(1 for i in ds.items if f"{i.bucket[0]}x{i.bucket[1]}" == shard.parent.name)
    assert report.repaired and "repaired 1 damaged shard" in report.summary()
    assert_cache_holds(tmp_path / "cache", ds, vae)


def test_same_size_corruption_is_caught_by_the_hash(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    shard = next((tmp_path / "cache" / "texts").rglob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="content hash does not match"):
        verify(CacheReader(tmp_path / "cache"), deep=True)
    report = build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    assert report.texts_encoded == 5 and report.latents_encoded == 0
    verify(CacheReader(tmp_path / "cache"), ds, deep=True)


def test_cancel_midway_keeps_whole_shards_and_next_run_completes(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)

    class Cancelled(Exception):
        pass

    def cancel_after_texts(done: int, total: int) -> None:
        if done == 8:  # 5 texts, rocket (32x64), then coffee + chelsea (64x48): cancelled mid-bucket
            raise Cancelled

    with pytest.raises(Cancelled):
        build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP(), batch_size=2, progress=cancel_after_texts)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["complete"] is False and len(index["texts"]) == 5 and len(index["latents"]) == 3
    with pytest.raises(ValueError, match="incomplete"):
        CacheReader(tmp_path / "cache")
    vae, clip = FakeVAE(), FakeCLIP()
    report = build(ds, tmp_path / "cache", vae, clip, batch_size=2)
    assert (report.texts_encoded, report.latents_encoded, report.latents_reused) == (0, 1, 3)
    assert_cache_holds(tmp_path / "cache", ds, vae)


def test_shards_written_by_a_killed_run_without_index_are_adopted(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    (tmp_path / "cache" / "index.json").unlink()
    (tmp_path / "cache" / "latents" / ".leftover.safetensors.x.tmp").write_bytes(b"half")
    vae, clip = FakeVAE(), FakeCLIP()
    report = build(ds, tmp_path / "cache", vae, clip)
    assert (report.latents_encoded, report.texts_encoded) == (0, 0)
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    verify(CacheReader(tmp_path / "cache"), ds, deep=True)


def test_sigkill_of_a_worker_mid_run_then_rerun_is_complete_and_correct(tmp_path, photos):
    """A separate process builds with a slow encoder and is SIGKILLed once its first shard exists."""
    ds = make_dataset(tmp_path / "ds", photos)
    ds.write_jsonl(tmp_path / "ds.jsonl")
    script = f"""
import sys, threading
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from dataset.images import render_item
from dataset.manifest import Dataset
from training.cache import build_cache, LatentEncoder, TextEncoder, TextEncoding
from tests.unit.test_cache_library import FakeVAE, FakeCLIP
vae = FakeVAE()
def slow(px, bucket):
    if bucket != (32, 64):
        threading.Event().wait()  # until SIGKILL
    return vae.encode(px, bucket)
ds = Dataset.read_jsonl({str(tmp_path / "ds.jsonl")!r})
build_cache(ds, {str(tmp_path / "cache")!r}, LatentEncoder("vae-a", slow, 16), FakeCLIP().encoder(),
            render=render_item, batch_size=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = 120.0
        start = time.monotonic()
        while not list((tmp_path / "cache" / "latents").rglob("*.safetensors")):
            assert proc.poll() is None, "worker exited before writing a shard"
            assert time.monotonic() - start < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9
    with pytest.raises(ValueError, match="incomplete"):
        CacheReader(tmp_path / "cache")
    vae = FakeVAE()
    report = build(ds, tmp_path / "cache", vae, FakeCLIP())
    assert report.latents_reused == 1 and report.latents_encoded == 3 and report.texts_encoded == 0
    assert_cache_holds(tmp_path / "cache", ds, vae)


def _refuse_writes_under(monkeypatch, folder: Path, code: int) -> None:
    """The kernel's answer for a read-only or forbidden folder, at the system calls that create files or folders
    (chmod and chattr cannot make a folder read-only for root without special capabilities, so this always runs)."""
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return Path(path).resolve() == folder.resolve() or folder.resolve() in Path(path).resolve().parents

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EROFS, "the file system is read-only"),
        (errno.EACCES, "permission denied .*read-only for this user"),
        (errno.EPERM, "operation not permitted .*read-only or immutable"),
    ],
)
def test_read_only_cache_folder_gives_a_clear_error(tmp_path, photos, monkeypatch, code, reason):
    ds = make_dataset(tmp_path / "ds", photos)
    cache = tmp_path / "cache"
    cache.mkdir()
    _refuse_writes_under(monkeypatch, cache, code)
    with pytest.raises(CacheWriteError, match=rf"cannot write the cache at .*cache: {reason}"):
        build(ds, cache, FakeVAE(), FakeCLIP())
    monkeypatch.undo()
    assert list(cache.iterdir()) == []
    build(ds, cache, FakeVAE(), FakeCLIP())  # writable again: the same call succeeds
    verify(CacheReader(cache), ds, deep=True)


def test_disk_full_while_writing_leaves_the_previous_index_intact(tmp_path, photos, monkeypatch):
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    before = (tmp_path / "cache" / "index.json").read_bytes()
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith(".safetensors") or str(dst).endswith("index.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    changed = make_dataset(tmp_path / "ds", photos, rocket="a rocket on the launch pad")
    with pytest.raises(CacheWriteError, match="the disk is full"):
        build(changed, tmp_path / "cache", FakeVAE(), FakeCLIP())
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "cache" / "index.json").read_bytes() == before
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    verify(CacheReader(tmp_path / "cache"), ds, deep=True)


# -- bad input --------------------------------------------------------------------------------------


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dataset is empty"):
        build(Dataset(()), tmp_path / "cache", FakeVAE(), FakeCLIP())


def test_vanished_images_are_named(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    Path(ds.items[1].source).unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) of the dataset no longer exist \(first: .*coffee.png\)"):
        build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    assert not (tmp_path / "cache" / "index.json").exists()


def test_four_channel_vae_is_refused(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    with pytest.raises(ValueError, match="4-channel latents, but SD3/SD3.5 needs a 16-channel VAE"):
        build(ds, tmp_path / "cache", FakeVAE(channels=4), FakeCLIP())


def test_missing_or_misaligned_bucket_names_the_item(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    bad = ds.with_items([ds.items[0].with_(bucket=None), *ds.items[1:]])
    with pytest.raises(ValueError, match="astronaut.png: item has no bucket"):
        build(bad, tmp_path / "cache", FakeVAE(), FakeCLIP())
    bad = ds.with_items([ds.items[0].with_(bucket=(72, 64)), *ds.items[1:]])
    with pytest.raises(ValueError, match="astronaut.png: bucket 72x64 must be positive multiples of 16"):
        build(bad, tmp_path / "cache", FakeVAE(), FakeCLIP())


def test_non_sd3_text_encoder_is_refused(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)

    def sd1(text: str) -> TextEncoding:
        return TextEncoding(torch.zeros(1, 77, 768), torch.zeros(1, 768))

    with pytest.raises(ValueError, match=r"cond \(1, 77, 768\).*Load SD3 text encoders"):
        build_cache(ds, tmp_path / "cache", FakeVAE().encoder(), TextEncoder("sd1", sd1), render=render_item)


def test_long_caption_truncation_is_stated(tmp_path, photos):
    long = "a very long caption " * 30
    ds = make_dataset(tmp_path / "ds", photos, chelsea=long)
    report = build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    assert "1 caption(s) longer than 77 tokens were truncated" in report.summary()
    assert [e["truncated"] for e in CacheReader(tmp_path / "cache").items] == [False, False, True, False]
    report = build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())  # still stated when reused
    assert report.texts_encoded == 0 and len(report.truncated) == 1


def test_t5_length_conditioning_passes_through(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP("te-t5", length=154))
    reader = CacheReader(tmp_path / "cache")
    assert reader.meta["text_len"] == 154
    batch = next(reader.batches(2, seed=0, epoch=0))
    assert batch.cond.shape == (2, 154, 4096) and batch.pooled.shape == (2, 2048)


# -- keys, identities, tokens, fingerprint -------------------------------------------------------------


def test_state_dict_identity_tracks_weights_dtype_and_extras():
    torch.manual_seed(0)
    a = torch.nn.Linear(300, 200).state_dict()
    same = {k: v.clone() for k, v in a.items()}
    tweaked = {k: v.clone() for k, v in a.items()}
    tweaked["weight"] += 1e-3
    assert state_dict_identity(a) == state_dict_identity(same)
    assert state_dict_identity(a) != state_dict_identity(tweaked)
    assert state_dict_identity(a) != state_dict_identity({k: v.half() for k, v in a.items()})
    assert state_dict_identity(a) != state_dict_identity(a, "layer=-2")


def test_truncate_tokens_keeps_first_chunk_and_end_token():
    clip = [[(49406, 1.0)] + [(7, 1.0)] * 75 + [(49407, 1.0)], [(49406, 1.0), (8, 1.0), (49407, 1.0)]]
    t5 = [[(5, 1.0)] * 100 + [(1, 1.0)]]
    out, cut = truncate_tokens({"l": clip, "t5xxl": t5}, 77)
    assert cut and out["l"] == [clip[0]] and len(out["t5xxl"][0]) == 77 and out["t5xxl"][0][-1] == (1, 1.0)
    short = {"l": [clip[0]], "t5xxl": [[(5, 1.0), (1, 1.0)] + [(0, 1.0)] * 75]}
    assert truncate_tokens(short, 77) == (short, False)


def test_fingerprint_changes_when_a_source_image_changes(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    cache = tmp_path / "cache"
    never_built = cache_fingerprint(cache)  # new on every call: a cache deleted after a build is rebuilt
    assert never_built.startswith("no-index") and cache_fingerprint(cache) != never_built
    build(ds, cache, FakeVAE(), FakeCLIP())
    first = cache_fingerprint(cache)
    assert cache_fingerprint(cache) == first
    src = Path(ds.items[2].source)
    Image.open(src).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(src)
    assert cache_fingerprint(cache) != first
    report = build(ds, cache, FakeVAE(), FakeCLIP())
    assert (report.latents_encoded, report.images_hashed) == (1, 1)


# -- the loader --------------------------------------------------------------------------------------


@pytest.fixture
def reader(tmp_path, photos) -> CacheReader:
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    return CacheReader(tmp_path / "cache")


def test_batches_are_single_bucket_honour_repeats_and_are_scaled_once(reader):
    seen: dict[str, int] = {}
    for batch in reader.batches(2, seed=3, epoch=0, drop_last=False):
        assert len({tuple(lat.shape) for lat in batch.latents}) == 1
        for key, lat in zip(batch.keys, batch.latents, strict=True):
            seen[key] = seen.get(key, 0) + 1
            i = next(n for n, e in enumerate(reader.items) if e["latent"] == key)
            torch.testing.assert_close(lat, (raw_latent(reader, i) - SD3_SHIFT_FACTOR) * SD3_SCALE_FACTOR)
        assert batch.cond.shape == (len(batch.keys), 77, 4096) and batch.pooled.shape == (len(batch.keys), 2048)
        assert batch.captions == [next(e["caption"] for e in reader.items if e["latent"] == k) for k in batch.keys]
    assert seen == {e["latent"]: e["repeats"] for e in reader.items}


def test_batches_depend_only_on_seed_and_epoch(reader):
    def order(seed: int, epoch: int) -> list[list[str]]:
        return [b.keys for b in reader.batches(1, seed=seed, epoch=epoch)]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) or order(1, 0) != order(2, 0)
    assert sorted(map(tuple, order(1, 0))) == sorted(map(tuple, order(1, 1)))


def test_drop_last_drops_partial_batches_per_bucket(reader):
    # buckets hold 1 (64x64), 3 (64x48: coffee x2 + chelsea) and 3 (32x64: rocket x3) samples
    assert [len(b.keys) for b in reader.batches(2, seed=0, epoch=0)] == [2, 2]
    assert sorted(len(b.keys) for b in reader.batches(2, seed=0, epoch=0, drop_last=False)) == [1, 1, 1, 2, 2]


def test_verify_names_stale_items(tmp_path, photos, reader):
    ds = make_dataset(tmp_path / "ds", photos)
    verify(reader, ds)
    changed = make_dataset(tmp_path / "ds", photos, astronaut="an astronaut")
    with pytest.raises(ValueError, match="astronaut.png: caption changed.*Run the cache node again"):
        verify(reader, changed)
    Image.new("RGB", (160, 120), "red").save(ds.items[1].source)
    with pytest.raises(ValueError, match="coffee.png: image changed on disk"):
        verify(reader, ds)
    Path(ds.items[3].source).unlink()
    with pytest.raises(ValueError, match="rocket.png: image vanished"):
        verify(reader, ds)


# -- token shuffle variants ----------------------------------------------------------------------------


def test_shuffled_captions_keep_the_first_parts_and_are_deterministic():
    from training.cache.plan import shuffled_captions

    caption = "ohwx person, red coat, snow, mountains, smiling"
    variants = shuffled_captions(caption, 4, keep_first=1)
    assert len(variants) == 4 and len(set(variants)) == 4 and caption not in variants
    for v in variants:
        parts = v.split(", ")
        assert parts[0] == "ohwx person" and sorted(parts[1:]) == sorted(caption.split(", ")[1:])
    assert shuffled_captions(caption, 4, keep_first=1) == variants
    assert shuffled_captions("just one part", 3, keep_first=0) == []
    assert shuffled_captions("a, b", 5, keep_first=0) == ["b, a"]


def test_caption_variants_are_cached_and_picked_per_sample(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos, coffee="coffee, cup, saucer, table, morning light")
    clip = FakeCLIP()
    report = build(ds, tmp_path / "cache", FakeVAE(), clip, shuffle_variants=3, keep_first=1)
    # 4 captions + "" + 3 variants of the coffee caption (the others have a single part)
    assert report.texts_encoded == 8
    reader = CacheReader(tmp_path / "cache")
    verify(reader, ds)
    coffee = next(e for e in reader.items if e["caption"].startswith("coffee"))
    assert len(coffee["variants"]) == 3 and reader.meta["shuffle_variants"] == 3
    seen = set()
    for epoch in range(12):
        for batch in reader.batches(1, seed=5, epoch=epoch):
            if batch.captions[0].startswith("coffee"):
                seen.add(batch.captions[0])
                torch.testing.assert_close(batch.cond, FakeCLIP().encode(batch.captions[0]).cond)
    assert seen == {coffee["caption"], *(v for v, _ in coffee["variants"])}
    again = build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP(), shuffle_variants=3, keep_first=1)
    assert again.texts_encoded == 0
    off = build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    assert off.texts_encoded == 0 and off.stale_removed == 3


def test_pixels_are_rendered_one_batch_at_a_time(tmp_path, photos):
    """Never the whole dataset's pixels in memory: renders and encodes interleave, batch by batch."""
    ds = make_dataset(tmp_path / "ds", photos)
    events: list[str] = []
    vae = FakeVAE()

    def render(item: DatasetItem) -> Image.Image:
        events.append("render")
        return render_item(item)

    def encode(pixels: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
        events.append(f"encode{pixels.shape[0]}")
        return vae.encode(pixels, bucket)

    build_cache(
        ds, tmp_path / "cache", LatentEncoder("vae-a", encode, 16), FakeCLIP().encoder(), render=render, batch_size=1
    )
    assert events == ["render", "encode1"] * 4


def test_non_finite_encodings_are_refused_and_not_cached(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)

    def nan_text(text: str) -> TextEncoding:
        return TextEncoding(torch.full((1, 154, 4096), float("nan")), torch.zeros(1, 2048))

    with pytest.raises(ValueError, match="produced NaN or infinite values for the caption 'a photo of astronaut'"):
        build_cache(ds, tmp_path / "cache", FakeVAE().encoder(), TextEncoder("bad", nan_text), render=render_item)

    def inf_latents(pixels: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
        return FakeVAE().encode(pixels, bucket) / 0.0

    with pytest.raises(ValueError, match=r"rocket.png: .* produced NaN or infinite latents"):
        build_cache(
            ds, tmp_path / "cache", LatentEncoder("inf", inf_latents, 16), FakeCLIP().encoder(), render=render_item
        )
    assert not json.loads((tmp_path / "cache" / "index.json").read_text())["latents"]


def test_deleted_shard_is_reported_and_reencoded(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    shard = next((tmp_path / "cache" / "texts").rglob("*.safetensors"))
    shard.unlink()
    with pytest.raises(ValueError, match="cache shard is missing"):
        CacheReader(tmp_path / "cache")
    clip = FakeCLIP()
    report = build(ds, tmp_path / "cache", FakeVAE(), clip)
    assert report.texts_encoded == 5 and report.latents_encoded == 0
    assert f"{shard.name} (is missing)" in report.summary()
    verify(CacheReader(tmp_path / "cache"), ds, deep=True)


def test_duplicate_shards_from_an_interrupted_run_are_collected(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    cache = tmp_path / "cache"
    build(ds, cache, FakeVAE(), FakeCLIP())
    index = json.loads((cache / "index.json").read_text())
    text_shard = next(rel for rel, rec in index["shards"].items() if rec["kind"] == "text")
    copy = cache / text_shard.replace(".safetensors", "-copy.safetensors")  # as if written twice by two runs
    copy.write_bytes((cache / text_shard).read_bytes())
    report = build(ds, cache, FakeVAE(), FakeCLIP())
    assert report.texts_encoded == 0
    assert len(list((cache / "texts").rglob("*.safetensors"))) == 1
    verify(CacheReader(cache), ds, deep=True)


def test_cache_files_are_readable_by_other_users(tmp_path, photos):
    import stat

    build(make_dataset(tmp_path / "ds", photos), tmp_path / "cache", FakeVAE(), FakeCLIP())
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".sd35-tuner.lock"]
    assert len(files) >= 4 and {p.suffix for p in files} == {".json", ".safetensors"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def test_small_shards_never_split_an_entry(tmp_path, photos):
    """Every flush boundary (one entry per shard here) keeps a text's cond and pooled together."""
    ds = make_dataset(tmp_path / "ds", photos)
    vae = FakeVAE()
    report = build(ds, tmp_path / "cache", vae, FakeCLIP(), shard_bytes=1)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert len(index["shards"]) == report.latents_encoded + report.texts_encoded == 4 + 5
    assert_cache_holds(tmp_path / "cache", ds, vae)


def test_an_unchanged_cache_is_not_rewritten(tmp_path, photos):
    ds = make_dataset(tmp_path / "ds", photos)
    build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    index = tmp_path / "cache" / "index.json"
    before = (index.stat().st_ino, index.stat().st_mtime_ns)
    report = build(ds, tmp_path / "cache", FakeVAE(), FakeCLIP())
    assert (report.latents_encoded, report.texts_encoded, report.stale_removed) == (0, 0, 0)
    assert (index.stat().st_ino, index.stat().st_mtime_ns) == before
    build(make_dataset(tmp_path / "ds", photos, coffee="another caption"), tmp_path / "cache", FakeVAE(), FakeCLIP())
    assert (index.stat().st_ino, index.stat().st_mtime_ns) != before
