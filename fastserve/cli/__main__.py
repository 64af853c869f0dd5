"""``python -m fastserve.cli``: the same as the ``fastserve`` command."""

from fastserve.cli import main

main()
