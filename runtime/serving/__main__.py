"""``python -m runtime.serving``: the ``serve`` command group (see runtime/serving/cli.py)."""

from .cli import main

main()
