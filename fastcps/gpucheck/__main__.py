"""``python -m fastcps.gpucheck [--parts tests,kernels,toy,flux] [--out DIR]``."""

import sys

from fastcps.gpucheck.check import main

sys.exit(main())
