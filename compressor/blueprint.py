"""The blueprint of a slim model: what a checkpoint records that the model's tensors do not tell.

A slim model's tensors say what its factorized layers are now. They do not say how big the
dense model was (the ratio a file reports), where each layer sat in a ``torch.export`` base
program (the aten call ``load`` must replace), or which run made it. ``compress`` returns that
as a value (``CompressResult.blueprint``) and ``checkpoint.save`` writes it; nothing is ever
stored on the user's model, so a model that was rebuilt by ``load``, wrapped, or whose layers
were moved into a new module is described by the same value, or by :func:`blueprint_of` when
the model itself tells everything (factorized layers as submodules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .errors import CheckpointError
from .plan import Site, count_state, tensor_key
from .surgery import tn_layers
from .trace import is_export_graph


#: The ``extra`` key where a run whose target counts bytes (``quantize="int8"``) records the
#: ratio of tensor elements it aimed at to meet it (``target`` stays what the user asked).
ELEMENT_TARGET = "element_target"


@dataclass(frozen=True)
class Blueprint:
    """What a slim model is made of, besides its tensors and layer specs.

    ``source`` is how the dense model was read ("module", "export", "module-walk" or "graph");
    ``dense_params`` the tensor elements of the dense model's state (the ratio's numerator;
    None when unknown); ``sites`` the layers that replaced an aten call of a ``torch.export``
    graph, with the attributes that call read, so ``load`` finds the same call in the base
    program; ``decomp`` and ``target`` what the run asked for. ``extra`` is the free-form JSON
    a file carried besides (the CLI's ``arch`` and report figures), kept when a loaded model is
    saved again.
    """

    source: str = "module"
    dense_params: int | None = None
    sites: tuple[Site, ...] = ()
    decomp: str | None = None
    target: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def site(self, name: str) -> Site | None:
        """The graph site of the factorized layer ``name`` (None: a module path is enough)."""
        return next((s for s in self.sites if s.name == name), None)

    def element_target(self) -> float | None:
        """The ratio of tensor elements the model was made to: ``target``, or for a target in
        bytes the element ratio recorded beside it (what the model's parameters may grow to)."""
        aimed = self.extra.get(ELEMENT_TARGET)
        return float(aimed) if isinstance(aimed, (int, float)) and not isinstance(aimed, bool) else self.target

    def file_extra(self) -> dict[str, Any]:
        """The free-form ``extra`` of a checkpoint's metadata: the run's decomposition and target first."""
        return {"decomp": self.decomp, "target": self.target, **self.extra}


@runtime_checkable
class Blueprinted(Protocol):
    """A slim model with its blueprint, as ``compress`` returns them (``CompressResult``)."""

    model: nn.Module
    blueprint: Blueprint


def dense_size(model: nn.Module) -> int:
    """Elements of the dense model's state: the slim model's state with every factorized layer
    counted at the size of the dense layer it stands for (weight and bias), each tensor once."""
    layers = tn_layers(model).values()
    own = {tensor_key(t): t.numel() for layer in layers for t in layer.state_dict(keep_vars=True).values()}
    return count_state(model) - sum(own.values()) + sum(layer.dense_param_count() for layer in layers)


def blueprint_of(model: nn.Module) -> Blueprint:
    """The blueprint a slim ``nn.Module`` tells by itself (factorized layers as submodules).

    A ``torch.export`` graph cannot tell which aten call each factorized layer replaced, so it
    needs the blueprint it was made or loaded with.
    """
    layers = tn_layers(model)
    if layers and is_export_graph(model):
        raise CheckpointError("this slim model is a torch.export graph and does not tell where its factorized "
                              "layers sit in the base program: pass save(..., blueprint=result.blueprint or "
                              "read_blueprint(file)), or save the CompressResult itself")
    decomps = {layer.decomp for layer in layers.values()}
    return Blueprint("module", dense_size(model), decomp=decomps.pop() if len(decomps) == 1 else None)
