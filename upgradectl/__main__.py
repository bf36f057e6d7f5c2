"""``python -m upgradectl``: the same as the ``upgradectl`` console script."""

import sys

from upgradectl.cli import main

sys.exit(main())
