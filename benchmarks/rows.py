"""A benchmark row is a selector, the start it fits and its switches: ``"l0:activations+refit"``;
``"default"`` is a run that leaves every such choice to the tool (init ``auto``, refit ``None``).

Shared by the benchmarks so that the same spelling means the same run everywhere.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from compressor.selectors import DEFAULT_SELECTOR, get_selector

#: Row switches: each is a boolean option of ``compress`` that only gated selectors take.
SWITCHES = ("refit",)


class Row(NamedTuple):
    selector: str
    init: str
    refit: bool | None = False  # None: left to the tool


#: A run as ``compress(model, loader)`` makes it: the default selector with every choice left open.
DEFAULT_ROW = Row(DEFAULT_SELECTOR, "auto", None)


def parse_row(spec: str) -> Row:
    """``"l0:activations+refit"`` -> Row("l0", "activations", True). A selector that learns
    nothing fits what it always fits: ``whitened-svd`` and ``svd-llm`` the activations, the
    others the weights."""
    if spec == "default":
        return DEFAULT_ROW
    head, *switches = spec.split("+")
    selector, _, init = head.partition(":")
    chosen = get_selector(selector)  # a clear error for a misspelt name
    for s in switches:
        if s not in SWITCHES:
            raise SystemExit(f"error: unknown switch {s!r} in row {spec!r} (known: {', '.join(SWITCHES)})")
        if not chosen.gated:
            raise SystemExit(f"error: row {spec!r}: {s} needs a gated selector")
    if not chosen.gated:
        return Row(selector, "activations" if chosen.calibrates else "weights")
    return Row(selector, init or "weights", "refit" in switches)


def row_of(record: dict[str, Any]) -> Row:
    """The row a JSON record was made by (records from before switches existed have none)."""
    return Row(record["selector"], record.get("init", "weights"), record.get("refit", False))


def row_name(selector: str, init: str, refit: bool | None = False) -> str:
    """The table label: the selector, the start of a learning one when it is not the default, and its switches."""
    if Row(selector, init, refit) == DEFAULT_ROW:
        return f"{selector}, tool defaults"
    return (selector + (f" ({init} init)" if get_selector(selector).gated and init != "weights" else "")
            + (", refit" if refit else ""))
