"""``python -m archiver``: the same command line as ``desto-archiver``."""

import sys

from archiver.cli import main

sys.exit(main())
