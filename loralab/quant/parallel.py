"""How the NF4 work is cut up: contiguous parts on Python threads, each a loop of small single-threaded ops.

    [0, n) -> parts [b_0, b_1), [b_1, b_2), ...   one per intra-op thread (at most MAX_PARTS), at multiples of a unit
    each part -> steps of SLICE values            every op on <= 32768 elements, torch's parallel grain, so torch
                                                  runs it in the calling thread

Why: between two of torch's own parallel ops every OpenMP thread waits at a barrier for the slowest one.  On a
quiet machine that costs microseconds; on a busy one (more runnable threads than cores) a descheduled thread makes
each barrier cost milliseconds, and quantizing one 4096 x 4096 matrix is a few hundred ops.  Here the threads only
meet once, at the end; torch releases the GIL inside each op, so the parts run in parallel.  The per-thread
grad and inference modes of the caller are carried into the worker threads.  On other devices (CUDA, ...) the
work stays in the calling thread, ACCELERATOR_STEP values per op.

A large fresh output (the dequantized weight) is allocated by `empty`: on Linux its pages are marked for
transparent huge pages before anything touches them.  Writing a fresh 4096 x 4096 fp32 tensor otherwise takes
16,384 page faults (4 KiB each), measured here at ~20 ms of the ~30 ms a dequantization takes; with 2 MiB pages it
is 3 ms.  Where the kernel does not offer them (`never`, other systems) nothing changes.
"""

from __future__ import annotations

import ctypes
import sys
import threading

import torch

__all__ = ["SLICE", "MIN_PART", "MAX_PARTS", "ACCELERATOR_STEP", "run_split", "on_cpu", "slices", "whole_steps",
           "empty"]

SLICE = 1 << 15                 # values per op on CPU: torch's parallel grain (32768), so one thread runs it
MIN_PART = 1 << 16              # values below which the work stays in the calling thread
MAX_PARTS = 4                   # more threads would mostly wait for the GIL (held between ops)
ACCELERATOR_STEP = 1 << 24      # values per op on other devices (bounds the scratch memory)
HUGE_PAGE = 1 << 21             # 2 MiB: x86-64's and arm64's transparent huge page
_MADV_HUGEPAGE = 14             # linux/mman.h


def run_split(work, n: int, unit: int, device: torch.device) -> None:
    """work(lo, hi) over [0, n), cut at multiples of `unit` into one contiguous part per intra-op thread (see the
    module docstring), the first in the calling thread; an error in any part is raised here."""
    parts = max(1, min(torch.get_num_threads(), MAX_PARTS, n // MIN_PART)) if on_cpu(device) else 1
    bounds = [min(n, -(-(n * i // parts) // unit) * unit) for i in range(parts + 1)]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()   # both are per thread
    errors: list[BaseException] = []

    def run(lo: int, hi: int) -> None:
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                work(lo, hi)
        except BaseException as e:  # noqa: BLE001  (re-raised in the calling thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=bounds[i:i + 2], daemon=True) for i in range(1, parts)]
    for thread in threads:
        thread.start()
    run(bounds[0], bounds[1])
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def on_cpu(device: torch.device) -> bool:
    """CPU: small single-threaded ops on Python threads.  Elsewhere (CUDA, ...) large ops, ACCELERATOR_STEP
    values at a time, in the calling thread."""
    return device.type == "cpu"


def slices(lo: int, hi: int, device: torch.device):
    step = SLICE if on_cpu(device) else ACCELERATOR_STEP
    for start in range(lo, hi, step):
        yield start, min(start + step, hi)


def whole_steps(lo: int, hi: int, device: torch.device, factor: int = 1) -> tuple[int, int, int]:
    """(step, number of whole steps in [lo, hi), where they end).  Whole steps get their views from one unbind
    (a Python-level slice or view costs as much as a small op); the short rest is sliced by hand."""
    step = factor * SLICE if on_cpu(device) else min(ACCELERATOR_STEP, hi - lo)
    k = (hi - lo) // step
    return step, k, lo + k * step


def empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty(n), its whole 2 MiB pages marked MADV_HUGEPAGE first on Linux CPU (see the module docstring)."""
    out = torch.empty(n, dtype=dtype, device=device)
    size = n * out.element_size()
    if on_cpu(out.device) and size >= 2 * HUGE_PAGE and _madvise is not None:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        stop = (out.data_ptr() + size) // HUGE_PAGE * HUGE_PAGE
        if stop > start:
            _madvise(start, stop - start, _MADV_HUGEPAGE)     # advice only: a refusal (-1) changes nothing
    return out


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_madvise = _libc_madvise()
