"""``python -m compressor`` is the ``compress`` command (e.g. under ``torchrun ... -m compressor``)."""

from .cli import main

main(prog_name="compress")
