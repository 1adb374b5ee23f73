"""``python -m duogard.cli``: the ``duogard`` command."""

import sys

from duogard.cli import main

sys.exit(main())
