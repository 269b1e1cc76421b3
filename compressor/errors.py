"""Every failure a user can cause is a ``CompressorError`` with a one-line message.

The CLI turns these into ``error: <message>`` and exit code 2; anything else is a bug.
"""


class CompressorError(Exception):
    """Base class: a problem with the user's input, not a bug in compressor."""

    def __init__(self, message: str):
        # One line, always: the CLI prints it verbatim.
        super().__init__(" ".join(str(message).split()))


class ConfigError(CompressorError, ValueError):
    """An argument or option is out of range or unknown (rank <= 0, decomp 'xyz', ...)."""


class TensorizationError(CompressorError, ValueError):
    """A shape cannot be split into tensor modes the way it was asked (or usefully at all)."""


class TargetError(CompressorError, ValueError):
    """The requested compression ratio is not a number, <= 1, or more than the model can give."""


class ModelError(CompressorError):
    """The model cannot be read, traced or compressed (no eligible layer, bad file, ...)."""


class DataError(CompressorError):
    """The data is missing, empty, or does not fit the model."""


class TrainingError(CompressorError):
    """Fine-tuning diverged (NaN/Inf loss); the last good state was kept."""


class CheckpointError(CompressorError):
    """A slim checkpoint is missing, corrupted, or does not match the base architecture."""


def require_file(path, error: type[CompressorError], what: str):
    """``Path(path)`` if it names an existing regular file, else ``error`` saying which of the two failed."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if p.is_dir():
        raise error(f"{what} {p} is a directory, not a file")
    return p
