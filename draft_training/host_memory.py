"""Keep freed memory in the process, so a training step does not fault its tensors in afresh.

A fit step frees and allocates again tensors of ~100 MB (the tied embedding's dense gradient,
[49,152 × 576] float32, twice; the head's [tokens × rows] log-probabilities and their gradient).
glibc's malloc serves blocks that large with `mmap` and hands them back to the kernel when they
are freed, so every step writes them as fresh pages and pays a page fault per 4 KiB. `mallopt`
turns that off for the process: no `mmap` for any block (`M_MMAP_MAX` 0), and up to 2 GiB of
freed memory at the heap's top kept (`M_TRIM_THRESHOLD`). Measured on the default mission's fit
(300 steps, 2 cores of an AMD EPYC, 2026-12-02; README): 351 s against 530 s, held-out scores
identical. The cost is memory not handed back to the kernel before the process ends: peak 9.7 GB
against 7.1 GB there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_MAX = -4
KEPT_HEAP_TOP_BYTES = 2**31 - 1  # the most an int (mallopt's argument) holds


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks in the process; False where it is not glibc's."""
    name = ctypes.util.find_library("c")
    mallopt = None if name is None else getattr(ctypes.CDLL(name), "mallopt", None)
    if mallopt is None:
        return False
    kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_HEAP_TOP_BYTES))
    if not kept:
        logger.warning("malloc refused to keep freed memory: training steps may run slower")
    return kept
