"""`python -m minitorch_infer ...` is the `minitorch-infer` command."""

import sys

from .cli import main

sys.exit(main())
