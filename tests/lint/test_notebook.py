"""Notebooks: code cells linted as one module, magics left alone, fixes written back into the cells."""

from __future__ import annotations

import json

import pytest

from gradguard.lint import lint_file, rules
from gradguard.lint.notebook import Notebook


def _notebook(cells, language="python"):
    return {
        "cells": [
            {"cell_type": kind, "metadata": {}, "source": source, **({"outputs": []} if kind == "code" else {})}
            for kind, source in cells
        ],
        "metadata": {"kernelspec": {"language": language, "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


CELLS = [
    ("markdown", ["# Fine-tuning\n", "p.requres_grad = False is prose here\n"]),
    ("code", ["%matplotlib inline\n", "!pip install -q foo\n", "import torch\n", "files = !ls\n"]),
    ("code", ["for p in model.backbone.parameters():\n", "    p.requres_grad = False\n", "model?"]),
    ("code", ["%%bash\n", "echo p.requres_grad = False\n"]),
]


def test_code_cells_are_one_module_and_findings_name_their_cell(tmp_path):
    path = tmp_path / "ft.ipynb"
    path.write_text(json.dumps(_notebook(CELLS), indent=1))
    result = lint_file(str(path), rules())
    assert result.error is None
    (finding,) = result.findings
    assert (finding.code, finding.location.line, finding.data["cell"]) == ("GG401", 2, 3)


def test_fixes_are_written_into_their_cell_and_nothing_else_changes(tmp_path):
    path = tmp_path / "ft.ipynb"
    original = json.dumps(_notebook(CELLS), indent=1, ensure_ascii=False) + "\n"
    path.write_text(original)
    result = lint_file(str(path), rules(), fix=True)
    content = result.new_content()
    assert content is not None
    after = json.loads(content)
    before = json.loads(original)
    assert after["cells"][2]["source"] == ["for p in model.backbone.parameters():\n", "    p.requires_grad = False\n",
                                           "model?"]  # fmt: skip
    after["cells"][2]["source"] = before["cells"][2]["source"]
    assert after == before  # magics, markdown, metadata: as they were
    assert content.replace("requires_grad", "requres_grad", 1) == original  # the same JSON layout


def test_other_languages_and_broken_notebooks(tmp_path):
    r = tmp_path / "r.ipynb"
    r.write_text(json.dumps(_notebook([("code", ["p.requres_grad = FALSE\n"])], language="R")))
    assert lint_file(str(r), rules()).findings == []
    broken = tmp_path / "broken.ipynb"
    broken.write_text("{not json")
    assert "not a notebook" in (lint_file(str(broken), rules()).error or "")


def test_a_notebook_with_top_level_await_parses():
    nb = Notebook("n.ipynb", json.dumps(_notebook([("code", ["x = await fetch()\n"])])))
    from gradguard.lint.source import Source

    Source("n.ipynb", nb.text, cells=nb.cells)


def test_render_refuses_a_change_in_the_number_of_lines():
    nb = Notebook("n.ipynb", json.dumps(_notebook([("code", ["x = 1\n"])])))
    with pytest.raises(ValueError, match="number of lines"):
        nb.render("x = 1\ny = 2\n")
