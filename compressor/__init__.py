"""compressor: learn tensor-ring / tensor-train ranks with l0 gates and ship slim models."""

from .errors import CompressorError

__version__ = "0.1.0"

__all__ = ["CompressorError", "__version__"]
