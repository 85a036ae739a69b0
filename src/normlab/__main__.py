"""``python -m normlab``: the ``normlab`` command (see :mod:`normlab.lab.cli`)."""

import sys

from normlab.lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
