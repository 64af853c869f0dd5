"""``python -m fastserve`` is the ``fastserve`` command."""

from fastserve.cli import main

main()
