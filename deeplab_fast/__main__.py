"""``python -m deeplab_fast``: the same as the ``deeplab-fast`` command (see :mod:`deeplab_fast.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
