"""`python -m dpspeed` (as torchrun starts it): the command line."""

import sys

from .cli import main

sys.exit(main())
