"""``python -m fastcps.plan --config X.json --world-size 8 [--gpu-mem 80] [--json]``."""

import sys

from fastcps.plan.resources import main

sys.exit(main())
