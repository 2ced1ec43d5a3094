"""``python -m deltadit_export``: the ``deltadit`` command."""

from .command import main

if __name__ == "__main__":
    main()
