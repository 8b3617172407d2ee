"""``python -m qafel.sweep``: the ``qafel-sweep`` command (worker processes unpickle ``qafel.sweep.*`` by name)."""

import sys

from qafel.sweep.cli import main

sys.exit(main())
