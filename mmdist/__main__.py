"""`python -m mmdist ...` is the same as the `mmdist` command."""

import sys

from mmdist.commands.cli import main

sys.exit(main())
