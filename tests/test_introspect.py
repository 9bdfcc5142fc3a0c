"""The introspection toolkit, tested once: frames, naming, assignment sites, graph walks, device flags."""

from __future__ import annotations

import sys
from collections import deque

import torch

from gradguard.introspect import device, sites
from gradguard.introspect.frames import frame_variables, is_library_file, user_frame, user_frames, user_location
from gradguard.introspect.graph import graph_tensors, walk
from gradguard.introspect.naming import Namer, name_in_frame

from .helpers import line_of


def test_user_frames_skip_torch_and_gradguard():
    seen = []
    model = torch.nn.Linear(2, 2)

    def hook(module, args, output):  # called by torch: the user's frame is the one that called the model
        caller = sys._getframe(1)
        seen.append((user_frame(caller), user_location(caller)))

    model.register_forward_hook(hook)
    model(torch.ones(1, 2))  # marker: call
    frame, location = seen[0]
    assert frame.f_code.co_name == "test_user_frames_skip_torch_and_gradguard"
    assert location.line == line_of("# marker: call")
    assert is_library_file(torch.__file__)
    assert not is_library_file(__file__)
    assert user_frames(limit=2)[0].f_code is sys._getframe().f_code


def test_naming_finds_locals_self_attributes_and_containers():
    class Loop:
        def __init__(self):
            self.losses = []

        def run(self):
            target = object()
            history = [target]
            self.losses.append(target)
            frame = sys._getframe()
            return (
                name_in_frame(frame, target),
                name_in_frame(frame, self.losses, attributes=True),
                name_in_frame(frame, history[0], containers=True),
            )

    assert Loop().run() == ("target", "self.losses", "target")

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model[0].kept = kept = [torch.ones(1)]
    namer = Namer([sys._getframe()], [model])
    assert namer.name(kept).text == "kept"  # a variable first
    del kept
    name = Namer([sys._getframe()], [model]).name(model[0].kept)
    assert name.text == "model.0.kept"
    assert name.attribute == "kept"


def _filling():
    total = 0
    cache = {}
    window = deque(maxlen=3)
    for step in range(3):
        total += step  # marker: augmented
        cache[step] = step  # marker: subscript
        window.append(step)  # marker: append
    return sys._getframe().f_code


class _Owner:
    def __init__(self):
        self.history = []

    def add(self, x):
        self.history.append(x)  # marker: attribute


def test_sites_find_the_lines_that_fill_a_name():
    code = _filling()
    assert sites.variable_sites(code, "total").augmented == [line_of("# marker: augmented")]
    assert sites.variable_sites(code, "cache").mutation({}) == line_of("# marker: subscript")
    assert sites.variable_sites(code, "window").mutation(deque()) == line_of("# marker: append")
    assert sites.variable_sites(code, "total").created  # `total = 0` holds no graph
    location = sites.class_attribute_location(_Owner, "history", [])
    assert location is not None
    assert location.line == line_of("# marker: attribute")


def test_attribute_assignments_are_found_anywhere_in_a_file(tmp_path):
    path = tmp_path / "freeze.py"
    path.write_text("for p in params:\n    p.requres_grad = False\nsetattr(q, 'requres_grad', False)\nx = 1\n")
    assert sites.attribute_assignments(str(path), "requres_grad") == [2, 3]


def test_graph_walks_are_bounded_and_see_each_node_once():
    x = torch.ones(2, requires_grad=True)
    y = x
    for _ in range(50):
        y = y * 2
    nodes = walk([y.grad_fn], limit=10)
    assert len(nodes) == 10
    assert len({id(n) for n in nodes}) == 10
    assert list(graph_tensors([y, 1, (x,)], depth=2)) == [y, x]


def test_device_flags_answer_on_the_cpu_at_once():
    assert device.holds_values(torch.zeros(3)) is False
    assert device.resolve(device.holds_values(torch.tensor([0.0, 1.0])), wait=False) is True


def test_reading_variables_leaves_no_snapshot_that_keeps_tensors_alive():
    import weakref

    def loop():
        t = torch.ones(1000)
        ref = weakref.ref(t)
        frame_variables(sys._getframe())
        del t
        return ref

    assert loop()() is None


def test_code_at_names_the_innermost_function_of_a_line():
    from gradguard.introspect.sites import code_at

    source = "x = 1\nclass A:\n    def f(self):\n        y = 2\n        return y\ndef g():\n    return 3\n"
    module = compile(source, "m.py", "exec")
    assert [code_at(module, line).co_name for line in (1, 4, 5, 7)] == ["<module>", "f", "f", "g"]
