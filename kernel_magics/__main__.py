"""``python -m kernel_magics`` works like the ``kernel-magics`` command."""

import sys

from .cli import main

sys.exit(main())
