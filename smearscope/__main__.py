"""`python -m smearscope`: the `smearscope` command line."""

import sys

from smearscope.cli import main

sys.exit(main())
