"""Memory counters, read without synchronising anything: host RSS and malloc, CUDA allocator stats."""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

import psutil
import torch

MiB = 1 << 20

#: The memory signals the sampler records, and how a report names them.
SIGNALS: dict[str, str] = {
    "heap": "host memory in use (malloc)",
    "rss": "host memory (RSS)",
    "cuda_allocated": "CUDA memory allocated",
    "cuda_reserved": "CUDA memory reserved",
}


def format_bytes(n: float) -> str:
    """A byte count for people: whole numbers stay whole.

    >>> format_bytes(2 * MiB), format_bytes(1.25 * MiB), format_bytes(512 * 1024), format_bytes(3 * 2**30)
    ('2 MiB', '1.2 MiB', '512 KiB', '3 GiB')
    """
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if abs(value - round(value)) < 0.05 else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2() -> Any:
    """glibc's ``mallinfo2`` (glibc >= 2.33), or ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


class MemorySampler:
    """Reads memory counters without synchronising anything.

    Host: the process's resident set size through psutil and, with glibc, the bytes
    malloc has handed out and not taken back (``mallinfo2``: heap in use plus mmapped
    blocks), which is where CPU tensors live. Unlike RSS, it grows with a leak even
    while malloc recycles pages that earlier work freed. CUDA, once the program itself
    has initialised CUDA: the caching allocator's counters (allocated, reserved, peak),
    which are host-side bookkeeping and never wait for the device.
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._mallinfo = _mallinfo2()
        self.cuda_device: int | None = None
        self._statm: int | None = None  # on Linux, /proc/self/statm kept open: a read, not an open
        self._page = 4096
        if sys.platform.startswith("linux"):
            try:
                self._statm = os.open("/proc/self/statm", os.O_RDONLY)
                self._page = os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, AttributeError):
                self._statm = None

    def close(self) -> None:
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None

    def rss(self) -> int:
        if self._statm is not None:
            try:
                return int(os.pread(self._statm, 128, 0).split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                self.close()
        return int(self._process.memory_info().rss)

    def cuda(self) -> dict[str, int]:
        """The CUDA allocator's counters, once the program has initialised CUDA (else nothing)."""
        out: dict[str, int] = {}
        if torch.cuda.is_initialized():
            if self.cuda_device is None:
                self.cuda_device = torch.cuda.current_device()
            stats = torch.cuda.memory_stats(self.cuda_device)
            out["cuda_allocated"] = int(stats.get("allocated_bytes.all.current", 0))
            out["cuda_reserved"] = int(stats.get("reserved_bytes.all.current", 0))
            out["cuda_peak"] = int(stats.get("allocated_bytes.all.peak", 0))
        return out

    def heap(self) -> int | None:
        """Bytes malloc has handed out. Cheap on a tidy heap; it walks the free lists, so
        a heap with many free chunks makes it slower: the caller schedules it."""
        if self._mallinfo is None:
            return None
        info = self._mallinfo()
        return int(info.uordblks + info.hblkhd)

    def headroom(self, signal: str) -> tuple[int, int] | None:
        """(bytes still free, total bytes) for the memory a signal lives in."""
        try:
            if signal in ("rss", "heap"):
                vm = psutil.virtual_memory()
                return int(vm.available), int(vm.total)
            if self.cuda_device is not None:
                total = int(torch.cuda.get_device_properties(self.cuda_device).total_memory)
                reserved = int(torch.cuda.memory_reserved(self.cuda_device))
                return max(total - reserved, 0), total
        except Exception:
            return None
        return None
