"""The process's C heap: glibc keeps freed memory unless told, so RSS would stay at every phase's peak.

A training run inside ComfyUI shares the process with everything the graph holds; what one phase
freed (the block-by-block load's per-layer temporaries, the optimizer's state after the last step)
should be back with the OS before the next phase allocates, or the phases' peaks add up. glibc serves
an allocation above its mmap threshold from a mapping of its own, unmapped when freed; below it, from
the heap, where freed blocks stay in RSS and fragment. Its default threshold starts at 128 KiB and
rises to the largest block freed so far (up to 32 MiB), so a long-running process ends up keeping
nearly everything in the heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Iterator

LOADING = 1 << 20  # the block-by-block load: one layer's temporaries at a time
TRAINING = 64 << 10  # a rank-32 LoRA factor of a 1536-wide layer is 192 KiB in fp32, and so is each of
# its gradient and AdamW's two states: thousands of blocks of that size per step


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def map_allocations_above(size: int) -> None:
    """Serve every allocation above ``size`` bytes from its own mapping, returned to the OS when freed
    (glibc's M_MMAP_THRESHOLD, fixed: no longer raised as blocks are freed)."""
    if (libc := _glibc()) is not None:
        libc.mallopt(-3, size)


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and RSS stays at the peak)."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def release_freed() -> None:
    """Collect unreachable objects held in reference cycles (a finished run's optimizer, its hooks),
    then trim the heap."""
    gc.collect()
    trim_heap()


@contextlib.contextmanager
def training_heap(device, trainable: int) -> Iterator[None]:
    """While a LoRA of ``trainable`` parameters trains on ``device``: on the CPU, with a LoRA of a
    million parameters or more, LoRA-sized blocks (gradients, optimizer states, the step's small
    activations) get mappings of their own, so what a step frees goes back to the OS instead of
    fragmenting the heap (a real-size SD3.5 Medium step: 0.2 GiB lower peak RSS at the same speed). A
    small LoRA keeps the heap: there the mappings' system calls cost ~20% of a step and save nothing
    worth it; on a GPU those blocks are device memory. Afterwards the loader's threshold again (the
    memory is handed back by ``release_freed`` once the run's model is gone)."""
    import torch

    mapped = torch.device(device).type == "cpu" and trainable >= 1_000_000
    if mapped:
        map_allocations_above(TRAINING)
    try:
        yield
    finally:
        if mapped:
            map_allocations_above(LOADING)
