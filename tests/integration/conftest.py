from __future__ import annotations

import pytest

from tools.comfy_server import ComfyServer


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    """One real ComfyUI server (CPU, 127.0.0.1, own base dir, pack + tiny models linked) for the session."""
    server = ComfyServer(tmp_path_factory.mktemp("comfy"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
