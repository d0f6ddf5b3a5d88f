"""`python -m dpspeed` (as torchrun starts it): the command line."""

import sys

from .apps.cli import main

sys.exit(main())
