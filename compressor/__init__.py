"""compressor: learn tensor-ring / tensor-train ranks with l0 gates and ship slim models.

    from compressor import compress, save, load
    result = compress(model, loader, decomp="tr", target="5x")
    save(result, "slim.safetensors")
    slim = load("slim.safetensors", base=original_model_or_factory)
"""

from . import pstrn  # noqa: F401  (registers --rank-select pstrn before the config reads the registry)
from . import mars  # noqa: F401  (registers --rank-select mars before the config reads the registry)
from .api import CompressResult, Report, compress, evaluate
from .blueprint import Blueprint
from .config import CompressConfig, parse_target
from .errors import CompressorError
from .checkpoint import export_program, read_blueprint, read_metadata, save
from .hf_folders import load
from .resume import ResumeError, RunInterrupted

__version__ = "0.1.0"

__all__ = [
    "Blueprint",
    "CompressConfig",
    "CompressResult",
    "CompressorError",
    "Report",
    "ResumeError",
    "RunInterrupted",
    "compress",
    "evaluate",
    "export_program",
    "load",
    "parse_target",
    "read_blueprint",
    "read_metadata",
    "save",
    "__version__",
]
