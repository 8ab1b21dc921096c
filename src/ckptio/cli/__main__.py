"""``python -m ckptio.cli``."""

import sys

from ckptio.cli import main

sys.exit(main())
