"""``python -m fastcps.plan --config X.json --world-size 8 [--gpu-mem 80] [--json]``: the command line
hands the plan the trainer's eval to count (the plan's library modules never import the trainer)."""

import sys

from fastcps.plan.resources import main
from fastcps.trainer import evaluate_with

sys.exit(main(evaluate=evaluate_with))
