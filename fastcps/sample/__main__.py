import sys

from fastcps.sample.cli import main

sys.exit(main())
