"""`python -m diffquant.cli`: the `diffquant` command."""

import sys

from diffquant.cli import main

sys.exit(main())
