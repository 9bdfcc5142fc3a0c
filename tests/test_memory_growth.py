"""GG301 memory-growth: leaks that grow every step are named; memory that fills and stays flat is not."""

import collections
import ctypes
import functools
import json
import os
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradguard
from gradguard import memory as mem
from gradguard.detectors import DETECTORS, MemoryGrowth

HERE = os.path.abspath(__file__)
STEPS = 60  # warm-up 10 + window 24 + confirmation 6 = flagged by step 40


def _line(marker):
    with open(HERE) as fh:
        for number, text in enumerate(fh, 1):
            if marker in text and "_line(" not in text:
                return number
    raise AssertionError(marker)


def _only(guard, code="GG301"):
    assert [f.code for f in guard.findings] == [code], (
        [str(f) for f in guard.findings],
        guard.to_dict()["detectors"]["GG301"],
    )
    return guard.findings[0]


def _train_step(model, opt, x):
    loss = model(x).float().pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


# ------------------------------------------------------------------------- flagged
def test_dict_cache_gaining_a_detached_tensor_each_step_is_flagged():
    torch.manual_seed(0)
    model = nn.Linear(16, 1024)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cache = {}
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        for step in range(STEPS):
            out = model(torch.randn(512, 16))
            cache[step] = out.detach()  # leak: dict
            loss = out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    f = _only(guard)
    assert f.where == "cache"
    assert os.path.abspath(f.location.file) == HERE
    assert f.location.line == _line("# leak: dict")
    assert f.step <= 10 + 50
    assert "`cache` (dict, " in f.message
    assert "gains 1 tensor [512, 1024] float32 (2 MiB) per step" in f.message
    assert 1.5 <= f.data["rate_mib_per_step"] <= 3.0
    assert f.data["projected_oom_step"] > f.step
    culprit = f.data["culprits"][0]
    assert culprit["shape"] == [512, 1024]
    assert culprit["owners"][0]["kind"] == "dict"
    report = guard.to_dict()["detectors"]["GG301"]
    assert len(report["series"]["step"]) == len(report["series"]["rss"]) >= STEPS // 2
    assert report["trends"][0]["slope"] > mem.MiB


def test_list_cache_gaining_a_detached_tensor_each_step_is_flagged():
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kept = []
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        for _ in range(STEPS):
            _train_step(model, opt, torch.randn(8, 16))
            kept.append(torch.randn(256, 1024).detach())  # leak: list
    f = _only(guard)
    assert f.where == "kept"
    assert f.location.line == _line("# leak: list")
    assert "`kept` (list, " in f.message
    assert "gains 1 tensor [256, 1024] float32 (1 MiB) per step" in f.message


def test_a_leak_in_a_loop_with_hand_written_updates_and_no_optimizer_is_flagged():
    model = nn.Linear(16, 16)
    kept = []
    with gradguard.Guard(model, detectors=[MemoryGrowth], policy="collect") as guard:  # no optimizer
        for _ in range(STEPS):
            model.zero_grad()
            model(torch.randn(8, 16)).pow(2).mean().backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.01)  # each backward() is an iteration
            kept.append(torch.randn(256, 1024))  # leak: by hand
    f = _only(guard)
    assert f.where == "kept"
    assert f.location.line == _line("# leak: by hand")
    assert f.data["clock"] == "iteration"
    assert "per iteration" in f.message


def test_outputs_kept_with_their_graphs_in_an_evaluation_loop_are_flagged():
    model = nn.Sequential(nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10))
    outputs = []
    with gradguard.Guard(model, detectors=[MemoryGrowth], policy="collect") as guard:  # no optimizer
        for _ in range(STEPS):
            outputs.append(model(torch.randn(512, 1024)))  # leak: graphs
    f = _only(guard)
    assert f.where == "outputs"
    assert f.location.line == _line("# leak: graphs")
    assert f.data["clock"] == "iteration"
    assert "no_grad" in f.hint
    culprit = f.data["culprits"][0]
    assert culprit["shape"] == [512, 10]
    assert culprit["grad_fn"]
    assert culprit["graph_bytes"] >= 2 * mem.MiB  # the input each graph saved
    assert "autograd graph" in f.message


class _Remembering(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 1024)
        self.history = []

    def forward(self, x):
        h = self.fc(x)
        self.history.append(h.detach())  # leak: attribute
        return h


def test_growing_list_on_a_module_attribute_is_flagged():
    model = _Remembering()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        for _ in range(STEPS):
            _train_step(model, opt, torch.randn(512, 16))
    f = _only(guard)
    assert f.where == "model.history"
    assert f.location.line == _line("# leak: attribute")
    assert "`model.history` (list, " in f.message


# ------------------------------------------------------------------------- nothing
@pytest.mark.parametrize("maxlen", [8, 30, 40])
def test_bounded_replay_buffer_that_fills_then_stays_flat_is_not_flagged(maxlen):
    # 8 fills during warm-up, 30 inside the trend window, 40 right at the confirmation
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    replay = collections.deque(maxlen=maxlen)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            _train_step(model, opt, torch.randn(8, 16))
            replay.append(torch.randn(512, 1024))
    assert [f for f in guard.findings if f.code == "GG301"] == []


def test_a_cache_bounded_by_hand_that_fills_past_the_decision_ends_as_info():
    # It grows for 60 steps, longer than the decision takes: told from a leak only once
    # it stays flat, so the finding is kept, downgraded to info, with the evidence.
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cache = []
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        for _ in range(130):
            _train_step(model, opt, torch.randn(8, 16))
            cache.append(torch.randn(512, 1024))
            if len(cache) > 60:
                cache.pop(0)
    f = _only(guard)
    assert f.where == "cache"
    assert f.severity == "info"
    assert f.data["stopped"]["flat_to"] == 130
    assert f.data["stopped"]["rate_mib_per_step"] < 0.2


def test_a_leak_that_keeps_growing_stays_a_warning():
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kept = []
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        for _ in range(90):
            _train_step(model, opt, torch.randn(8, 16))
            kept.append(torch.randn(512, 1024))
    f = _only(guard)
    assert f.severity == "warning"
    assert "stopped" not in f.data


def test_alternating_batch_sizes_are_not_flagged():
    model = nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for step in range(STEPS):
            _train_step(model, opt, torch.randn(1024 if step % 2 else 64, 1024))
    assert [f for f in guard.findings if f.code == "GG301"] == []


def test_first_steps_of_a_run_are_not_flagged():
    # Adam creates 8 MiB of state at step 1; a warm-up cache grows for the first steps only
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 8))
    opt = torch.optim.Adam(model.parameters())
    warm = []
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for step in range(40):
            _train_step(model, opt, torch.randn(32, 1024))
            if step < 10:
                warm.append(torch.randn(512, 1024))
    assert [f for f in guard.findings if f.code == "GG301"] == []


def test_short_runs_are_never_judged():
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cache = []
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        for _ in range(30):  # warm-up plus less than a window
            _train_step(model, opt, torch.randn(8, 16))
            cache.append(torch.randn(512, 1024))
    assert guard.findings == []


# ------------------------------------------------------------------------- what the census explains
@pytest.mark.parametrize("kind", ["list", "dict"])
def test_numpy_arrays_kept_in_a_container_are_explained_by_the_census(kind):
    # a dict of numpy arrays is one the garbage collector stops tracking: found through the variables
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kept = [] if kind == "list" else {}
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        for step in range(STEPS):
            _train_step(model, opt, torch.randn(8, 16))
            if kind == "list":
                kept.append(np.ones((256, 1024)))  # leak: numpy list
            else:
                kept[step] = np.ones((256, 1024))  # leak: numpy dict
    f = _only(guard)
    assert f.severity == "warning"
    assert f.where == "kept"
    assert f.location.line == _line(f"# leak: numpy {kind}")
    assert f"`kept` ({kind}, " in f.message
    assert "gains 1 entry per step, a numpy array [256, 1024] float64 (2 MiB)" in f.message
    assert f.data["culprits"][0]["kind"] == "entries"


def test_python_objects_kept_in_a_list_are_explained_by_the_census():
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    records = []
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        for _ in range(STEPS):
            _train_step(model, opt, torch.randn(8, 16))
            records.append([float(i) for i in range(40_000)])  # leak: objects
    f = _only(guard)
    assert f.severity == "warning"
    assert f.where == "records"
    assert f.location.line == _line("# leak: objects")
    assert "`records` (list, " in f.message
    assert "gains 1 entry per step, a list of 40000 float (1." in f.message


@pytest.fixture
def native_memory():
    """Memory that no Python object holds (what a C extension or the allocator itself keeps)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("allocates through glibc")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = []

    def grab(nbytes):
        block = libc.malloc(nbytes)
        ctypes.memset(block, 1, nbytes)
        blocks.append(block)

    yield grab
    for block in blocks:
        libc.free(block)


def _severities(guard):
    """Every severity a GG301 finding had, in order: as published, then as revised."""
    seen = []
    guard.finding_callbacks.append(lambda f: seen.append(f.severity.value) if f.code == "GG301" else None)
    return seen


def test_growth_nothing_explains_is_info_and_stays_info_once_it_levels_off(native_memory):
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="warn") as guard:
        seen = _severities(guard)
        for step in range(160):  # level for 110 steps: the sampling slows down where reading memory is slow
            _train_step(model, opt, torch.randn(8, 16))
            if step < 50:
                native_memory(1 << 20)
    f = _only(guard)
    assert seen == ["info", "info"]  # never a warning, not even for a while (and so nothing warned)
    assert f.data["explained"] is False
    assert "No growing group of live tensors, numpy arrays or Python containers explains it" in f.message
    assert "as an allocator that settles does" in f.message
    assert f.data["stopped"]["flat_to"] >= 90  # flat to the last samples (the cadence may skip the very last)


def test_growth_nothing_explains_becomes_a_warning_when_it_keeps_growing(native_memory):
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        seen = _severities(guard)
        for _ in range(150):  # the sampling slows down where reading memory is slow
            _train_step(model, opt, torch.randn(8, 16))
            native_memory(1 << 20)
    f = _only(guard)
    assert seen == ["info", "warning"]  # info when found, raised by a revision once it kept on
    assert f.severity == "warning"
    assert f.step <= 50
    persisted = f.data["persisted"]
    assert persisted["to"] - persisted["from"] >= 4 * 24
    assert 0.8 <= persisted["rate_mib_per_step"] <= 1.5
    assert "it kept growing, 1 MiB per step" in f.message
    assert "memory held outside what the census sees" in f.message


# ------------------------------------------------------------------------- correct loops, again and again
def _replay_varying(guarded, rng):
    model = nn.Linear(512, 8)
    opt = torch.optim.Adam(model.parameters())
    replay = collections.deque(maxlen=44)  # fills just after GG301 first decides
    with guarded(model, opt):
        for _ in range(70):
            n = rng.randint(32, 768)
            replay.append((torch.randn(n, 512), torch.randn(n, 8)))
            batch = rng.sample(list(replay), min(4, len(replay)))
            out = model(torch.cat([obs for obs, _ in batch]))
            loss = (out - torch.cat([target for _, target in batch])).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


def _two_sizes(guarded, rng):
    model = nn.Sequential(nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sizes = (rng.choice((32, 64)), rng.choice((768, 1024)))
    with guarded(model, opt):
        for step in range(60):
            _train_step(model, opt, torch.randn(sizes[step % 2], 1024))


class _FreshImages(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, index):
        return torch.rand(3, 32, 32), index % 10


def _dataloader(guarded, rng):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(_FreshImages(), batch_size=64, shuffle=True)
    with guarded(model, opt):
        for step, (images, labels) in enumerate(loader):
            loss = nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 60:
                break


def _lru_tokenizer(guarded, rng):
    corpus = [" ".join(str(rng.randrange(5000)) for _ in range(rng.randint(100, 1500))) for _ in range(300)]

    @functools.lru_cache(maxsize=512)
    def encode(text):
        return torch.tensor([int(word) for word in text.split()])

    model = nn.EmbeddingBag(5000, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with guarded(model, opt):
        for _ in range(70):
            ids = [encode(text) for text in rng.sample(corpus, 16)]
            offsets = torch.tensor([0] + [len(t) for t in ids[:-1]]).cumsum(0)
            loss = model(torch.cat(ids), offsets).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


def _tbptt_rnn(guarded, rng):
    model = nn.LSTM(32, 128, batch_first=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    state = None
    with guarded(model, opt):
        for _ in range(60):
            if state is not None:
                state = tuple(s.detach() for s in state)  # truncated backpropagation through time
            out, state = model(torch.randn(16, 20, 32), state)
            loss = out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("loop", [_replay_varying, _two_sizes, _dataloader, _lru_tokenizer, _tbptt_rnn])
def test_correct_loops_whose_memory_goes_up_and_down_never_warn(loop):
    # a few runs each (benchmarks/false_alarms.py runs them, and more, many times over)
    loud = []

    def guarded(model, opt):
        guard = gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect")
        guard.finding_callbacks.append(lambda f: loud.append(str(f)) if f.severity != "info" else None)
        return guard

    for seed in range(3):
        torch.manual_seed(seed)
        loop(guarded, random.Random(seed))
    assert loud == []


# ------------------------------------------------------------------------- the trend test alone
def _noisy(values, seed, noise_mib=0.3):
    rng = np.random.default_rng(seed)
    return [v + rng.normal(0, noise_mib * mem.MiB) + (rng.random() < 0.1) * 20 * mem.MiB for v in values]


@pytest.mark.parametrize("seed", range(5))
def test_trend_finds_a_1_mib_per_step_leak_in_noise_and_outliers(seed):
    steps = list(range(24))
    rss = _noisy([500 * mem.MiB + s * mem.MiB for s in steps], seed)
    trend = mem.growing(steps, rss, min_rate=0.25 * mem.MiB, min_growth=8 * mem.MiB)
    assert trend is not None
    assert 0.8 * mem.MiB < trend.slope < 1.2 * mem.MiB


@pytest.mark.parametrize("seed", range(5))
def test_trend_ignores_plateaus_alternation_and_noise(seed):
    steps = list(range(24))
    base = 500 * mem.MiB
    plateau = _noisy([base + 3 * mem.MiB * min(s, 11) for s in steps], seed)
    alternating = _noisy([base + 40 * mem.MiB * (s % 2) for s in steps], seed)
    flat = _noisy([base] * 24, seed, noise_mib=4)
    for series in (plateau, alternating, flat):
        assert mem.growing(steps, series, min_rate=0.25 * mem.MiB, min_growth=8 * mem.MiB) is None


# ------------------------------------------------------------------------- contract
def test_rule_page_and_registration():
    assert gradguard.explain("memory-growth").startswith("GG301 memory-growth: ")
    assert MemoryGrowth in DETECTORS
    assert "GG301" in gradguard.explain("GG301")
    assert "**How to fix it.**" in MemoryGrowth.rule_page()


def test_configuration_errors_name_the_argument():
    with pytest.raises(ValueError, match="Expected window to be an int >= 8 but got 2"):
        MemoryGrowth(window=2)
    with pytest.raises(ValueError, match="min_rate_mib"):
        MemoryGrowth(min_rate_mib=0)


def test_state_dict_round_trips_and_report_is_json(tmp_path):
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    det = MemoryGrowth()
    with gradguard.Guard(model, opt, detectors=[det], policy="collect") as guard:
        for _ in range(12):
            _train_step(model, opt, torch.ones(2, 4))
        state = guard.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path)
    assert loaded == state
    fresh = MemoryGrowth()
    with gradguard.Guard(model, opt, detectors=[fresh], policy="collect") as other:
        other.load_state_dict(loaded)
    assert loaded == state
    assert not model._forward_pre_hooks  # detectors hold no hooks; the guard removed its own
    assert not model._forward_hooks
    assert not det.attached
    json.dumps(guard.to_dict())


# ------------------------------------------------------------------------- gradguard run
_DICT_SCRIPT = """\
import torch
from torch import nn

torch.set_num_threads(1)
model = nn.Linear(16, 1024)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
cache = {}
for step in range(60):
    out = model(torch.randn(512, 16))
    cache[step] = out.detach()
    loss = out.pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""

_EVAL_SCRIPT = """\
import torch
from torch import nn

torch.set_num_threads(1)


def evaluate(model):
    outputs = []
    for _ in range(60):
        outputs.append(model(torch.randn(512, 1024)))
    return outputs


evaluate(nn.Sequential(nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10)))
"""

_ATTR_SCRIPT = """\
import torch
from torch import nn

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 1024)
        self.seen = []

    def forward(self, x):
        h = self.fc(x)
        self.seen.append(h.detach())
        return h


net = Net()
optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
for _ in range(60):
    loss = net(torch.randn(512, 16)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""

_CORRECT_SCRIPT = """\
import collections

import torch
from torch import nn

torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 1))
optimizer = torch.optim.Adam(model.parameters())  # its state appears at step 1
replay = collections.deque(maxlen=30)  # fills inside the trend window, then stays flat
for step in range(60):
    replay.append(torch.randn(512, 1024))
    x = torch.randn(512 if step % 2 else 64, 1024)  # alternating batch sizes
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""


@pytest.mark.parametrize(
    ("source", "where", "line", "kind"),
    [
        (_DICT_SCRIPT, "cache", 10, "dict"),
        (_EVAL_SCRIPT, "outputs", 10, "list"),
        (_ATTR_SCRIPT, "net.seen", 15, "list"),
    ],
    ids=["dict-cache", "eval-graphs", "module-attribute"],
)
def test_gradguard_run_flags_each_leak(tmp_path, write_script, run_cli, source, where, line, kind):
    write_script(source)
    proc = run_cli(
        "run", "--json", "out.json", "--html", "report.html", "--policy", "collect", "--select", "GG301", "train.py"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    findings = report["findings"]
    assert [f["code"] for f in findings] == ["GG301"], proc.stderr
    f = findings[0]
    assert f["where"] == where
    assert f["location"]["file"] == "train.py"
    assert f["location"]["line"] == line
    assert f"`{where}` ({kind}, train.py:{line}) gains 1 tensor" in f["message"]
    assert report["detectors"]["GG301"]["census"]["groups"]
    page = (tmp_path / "report.html").read_text()
    assert f"<code>{where}</code>" in page
    assert "<polyline" in page


def test_gradguard_run_leaves_a_correct_loop_alone(tmp_path, write_script, run_cli):
    # a bounded replay buffer, alternating batch sizes and Adam's first steps, all at once
    write_script(_CORRECT_SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    growths = [f for f in report["findings"] if f["code"] == "GG301"]
    # RSS may grow a while as malloc keeps what the buffer evicts: nothing explains it, so info at most
    assert [f for f in growths if f["severity"] != "info" or f["data"]["explained"] is not False] == []
    assert len(report["detectors"]["GG301"]["series"]["rss"]) >= 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_is_flagged_on_the_device_counter():
    model = nn.Linear(16, 1024).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cache = []
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        for _ in range(STEPS):
            out = model(torch.randn(512, 16, device="cuda"))
            cache.append(out.detach())
            loss = out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    signals = {f.data["signal"] for f in guard.findings if f.code == "GG301"}
    assert "cuda_allocated" in signals
