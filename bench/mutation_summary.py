"""Per-module tally of a mutmut run: ``python bench/mutation_summary.py results.txt`` (bench/mutation.sh
calls it in its scratch folder) reads a ``mutmut results --all true`` listing and prints killed/total per
module, and the mutants not killed by name (``mutmut show <name>`` in that folder gives the diff)."""

from __future__ import annotations

import collections
import sys
from pathlib import Path


def tally(lines):
    """{module: Counter(status)} and the names of the mutants that were not killed."""
    by_module, alive = collections.defaultdict(collections.Counter), []
    for line in lines:
        name, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in name:
            continue
        module = name.split("__mutmut_")[0].rpartition(".")[0]
        by_module[module][status] += 1
        if status != "killed":
            alive.append(f"{name}: {status}")
    return by_module, alive


def main(listing: str) -> None:
    by_module, alive = tally(Path(listing).read_text().splitlines())
    total = collections.Counter()
    print(f"{'module':34} killed/total  score  other")
    for module, c in sorted(by_module.items()):
        total += c
        n = sum(c.values())
        other = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k != "killed")
        print(f"{module:34} {c['killed']:>5}/{n:<5} {100 * c['killed'] / n:5.1f}%  {other}")
    n = sum(total.values())
    if n:
        print(f"{'all':34} {total['killed']:>5}/{n:<5} {100 * total['killed'] / n:5.1f}%")
    print("\nnot killed:")
    print("\n".join(alive) or "  none")


if __name__ == "__main__":
    main(sys.argv[1])
