"""GG501 numpy-alias-mutated, static form: what is flagged, what is left alone, and agreement with the run."""

from __future__ import annotations

import ast
import json
import textwrap

import pytest

from gradguard.lint import lint_text
from gradguard.lint.aliasing import Arrays, base_of, bound_in, prefixes
from gradguard.lint.rules.numpy_alias import NumpyAlias
from gradguard.lint.source import Source

LOOP = """\
import numpy as np
import torch

def load(paths, f, sock, rng, model, device, writer):
    buf = np.empty(4, dtype=np.float32)
    kept = []
    by_step = {{}}
    {before}
    for step, path in enumerate(paths):
        {refill}
        t = torch.from_numpy(buf)
        {keep}
    return kept
"""


def _lint(text):
    return lint_text(textwrap.dedent(text), "train.py", select="GG501")


def _loop(refill="buf[:] = np.load(path)", keep="kept.append(t)", before="pass"):
    return _lint(LOOP.format(refill=refill, keep=keep, before=before))


def test_the_issue_case_is_reported_at_the_conversion_with_the_loop_the_refill_and_the_store():
    (finding,) = _lint(
        """\
        import numpy as np
        import torch

        def load_dataset(paths):
            buf = np.empty(784, dtype=np.float32)
            data = []
            for path in paths:
                buf[:] = np.load(path)
                data.append(torch.from_numpy(buf))
            return data
        """
    )
    assert (finding.code, finding.name, finding.where) == ("GG501", "numpy-alias-mutated", "buf")
    assert (finding.location.line, finding.data["column"], finding.location.function) == (9, 21, "load_dataset")
    assert finding.message == (
        "`torch.from_numpy(buf)` (line 9) shares memory with `buf`, which line 8 refills in place in the loop from "
        "line 7, and the tensor is kept past the iteration (`data.append`, line 9): every kept tensor changes to "
        "the latest contents of `buf`"
    )
    assert finding.hint == "Copy before keeping it: torch.from_numpy(buf.copy()) or torch.tensor(buf)"
    assert finding.data["lines"] == [7, 8, 9]
    assert (finding.data["how"], finding.data["buffer"], finding.data["refills"]) == ("torch.from_numpy", "buf", [8])


@pytest.mark.parametrize(
    "refill",
    ["buf[:] = np.load(path)", "buf[0] = step", "buf += 1", "buf[1:] *= 2", "np.copyto(buf, np.load(path))",
     "np.add(buf, 1, out=buf)", "rng.standard_normal(out=buf, dtype=np.float32)", "buf.fill(step)", "buf.sort()",
     "buf.put([0], step)", "f.readinto(buf)", "sock.recv_into(buf)", "np.random.shuffle(buf)"],
)  # fmt: skip
def test_each_way_of_refilling_the_buffer_in_place_is_a_refill(refill):
    (finding,) = _loop(refill=refill)
    assert (finding.location.line, finding.data["refills"]) == (11, [10])


@pytest.mark.parametrize(
    "refill",
    ["buf = np.load(path)", "buf = np.zeros(4, dtype=np.float32); buf[:] = step", "other[:] = np.load(path)",
     "decode(buf, path)", "buf.copy().fill(0)", "x = buf + 1", "print(buf)"],
)  # fmt: skip
def test_a_buffer_bound_anew_or_not_written_in_the_loop_is_not_flagged(refill):
    assert _loop(refill=refill, before="buf[:] = 0") == []


@pytest.mark.parametrize(
    "keep",
    ["kept.append(t)", "kept.insert(0, t)", "kept.extend([t])", "kept.extend(t)", "kept += [t]",
     "by_step[step] = t", "by_step.setdefault(path, []).append(t)", "kept.append((t, step))",
     "kept.append({'x': t})", "sample = (t, step); kept.append(sample)", "kept.append(t[0])", "kept.append(t[1:])",
     "kept.append(t.view(2, 2))", "kept.append(t.unsqueeze(0))", "kept.append(t.reshape(-1))", "kept.append(t.T)",
     "kept.append(t.detach())", "kept.append(t.div_(255))", "kept.extend(t.unbind())", "x = t; y = x; kept.append(y)",
     "kept.append([t, t])"],
)  # fmt: skip
def test_the_tensor_a_view_or_a_container_kept_past_the_iteration_is_flagged(keep):
    (finding,) = _loop(keep=keep)
    assert finding.location.line == 11


@pytest.mark.parametrize(
    "keep",
    ["model(t)", "out = model(t); kept.append(out)", "kept.append(t.clone())", "kept.append(t.to(device))",
     "kept.append(t.float())", "kept.append(t.cuda())", "kept.append(t.numpy())", "kept.append(t[[0, 1]])",
     "kept.append(t[t > 0])", "kept.append(t.sum())", "by_step['last'] = t", "by_step[device] = t",
     "model.last_input = t", "kept.append(t); break", "kept.append(t); return kept", "writer.flush(kept, t)",
     "kept.append(t); kept.clear()", "kept.append(t); kept.pop()", "t = t * 2; kept.append(t)",
     "t = t.clone() if step else t.clone(); kept.append(t)", "batch = []; batch.append(t); model(batch)",
     "kept.append(torch.stack([t, t]))", "kept.append(torch.cat([t]))"],
)  # fmt: skip
def test_a_copy_a_use_within_the_iteration_or_a_place_overwritten_next_time_is_not_flagged(keep):
    assert _loop(keep=keep) == []


def test_a_tensor_or_array_slot_copies_and_a_list_slot_keeps():
    text = """\
    import numpy as np, torch
    def f(paths):
        buf = np.empty(4, dtype=np.float32)
        batch = torch.empty(len(paths), 4)
        slots = [None] * len(paths)
        for i, path in enumerate(paths):
            buf[:] = np.load(path)
            batch[i] = torch.from_numpy(buf)
            slots[i] = torch.from_numpy(buf)
    """
    assert [f.location.line for f in _lint(text)] == [9]


@pytest.mark.parametrize(
    ("made", "conversion", "flagged"),
    [("np.empty(4, dtype=np.float32)", "torch.as_tensor(buf)", True), ("np.empty(4)", "torch.as_tensor(buf)", True),
     ("np.empty(4, dtype=np.float32)", "torch.as_tensor(buf, dtype=torch.float32)", True),
     ("np.empty(4, dtype=np.float32)", "torch.as_tensor(buf, dtype=torch.float64)", False),
     ("np.empty(4, dtype=np.float32)", "torch.as_tensor(buf, device='cuda')", False),
     ("[0.0] * 4", "torch.as_tensor(buf)", False), ("np.zeros(4, np.float32)", "torch.Tensor(buf)", True),
     ("np.zeros(4, 'float32')", "torch.FloatTensor(buf)", True), ("np.zeros(4)", "torch.Tensor(buf)", False),
     ("np.zeros(4)", "torch.DoubleTensor(buf)", True), ("np.zeros(4, dtype=np.int64)", "torch.LongTensor(buf)", True),
     ("np.zeros(4, dtype=np.int64)", "torch.IntTensor(buf)", False),
     ("np.zeros_like(proto)", "torch.FloatTensor(buf)", False), ("np.empty(4)", "torch.tensor(buf)", False),
     ("np.empty(4)", "torch.from_numpy(buf.copy())", False), ("np.empty(4)", "torch.from_numpy(np.array(buf))", False),
     ("np.empty((4, 4))", "torch.from_numpy(buf[:2])", True), ("np.empty(16)", "torch.from_numpy(buf.T)", True)],
)  # fmt: skip
def test_which_constructors_share_the_memory_follows_the_runtime_detector(made, conversion, flagged):
    text = f"""\
    import numpy as np, torch
    def f(paths, proto):
        buf = {made}
        kept = []
        for path in paths:
            buf[:] = np.load(path)
            kept.append({conversion})
    """
    assert bool(_lint(text)) is flagged


def test_import_aliases_are_followed():
    text = """\
    import numpy as xp
    import torch as th
    from torch import from_numpy as fn
    def f(paths):
        buf = xp.empty(4, dtype=xp.float32)
        a, b = [], []
        for path in paths:
            xp.copyto(buf, xp.load(path))
            a.append(fn(buf))
            b.append(th.as_tensor(buf))
    """
    assert [f.location.line for f in _lint(text)] == [9, 10]


def test_a_buffer_attribute_refilled_by_a_method_of_the_class_and_one_it_rebinds():
    text = """\
    import numpy as np, torch
    class Reader:
        def read(self, n):
            for _ in range(n):
                self.refill()
                self.chunks.append(torch.from_numpy(self.buf))

        def read_fresh(self, n):
            for _ in range(n):
                self.reset()
                self.buf += 1
                self.chunks.append(torch.from_numpy(self.buf))

        def refill(self):
            self.fh.readinto(self.buf)

        def reset(self):
            self.buf = np.zeros(4)
    """
    (finding,) = _lint(text)
    assert (finding.location.line, finding.where, finding.data["refills"]) == (6, "self.buf", [5])


def test_a_same_file_function_that_fills_its_argument_is_a_refill_and_one_that_rebinds_it_first_is_not():
    text = """\
    import numpy as np, torch
    def fill(dst, path):
        dst[:] = np.load(path)
    def fresh(dst, path):
        dst = np.load(path)
        dst += 1
    def f(paths):
        buf = np.empty(4, dtype=np.float32)
        a, b = [], []
        for path in paths:
            fill(buf, path)
            a.append(torch.from_numpy(buf))
        for path in paths:
            fresh(buf, path)
            b.append(torch.from_numpy(buf))
    """
    assert [(f.location.line, f.data["refills"]) for f in _lint(text)] == [(12, [11])]


def test_nested_loops_report_each_conversion_once_with_the_innermost_loop_that_refills():
    text = """\
    import numpy as np, torch
    def f(groups):
        buf = np.empty(4, dtype=np.float32)
        result = []
        for group in groups:
            parts = []
            for item in group:
                buf[:] = item
                parts.append(torch.from_numpy(buf))
            result.append(parts)
        for group in groups:
            buf[:] = group
            for i in range(4):
                result.append(torch.from_numpy(buf)[i])
    """
    findings = _lint(text)
    assert [(f.location.line, f.data["lines"]) for f in findings] == [(9, [7, 8, 9]), (14, [11, 12, 14])]


def test_an_ignore_comment_drops_the_finding_and_code_without_torch_is_not_read():
    flagged = LOOP.format(refill="buf[:] = 1", keep="kept.append(t)", before="")
    assert len(_lint(flagged)) == 1
    assert _lint(flagged.replace("torch.from_numpy(buf)", "torch.from_numpy(buf)  # gradguard: ignore[GG501]")) == []
    assert list(NumpyAlias().check(Source("t.py", "for x in xs:\n    buf[:] = x\n    out.append(buf)\n"))) == []


def test_the_helpers():
    loop = ast.parse("for i, (x, self.y) in xs:\n    buf[:] = x\n    z = [w for w in x]\n").body[0]
    assert sorted(bound_in(loop)) == ["i", "self.y", "w", "x", "z"]
    assert base_of(ast.parse("d.setdefault(k, [])[0].append").body[0].value.value) == "d"
    assert prefixes("a.b") == ["a", "a.b"]
    src = Source("t.py", "import numpy as np\nclass A:\n    def __init__(self):\n        self.b = np.ones(3, bool)\n")
    arrays, at = Arrays(src), src.tree.body[1].body[0].body[0]
    assert arrays.dtype_of(at, "self.b") == "bool"
    assert (arrays.dtype_of(at, "self"), arrays.is_container(at, "self.b")) == (None, False)


AGREEMENT = """\
import io
import numpy as np
import torch

def as_tensor_case():
    buf = np.zeros(3, dtype=np.float32)
    samples = []
    for i in range(4):
        np.copyto(buf, np.full(3, i, dtype=np.float32))
        samples.append(torch.as_tensor(buf))

def readinto_case():
    fh = io.BytesIO(bytes(range(16)))
    buf = np.empty(4, dtype=np.uint8)
    records = {}
    while n := fh.readinto(buf):
        records[len(records)] = torch.from_numpy(buf[:n])

def correct():
    buf, wide, kept, latest = np.empty(3, dtype=np.float32), np.zeros(3), [], {}
    for i in range(4):
        buf[:] = wide[:] = i
        kept += [torch.from_numpy(buf.copy()), torch.Tensor(wide)]
        latest["x"] = torch.from_numpy(buf)

as_tensor_case(); readinto_case(); correct()
"""


def test_the_static_findings_are_the_ones_the_run_reports(write_script, run_cli, tmp_path):
    script = write_script(AGREEMENT)
    proc = run_cli("run", "--lint", "--json", "out.json", str(script))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    runtime = sorted((f["code"], f["location"]["line"]) for f in report["findings"])
    static = sorted((f["code"], f["location"]["line"]) for f in report["static"])
    assert runtime == static == [("GG501", 10), ("GG501", 17)]
    assert report["summary"]["agreed"] == 2
