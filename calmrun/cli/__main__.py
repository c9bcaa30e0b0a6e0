"""``python -m calmrun.cli``: the ``calmrun`` command."""

from calmrun.cli import main

main()
