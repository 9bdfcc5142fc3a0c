"""Where live CUDA blocks were allocated: the allocator's own history, recorded only while confirming."""

from __future__ import annotations

from typing import Any

import torch

from gradguard.introspect.frames import display_path, is_library_file


def start_cuda_history(max_entries: int = 20000) -> bool:
    """Start recording CUDA allocation stacks, where this torch can. True if started."""
    recorder = getattr(getattr(torch.cuda, "memory", None), "_record_memory_history", None)
    if recorder is None:
        return False
    try:
        recorder(enabled="all", context="alloc", stacks="python", max_entries=max_entries)
    except TypeError:  # torch < 2.1 spells it differently
        try:
            recorder(True, record_context=True, trace_alloc_max_entries=max_entries)
        except Exception:
            return False
    except Exception:
        return False
    return True


def stop_cuda_history() -> None:
    recorder = getattr(getattr(torch.cuda, "memory", None), "_record_memory_history", None)
    if recorder is None:
        return
    try:
        recorder(enabled=None)
    except TypeError:
        try:
            recorder(False)
        except Exception:
            return
    except Exception:
        return


def cuda_allocation_sites(limit: int = 5) -> list[dict[str, Any]]:
    """The user lines that allocated the CUDA blocks still alive, grouped, largest first.

    Reads ``torch.cuda.memory._snapshot()``: host-side allocator bookkeeping, no device
    synchronisation. Only blocks allocated while recording was on carry frames.
    """
    snapshot_fn = getattr(getattr(torch.cuda, "memory", None), "_snapshot", None)
    if snapshot_fn is None:
        return []
    try:
        snapshot = snapshot_fn()
    except Exception:
        return []
    sites: dict[tuple[str, int, str, int], list[int]] = {}
    for segment in snapshot.get("segments", []) if isinstance(snapshot, dict) else []:
        for block in segment.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = block.get("frames") or []
            frame = next((f for f in frames if not is_library_file(str(f.get("filename", "<")))), None)
            if frame is None:
                continue
            size = int(block.get("requested_size") or block.get("size") or 0)
            key = (
                display_path(str(frame.get("filename"))),
                int(frame.get("line", 0)),
                str(frame.get("name", "")),
                size,
            )
            entry = sites.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += size
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][1])[:limit]
    return [
        {"file": f, "line": line, "function": fn, "block_bytes": size, "count": c, "bytes": b}
        for (f, line, fn, size), (c, b) in ranked
    ]
