"""The latent cache against crafted, damaged and contended folders (issue 11, cases 1-4), library side.

Each test is written from the attacker's or the unlucky user's side: craft the index, plant a link,
delete the folder, flip bytes with size and mtime kept, start a second builder. Each asserts that
nothing outside the cache folder changed (every file of the neighbourhood hashed before and after),
that the message names the entry or file, and that a later good run succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cache_checks import neighbourhood, raw_latent, verify
from tests.unit.test_cache_library import FakeCLIP, FakeVAE, build, expected_latent, make_dataset, photos  # noqa: F401
from training import folder_lock
from training.cache import CacheReader, cache_fingerprint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def built(tmp_path, photos):  # noqa: F811
    """A dataset, its built cache, and a victim file and folder beside the cache."""
    ds = make_dataset(tmp_path / "ds", photos)
    cache = tmp_path / "out" / "cache"
    build(ds, cache, FakeVAE(), FakeCLIP())
    (tmp_path / "victim.safetensors").write_bytes(b"precious")
    (tmp_path / "victim_dir" / "64x64").mkdir(parents=True)
    (tmp_path / "victim_dir" / "64x64" / "v.safetensors").write_bytes(b"also precious")
    return ds, cache


def _edit_index(cache: Path, edit) -> None:
    index = json.loads((cache / "index.json").read_text())
    edit(index)
    (cache / "index.json").write_text(json.dumps(index))


def _plant_entry(rel: str):
    def edit(index: dict) -> None:
        index["shards"][rel] = {"bytes": 8, "kind": "latent", "identity": "vae-a"}
        index["latents"]["planted"] = rel

    return edit


CRAFTED = {
    "dotdot": "../../victim.safetensors",
    "absolute": "{tmp}/victim.safetensors",
    "layout_dotdot": "latents/../../../victim.safetensors",
    "backslashes": "latents\\..\\..\\..\\victim.safetensors",
    "inside_not_a_shard": "index.json",
    "layout_with_dotdot": "texts/../victim.safetensors",
}


def named(rel: str, text: str) -> bool:
    return repr(rel) in text or f"'{rel}'" in text


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_index_entries_are_refused_by_name_and_nothing_outside_changes(tmp_path, built, case):
    ds, cache = built
    rel = CRAFTED[case].format(tmp=tmp_path)
    _edit_index(cache, _plant_entry(rel))
    before = neighbourhood(tmp_path, cache)
    with pytest.raises(ValueError, match=r"shard entry .*Nothing was read") as refused:
        CacheReader(cache)
    assert named(rel, str(refused.value))
    report = build(ds, cache, FakeVAE(), FakeCLIP())
    assert neighbourhood(tmp_path, cache) == before
    assert "refused 1 index entry (left untouched)" in report.summary() and named(rel, report.summary())
    assert report.latents_encoded == 0 and report.texts_encoded == 0
    reader = CacheReader(cache)  # the later good run
    verify(reader, ds, deep=True)
    assert rel not in reader.shards


def test_a_planted_directory_link_inside_the_cache_is_never_followed_or_deleted(tmp_path, built):
    ds, cache = built
    (cache / "latents" / "evil").symlink_to(tmp_path / "victim_dir", target_is_directory=True)
    _edit_index(cache, _plant_entry("latents/evil/64x64/v.safetensors"))
    before = neighbourhood(tmp_path, cache)
    with pytest.raises(ValueError, match=r"'latents/evil/64x64/v.safetensors' resolves to .*victim_dir.*, outside"):
        CacheReader(cache)
    report = build(ds, cache, FakeVAE(), FakeCLIP())
    assert neighbourhood(tmp_path, cache) == before
    assert "latents/evil/64x64/v.safetensors" in report.summary()
    verify(CacheReader(cache), ds, deep=True)


def test_a_planted_file_link_as_a_shard_is_refused(tmp_path, built):
    ds, cache = built
    rel = next(iter(json.loads((cache / "index.json").read_text())["shards"]))
    link = cache / Path(rel).parent / "0123456789abcdef.safetensors"
    link.symlink_to(cache / rel)  # inside the folder, but a link: refused rather than trusted
    outside = cache / Path(rel).parent / "fedcba9876543210.safetensors"
    outside.symlink_to(tmp_path / "victim.safetensors")
    before = neighbourhood(tmp_path, cache)
    report = build(ds, cache, FakeVAE(), FakeCLIP())
    assert neighbourhood(tmp_path, cache) == before
    assert "is a symbolic link" in report.summary() and "fedcba9876543210" in "\n".join(report.refused)
    assert (cache / rel).is_file()  # the real shard the first link pointed at is still there and used
    verify(CacheReader(cache), ds, deep=True)


def test_malformed_index_records_are_refused_naming_the_item(tmp_path, built):
    ds, cache = built

    def edit(index: dict) -> None:
        index["items"][1]["latent"] = "no-such-key"

    _edit_index(cache, edit)
    with pytest.raises(ValueError, match=r"item 1 \('.*coffee.png'\) is malformed or refers to entries"):
        CacheReader(cache)
    _edit_index(cache, lambda index: index["shards"].update({"texts/te-a/x.safetensors": "not a record"}))
    report = build(ds, cache, FakeVAE(), FakeCLIP())
    assert "texts/te-a/x.safetensors (is missing)" in report.summary()
    verify(CacheReader(cache), ds, deep=True)


# -- 2: the folder deleted after a build ---------------------------------------------------------------


def test_fingerprint_tells_never_built_from_deleted_after_build_and_sees_every_change(tmp_path, photos):  # noqa: F811
    ds = make_dataset(tmp_path / "ds", photos)
    cache = tmp_path / "cache"
    never_built = cache_fingerprint(cache)
    build(ds, cache, FakeVAE(), FakeCLIP())
    built_once = cache_fingerprint(cache)
    assert cache_fingerprint(cache) == built_once  # stable while nothing changes
    shard = next(cache.rglob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # touched, mtime kept: ctime moves
    touched = cache_fingerprint(cache)
    (cache / "index.json").unlink()
    index_gone = cache_fingerprint(cache)
    shutil.rmtree(cache)
    deleted = cache_fingerprint(cache)
    assert len({never_built, built_once, touched, index_gone, deleted}) == 5
    report = build(ds, cache, FakeVAE(), FakeCLIP())  # a later good run rebuilds it
    assert report.latents_encoded == 4
    verify(CacheReader(cache), ds, deep=True)


# -- 3: silent corruption ------------------------------------------------------------------------------


def _overwrite_tail(path: Path, data: bytes) -> None:
    """Replace the file's last bytes (the last tensor's data) in place, keeping size and mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size - len(data))
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize(
    "damage",
    [b"\xff" * 64, torch.randn(16, generator=torch.Generator().manual_seed(1)).numpy().tobytes()],
    ids=["nan_after_0xff", "finite_random_bytes"],
)
def test_flipped_shard_bytes_are_refused_by_the_reader_and_reencoded_by_the_builder(tmp_path, built, damage):
    ds, cache = built
    shard = next((cache / "latents").rglob("*.safetensors"))
    _overwrite_tail(shard, damage)
    before = neighbourhood(tmp_path, cache)
    with pytest.raises(ValueError, match=rf"{shard.name}: content hash does not match .* first: .*\.png"):
        CacheReader(cache)
    vae = FakeVAE()
    report = build(ds, cache, vae, FakeCLIP())
    assert neighbourhood(tmp_path, cache) == before
    assert "repaired 1 damaged shard" in report.summary() and "content hash does not match" in report.summary()
    assert report.latents_encoded >= 1 and report.texts_encoded == 0
    reader = CacheReader(cache)
    for i, item in enumerate(ds.items):
        torch.testing.assert_close(raw_latent(reader, i), expected_latent(vae, item), rtol=0, atol=1e-6)
    assert all(torch.isfinite(b.latents).all() for b in reader.batches(1, seed=0, epoch=0))


def test_a_damaged_shard_without_index_is_not_adopted(tmp_path, built):
    ds, cache = built
    (cache / "index.json").unlink()
    shard = next((cache / "texts").rglob("*.safetensors"))
    _overwrite_tail(shard, b"\x00" * 32)
    report = build(ds, cache, FakeVAE(), FakeCLIP())
    assert report.texts_encoded == 5 and "content hash does not match" in report.summary()
    verify(CacheReader(cache), ds, deep=True)


def test_a_touched_but_intact_shard_is_rehashed_and_accepted(tmp_path, built):
    ds, cache = built
    shard = next((cache / "texts").rglob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    verify(CacheReader(cache), ds)  # re-hashed (identity changed), content intact: accepted
    report = build(ds, cache, FakeVAE(), FakeCLIP())
    assert (report.texts_encoded, report.latents_encoded, report.repaired) == (0, 0, [])


# -- 4: two builders of one cache ----------------------------------------------------------------------

_SLOW_BUILDER = """
import sys, threading
sys.path.insert(0, {repo!r})
from dataset.images import render_item
from dataset.manifest import Dataset
from training.cache import build_cache, LatentEncoder
from tests.unit.test_cache_library import FakeVAE, FakeCLIP
vae = FakeVAE()
def slow(px, bucket):
    threading.Event().wait()  # until killed
ds = Dataset.read_jsonl({manifest!r})
build_cache(ds, {cache!r}, LatentEncoder("vae-b", slow, 16), FakeCLIP().encoder(), render=render_item)
"""


def test_a_second_builder_is_refused_naming_the_first_and_a_killed_one_leaves_no_stale_lock(
    tmp_path,
    built,
    caplog,
):
    ds, cache = built
    ds.write_jsonl(tmp_path / "ds.jsonl")
    index_before = (cache / "index.json").read_bytes()
    script = _SLOW_BUILDER.format(repo=str(REPO), manifest=str(tmp_path / "ds.jsonl"), cache=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        start = time.monotonic()
        while f'"pid": {proc.pid}' not in (cache / folder_lock.LOCK_NAME).read_text():
            assert proc.poll() is None and time.monotonic() - start < 120, "the first builder never took the lock"
            time.sleep(0.05)
        with pytest.raises(
            folder_lock.FolderInUseError, match=rf"{cache} is in use by process {proc.pid} on host .*cache b"
        ):
            build(ds, cache, FakeVAE(), FakeCLIP())
        assert (cache / "index.json").read_bytes() == index_before  # the refused builder wrote nothing
    finally:
        proc.kill()
        proc.wait()
    with caplog.at_level(logging.WARNING):
        report = build(ds, cache, FakeVAE(), FakeCLIP())  # the killed builder's lock is recovered
    assert f"left by process {proc.pid} " in caplog.text
    assert report.latents_encoded == 0 and report.texts_encoded == 0
    verify(CacheReader(cache), ds, deep=True)
