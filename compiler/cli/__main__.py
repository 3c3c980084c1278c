"""``python -m infoptc.cli``: the same as the ``infoptc`` command."""

import sys

from . import main

sys.exit(main())
