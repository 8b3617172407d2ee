"""``python -m qafel.report``: the ``qafel-report`` command."""

import sys

from qafel.report.build import main

sys.exit(main())
