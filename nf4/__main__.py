"""``python -m nf4``: the command line (see nf4.cli)."""
import sys

from nf4.cli import main

sys.exit(main())
