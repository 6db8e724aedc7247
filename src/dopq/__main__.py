"""``python -m dopq`` (and ``torchrun -m dopq``): the ``dopq`` command."""

import sys

from dopq.cli import main

if __name__ == "__main__":
    sys.exit(main())
