"""Run ``fastcps.train.main`` on several argument lists, one after the other, in this process:
``python tests/multi_run.py ARGS... --next ARGS...``. Started once per rank (RANK / WORLD_SIZE /
MASTER_* in the environment, no launcher), it runs several 2-process trainings for the interpreter
and DeepSpeed start-up of one (most of a tiny run's cost). Exits with the first non-zero code."""

import sys

from fastcps.train import main

if __name__ == "__main__":
    runs, cur = [], []
    for a in sys.argv[1:]:
        if a == "--next":
            runs.append(cur)
            cur = []
        else:
            cur.append(a)
    runs.append(cur)
    for args in runs:
        rc = main(args)
        if rc:
            sys.exit(rc)
