"""training/fs.py: atomic writes (files, folders), stale-temp cleanup, confinement, hashing, the folder lock."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from training import folder_lock, fs

REPO = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _child(code: str) -> subprocess.Popen[str]:
    """A Python child that runs ``code`` with the repo importable, prints 'ready' and then sleeps."""
    body = textwrap.dedent(code) + "\nprint('ready', flush=True)\nimport time\ntime.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", body], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_atomic_writes_replace_the_target_whole_with_mode_0644_and_leave_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    fs.atomic_write_bytes(target, b"one")
    fs.atomic_write_bytes(target, b"two")
    fs.atomic_write_text(tmp_path / "t.txt", "héllo")
    fs.atomic_write_json(tmp_path / "j.json", {"a": [1, "é"]})
    fs.atomic_save_safetensors(tmp_path / "w.safetensors", {"w": torch.arange(4.0)}, {"k": "v"})
    assert target.read_bytes() == b"two"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "j.json").read_text(encoding="utf-8")) == {"a": [1, "é"]}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert torch.equal(f.get_tensor("w"), torch.arange(4.0))
    for p in (target, tmp_path / "t.txt", tmp_path / "j.json", tmp_path / "w.safetensors"):
        assert _mode(p) == 0o644
    assert _hidden(tmp_path) == [] and _hidden(target.parent) == []


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), fs.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    with pytest.raises(TypeError):
        fs.atomic_save_safetensors(target, {"w": torch.zeros(2)}, {"k": 1})  # type: ignore[dict-item]
    assert target.read_text() == "old"
    assert _hidden(tmp_path) == []


def test_temp_names_are_unique_per_call_and_carry_the_writer_pid(tmp_path: Path) -> None:
    with fs.atomic_file(tmp_path / "x") as a, fs.atomic_file(tmp_path / "x") as b:
        assert a != b and a.parent == b.parent == tmp_path
        assert a.name.startswith(f".x.{os.getpid()}.") and a.name.endswith(".tmp")
        a.write_text("a")
        b.write_text("b")
    assert (tmp_path / "x").read_text() == "a"  # the outer one finished last


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fs.atomic_save_safetensors(tmp_path / "lora.safetensors", {"w": torch.zeros(2)})
    assert events == ["fsync-file", "replace", "fsync-dir"]


def test_a_folder_is_published_whole_and_replaces_the_old_one_only_at_the_end(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint-000010"
    with fs.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "1" and _mode(target) == 0o755
    with pytest.raises(RuntimeError), fs.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("killed mid-save")
    assert (target / "a.txt").read_text() == "1"
    with fs.atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("2")
        assert (target / "a.txt").exists()  # the old one stays until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert _hidden(tmp_path) == []


def test_a_folder_is_removed_without_ever_being_seen_half_deleted(tmp_path: Path, monkeypatch) -> None:
    old = tmp_path / "checkpoint-000002"
    old.mkdir()
    (old / "a.bin").write_bytes(b"x")
    (old / "b.bin").write_bytes(b"y")

    def killed(path: Path) -> None:  # the process dies while deleting the renamed folder's files
        (path / "a.bin").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(fs, "_remove", killed)
    with pytest.raises(KeyboardInterrupt):
        fs.remove_folder(old)
    monkeypatch.undo()
    assert not old.exists() and len(_hidden(tmp_path)) == 1  # only a temp name holds the half-deleted rest
    fs.remove_stale_temps(tmp_path, locked=True)
    assert os.listdir(tmp_path) == []


def test_a_planted_symlink_at_the_target_is_replaced_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "victim"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    base = tmp_path / "runs"
    base.mkdir()
    (base / "checkpoint-000001").symlink_to(outside, target_is_directory=True)
    (base / "f.txt").symlink_to(outside / "keep.txt")
    with fs.atomic_folder(base / "checkpoint-000001") as tmp:
        (tmp / "state.json").write_text("{}")
    fs.atomic_write_text(base / "f.txt", "new")
    assert (outside / "keep.txt").read_text() == "precious" and sorted(os.listdir(outside)) == ["keep.txt"]
    assert not (base / "checkpoint-000001").is_symlink() and (base / "checkpoint-000001" / "state.json").exists()
    assert not (base / "f.txt").is_symlink() and (base / "f.txt").read_text() == "new"


def test_stale_temps_of_dead_writers_go_and_live_ones_stay(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / f".a.bin.{dead}.x1y2z3w4.tmp").write_bytes(b"half")
    (tmp_path / f".ckpt.{dead}.abcd1234.tmp").mkdir()
    (tmp_path / f".b.bin.{live}.abcd1234.tmp").write_bytes(b"in progress")
    (tmp_path / f".gone.{dead}.abcd1234.old").mkdir()  # interrupted replace, target missing: restored
    (tmp_path / "kept").mkdir()
    (tmp_path / f".kept.{dead}.abcd1234.old").mkdir()  # interrupted replace after the new one landed: removed
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f".c.{dead}.abcd1234.tmp").write_bytes(b"")
    (tmp_path / ".hidden-user-file.tmp").write_text("not ours")
    removed = fs.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [f".a.bin.{dead}.x1y2z3w4.tmp", f".ckpt.{dead}.abcd1234.tmp", f".kept.{dead}.abcd1234.old"]
    )
    assert (tmp_path / "gone").is_dir() and (tmp_path / f".b.bin.{live}.abcd1234.tmp").exists()
    assert (tmp_path / "sub" / f".c.{dead}.abcd1234.tmp").exists()  # not recursive
    assert (tmp_path / ".hidden-user-file.tmp").exists()
    fs.remove_stale_temps(tmp_path, recursive=True, locked=True)  # the caller holds the folder: every temp goes
    assert _hidden(tmp_path) == [] and os.listdir(tmp_path / "sub") == []


def test_a_writer_killed_mid_write_leaves_the_target_intact_and_its_temp_is_collected(tmp_path: Path) -> None:
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous")
    proc = _child(
        f"""
        from training import fs
        ctx = fs.atomic_file({str(target)!r})
        tmp = ctx.__enter__()
        tmp.write_bytes(b"partial")
        """
    )
    try:
        assert len(_hidden(tmp_path)) == 1
        assert fs.remove_stale_temps(tmp_path) == []  # its writer is alive
    finally:
        _kill(proc)
    assert len(fs.remove_stale_temps(tmp_path)) == 1
    assert target.read_bytes() == b"previous" and _hidden(tmp_path) == []


@pytest.mark.parametrize(
    ("rel", "message"),
    [
        ("../x", "may not contain '..'"),
        ("a/../../x", "may not contain '..'"),
        ("..\\x", "may not contain '..'"),
        ("/etc/passwd", "not absolute"),
        ("C:\\x", "not absolute"),
        ("c:evil", "not absolute"),
        ("\\\\server\\share\\x", "not absolute"),
        ("a\0b", "NUL"),
        (3, "is not a path"),
        (None, "is not a path"),
        (["a"], "is not a path"),
    ],
)
def test_resolve_inside_refuses_escapes_naming_the_entry(tmp_path: Path, rel, message: str) -> None:
    with pytest.raises(ValueError, match=f"index entry .*{message}"):
        fs.resolve_inside(tmp_path, rel, "index entry")


def test_resolve_inside_follows_links_only_while_they_stay_inside(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "real").mkdir(parents=True)
    (base / "inner").symlink_to(base / "real")
    (base / "outer").symlink_to(tmp_path)
    assert fs.resolve_inside(base, "") == base.resolve()
    assert fs.resolve_inside(base, "inner/f") == (base / "real" / "f").resolve()
    assert fs.resolve_inside(base, " sets\\one ") == (base / "sets" / "one").resolve()
    with pytest.raises(ValueError, match=r"shard 'outer/f' resolves to .*, outside"):
        fs.resolve_inside(base, "outer/f", "shard")
    assert fs.is_inside(base / "inner" / "x", [base]) and not fs.is_inside(base / "outer" / "x", [base])


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 7)
    (tmp_path / "f").write_bytes(data)
    assert fs.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_folder_lock_refuses_a_second_holder_naming_it_and_recovers_from_a_killed_one(tmp_path, caplog) -> None:
    folder = tmp_path / "cache"
    with folder_lock.folder_lock(folder, "cache build"):
        with pytest.raises(
            folder_lock.FolderInUseError, match=rf"in use by process {os.getpid()} on host .* since .*cache b"
        ):
            with folder_lock.folder_lock(folder, "cache build"):
                pass
    assert (folder / folder_lock.LOCK_NAME).read_text() == ""  # released cleanly
    proc = _child(
        f"""
        from training import folder_lock
        held = folder_lock.folder_lock({str(folder)!r}, "cache build")
        held.__enter__()
        """
    )
    try:
        with pytest.raises(folder_lock.FolderInUseError, match=f"in use by process {proc.pid} "):
            with folder_lock.folder_lock(folder, "cache build"):
                pass
    finally:
        _kill(proc)
    with caplog.at_level(logging.WARNING), folder_lock.folder_lock(folder, "cache build") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"left by process {proc.pid} " in caplog.text


def test_dataset_reaches_the_module_both_as_a_top_level_package_and_inside_the_pack() -> None:
    from dataset._fs import fs as top_level

    assert top_level is fs
    spec = importlib.util.spec_from_file_location(
        "sd35_pack_probe", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["sd35_pack_probe"] = pack
    try:
        spec.loader.exec_module(pack)
        inside = importlib.import_module("sd35_pack_probe.dataset._fs").fs
        assert inside.__name__ == "sd35_pack_probe.training.fs"
    finally:
        for name in [n for n in sys.modules if n == "sd35_pack_probe" or n.startswith("sd35_pack_probe.")]:
            del sys.modules[name]
