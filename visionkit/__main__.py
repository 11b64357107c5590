"""`python -m visionkit ...` (also what `torchrun -m visionkit` runs)."""
import sys

from .cli import main

sys.exit(main())
