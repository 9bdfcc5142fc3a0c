"""Near misses of requires_grad: one definition for the runtime detector and the linter."""

import subprocess
import sys

import pytest
import torch

from gradguard import spelling
from gradguard.detectors.requires_grad_typo import is_near_miss as runtime_is_near_miss
from gradguard.introspect import spelling as introspect_spelling
from gradguard.spelling import (
    LEGITIMATE,
    TARGET,
    damerau_levenshtein,
    is_near_miss,
    spelling_key,
    within_distance,
)


@pytest.mark.parametrize("cls", [torch.nn.Parameter, torch.Tensor])
def test_legitimate_names_are_those_tensors_really_have(cls):
    # the written-out set must follow torch: a real tensor attribute is never a misspelling
    found = frozenset(n for n in dir(cls) if n != "requires_grad_" and within_distance(spelling_key(n)))
    assert found | {TARGET} == LEGITIMATE


def test_every_real_tensor_attribute_is_not_a_near_miss_except_the_method_name():
    names = set(dir(torch.nn.Parameter)) | set(dir(torch.Tensor))
    assert [n for n in sorted(names) if is_near_miss(n)] == ["requires_grad_"]


def test_runtime_and_linter_share_one_definition():
    assert introspect_spelling.is_near_miss is is_near_miss
    assert runtime_is_near_miss is is_near_miss
    assert introspect_spelling.damerau_levenshtein is damerau_levenshtein


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("requires_grad", "requires_grad", 0), ("requres_grad", "requires_grad", 1),
     ("requries_grad", "requires_grad", 1), ("reqiures_grad", "requires_grad", 1),
     ("rqeuires_grad", "requires_grad", 1), ("required_grad", "requires_grad", 1),
     ("grad", "requires_grad", 9), ("", "abc", 3), ("abc", "", 3), ("ab", "ba", 1)],
)  # fmt: skip
def test_damerau_levenshtein(a, b, distance):
    assert damerau_levenshtein(a, b) == distance
    assert damerau_levenshtein(b, a) == distance


@pytest.mark.parametrize(
    "name",
    ["requres_grad", "require_grad", "requires_grads", "requiresgrad", "Requires_Grad", "REQUIRES_GRAD",
     "requries_grad", "requires_grad_", "required_grad", "reqires_grad", "requiresGrad", "requires-grad"],
)  # fmt: skip
def test_near_misses(name):
    assert is_near_miss(name)


@pytest.mark.parametrize(
    "name",
    ["requires_grad", "retains_grad", "retain_grad", "grad", "gradient", "require", "requires",
     "requires_grad_sync_enabled", "no_decay", "_is_param", "requires_grad_hook", "acquires_grads_x"],
)  # fmt: skip
def test_not_near_misses(name):
    assert not is_near_miss(name)


def test_three_edits_away_is_not_a_near_miss():
    assert spelling.MAX_DISTANCE == 2
    assert within_distance("requiresgraX")
    assert within_distance("requiresgXaX")
    assert not within_distance("requiresXXXX")


def test_the_shared_module_imports_no_torch():
    code = "import sys, gradguard.spelling, gradguard.lint; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
