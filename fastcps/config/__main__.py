"""``python -m fastcps.config --schema [--out FILE]``: the run config's JSON Schema."""

from fastcps.config.models import main

raise SystemExit(main())
