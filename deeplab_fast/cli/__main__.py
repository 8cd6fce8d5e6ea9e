"""``python -m deeplab_fast.cli``: the same as ``deeplab-fast``."""
import sys

from . import main

sys.exit(main())
