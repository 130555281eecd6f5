"""`python -m chopgrad bench|probe|train|info` (same as the `chopgrad` console script)."""
import sys

from chopgrad.tools.cli import main

sys.exit(main())
