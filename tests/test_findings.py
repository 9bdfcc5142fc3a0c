import json

import pytest

from gradguard import RULES, Finding, Location, Severity
from gradguard.rules import resolve, resolve_prefix


def test_severity_is_a_str_enum_ordered_by_seriousness():
    assert Severity.WARNING == "warning"
    assert isinstance(Severity.ERROR, str)
    assert Severity.INFO < Severity.WARNING < Severity.ERROR
    assert Severity.ERROR >= "warning"
    assert sorted([Severity.ERROR, Severity.INFO, Severity.WARNING]) == ["info", "warning", "error"]


def test_finding_round_trips_through_json():
    f = Finding(
        "GG101",
        "missing-zero-grad",
        Severity.WARNING,
        message="m",
        hint="h",
        location=Location("a.py", 3, "main"),
        where="fc.weight",
        step=7,
        count=2,
        data={"parameters": ["fc.weight"]},
    )
    back = Finding.from_dict(json.loads(json.dumps(f.to_dict())))
    assert back == f
    assert back.key == ("GG101", "fc.weight", Location("a.py", 3, "main"))


def test_str_is_one_readable_line():
    f = Finding("GG201", "graph-retained", Severity.ERROR, "held", where="total_loss", count=3)
    assert str(f) == "GG201 graph-retained [error] total_loss: held (seen 3 times)"
    assert "\n" not in str(f)


def test_reserved_codes_are_the_public_contract():
    assert {
        "GG000": "internal-error",
        "GG101": "missing-zero-grad",
        "GG102": "zero-grad-before-step",
        "GG201": "graph-retained",
        "GG301": "memory-growth",
        "GG401": "requires-grad-typo",
        "GG402": "frozen-param-updated",
        "GG403": "param-not-in-optimizer",
        "GG404": "frozen-norm-stats-updating",
        "GG405": "param-without-grad",
        "GG406": "optimizer-updates-nothing",
        "GG501": "numpy-alias-mutated",
    } | {code: name for code, name in RULES.items() if code >= "GG6"} == RULES


@pytest.mark.parametrize(
    ("text", "code"), [("GG101", "GG101"), ("gg101", "GG101"), ("missing-zero-grad", "GG101"), ("nope", None)]
)
def test_resolve(text, code):
    assert resolve(text) == code


def test_resolve_prefix():
    assert resolve_prefix("GG4") == "GG4"
    assert resolve_prefix("GG") == "GG"
    assert resolve_prefix("GG9") is None
