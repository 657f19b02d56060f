"""``python -m archiver``: the same command line as ``desto-archiver``."""

import sys

from archiver.commands.cli import main

sys.exit(main())
