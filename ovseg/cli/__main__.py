"""`python -m ovseg.cli`: the same as the `ovseg` command."""

import sys

from .main import main

sys.exit(main())
