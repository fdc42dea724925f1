"""Test groups by folder: tests/unit (no ComfyUI), tests/integration (real server), tests/browser (real frontend).

The servers run the ComfyUI home ``SD35_TUNER_COMFY_HOME`` names (default: the env home, ComfyUI
0.3.75); ``scripts/test.sh`` runs the integration and browser groups once per ComfyUI version.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (scripts/test.sh stopping a run, a CI timeout) unwinds like Ctrl-C: fixtures stop their servers.
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_report_header(config: pytest.Config) -> str:
    from tools import paths

    try:
        version = ".".join(map(str, paths.comfyui_version()))
    except OSError:
        version = "missing (run scripts/setup_env.sh)"
    return f"ComfyUI {version} in {paths.COMFY_HOME} (SD35_TUNER_COMFY_HOME)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(HERE).parts
        if parts[0] == "integration":
            item.add_marker(pytest.mark.integration)
        elif parts[0] == "browser":
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    """One real ComfyUI server (CPU, 127.0.0.1, own base dir, pack + tiny models linked) for the session."""
    from tools.comfy_server import ComfyServer

    server = ComfyServer(tmp_path_factory.mktemp("comfy"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
