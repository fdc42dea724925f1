"""Drive ComfyUI's real frontend in Debian's headless Chromium (through Python playwright).

Never ``playwright install``: the browser is the ``chromium`` on PATH. The frontend is ready
when ``window.app && app.graph && window.LiteGraph``. First-run dialogs are pre-dismissed and
requests to the outside world are aborted (this machine has no network beyond loopback).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .comfy_server import ComfyServer

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The last one is a known frontend 1.32 bug (a TypeError in a Vue onChange handler), not ours.
EXPECTED_NOISE = ("user.css", "userdata", "api.comfy.org", "Failed to load resource", "favicon", "at onChange (")


@dataclass
class FrontendSession:
    page: Any
    server: ComfyServer
    console_errors: list[str] = field(default_factory=list)

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.console_errors if not any(noise in e for noise in EXPECTED_NOISE)]

    def load_workflow(
        self, workflow: dict[str, Any], name: str = "workflow.json", missing_models: bool = False
    ) -> list[str]:
        """Load a UI-format workflow like a user opening the file; return node types the frontend lacks.

        The frontend's missing-models warning (a dialog in 1.32, the errors panel in newer ones) stays
        quiet unless ``missing_models``: the bundled workflows name SD3.5 files this machine lacks.
        """
        return self.page.evaluate(
            """async ([wf, name, missingModels]) => {
                const quiet = {showMissingModelsDialog: missingModels, skipAssetScans: !missingModels};
                await window.app.loadGraphData(wf, true, true, name, quiet);
                return window.app.graph.nodes
                    .filter((n) => !(n.type in window.LiteGraph.registered_node_types))
                    .map((n) => n.type);
            }""",
            [workflow, name, missing_models],
        )

    def node_types(self) -> list[str]:
        return self.page.evaluate("() => window.app.graph.nodes.map((n) => n.type)")

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("Debian's chromium is not installed: run scripts/setup_env.sh")
    return path


@contextlib.contextmanager
def frontend(
    server: ComfyServer, width: int = 1400, height: int = 900, timeout_ms: int = 60_000
) -> Iterator[FrontendSession]:
    """Open the server's frontend; yield a session whose ``page`` is the live app."""
    from playwright.sync_api import sync_playwright

    server.post("/settings", {"Comfy.TutorialCompleted": True})
    with tempfile.TemporaryDirectory(prefix="sd35-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=chromium_path(),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": width, "height": height},
        )
        try:
            context.route(
                lambda url: not url.startswith(server.url),
                lambda route: route.abort(),
            )
            page = context.new_page()
            session = FrontendSession(page, server)
            page.on("console", lambda msg: msg.type == "error" and session.console_errors.append(msg.text))
            page.on("pageerror", lambda exc: session.console_errors.append(f"pageerror: {exc}"))
            page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true');")
            page.goto(server.url, timeout=timeout_ms)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=timeout_ms)
            yield session
        finally:
            context.close()


def queue_from_frontend(session: FrontendSession, timeout_ms: int = 300_000) -> dict[str, Any]:
    """Queue the loaded graph the way the Queue button does; return the server's /prompt answer."""
    page = session.page
    with page.expect_response(
        lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST", timeout=timeout_ms
    ) as info:
        page.evaluate("() => window.app.queuePrompt(0, 1)")
    response = info.value
    body = response.text()
    if response.status != 200:
        raise RuntimeError(f"/prompt refused the graph: {body}")
    return json.loads(body)
