"""``python -m ronan_fast.cli``: the ``ronan-fast`` command."""

import sys

from ronan_fast.cli import main

sys.exit(main())
