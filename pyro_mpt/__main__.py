"""``python -m pyro_mpt``: the same as the ``pyro-mpt`` command."""

import sys

from pyro_mpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
