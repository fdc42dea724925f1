"""Test groups by folder: tests/unit (no ComfyUI), tests/integration (real server), tests/browser (real frontend)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


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
