"""`python -m plmscale ...` is the `plmscale` command."""

import sys

from plmscale.cli import main

sys.exit(main())
