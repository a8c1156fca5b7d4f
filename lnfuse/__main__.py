"""``python -m lnfuse``: the same as the ``lnfuse`` command."""

from lnfuse.cli import main

main(prog_name="lnfuse")
