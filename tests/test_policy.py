import warnings

import pytest

from gradguard import ConfigurationError, Finding, FindingError, FindingWarning, GradGuardWarning, Policy, Severity
from gradguard.findings import Location


def _finding(code="GG101", severity=Severity.WARNING):
    return Finding(code, "missing-zero-grad", severity, "msg", location=Location("user.py", 5))


def test_warn_issues_a_gradguard_warning_starting_with_the_code_at_the_users_line():
    with pytest.warns(FindingWarning) as record:
        Policy("warn").apply([_finding()])
    (w,) = record
    assert issubclass(w.category, GradGuardWarning)
    assert issubclass(w.category, UserWarning)
    assert str(w.message).startswith("GG101 missing-zero-grad")
    assert (w.filename, w.lineno) == ("user.py", 5)
    assert w.message.finding.code == "GG101"


def test_warnings_filter_by_code_prefix_silences_them():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="GG101")
        Policy("warn").apply([_finding()])


def test_raise_carries_the_findings():
    with pytest.raises(FindingError) as info:
        Policy("raise").apply([_finding()])
    assert [f.code for f in info.value.findings] == ["GG101"]


def test_internal_errors_warn_even_under_raise_so_training_goes_on():
    with pytest.warns(FindingWarning, match="^GG000"):
        Policy("raise").apply([_finding("GG000")])


def test_collect_is_silent_and_info_is_never_loud():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Policy("collect").apply([_finding()])
        Policy("warn").apply([_finding(severity=Severity.INFO)])
        Policy("raise").apply([_finding(severity=Severity.INFO)])


def test_select_and_ignore_take_prefixes_and_names():
    p = Policy(select=("GG1", "graph-retained"), ignore="GG10")
    assert not p.enabled("GG101")
    assert p.enabled("GG201")
    assert not p.enabled("GG301")
    assert Policy(select="GG1,GG2").select == ("GG1", "GG2")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"action": "loud"}, "policy"), ({"select": ("XX1",)}, "select"), ({"ignore": ("nonsense",)}, "ignore")],
)
def test_bad_configuration_is_a_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        Policy(**kwargs)
    assert isinstance(info.value, ValueError)
