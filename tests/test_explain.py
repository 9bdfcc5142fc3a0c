"""Rule pages: Markdown read without torch, rendered for a terminal, and docs/rules.md."""

import os
import re
import runpy
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard import pages
from gradguard.detectors import DETECTORS
from gradguard.errors import ConfigurationError
from gradguard.explain import (
    MAX_WIDTH,
    explain,
    explain_text,
    render_terminal,
    rules_markdown,
    rules_table,
    use_color,
)
from gradguard.rules import RULES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES_MD = os.path.join(REPO, "docs", "rules.md")
CODES = sorted(pages.implemented())
ESC = "\x1b["


def md(text):
    return textwrap.dedent(text).strip("\n")


def fenced_blocks(markdown):
    """The contents of each fenced code block of a Markdown page."""
    return [block.split("\n")[1:-1] for block in re.findall(r"^```\w*\n.*?^```$", markdown, flags=re.M | re.S)]


def without_code(text, markdown):
    """The rendered lines of a page that are not lines of its code blocks."""
    code = {"    " + line for block in fenced_blocks(markdown) for line in block if line.strip()}
    return [line for line in text.splitlines() if line not in code]


# ------------------------------------------------------------------ the renderer


def test_a_bold_section_title_goes_on_its_own_line_and_the_paragraph_is_rewrapped():
    source = md("""
        **How to fix it.** Reset the gradients once
        per update: `optimizer.zero_grad()` before
        `loss.backward()`.
        """)
    assert render_terminal(source, width=40) == md("""
        How to fix it
        Reset the gradients once per update:
        optimizer.zero_grad() before
        loss.backward().
        """)


def test_headings_paragraphs_and_blank_lines():
    source = md("""
        ## What it detects

        One   paragraph,
        on two lines.

        Another *one*.

        **Example.**

        ```python
        x = 1
        ```
        """)
    assert render_terminal(source, width=30) == md("""
        What it detects
        One paragraph, on two lines.

        Another one.

        Example
            x = 1
        """)


def test_inline_code_and_urls_are_never_broken():
    source = "Call `opt.zero_grad(set_to_none=True)` then see https://example.org/a-long/path-with-hyphens now."
    assert render_terminal(source, width=24) == md("""
        Call
        opt.zero_grad(set_to_none=True)
        then see
        https://example.org/a-long/path-with-hyphens
        now.
        """)


def test_links_keep_their_address():
    source = "See [the FAQ](https://pytorch.org/docs/stable/notes/faq.html) or <https://example.org>."
    assert render_terminal(source, width=100) == (
        "See the FAQ (https://pytorch.org/docs/stable/notes/faq.html) or https://example.org."
    )


def test_code_blocks_are_indented_and_kept_verbatim():
    line = "loss = criterion(model(x), y)  # **not bold** `not code` and a comment longer than the width"
    source = f"Before.\n\n```python\nfor x, y in loader:\n\n    {line}\n```\n\n~~~\n  ~ tilde\n~~~"
    assert render_terminal(source, width=20) == (
        f"Before.\n\n    for x, y in loader:\n\n        {line}\n\n      ~ tilde"
    )


def test_lists_keep_markers_with_hanging_indents():
    source = md("""
        Three cases:

        - **the first**: a long item that wraps
          onto a second line;
        - the second, with a lazy
        continuation line;
          - and a nested item that wraps too.

        1. one
        2. two
        """)
    assert render_terminal(source, width=30) == md("""
        Three cases:

        - the first: a long item that
          wraps onto a second line;
        - the second, with a lazy
          continuation line;
          - and a nested item that
            wraps too.

        1. one
        2. two
        """)


def test_a_loose_list_keeps_blank_lines_between_items():
    assert render_terminal("- one\n\n- two", width=20) == "- one\n\n- two"


def test_double_backticks_and_escapes():
    assert render_terminal(r"A ``code `with` ticks`` and \*stars\*.", width=60) == "A code `with` ticks and *stars*."


def test_arithmetic_stars_are_not_emphasis():
    assert render_terminal("Scale by 2 * 3 * lr, not *this*.", width=60) == "Scale by 2 * 3 * lr, not this."


def test_color_bolds_titles_and_bold_text_and_highlights_code():
    source = "**Why.** A **big** `x` and *some*."
    assert render_terminal(source, width=60, color=True) == (
        "\x1b[1mWhy\x1b[0m\nA \x1b[1mbig\x1b[0m \x1b[36mx\x1b[0m and \x1b[3msome\x1b[0m."
    )
    assert render_terminal(source, width=60, color=False) == "Why\nA big x and some."


def test_color_wraps_by_visible_width():
    source = "`aaaa` `bbbb` `cccc`"
    plain = render_terminal(source, width=20)
    colored = render_terminal(source, width=20, color=True)
    assert plain == "aaaa bbbb cccc"
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == plain


@pytest.mark.parametrize("width", [0, 5, 19, 20.0, True, "88", None])
def test_bad_width_names_the_argument(width):
    with pytest.raises(ConfigurationError, match=r"width .*but got"):
        render_terminal("text", width=width)


_MARKDOWNISH = st.text(alphabet=st.sampled_from(list("ab -*`#~1.[]()<>:/\\\n ")), max_size=200)


@settings(max_examples=150, deadline=None)
@given(source=_MARKDOWNISH, width=st.integers(20, 60))
def test_any_text_renders_and_color_only_adds_escapes(source, width):
    plain = render_terminal(source, width=width)
    colored = render_terminal(source, width=width, color=True)
    assert ESC not in plain
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == plain
    words = [w for line in plain.splitlines() for w in line.split()]
    assert len("".join(words)) <= len(source)


def test_markdown_must_be_a_string():
    with pytest.raises(ConfigurationError, match="markdown"):
        render_terminal(b"bytes")


# ------------------------------------------------------------------ every rule page


@pytest.mark.parametrize("code", CODES)
def test_pages_are_markdown(code):
    page = pages.markdown(code)
    name = RULES[code]
    assert re.match(rf"{code} {name}: \S.*\.$", page.split("\n\n", 1)[0].replace("\n", " "))
    assert ".. code-block" not in page
    assert "``" not in page.replace("```", "")
    assert not any(line.rstrip().endswith("::") for line in page.splitlines())
    fences = re.findall(r"^```(\w*)$", page, flags=re.M)
    assert len(fences) % 2 == 0
    assert fences
    assert set(fences[::2]) <= {"python", "text"}, fences
    assert set(fences[1::2]) == {""}, fences
    for section in ("Why it matters", "How to fix it", "Example"):
        assert f"**{section}.**" in page, section


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("width", [64, 88, MAX_WIDTH])
def test_every_page_renders_without_markup_within_the_width(code, width):
    page = pages.markdown(code)
    text = render_terminal(page, width=width)
    assert text.splitlines()[0].startswith(f"{code} {RULES[code]}")
    rest = without_code(text, page)
    for bad in ("**", "`", ".. code-block", "\x1b"):
        assert not any(bad in line for line in rest), bad
    assert [line for line in rest if len(line) > width] == []
    assert "What it detects" in rest or "What it reports" in rest
    assert "Example" in rest


@pytest.mark.parametrize("code", CODES)
def test_every_code_block_of_a_page_is_kept_verbatim(code):
    page = pages.markdown(code)
    blocks = fenced_blocks(page)
    assert blocks
    text = render_terminal(page, width=64)
    for block in blocks:
        expected = "\n".join("    " + line if line.strip() else "" for line in block)
        assert expected in text


def test_color_on_a_page():
    plain = explain_text("GG102", width=88, color=False)
    colored = explain_text("GG102", width=88, color=True)
    assert ESC not in plain
    assert "\x1b[1mWhat it detects\x1b[0m" in colored
    assert "\x1b[36mbackward()\x1b[0m" in colored
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == plain


# ------------------------------------------------------------------ explain_text: width and colour


class _Stdout:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def no_color_env(monkeypatch):
    for var in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "tty", "expected"),
    [
        ({}, True, True),
        ({}, False, False),
        ({"NO_COLOR": "1"}, True, False),
        ({"NO_COLOR": "1", "FORCE_COLOR": "1"}, True, False),
        ({"NO_COLOR": ""}, True, True),
        ({"FORCE_COLOR": "1"}, False, True),
        ({"FORCE_COLOR": "0"}, False, False),
        ({"TERM": "dumb"}, True, False),
    ],
)
def test_color_follows_the_terminal_and_no_color(no_color_env, env, tty, expected):
    for var, value in env.items():
        no_color_env.setenv(var, value)
    no_color_env.setattr(sys, "stdout", _Stdout(tty))
    assert use_color() is expected
    assert (ESC in explain_text("GG101", width=88)) is expected


def test_color_is_off_without_a_usable_stdout(no_color_env):
    no_color_env.setattr(sys, "stdout", None)
    assert use_color() is False


def test_explicit_color_wins_over_the_environment(no_color_env):
    no_color_env.setenv("NO_COLOR", "1")
    assert ESC in explain_text("GG101", width=88, color=True)


def test_width_follows_the_terminal_up_to_a_cap(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    assert explain_text("GG201", color=False) == explain_text("GG201", width=60, color=False)
    monkeypatch.setenv("COLUMNS", "300")
    assert explain_text("GG201", color=False) == explain_text("GG201", width=MAX_WIDTH, color=False)


def test_explain_text_takes_names_and_ends_with_a_newline():
    text = explain_text("missing-zero-grad", width=88, color=False)
    assert text == render_terminal(pages.markdown("GG101"), width=88) + "\n"


# ------------------------------------------------------------------ explain, rules_table


def test_explain_returns_the_markdown_page():
    assert explain("gg301") == pages.markdown("GG301") + "\n"
    assert "```python" in explain("GG301")
    assert explain("internal-error") == pages.INTERNAL_ERROR_PAGE + "\n"


@pytest.mark.parametrize("bad", ["GG999", "frobnicate", ""])
def test_explain_rejects_unknown_rules(bad):
    with pytest.raises(ConfigurationError, match=re.escape(repr(bad))):
        explain(bad)
    with pytest.raises(ConfigurationError, match="GG101 \\(missing-zero-grad\\)"):
        explain_text(bad)


def test_rules_table_has_one_plain_line_per_rule():
    lines = rules_table().splitlines()
    assert len(lines) == len(RULES)
    for line, (code, name) in zip(lines, RULES.items(), strict=True):
        assert line.startswith(f"{code}  {name} ")
        assert "`" not in line
        assert "*" not in line
    assert lines[list(RULES).index("GG102")].endswith("gradients reset between backward() and step().")


# ------------------------------------------------------------------ pages agree with the registry


@pytest.mark.parametrize("det", DETECTORS, ids=lambda d: d.code)
def test_the_page_read_from_source_is_the_detectors_rule_page(det):
    assert pages.markdown(det.code) == det.rule_page()
    assert explain(det.code) == det.rule_page() + "\n"
    assert pages.summary(det.code) != "(reserved)"


def test_every_registered_code_has_a_page_and_every_page_a_registered_detector():
    assert pages.implemented() == {d.code for d in DETECTORS} | {"GG000"}


def test_explaining_imports_neither_torch_nor_the_detectors():
    script = (
        "import sys\n"
        "from gradguard.explain import explain, explain_text, rules_markdown, rules_table\n"
        "explain('GG101'); explain_text('GG301', width=80, color=True); rules_table(); rules_markdown()\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'gradguard.detectors')))\n"
        "print(loaded)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------ docs/rules.md


def test_docs_rules_md_is_up_to_date():
    with open(RULES_MD, encoding="utf-8") as fh:
        current = fh.read()
    assert current == rules_markdown(), (
        "docs/rules.md is out of date with the rule pages: regenerate it with `python docs/make_rules.py`"
    )


def test_rules_md_has_every_page_under_a_heading_its_contents_links_to():
    doc = rules_markdown()
    headings = re.findall(r"^## (.+)$", doc, flags=re.M)
    assert headings == [f"{code} {RULES[code]}" for code in RULES if code in pages.implemented()]
    anchors = re.findall(r"^- \[[^\]]+\]\(#([^)]+)\)", doc, flags=re.M)
    assert anchors == [re.sub(r"[^\w\- ]", "", h).lower().replace(" ", "-") for h in headings]
    for code in pages.implemented():
        body = pages.markdown(code).split("\n\n", 1)[1]
        assert body in doc


def test_make_rules_writes_rules_markdown(tmp_path, capsys):
    script = runpy.run_path(os.path.join(REPO, "docs", "make_rules.py"), run_name="make_rules")
    out = tmp_path / "rules.md"
    assert script["main"]([str(out)]) == 0
    assert out.read_text(encoding="utf-8") == rules_markdown()
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("det", DETECTORS, ids=lambda d: d.code)
def test_default_severity_read_from_source_matches_the_detector(det):
    assert pages.default_severity(det.code) == det.severity.value
