"""GG501 numpy-alias-mutated: the buggy loops of issue 6 are flagged, their fixes are not."""

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

import gradguard
from gradguard.detectors.numpy_alias import NumpyAliasMutated
from gradguard.sources.numpy import TYPED, patched

from .helpers import line_of

_REL = os.path.relpath(__file__)
HERE = __file__ if _REL.startswith("..") else _REL  # how findings name this file


def _line(marker: str) -> int:
    return line_of(f"# {marker}", __file__)


def _model_opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _train(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def _only_gg501(guard):
    return [f for f in guard.findings if f.code == "GG501"]


# ------------------------------------------------------------------------------ flagged
def test_refilled_buffer_kept_in_list_is_flagged():
    model, opt = _model_opt()
    rng = np.random.default_rng(0)
    with gradguard.Guard(model, opt, policy="collect", detectors=[NumpyAliasMutated]) as guard:
        buf = np.empty(4, dtype=np.float32)
        data = []
        for _ in range(4):
            buf[:] = rng.random(4)
            data.append(torch.from_numpy(buf))  # refill
        for x in data:
            _train(model, opt, x)
    [f] = guard.findings
    assert f.code == "GG501"
    assert f.where == "buf"
    assert (f.location.file, f.location.line) == (HERE, _line("refill"))
    assert f.data["kind"] == "kept-alias"
    assert f.data["container"] == "data"
    assert f.data["created_at"] == f"{HERE}:{_line('refill')}"
    assert f.count == 3  # the first three tensors now hold the fourth sample
    assert "torch.tensor" in f.hint
    assert "buf.copy()" in f.hint
    assert all(torch.equal(x, data[-1]) for x in data)  # the bug is real


def test_two_refilled_tensors_used_in_forward_are_flagged_at_the_forward():
    model, opt = _model_opt()
    with gradguard.Guard(model, opt, policy="collect", detectors=[NumpyAliasMutated]) as guard:
        buf = np.empty(4, dtype=np.float32)
        pair = []
        for value in (1.0, 2.0):
            buf[:] = value
            pair.append(torch.from_numpy(buf))  # aliases
        with torch.no_grad():
            model(pair[1])
            model(pair[0])  # stale use
    [f] = guard.findings
    assert (f.where, f.location.line, f.data["kind"]) == ("buf", _line("stale use"), "stale-tensor-used")
    assert f.data["created_at"] == f.data["made_again_at"] == f"{HERE}:{_line('aliases')}"
    assert "Linear.forward" in f.message


def _normalise_every_epoch(model, opt, data):
    for _ in range(3):
        x = torch.from_numpy(data)  # normalise
        x.sub_(x.mean(0)).div_(x.std(0))
        for i in range(0, len(x), 4):
            _train(model, opt, x[i : i + 4])


def test_in_place_normalisation_of_a_from_numpy_tensor_is_flagged():
    model, opt = _model_opt()
    data = np.random.default_rng(0).random((8, 4)).astype(np.float32)
    with gradguard.Guard(model, opt, policy="collect", detectors=[NumpyAliasMutated]) as guard:
        _normalise_every_epoch(model, opt, data)
    [f] = guard.findings
    assert (f.code, f.where, f.location.line) == ("GG501", "data", _line("normalise"))
    assert f.data["kind"] == "rewritten-in-place"
    assert f.data["created_at"] == f"{HERE}:{_line('normalise')}"
    assert f.data["changed_at"].startswith(f"{HERE}:")
    assert f.count == 2  # epochs 2 and 3 normalise the already normalised array again


def test_numpy_snapshots_of_a_parameter_are_flagged_at_the_step_after():
    model, opt = _model_opt()
    history = []
    with gradguard.Guard(model, opt, policy="collect", detectors=[NumpyAliasMutated]) as guard:
        for step in range(3):
            _train(model, opt, torch.randn(2, 4))
            history.append(model.weight.detach().numpy())  # snapshot
            if step == 1:
                assert guard.findings == []  # two snapshots, no step since the second
    [f] = guard.findings
    assert (f.where, f.location.line, f.step) == ("weight", _line("snapshot"), 3)
    assert f.data["container"] == "history"
    assert ".copy()" in f.hint
    assert np.array_equal(history[0], history[-1])  # the bug is real


@pytest.mark.parametrize(
    ("how", "dtype"),
    [
        ("torch.Tensor", np.float32),
        ("torch.FloatTensor", np.float32),
        ("torch.DoubleTensor", np.float64),
        ("torch.HalfTensor", np.float16),
        ("torch.LongTensor", np.int64),
        ("torch.IntTensor", np.int32),
        ("torch.ShortTensor", np.int16),
        ("torch.CharTensor", np.int8),
        ("torch.ByteTensor", np.uint8),
        ("torch.BoolTensor", np.bool_),
    ],
)
def test_refilled_buffer_kept_through_a_legacy_constructor_is_flagged(how, dtype):
    model, opt = _model_opt()
    with gradguard.Guard(model, opt, policy="collect", detectors=[NumpyAliasMutated]) as guard:
        make = getattr(torch, how.split(".")[1])  # looked up while attached, as torch.FloatTensor(...) is
        buf = np.empty(4, dtype=dtype)
        data = []
        for i in range(3):
            buf[:] = i % 2  # bool too
            data.append(make(buf))  # legacy refill
        for x in data:
            _train(model, opt, x.float())
    [f] = guard.findings
    assert (f.code, f.where, f.location.file, f.location.line) == ("GG501", "buf", HERE, _line("legacy refill"))
    assert (f.data["kind"], f.data["how"], f.data["container"]) == ("kept-alias", how, "data")
    assert f.count == 2
    assert f"{how}(buf.copy())" in f.hint
    assert all(torch.equal(x, data[-1]) for x in data)  # the bug is real


def test_in_place_normalisation_of_a_torch_tensor_over_an_array_is_flagged():
    model, opt = _model_opt()
    data = np.random.default_rng(0).random((8, 4)).astype(np.float32)
    with gradguard.Guard(model, opt, policy="collect", detectors=[NumpyAliasMutated]) as guard:
        for _ in range(2):
            x = torch.Tensor(data)  # legacy normalise
            x.sub_(x.mean(0))
            _train(model, opt, x)
    [f] = guard.findings
    assert (f.where, f.location.line, f.data["kind"]) == ("data", _line("legacy normalise"), "rewritten-in-place")
    assert "torch.Tensor(data)" in f.message


# ------------------------------------------------------------------------------ nothing
def test_fresh_array_per_batch_is_not_flagged():
    model, opt = _model_opt()
    rng = np.random.default_rng(0)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(4):
            x = torch.from_numpy(rng.random((2, 4)).astype(np.float32))
            _train(model, opt, x)
    assert _only_gg501(guard) == []
    assert guard.detector("GG501").aliases_seen == 4


def test_copied_snapshots_and_read_only_outputs_are_not_flagged():
    model, opt = _model_opt()
    history, outputs = [], []
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(4):
            x = torch.randn(2, 4)
            _train(model, opt, x)
            history.append(model.weight.detach().numpy().copy())
            outputs.append(model(x).detach().numpy())
            latest = model.weight.detach().numpy()  # a live view, rebound every step
    assert _only_gg501(guard) == []
    assert np.array_equal(latest, model.weight.detach().numpy())
    assert not np.array_equal(history[0], history[-1])


def test_views_of_a_data_matrix_nobody_writes_to_are_not_flagged():
    model, opt = _model_opt()
    data = np.random.default_rng(0).random((8, 4)).astype(np.float32)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(3):
            for i in range(0, 8, 2):
                _train(model, opt, torch.from_numpy(data[i : i + 2]))
                _train(model, opt, torch.as_tensor(data[i]))
    assert _only_gg501(guard) == []


def test_a_refilled_buffer_used_right_away_is_not_flagged():
    model, opt = _model_opt()
    rng = np.random.default_rng(0)
    buf = np.empty((2, 4), dtype=np.float32)
    pinned = torch.from_numpy(buf)  # one alias, refilled on purpose
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(4):
            buf[:] = rng.random((2, 4))
            x = torch.from_numpy(buf)  # a variable rebound every step
            x.sub_(0.5)  # in place, but buf is refilled before it is read again
            _train(model, opt, x)
            _train(model, opt, pinned)
        with torch.enable_grad():  # forward without backward keeps the last input alive
            for _ in range(3):
                buf[:] = rng.random((2, 4))
                x = torch.from_numpy(buf)
                out = model(x)
    assert out.requires_grad
    assert _only_gg501(guard) == []


def test_legacy_constructors_that_copy_are_not_flagged():
    model, opt = _model_opt()
    with gradguard.Guard(model, opt, policy="collect") as guard:
        buf = np.empty(4, dtype=np.float32)
        ints = np.empty(4, dtype=np.int64)
        data = []
        for i in range(3):
            buf[:] = i
            ints[:] = i
            data.append(torch.Tensor(buf.tolist()))  # a list
            data.append(torch.tensor(buf))  # a copy
            data.append(torch.FloatTensor(ints))  # int64 to float32: a copy
            data.append(torch.Tensor(buf.astype(np.float64)))  # float64 to the default float32: a copy
            data.append(torch.DoubleTensor(buf))  # float32 to float64: a copy
            data.append(torch.Tensor(4).fill_(i))  # a size
            data.append(torch.FloatTensor(2, 2).view(4).fill_(i))
        for x in data:
            _train(model, opt, x.float())
        seen = guard.detector("GG501").aliases_seen
    assert _only_gg501(guard) == []
    assert seen == 0
    assert [x[0].item() for x in data[::7]] == [0.0, 1.0, 2.0]


def test_legacy_constructors_report_exactly_the_aliases_they_make():
    # Which (constructor, dtype) pairs share memory is measured, not assumed.
    arrays = [np.arange(4).astype(d) for d in (np.float16, np.float32, np.float64, np.int8, np.int16)]
    arrays += [np.arange(4).astype(d) for d in (np.int32, np.int64, np.uint8, np.bool_, np.uint16)]
    made = 0
    with gradguard.Guard(policy="collect", detectors=["GG501"]) as guard:
        det = guard.detector("GG501")
        for name in ("Tensor", *TYPED):
            for array in arrays:
                seen = det.aliases_seen
                try:
                    tensor = getattr(torch, name)(array)
                except TypeError:
                    assert det.aliases_seen == seen  # uint16 and the like: refused, nothing reported
                    continue
                shares = tensor.data_ptr() == array.ctypes.data  # (tensor.numpy() would be an alias too)
                assert det.aliases_seen == seen + shares, (name, array.dtype)
                made += shares
    assert made == 1 + len(TYPED)  # each aliases its own dtype only
    assert guard.findings == []


class _Arrays(torch.utils.data.Dataset):
    def __init__(self, from_numpy: bool = False) -> None:
        self.x = np.random.default_rng(0).random((8, 4)).astype(np.float32)
        self.y = np.arange(8, dtype=np.float32)
        self.from_numpy = from_numpy

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x = torch.from_numpy(self.x[i]) if self.from_numpy else self.x[i]
        return x, self.y[i]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_default_collation_is_not_flagged(num_workers):
    model, opt = _model_opt()
    loaders = [
        torch.utils.data.DataLoader(_Arrays(), batch_size=4, num_workers=num_workers),
        torch.utils.data.DataLoader(_Arrays(from_numpy=True), batch_size=4, num_workers=num_workers),
        torch.utils.data.DataLoader(_Arrays(), batch_size=None, num_workers=num_workers),
    ]
    with gradguard.Guard(model, opt, policy="raise") as guard:
        for _ in range(2):
            for loader in loaders:
                for x, _y in loader:
                    _train(model, opt, x)
        seen = guard.detector("GG501").aliases_seen
    assert guard.findings == []
    assert seen == (16 if num_workers == 0 else 0)  # only the dataset's own from_numpy, in this process


class _RefilledSamples(torch.utils.data.Dataset):
    """A buggy dataset: every sample is a tensor over one reused buffer."""

    def __init__(self) -> None:
        self.buf = np.empty(4, dtype=np.float32)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        self.buf[:] = i
        return torch.from_numpy(self.buf)  # dataset refill


def test_a_dataset_that_refills_one_buffer_is_flagged_in_process():
    loader = torch.utils.data.DataLoader(_RefilledSamples(), batch_size=4)
    with gradguard.Guard(policy="collect", detectors=[NumpyAliasMutated]) as guard:
        batches = list(loader)
    [f] = guard.findings
    assert (f.where, f.location.line) == ("self.buf", _line("dataset refill"))
    assert batches[0][0, 0].item() == 3.0  # collation stacked four copies of the last sample


def test_forked_workers_never_report():
    # A forked worker inherits the wrappers but no listener: it must not warn or raise in there.
    loader = torch.utils.data.DataLoader(_RefilledSamples(), batch_size=4, num_workers=2)
    with gradguard.Guard(policy="raise", detectors=[NumpyAliasMutated]) as guard:
        assert len(list(loader)) == 2
    assert guard.findings == []


# ------------------------------------------------------------------------------ the patch
def test_wrappers_exist_only_while_attached_and_nest():
    originals = (torch.from_numpy, torch.as_tensor, torch.Tensor.numpy)
    assert "numpy" not in torch.Tensor.__dict__
    assert not patched()
    outer = gradguard.Guard(policy="collect", detectors=["GG501"]).attach()
    inner = gradguard.Guard(policy="collect", detectors=["GG501"]).attach()
    assert torch.from_numpy is not originals[0]
    assert patched()
    kept = torch.from_numpy  # a reference to the wrapper that outlives the guards
    outer.detach()
    assert patched()  # the inner guard still needs them
    array = np.zeros(3)
    assert torch.from_numpy(array).data_ptr() == array.__array_interface__["data"][0]
    assert inner.detector("GG501").aliases_seen == 1
    inner.detach()
    assert (torch.from_numpy, torch.as_tensor, torch.Tensor.numpy) == originals
    assert "numpy" not in torch.Tensor.__dict__
    assert not patched()
    assert kept(array).data_ptr() == array.__array_interface__["data"][0]  # still works, records nothing


def test_legacy_constructor_stand_ins_behave_as_the_originals_and_leave_none_behind():
    originals = {name: getattr(torch, name) for name in TYPED}
    set_default = torch._C._set_default_tensor_type
    assert torch.Tensor.__init__ is object.__init__
    array = np.zeros(3, dtype=np.float32)
    with gradguard.Guard(policy="collect", detectors=["GG501"]) as guard:
        stand_in = torch.FloatTensor
        assert stand_in is not originals["FloatTensor"]
        assert "__init__" in vars(torch.Tensor)
        assert isinstance(torch.zeros(1), torch.FloatTensor)
        assert not isinstance(torch.zeros(1, dtype=torch.int64), torch.FloatTensor)
        assert issubclass(torch.LongTensor, torch.LongTensor)
        assert torch.FloatTensor == originals["FloatTensor"]
        assert {originals["FloatTensor"]: 1}[torch.FloatTensor] == 1
        assert (repr(torch.FloatTensor), torch.FloatTensor.__name__) == ("<class 'torch.FloatTensor'>", "FloatTensor")
        assert (torch.FloatTensor.dtype, torch.LongTensor.is_cuda) == (torch.float32, False)
        assert torch.zeros(2, dtype=torch.int64).type(torch.DoubleTensor).dtype == torch.float64
        assert pickle.loads(pickle.dumps(torch.FloatTensor)) is torch.FloatTensor
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.set_default_tensor_type\(\) is deprecated")
            try:
                torch.set_default_tensor_type(torch.DoubleTensor)  # given the original class
                assert torch.tensor([1.0]).dtype == torch.float64
            finally:
                torch.set_default_tensor_type("torch.FloatTensor")
        assert torch.tensor([1.0]).dtype == torch.float32
        assert type(torch.nn.Parameter(torch.zeros(2))) is torch.nn.Parameter

        class Subclass(torch.Tensor):
            pass

        class PassesUp(torch.Tensor):
            def __init__(self, data):
                super().__init__(data)

        sub = Subclass(array)
        assert type(sub) is Subclass
        assert guard.detector("GG501").aliases_seen == 1  # Subclass(array) shares its memory too
        with pytest.raises(TypeError, match="takes exactly one argument"):
            PassesUp(torch.zeros(2))  # as without gradguard
    assert {name: getattr(torch, name) for name in TYPED} == originals
    assert all(getattr(torch, name) is original for name, original in originals.items())
    assert torch._C._set_default_tensor_type is set_default
    assert torch.Tensor.__init__ is object.__init__
    assert "__init__" not in vars(torch.Tensor)
    assert not patched()
    assert stand_in(array).data_ptr() == array.__array_interface__["data"][0]  # a kept stand-in still works
    assert isinstance(torch.zeros(1), stand_in)
    assert guard.detector("GG501").aliases_seen == 1  # and reports nothing


def test_copies_are_not_aliases():
    with gradguard.Guard(policy="collect", detectors=["GG501"]) as guard:
        a = np.ones(3, dtype=np.float64)
        torch.as_tensor(a, dtype=torch.float32)
        torch.as_tensor([1.0, 2.0])
        torch.tensor(a)
        torch.ones(2, dtype=torch.complex64).conj().numpy(force=True)
        seen = guard.detector("GG501").aliases_seen
        torch.as_tensor(a)
        assert guard.detector("GG501").aliases_seen == seen + 1
    assert seen == 0


def test_state_dict_and_report():
    model, opt = _model_opt()
    with gradguard.Guard(model, opt, policy="collect", detectors=["GG501"]) as guard:
        buf = np.zeros(4, dtype=np.float32)
        kept = []
        for i in range(3):
            buf[:] = i
            kept.append(torch.from_numpy(buf))
        state = guard.detector("GG501").state_dict()
    assert state == {"aliases_seen": 3, "flagged": 1}
    assert guard.to_dict()["detectors"]["GG501"]["flagged"] == 1
    det = NumpyAliasMutated()
    det.load_state_dict(state)
    assert det.aliases_seen == 3


# ------------------------------------------------------------------------------ gradguard run
FLAGGED_SCRIPT = """\
import numpy as np
import torch

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rng = np.random.default_rng(0)


def train(x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


buf = np.empty(4, dtype=np.float32)
dataset = []
for _ in range(4):
    buf[:] = rng.random(4)
    dataset.append(torch.from_numpy(buf))  # L_REFILL
for x in dataset:
    train(x)

features = rng.random((8, 4)).astype(np.float32)
for epoch in range(3):
    x = torch.from_numpy(features)  # L_NORMALISE
    x.sub_(x.mean(0)).div_(x.std(0))
    train(x)

history = []
for step in range(3):
    train(torch.ones(2, 4))
    history.append(model.weight.detach().numpy())  # L_SNAPSHOT

block = np.empty(4, dtype=np.float32)
legacy = []
for _ in range(3):
    block[:] = rng.random(4)
    legacy.append(torch.FloatTensor(block))  # L_LEGACY
for x in legacy:
    train(x)
"""

NOTHING_SCRIPT = """\
import numpy as np
import torch


class Arrays(torch.utils.data.Dataset):
    def __init__(self):
        self.x = np.random.default_rng(0).random((8, 4)).astype(np.float32)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.x[i], np.float32(i)


def main():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(0)

    def train(x):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    history, outputs = [], []
    for _ in range(3):
        train(torch.from_numpy(rng.random((2, 4)).astype(np.float32)))  # a fresh array
        history.append(model.weight.detach().numpy().copy())
        outputs.append(model(torch.ones(2, 4)).detach().numpy())
    data = rng.random((8, 4)).astype(np.float32)
    for _ in range(2):
        for i in range(0, 8, 2):
            train(torch.from_numpy(data[i : i + 2]))
    buf, ints, kept = np.empty(4, dtype=np.float32), np.empty(4, dtype=np.int64), []
    for i in range(3):
        buf[:] = rng.random(4)
        ints[:] = i
        kept += [torch.Tensor(buf.copy()), torch.Tensor(buf.tolist()), torch.FloatTensor(ints), torch.Tensor(2, 4)]
    for x in kept:
        train(x)
    for workers in (0, 2):
        for x, _y in torch.utils.data.DataLoader(Arrays(), batch_size=4, num_workers=workers):
            train(x)


if __name__ == "__main__":
    main()
"""


def test_gradguard_run_flags_each_case(run_cli, write_script, tmp_path):
    script = str(write_script(FLAGGED_SCRIPT))
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    findings = json.loads((tmp_path / "out.json").read_text())["findings"]
    got = sorted((f["code"], f["where"], f["location"]["line"], f["data"]["kind"]) for f in findings)
    assert got == sorted(
        [
            ("GG501", "buf", line_of("# L_REFILL", script), "kept-alias"),
            ("GG501", "features", line_of("# L_NORMALISE", script), "rewritten-in-place"),
            ("GG501", "weight", line_of("# L_SNAPSHOT", script), "kept-alias"),
            ("GG501", "block", line_of("# L_LEGACY", script), "kept-alias"),
        ]
    )
    assert all(f["location"]["file"] == "train.py" for f in findings)


def test_gradguard_run_stays_silent_on_correct_code(run_cli, write_script, tmp_path):
    write_script(NOTHING_SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["findings"] == []
    # it was watching: 3 fresh arrays, 6 .numpy(), 8 slices, 3 torch.Tensor(buf.copy()); no copying constructor
    assert report["detectors"]["GG501"]["aliases_seen"] == 20
