"""``python -m services.cli ...``: the ``fleetloop`` command."""

import sys

from services.cli import main

sys.exit(main())
