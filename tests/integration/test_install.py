"""The pack installed the way users install it, into a fresh ComfyUI, which then lists every node.

ComfyUI-Manager (the ``comfyui-manager`` pip package; ComfyUI 0.33 pins it in manager_requirements.txt)
installs by URL with ``cm-cli install <git url>``: a git clone into custom_nodes/, then a pip install of
each line of the pack's requirements.txt. The URL is a dumb-HTTP git server on 127.0.0.1 serving a bare
clone of this repository (``git update-server-info``): nothing leaves the machine. The Registry path:
``comfy node pack`` (comfy-cli) builds the archive the Registry serves, honouring ``.comfyignore``;
installing it is unpacking it into custom_nodes/ and installing requirements.txt, as the Manager does.
Both install what is committed (HEAD). Each test starts its own server on a copy of the ComfyUI in use.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.comfy_server import PACK_DIR_NAME, ComfyServer

REPO = Path(__file__).resolve().parents[2]
LEFT_OUT = ("tests/", "bench/", "tools/", "scripts/")


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def fresh_comfyui(tmp: Path, server_home: Path) -> ComfyServer:
    """A fresh ComfyUI install: a copy of the tested ComfyUI's source (its own custom_nodes/, user/...), same venv."""
    home = tmp / "fresh"
    shutil.copytree(server_home / "comfyui", home / "comfyui", ignore=shutil.ignore_patterns("__pycache__", "user"))
    for shared in ("venv", "stubs"):
        if (server_home / shared).exists():
            (home / shared).symlink_to(server_home / shared)
    return ComfyServer(home / "comfyui", home=home, link_pack=False)


def our_nodes(server: ComfyServer) -> set[str]:
    return {node for node in server.object_info() if node.startswith("SD35Tuner")}


def has_manager_option(server: ComfyServer) -> bool:
    """Whether this ComfyUI runs the pip ComfyUI-Manager itself (``--enable-manager``; 0.3.x had no such option)."""
    return "--enable-manager" in (server.comfyui / "comfy" / "cli_args.py").read_text()


def assert_lists_every_node(server: ComfyServer, expected: set[str]) -> dict | None:
    """Start ``server``; its pack imports and it lists every node. Returns the Manager's installed list, if on."""
    with server:
        pack = str(server.base_dir / "custom_nodes" / PACK_DIR_NAME)
        failed = server.import_times().get(pack, (None, True))[1]
        assert not failed, f"ComfyUI did not import {pack}:\n{server.log()[-4000:]}"
        assert our_nodes(server) == expected
        return (
            server.get("/v2/customnode/installed?mode=imported") if "--enable-manager" in server.extra_args else None
        )


@pytest.fixture(scope="module")
def expected_nodes(comfy) -> set[str]:
    nodes = our_nodes(comfy)
    assert len(nodes) >= 12
    return nodes


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def git_url(tmp_path) -> Iterator[str]:
    """This repository's HEAD as a user would reach it: a git URL, here a dumb-HTTP server on 127.0.0.1."""
    served = tmp_path / "served"
    bare = served / f"{PACK_DIR_NAME}.git"
    _git("clone", "--quiet", "--bare", str(REPO), str(bare))
    _git("update-server-info", cwd=bare)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/{bare.name}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_comfyui_manager_installs_the_pack_from_its_git_url(comfy, tmp_path, git_url, expected_nodes):
    server = fresh_comfyui(tmp_path, comfy.home)
    env = {**os.environ, "COMFYUI_PATH": str(server.comfyui), "PYTHONUNBUFFERED": "1"}
    python = server.home / "venv" / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "cm_cli", "install", git_url],
        cwd=server.comfyui,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    said = result.stdout + result.stderr
    assert result.returncode == 0 and "[INSTALLED]" in said, said[-6000:]
    installed = server.comfyui / "custom_nodes" / PACK_DIR_NAME
    assert _git("rev-parse", "HEAD", cwd=installed) == _git("rev-parse", "HEAD")  # Manager's git clone
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):  # Manager's install step: pip, line by line
            assert f"'pip', 'install', '{line.strip()}'" in said.replace("\n", " "), said[-6000:]
    if has_manager_option(server):  # as users run it: the Manager inside ComfyUI (offline it logs failed fetches)
        server.extra_args = ("--enable-manager",)
        installed = assert_lists_every_node(server, expected_nodes)
        assert PACK_DIR_NAME in json.dumps(installed), installed
    else:
        assert_lists_every_node(server, expected_nodes)


def test_registry_archive_leaves_out_development_files_and_installs(comfy, tmp_path, expected_nodes):
    source = tmp_path / "source"
    _git("clone", "--quiet", str(REPO), str(source))
    comfy_cli = shutil.which("comfy", path=str(Path(sys.executable).parent))
    assert comfy_cli, "comfy-cli is part of requirements-dev.txt"
    packed = subprocess.run(
        [comfy_cli, "--skip-prompt", "--no-enable-telemetry", "node", "pack"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert packed.returncode == 0 and (source / "node.zip").is_file(), packed.stdout + packed.stderr
    with zipfile.ZipFile(source / "node.zip") as archive:
        names = set(archive.namelist())
        tracked = set(_git("ls-files", cwd=source).splitlines())
        assert not [n for n in names if n.startswith(LEFT_OUT)]
        shipped = {f for f in tracked if f.startswith(("nodes/", "apg/", "dataset/", "training/", "web/"))}
        assert shipped and shipped <= names
        workflows = {f for f in tracked if f.startswith(("example_workflows/", "workflows/"))}
        assert workflows and workflows <= names  # every bundled workflow (and thumbnail) ships
        assert {"__init__.py", "pyproject.toml", "requirements.txt", "LICENSE"} <= names
        server = fresh_comfyui(tmp_path, comfy.home)
        target = server.comfyui / "custom_nodes" / PACK_DIR_NAME
        archive.extractall(target)
    pip = subprocess.run(
        [
            str(server.home / "venv" / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "-r",
            str(target / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert_lists_every_node(server, expected_nodes)
