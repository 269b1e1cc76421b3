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


def test_rendered_deploy_frontier_takes_the_best_fitting_model_against_the_dense_line():
    import tables

    run = lambda model, q, size, ppl, target=1.0: {"model": model, "quantize": q, "file_bytes": size,  # noqa: E731
                                                  "perplexity": ppl, "target": target}
    result = {"budgets": [4, 7, 8], "runs": [run("dense", "none", 1000, 10.0), run("dense", "int8", 250, 10.0),
                                             run("dense", "int4", 125, 20.0), run("slim", "int8", 170, 12.0, 1.5),
                                             run("slim", "int8", 140, 30.0, 2.0), run("slim", "none", 100, 1.0, 9.0)]}
    line = tables.deploy_line(result)
    assert line(250) == pytest.approx(10.0) and line(125) == pytest.approx(20.0)
    assert line(176.77) == pytest.approx(10.0 * 2 ** 0.5, rel=1e-3)  # halfway in log bytes: the geometric mean
    rows = {r["times_smaller"]: r for r in tables.deploy_frontier(result)}
    assert rows[4]["ours_target"] == 1.5 and rows[4]["above_line"] == pytest.approx(0.2)
    assert rows[7]["ours_target"] == 2.0 and rows[7]["above_line"] > 0  # 170 B no longer fits 1000/7
    assert rows[8]["ours_perplexity"] is None and rows[8]["above_line"] is None  # fp32 slim runs never count
