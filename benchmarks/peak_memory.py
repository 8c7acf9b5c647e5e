"""Extra peak memory of one call: the CUDA allocator's peak, or on the CPU the peak resident set size (Linux)."""

import ctypes
import math
from pathlib import Path

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
# For a process measured with `extra_peak_mib` on the CPU: blocks of 128 KiB and more get their own pages, handed back
# when freed. glibc's default threshold moves up as blocks are freed, and reused heap pages then hide later allocations.
EXACT_CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 2**10)}


def _status_kib(field: str) -> int:
    line = next(line for line in _STATUS.read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def extra_peak_mib(function, device: str) -> float:
    """Peak memory during ``function()`` beyond the memory in use before it, in MiB (NaN where unmeasurable).

    On the CPU, freed heap pages are handed back first (``malloc_trim``) and the kernel's peak counter is reset
    (``/proc/self/clear_refs``), so the peak is the call's own, not that of building the model. In a process started
    with `EXACT_CPU_ENV` it matches the allocator's own count to about 1 MiB.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        function()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not _CLEAR_REFS.exists():
        return math.nan
    ctypes.CDLL(None).malloc_trim(0)
    _CLEAR_REFS.write_text("5")
    before = _status_kib("VmRSS")
    function()
    return (_status_kib("VmHWM") - before) / 2**10
