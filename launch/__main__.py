"""``python -m launch --nproc-per-node N <job> [job args]``; see :mod:`launch.runner`."""

import sys

from launch.runner import main

sys.exit(main())
