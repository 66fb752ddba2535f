"""``python -m moelora_dist.cli COMMAND ...`` is ``moelora-dist COMMAND ...``."""

import sys

from moelora_dist.cli.main import main

sys.exit(main())
