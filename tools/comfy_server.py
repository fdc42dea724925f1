"""Run a real, headless ComfyUI server with this pack installed, and talk to it over HTTP.

Used by the integration and browser tests and by the demo job. Each server gets its own
``--base-directory`` (custom_nodes/, input/, output/, models/, user/), a free port on 127.0.0.1,
the pack linked into ``custom_nodes/`` the way a ``git clone`` would put it, and the built-in
tiny models linked into ``models/``. ``stop()`` always terminates the process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths

PACK_DIR_NAME = "sd35-tuner"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "   0.0 seconds: <path>" (0.3.x); newer versions put a level in front: "[INFO]    0.0 seconds: <path>"
IMPORT_TIME = re.compile(
    r"^(?:\[[A-Z]+\])?\s*(?P<seconds>[0-9.]+) seconds(?P<failed> \(IMPORT FAILED\))?: (?P<path>.+?)\s*$", re.M
)
MODEL_FOLDERS = ("checkpoints", "vae", "vae_approx", "text_encoders", "clip", "diffusion_models")


class ComfyError(RuntimeError):
    pass


class PortTakenError(ComfyError):
    """Another process took the free port between our check and ComfyUI's bind."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base: Path, models: Path = paths.MODELS, link_pack: bool = True) -> Path:
    """Lay out a ComfyUI base directory with the pack (unless ``link_pack`` is False) and the built-in models."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if link_pack and not link.exists():
        link.symlink_to(paths.REPO, target_is_directory=True)
    for sub in ("input", "output", "temp", "user", "models/loras"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for folder in MODEL_FOLDERS:
        target = base / "models" / folder
        target.mkdir(parents=True, exist_ok=True)
        src = models / ("text_encoders" if folder == "clip" else folder)
        for file in src.glob("*.safetensors") if src.is_dir() else ():
            dst = target / file.name
            if not dst.exists():
                dst.symlink_to(file)
    return base


@dataclass
class ComfyServer:
    base_dir: Path
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    home: Path = field(default_factory=lambda: paths.COMFY_HOME)  # a ComfyUI home: comfyui/ + venv/ (+ stubs/)
    link_pack: bool = True  # False: custom_nodes/ gets whatever an installer put there
    proc: subprocess.Popen | None = None
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def import_times(self) -> dict[str, tuple[float, bool]]:
        """ComfyUI's "Import times for custom nodes" log lines: {pack path: (seconds, import failed)}."""
        plain = ANSI.sub("", self.log())
        return {m["path"]: (float(m["seconds"]), bool(m["failed"])) for m in IMPORT_TIME.finditer(plain)}

    @property
    def comfyui(self) -> Path:
        return self.home / "comfyui"

    @property
    def version(self) -> tuple[int, ...]:
        return paths.comfyui_version(self.comfyui)

    def start(self, timeout: float = 180.0, attempts: int = 3) -> ComfyServer:
        """Start and wait until this process serves its port; a port taken meanwhile (parallel test runs) is
        retried on another free port."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except PortTakenError:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> ComfyServer:
        prepare_base_dir(self.base_dir, link_pack=self.link_pack)
        python = self.home / "venv" / "bin" / "python"
        cmd = [
            str(python if python.exists() else "python"),
            str(self.comfyui / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--database-url",
            f"sqlite:///{self.base_dir / 'comfyui.db'}",
            "--disable-api-nodes",
            "--disable-auto-launch",
            *self.extra_args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        stubs = self.home / "stubs"  # stand-ins for modules a newer ComfyUI imports that CPU torch lacks
        if stubs.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(stubs), env.get("PYTHONPATH"))))
        start_of_log = len(self.log())
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            cmd, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        serving = f"127.0.0.1:{self.port}"  # "To see the GUI go to: http://127.0.0.1:<port>", once it listens
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = self.log()[start_of_log:]
                if "address already in use" in said:
                    raise PortTakenError(f"port {self.port} was taken")
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode} during start:\n{said[-4000:]}")
            if serving in self.log()[start_of_log:]:  # not another process that answers on this port
                try:
                    self.get("/object_info/CheckpointLoaderSimple", timeout=2)
                    return self
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
            time.sleep(0.3)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=15)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ---------------------------------------------------------------------------
    def request(self, method: str, route: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, route: str, timeout: float = 30) -> Any:
        return self.request("GET", route, timeout=timeout)

    def post(self, route: str, body: Any = None, timeout: float = 30) -> Any:
        return self.request("POST", route, body if body is not None else {}, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> str:
        """POST an API-format graph; raise ComfyError with ComfyUI's node_errors on a 400."""
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as err:
            raise ComfyError(f"/prompt refused the graph: {err.read().decode(errors='replace')}") from err
        if answer.get("node_errors"):
            # ComfyUI still runs the outputs that validated and silently drops the rest: never accept that.
            raise ComfyError(f"/prompt dropped invalid outputs: {json.dumps(answer['node_errors'])[:4000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll /history until the prompt finished; return its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-4000:]}")
            time.sleep(0.25)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue a graph, wait, and return its outputs; raise ComfyError on an execution error."""
        entry = self.wait(self.queue(prompt), timeout)
        status = entry["status"]
        if status.get("status_str") != "success":
            raise ComfyError(f"execution failed: {json.dumps(status.get('messages', []))[-4000:]}")
        return entry

    def interrupt(self) -> None:
        self.post("/interrupt")

    def output_files(self, entry: dict, node_id: str, kind: str = "images") -> list[Path]:
        files = []
        for item in entry["outputs"].get(node_id, {}).get(kind, []):
            folder = self.base_dir / item.get("type", "output")
            files.append(folder / item.get("subfolder", "") / item["filename"])
        return files


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None
