"""``python -m millstream``: the ``millstream`` command line."""

import sys

from millstream.cli.main import main

sys.exit(main())
