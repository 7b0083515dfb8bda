"""Print the exact versions of fastcps's installed dependency closure as pip constraints.

``python .ci/freeze.py > constraints.txt`` after a green suite: the lock that the README's install and
``.ci/run`` use. Only the packages that ``fastcps[dev]`` pulls in, recursively (not whatever else the
machine has), with the extras each requirement asks for; run it in the environment that was tested.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# The versions the whole suite was green with: `pip install -e ".[dev]" -c constraints.txt` installs them.
# Made by `python .ci/freeze.py` in the environment that passed; `.ci/newest` tries the newest releases and
# refreshes this file when they pass. pyproject.toml keeps the ranges for people who embed fastcps.
# Linux x86_64, Python {py}; torch is the CUDA build (its nvidia-* wheels are pinned below).
"""


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """{canonical name: version} of ``root`` and everything it requires, recursively, under ``extras``."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, asked = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement whose marker holds but that is not installed: pip would have failed
        key = canonicalize_name(dist.metadata["Name"])
        if key in found and not asked:
            continue
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in asked] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                if canonicalize_name(req.name) not in found or req.extras:
                    todo.append((req.name, set(req.extras)))
    return found


def main() -> None:
    pins = closure("fastcps", {"dev"})
    pins.pop("fastcps")
    py = ".".join(map(str, sys.version_info[:2]))
    lines = [HEADER.format(py=py)] + [f"{name}=={ver}" for name, ver in sorted(pins.items())]
    text = "\n".join(lines) + "\n"
    # local build tags (+cu130) are not on the index under that name for every package: keep the public one
    sys.stdout.write(re.sub(r"==([^\s+]+)\+\S+", r"==\1", text))


if __name__ == "__main__":
    main()
