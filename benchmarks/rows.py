"""A benchmark row is a selector and the start it fits: ``"l0:activations"``.

Shared by the benchmarks so that the same spelling means the same run everywhere.
"""

from __future__ import annotations

from compressor.selectors import get_selector


def parse_row(spec: str) -> tuple[str, str]:
    """``"l0:activations"`` -> ("l0", "activations"). A selector that learns nothing fits what it
    always fits: ``whitened-svd`` the activations, the others the weights."""
    selector, _, init = spec.partition(":")
    chosen = get_selector(selector)  # a clear error for a misspelt name
    if not chosen.gated:
        return selector, "activations" if chosen.calibrates else "weights"
    return selector, init or "weights"


def row_name(selector: str, init: str) -> str:
    """The table label: the selector, and the start of a learning one when it is not the default."""
    return selector + (f" ({init} init)" if get_selector(selector).gated and init != "weights" else "")
