"""``python -m modloc`` (and ``torchrun -m modloc``): the ``modloc`` command."""

import sys

from modloc.cli import main

sys.exit(main())
