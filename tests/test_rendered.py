"""Every results table in README.md and docs/ is what its JSON gives.

The benchmark scripts write JSON under benchmarks/results/; ``benchmarks/render.py`` renders the
documents' marked blocks from it. A hand-edited figure, or a JSON re-measured without
re-rendering, fails here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import render  # noqa: E402


def _blocks(text: str) -> list[str]:
    return [m.group(2) for m in render.BLOCK.finditer(text)]


@pytest.mark.parametrize("doc", render.DOCUMENTS, ids=lambda d: d.name)
def test_rendered_tables_equal_their_json(doc):
    text = doc.read_text()
    rendered = render.render_text(text)
    assert rendered == text, (f"{doc.relative_to(ROOT)} differs from what benchmarks/results/ gives: "
                              "run `python benchmarks/render.py`")


def test_rendered_every_block_is_published_and_known():
    used = [name for doc in render.DOCUMENTS for name in _blocks(doc.read_text())]
    assert set(used) <= set(render.BLOCKS)
    assert {"lenet5", "frontier", "frontier-verdicts", "llm-seeds-verdicts", "cost"} <= set(used)


def test_rendered_check_fails_when_a_figure_is_edited_by_hand(tmp_path):
    """One accuracy changed in a copy of frontier.json changes the rendered README."""
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    readme = (ROOT / "README.md").read_text()
    assert render.render_text(readme, results) == readme
    data = json.loads((results / "frontier.json").read_text())
    run = next(r for r in data["runs"] if "accuracy" in r and r["selector"] == "uniform")
    run["accuracy"] -= 0.05
    (results / "frontier.json").write_text(json.dumps(data))
    assert render.render_text(readme, results) != readme


def test_rendered_verdict_uses_a_two_standard_error_band():
    import tables

    assert tables.verdict([1.0, 1.1, 0.9], [0.95, 1.05, 1.0], higher_is_better=True) == "tie"
    assert tables.verdict([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], higher_is_better=True) == "ahead"
    assert tables.verdict([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], higher_is_better=False) == "behind"
    assert tables.verdict([2.0], [1.0, 1.1], higher_is_better=True) == "one seed: no verdict"
