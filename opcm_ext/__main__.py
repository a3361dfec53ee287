"""`python -m opcm_ext` is the `opcm` command."""

import sys

from .cli import main

sys.exit(main())
