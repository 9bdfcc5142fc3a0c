"""One command for a machine with a CUDA GPU: what gradguard does there, checked in under 5 minutes.

    python benchmarks/gpu_check.py                  # prints a summary, exit code 1 on a failed check
    python benchmarks/gpu_check.py --json out.json  # and writes it

It runs, on ``cuda:0``:

1. **No synchronisation.** 200 guarded steps of a small model (SGD, no ``.item()``) under
   ``torch.cuda.set_sync_debug_mode("error")``: any synchronising call, gradguard's or the
   loop's, raises. Then 200 steps with AMP and a ``GradScaler``, whose ``step()`` itself
   synchronises, under the ``"warn"`` mode, guarded and unguarded: the guard must add no
   synchronisation warning.
2. **GG101 on the GPU.** The same loop without ``zero_grad()``: found through the
   device-side flag, read once the GPU has produced it.
3. **GG101 for updates through ``.data``, and GG102.** A loop with no optimizer that
   updates ``p.data`` and never resets: found through the fingerprint flags, with no
   synchronisation; the same loop with ``model.zero_grad()`` or ``p.grad.data.zero_()``
   reports nothing. ``loss.backward(); opt.zero_grad(); opt.step()``: GG102, with no
   synchronisation.
4. **GG301 on CUDA memory.** A dict that keeps an 8 MiB CUDA tensor per step: found on the
   CUDA allocator's counters, with the allocation site recorded while confirming.
5. **Cost per step on the GPU.** ``benchmarks/scaling.py`` with ``--device cuda``.

Each check prints one line; the summary says which passed. Without a GPU it exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gradguard

STEPS = 200


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 1)).cuda()


def _loop(model: nn.Module, opt: torch.optim.Optimizer, *, reset: bool = True, scaler: Any = None) -> None:
    x = torch.randn(64, 256, device="cuda")
    y = torch.randn(64, 1, device="cuda")
    for _ in range(STEPS):
        if reset:
            opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=scaler is not None):
            loss = nn.functional.mse_loss(model(x).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def check_no_sync() -> dict[str, Any]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    torch.cuda.synchronize()
    guard = gradguard.Guard(model, opt, policy="collect").attach()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loop(model, opt)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        guard.detach()  # the end of a run may wait for what the GPU has not produced yet
    syncs = {}
    for guarded in (False, True):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                if guarded:
                    with gradguard.Guard(model, opt, policy="collect"):
                        _loop(model, opt, scaler=scaler)
                else:
                    _loop(model, opt, scaler=scaler)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs["guarded" if guarded else "unguarded"] = sum("synchroniz" in str(w.message) for w in caught)
    added = syncs["guarded"] - syncs["unguarded"]
    return {
        "ok": not guard.findings and added == 0,
        "steps": STEPS,
        "findings_on_a_correct_loop": [str(f) for f in guard.findings],
        "amp_sync_warnings": syncs,
        "syncs_added_by_gradguard": added,
    }


def check_gg101() -> dict[str, Any]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    guard = gradguard.Guard(model, opt, policy="collect").attach()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loop(model, opt, reset=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        guard.detach()
    codes = [f.code for f in guard.findings]
    return {"ok": codes == ["GG101"], "codes": codes, "count": guard.findings[0].count if codes else 0}


def _data_loop(model: nn.Module, reset: str) -> None:
    x = torch.randn(64, 256, device="cuda")
    y = torch.randn(64, 1, device="cuda")
    for _ in range(STEPS):
        if reset == "model.zero_grad":
            model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-1e-4)
            if reset == "grad.data.zero_":
                p.grad.data.zero_()


def check_gg101_data() -> dict[str, Any]:
    found: dict[str, list[str]] = {}
    for reset in ("none", "model.zero_grad", "grad.data.zero_"):
        model = _model()
        torch.cuda.synchronize()
        guard = gradguard.Guard(model, policy="collect").attach()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _data_loop(model, reset)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            guard.detach()
        found[reset] = [f"{f.code} {f.where} {f.data.get('through')}" for f in guard.findings]
    names = [name for name, _ in _model().named_parameters()]
    ok = found["none"] == [f"GG101 {n} .data" for n in names] and not found["model.zero_grad"]
    return {"ok": ok and not found["grad.data.zero_"], "findings": found}


def check_gg102() -> dict[str, Any]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(64, 256, device="cuda")
    torch.cuda.synchronize()
    guard = gradguard.Guard(model, opt, policy="collect").attach()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(STEPS):
            model(x).pow(2).mean().backward()
            opt.zero_grad(set_to_none=False)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        guard.detach()
    codes = [f.code for f in guard.findings]
    return {"ok": codes == ["GG102"], "codes": codes, "count": guard.findings[0].count if codes else 0}


def check_gg301() -> dict[str, Any]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    cache: dict[int, torch.Tensor] = {}
    x = torch.randn(64, 256, device="cuda")
    with gradguard.Guard(model, opt, policy="collect", detectors=["GG301"]) as guard:
        for step in range(80):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            cache[step] = torch.empty(2 << 20, device="cuda")  # 8 MiB kept per step
    found = [f for f in guard.findings if f.code == "GG301"]
    data = found[0].data if found else {}
    return {
        "ok": bool(found) and str(data.get("signal", "")).startswith("cuda"),
        "finding": str(found[0]) if found else None,
        "signal": data.get("signal"),
        "rate_mib_per_step": data.get("rate_mib_per_step"),
        "allocation_sites": data.get("allocation_sites", [])[:2],
    }


def check_scaling(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import scaling

    result = scaling.main(["--device", "cuda", "--sizes", args.sizes, "--repeats", str(args.repeats)])
    own = result["own_us"]
    assert isinstance(own, dict)
    return {"ok": own["slope_us_per_tensor"] <= 1.0 and own["at_291_us"] <= 600, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20,100,300,800")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "no_sync": check_no_sync,
        "gg101": check_gg101,
        "gg101_data": check_gg101_data,
        "gg102": check_gg102,
        "gg301": check_gg301,
        "scaling": lambda: check_scaling(args),
    }
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            results[name] = check()
        except Exception as exc:  # a check that crashes has failed; the others still run
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} {json.dumps(results[name], default=str)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0 if all(r["ok"] for k, r in results.items() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
