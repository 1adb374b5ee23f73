"""``python -m duogard``: the ``duogard`` command (also under ``torchrun -m duogard``)."""

import sys

from duogard.cli import main

sys.exit(main())
