"""What the trainer node tells the user while it runs, and when it stops early.

ComfyUI's progress bar moves every training step (its update is also where Cancel is noticed), and
the queuing client gets these websocket events (``web/js/train_monitor.js`` draws them in the node):

``sd35tuner.train.progress`` after training steps (at most every 0.2 s, and at the last step):
    ``{"node", "step", "total", "loss", "lr"}``
``sd35tuner.train.validating`` while validation samples are made (at most every 0.2 s, and at the end):
    ``{"node", "step", "total", "done", "of"}``: ``done`` of ``of`` sampler evaluations at training ``step``
``sd35tuner.train.validation`` once per validation, when its grid is made:
    ``{"node", "step", "total", "image": {"filename", "subfolder", "type": "temp"}, "prompts", "rows"}``:
    the labelled grid (rows CFG / APG, one column per prompt) as a PNG served by ``/view``
``sd35tuner.train.stopped`` when the run is cancelled or fails, before ComfyUI reports it:
    ``{"node", "reason": "cancelled" | "failed", "step", "total", "message", "checkpoint", "run_dir",
    "lora_name"}``: ``message`` says what happened, where the checkpoint is and how to resume;
    ``checkpoint`` / ``run_dir`` are paths relative to ComfyUI's output folder (``checkpoint`` null
    when none was written).
"""

from __future__ import annotations

import time
from pathlib import Path

import comfy.model_management
import torch
from comfy_api.latest import io, ui

from ._progress import progress_callback
from ._train_glue import output_relative

PROGRESS_EVENT = "sd35tuner.train.progress"
VALIDATING_EVENT = "sd35tuner.train.validating"
VALIDATION_EVENT = "sd35tuner.train.validation"
STOPPED_EVENT = "sd35tuner.train.stopped"
EVERY_S = 0.2


class RunReporter:
    """The trainer's hooks (``on_step``, ``on_validation``, ``on_images``) and its last word (``stopped``)."""

    def __init__(
        self,
        node_id: str | None,
        total: int,
        lora_name: str,
        work_dir: Path,
        rows: dict[str, str],
        prompts: list[str],
    ) -> None:
        from server import PromptServer

        self.node_id, self.total, self.lora_name, self.work_dir = node_id, total, lora_name, work_dir
        self.rows, self.prompts = rows, prompts  # row label per guidance ("cfg", "apg"), column label per prompt
        self.server = PromptServer.instance
        self.progress = progress_callback(total, node_id)  # the node's bar; raises ComfyUI's interrupt on Cancel
        self.step, self.last_sent = 0, 0.0

    def _send(self, event: str, data: dict, last: bool = False) -> None:
        now = time.monotonic()
        if last or event in (VALIDATION_EVENT, STOPPED_EVENT) or now - self.last_sent >= EVERY_S:
            self.last_sent = now
            self.server.send_sync(event, {"node": self.node_id, **data}, self.server.client_id)

    def on_step(self, info) -> None:
        self.step = info.step
        data = {"step": info.step, "total": info.total_steps, "loss": info.loss, "lr": info.lr}
        self._send(PROGRESS_EVENT, data, last=info.step == info.total_steps)
        self.progress(info.step, self.total)

    def on_validation(self, step: int, done: int, of: int) -> None:
        self.step = step  # validation runs after its training step, maybe before that step's on_step
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel between sampler evaluations
        data = {"step": step, "total": self.total, "done": done, "of": of}
        self._send(VALIDATING_EVENT, data, last=done in (0, of))

    def grid(self, decoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The labelled grid of one validation: a row per guidance, a column per prompt; blank without samples."""
        from ..apg.compare import labelled_grid

        if not decoded:
            return torch.zeros(1, 64, 64, 3)
        return labelled_grid({self.rows[g]: images for g, images in decoded.items()}, self.prompts)

    def on_images(self, step: int, decoded: dict[str, torch.Tensor]) -> None:
        (image,) = ui.ImageSaveHelper.save_images(
            self.grid(decoded), "sd35_tuner_validation", io.FolderType.temp, None
        )
        data = {"step": step, "total": self.total, "image": dict(image), "prompts": self.prompts}
        self._send(VALIDATION_EVENT, {**data, "rows": [self.rows[g] for g in decoded]})

    def stopped(self, error: BaseException) -> str:
        """Tell the node how the run ended early, where its checkpoint is and how to continue; returns the text."""
        from ..training.checkpoint import list_checkpoints
        from ..training.folder_lock import FolderInUseError

        cancelled = isinstance(error, comfy.model_management.InterruptProcessingException)
        busy = isinstance(error, FolderInUseError)  # another run's folder: its checkpoints are not this run's
        checkpoint = None if busy else next(reversed(list_checkpoints(self.work_dir)), None)
        saved = None if checkpoint is None else output_relative(checkpoint)
        what = "Cancelled" if cancelled else f"Failed: {error}."
        where = f" after step {self.step} of {self.total}." if cancelled else ""
        if busy:
            what, how = f"Not started: {error}", ""  # the error says whose run and what to do
        elif checkpoint is None:
            how = " No checkpoint was written; the next run starts from scratch."
        else:
            how = (
                f" Checkpoint: output/{saved}. To continue, tick "
                f"'resume' with lora_name '{self.lora_name}' and run again."
            )
        message = what + where + how
        self._send(
            STOPPED_EVENT,
            {
                "reason": "cancelled" if cancelled else "failed",
                "step": self.step,
                "total": self.total,
                "message": message,
                "checkpoint": saved,
                "run_dir": output_relative(self.work_dir),
                "lora_name": self.lora_name,
            },
        )
        return message
