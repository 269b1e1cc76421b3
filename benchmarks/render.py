"""Put every published results table into the documents, from the JSON the benchmarks wrote.

A document marks a rendered block like this (the lines between the markers are replaced)::

    <!-- rendered: frontier -->
    ...
    <!-- end rendered -->

``BLOCKS`` names each block and says which JSON files under ``benchmarks/results/`` it is made
from (the functions are in ``tables.py``). Every benchmark's ``--report`` calls
:func:`update_documents`; ``python benchmarks/render.py`` renders them all and
``--check`` only says which documents differ (``tests/test_rendered.py`` does the same).

    python benchmarks/render.py            # rewrite README.md and docs/*.md from the JSON
    python benchmarks/render.py --check    # exit 1 when a document differs from its JSON
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import tables  # noqa: E402

RESULTS = HERE / "results"
DOCUMENTS = (HERE.parent / "README.md", *sorted((HERE.parent / "docs").glob("*.md")))
BLOCK = re.compile(r"(<!-- rendered: ([\w-]+) -->\n)(.*?)(<!-- end rendered -->)", re.S)


def _is_default_or_baseline(name: str) -> bool:
    return name.startswith(("l0, tool defaults", "svd-llm", "whitened-svd"))


#: The full-budget SmolLM2 rows the README shows (docs/results.md has every row): the method as
#: the tool ran it by default when they were measured, and the post-hoc baselines.
LLM_SUMMARY_ROWS = ("l0 (activations init), refit, gate lr 0.14, embedding weighted by its head", "svd-llm",
                    "svd-llm, no fine-tune", "whitened-svd")


#: block name -> (the JSON files it reads, in order; the function of their contents that renders it)
BLOCKS: dict[str, tuple[tuple[str, ...], Callable[..., str]]] = {
    "lenet5": (("lenet5_module.json", "lenet5_export.json", "lenet5_module_nolabels.json"), tables.lenet5_table),
    "lenet5-ranks": (("lenet5_module.json", "lenet5_export.json", "lenet5_module_nolabels.json"), tables.lenet5_ranks),
    "frontier": (("frontier.json",), tables.frontier_table),
    "frontier-verdicts": (("frontier.json",), tables.frontier_verdicts),
    "frontier-refit": (("frontier.json",), tables.frontier_refit),
    "frontier-layers": (("frontier.json",), tables.frontier_layers),
    "frontier-comparators": (("frontier.json",), tables.frontier_comparators),
    "mars-ranks": (("mars_ranks.json",), tables.mars_ranks_table),
    "llm": (("llm.json",), tables.llm_table),
    "llm-summary": (("llm.json",), lambda r: tables.llm_table(r, LLM_SUMMARY_ROWS.__contains__)),
    "llm-budget": (("llm.json",), tables.llm_budget_tables),
    "llm-seeds": (("llm_seeds.json",), lambda r: tables.llm_table(r, _is_default_or_baseline)),
    "llm-seeds-verdicts": (("llm_seeds.json",), tables.llm_verdicts),
    "smollm2-cli": (("smollm2_cli_1.5x.json",), tables.llm_cli_run),
    "learned-ranks": (("learned_ranks.json", "llm.json"), tables.learned_ranks_table),
    "embedding-counts": (("embedding_counts.json",), tables.embedding_counts_table),
    "encoder-budget": (("encoder_budget.json",), tables.encoder_budget_table),
    "cost": (("cost.json",), tables.cost_table),
    "cost-transformer": (("cost_transformer.json",), tables.cost_transformer_table),
    "deploy": (("deploy.json",), tables.deploy_table),
}


def blocks_reading(*files: str) -> set[str]:
    """The blocks made from any of ``files``: what a benchmark that wrote them renders again."""
    return {name for name, (needs, _) in BLOCKS.items() if set(needs) & set(files)}


def render_from(*files: str) -> None:
    """Render again every block made from ``files`` (a benchmark's ``--report``, and what it does
    after measuring), saying which documents changed."""
    for doc in update_documents(blocks_reading(*files)):
        print("rendered", doc.relative_to(HERE.parent))


def write_result(result: dict[str, Any], out: Path, default_out: Path) -> None:
    """Write a benchmark's JSON to ``out``; the documents are rendered again only when it is the
    default file (a measurement written elsewhere is a trial, not a published figure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("wrote", out)
    if out.resolve() == default_out.resolve():
        render_from(default_out.name)


def render_block(name: str, results: Path = RESULTS) -> str:
    """The Markdown of block ``name`` from the JSON in ``results``."""
    if name not in BLOCKS:
        raise SystemExit(f"error: unknown rendered block {name!r} (known: {', '.join(BLOCKS)})")
    files, make = BLOCKS[name]
    missing = [f for f in files if not (results / f).is_file()]
    if missing:
        raise SystemExit(f"error: block {name!r} needs {', '.join(missing)} in {results}: run its benchmark first")
    contents: list[Any] = [json.loads((results / f).read_text()) for f in files]
    return make(*contents)


def render_text(text: str, results: Path = RESULTS, only: set[str] | None = None) -> str:
    """``text`` with every marked block (or those named in ``only``) rendered again."""
    def fill(m: re.Match) -> str:
        if only is not None and m.group(2) not in only:
            return m.group(0)
        return m.group(1) + render_block(m.group(2), results) + m.group(4)
    return BLOCK.sub(fill, text)


def update_documents(only: set[str] | None = None, results: Path = RESULTS) -> list[Path]:
    """Render the blocks into every document; the documents that changed."""
    changed = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        new = render_text(text, results, only)
        if new != text:
            doc.write_text(new)
            changed.append(doc)
    return changed


def output_arguments(ap: argparse.ArgumentParser, default_out: Path) -> None:
    """``--out`` and ``--report``, as every benchmark that renders a block takes them."""
    ap.add_argument("--out", default=str(default_out), help="where the JSON goes; the documents are rendered "
                                                            "only when it is the default")
    ap.add_argument("--report", action="store_true", help="only render the documents' blocks from the JSON")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a document differs")
    ap.add_argument("blocks", nargs="*", help=f"only these blocks (default: all of {', '.join(BLOCKS)})")
    args = ap.parse_args()
    if args.check:
        stale = [d for d in DOCUMENTS if render_text(d.read_text()) != d.read_text()]
        for d in stale:
            print(f"{d.relative_to(HERE.parent)} differs from its JSON: run python benchmarks/render.py")
        sys.exit(1 if stale else 0)
    for doc in update_documents(set(args.blocks) or None):
        print("rendered", doc.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
