"""Drive ComfyUI's real frontend in Debian's headless Chromium (through Python playwright).

Never ``playwright install``: the browser is the ``chromium`` on PATH. The frontend is ready
when ``window.app && app.graph && window.LiteGraph``. First-run dialogs are pre-dismissed and
requests to the outside world are aborted (this machine has no network beyond loopback).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .comfy_server import PACK_DIR_NAME, ComfyServer
from .workflow_specs import CHECKPOINT_MODELS, CLIP_MODELS

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


@dataclass(frozen=True)
class ConsoleError:
    text: str
    url: str  # where the message came from: a path for the server's own files, else the full URL, or ""

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0]

    @property
    def first_frame(self) -> str:
        frames = [line.strip() for line in self.text.splitlines()[1:] if line.strip().startswith("at ")]
        return frames[0] if frames else ""

    def __str__(self) -> str:
        return f"{self.text} [{self.url}]" if self.url else self.text


@dataclass(frozen=True)
class Noise:
    """A console error ComfyUI's own frontend logs with no custom node installed, matched exactly.

    ``text`` is the message's first line, verbatim; ``url`` (and ``frame``, when given) are regexes
    that must match in full where it came from (and its first stack frame): the same words logged
    from anywhere else, our extensions included, still fail the test.
    """

    text: str
    url: str
    reason: str
    frame: str | None = None

    def matches(self, error: ConsoleError) -> bool:
        return (
            error.first_line == self.text
            and re.fullmatch(self.url, error.url) is not None
            and (self.frame is None or re.fullmatch(self.frame, error.first_frame) is not None)
        )


_404 = "Failed to load resource: the server responded with a status of 404 (Not Found)"
_USERDATA = r"/api/userdata\?dir=(workflows|subgraphs(%2F)?)&recurse=true&split=false&full_info=true"
_HF_MODEL = (
    "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/diffusion_models/z_image_turbo_bf16"
)
_INDEX = r"/assets/index-[\w-]+\.js"
_MODEL_METADATA = r"/assets/missingModelMetadata-[\w-]+\.js"
# the CSP's connect-src and the script that logs the blocked request: frontend 1.32, frontend 1.49
_CSP_1_32_AND_1_49 = (
    ("'self'", r"/assets/vendor-other-[\w-]+\.js"),
    ("'self' data:", r"/assets/vendor-axios-[\w-]+\.js"),
)
# Each one seen on a server started without this pack: 0.3.75 (frontend 1.32.9) and 0.33.0 (frontend 1.49.6);
# the size lookups of our templates' model files are the same requests core's templates make.
EXPECTED_NOISE = (
    Noise(_404, r"/(api/userdata/)?user\.css", "optional user stylesheet, absent on a fresh install"),
    Noise(_404, _USERDATA + r"|/api/userdata/comfy\.templates\.json", "empty user folders on a fresh install"),
    Noise("Failed to load resource: net::ERR_FAILED", r"https://[^/]*\.comfy\.org/.*", "aborted: no internet here"),
    *(
        Noise(
            f"Connecting to 'https://api.comfy.org/nodes?{ids}' violates the following Content Security Policy "
            f'directive: "connect-src {sources}". The action has been blocked.',
            script,
            "the frontend looks up the registry entries of the packs in the graph; ComfyUI's CSP header blocks it",
        )
        for sources, script in _CSP_1_32_AND_1_49
        for ids in (
            "node_id=comfy-core",
            f"node_id={PACK_DIR_NAME}",
            f"node_id={PACK_DIR_NAME}&node_id=comfy-core",
            f"node_id=comfy-core&node_id={PACK_DIR_NAME}",
        )
    ),
    Noise(
        "TypeError: Cannot read properties of undefined (reading 'id')",
        r"/assets/lib/vue/dist/vue\.esm-browser\.prod\.js",
        "frontend 1.32 bug in a Vue onChange handler at start",
        frame=r"at onChange \(http://127\.0\.0\.1:\d+/assets/index-[\w-]+\.js:\d+:\d+\)",
    ),
    Noise(
        "ComfyApp graph accessed before initialization",
        r"/assets/settingStore-[\w-]+\.js",
        "frontend 1.49 reads app.rootGraph from a settings watcher before the graph exists",
    ),
    *(
        noise
        for url in (f"{_HF_MODEL}.safetensors", *(m["url"] for m in CHECKPOINT_MODELS + CLIP_MODELS))
        for sources, script in ((_CSP_1_32_AND_1_49[0][0], _INDEX), (_CSP_1_32_AND_1_49[1][0], _MODEL_METADATA))
        for noise in (
            Noise(
                f"Connecting to '{url}' violates the following Content Security Policy directive: "
                f'"connect-src {sources}". The action has been blocked.',
                script,
                "the missing-models list asks huggingface.co for each file's size (frontend 1.49 also for a "
                "template's files it has); ComfyUI's CSP header blocks it",
            ),
            Noise(
                f"Fetch API cannot load {url}. Refused to connect because it violates the document's "
                "Content Security Policy.",
                script,
                "the same blocked request, as fetch reports it",
            ),
        )
    ),
    Noise(
        "Error fetching file size: TypeError: Failed to fetch",
        _INDEX,
        "frontend 1.32's missing-models dialog logs the blocked size request",
        frame=r"at fetchFileSize \(http://127\.0\.0\.1:\d+/assets/index-[\w-]+\.js:\d+:\d+\)",
    ),
)


def console_error(text: str, url: str, origin: str) -> ConsoleError:
    return ConsoleError(text, url[len(origin) :] if url.startswith(origin + "/") else url)


@dataclass
class FrontendSession:
    page: Any
    server: ComfyServer
    console_errors: list[ConsoleError] = field(default_factory=list)

    def unexpected_errors(self) -> list[str]:
        return [str(e) for e in self.console_errors if not any(noise.matches(e) for noise in EXPECTED_NOISE)]

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
            origin = server.url

            def on_console(msg: Any) -> None:
                if msg.type == "error":
                    session.console_errors.append(console_error(msg.text, msg.location.get("url", ""), origin))

            page.on("console", on_console)
            page.on(
                "pageerror", lambda exc: session.console_errors.append(console_error(f"pageerror: {exc}", "", origin))
            )
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
