"""`python -m mmdist ...` is the same as the `mmdist` command."""

import sys

from mmdist.cli import main

sys.exit(main())
