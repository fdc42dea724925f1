"""Progress on ComfyUI's bar for a library loop, and the Cancel check that goes with it.

ComfyUI raises its interrupt inside the progress hook, but since 0.4 the bar calls that hook only
after a whole percent of progress (or the first and last update): a 100 000-step training run would
go on for a thousand steps after Cancel. Every update here also asks ComfyUI's public interrupt
check, so Cancel lands at the next step on every version.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management
import comfy.utils


def progress_callback(total: int = 1, node_id: str | None = None) -> Callable[[int, int], None]:
    """``(done, total)`` for a library loop: moves the node's bar; raises ComfyUI's interrupt on Cancel."""
    bar = comfy.utils.ProgressBar(max(1, total), node_id=node_id)

    def update(done: int, new_total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, max(1, new_total))

    return update
