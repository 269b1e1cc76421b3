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


def first_line(exc: BaseException, limit: int = 300, *, with_type: bool = False) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), to quote in a one-line error.

    Library exceptions often carry a multi-line dump; the user needs its headline. An empty
    message falls back to the exception's type name; ``with_type`` prefixes that name.
    """
    text = str(exc).strip()
    name = type(exc).__name__
    if not text:
        return name
    line = text.splitlines()[0][:limit]
    return f"{name}: {line}" if with_type else line
