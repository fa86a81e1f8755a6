"""``python -m p2pd`` runs the command line."""

import sys

from p2pd.cli import main

sys.exit(main())
