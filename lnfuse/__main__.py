"""``python -m lnfuse``: the same as the ``lnfuse`` command."""

from lnfuse.cli import run

run(prog_name="lnfuse")
