"""Print pip constraints pinning every runtime dependency of pyproject.toml (and the ocr/clip/vlm/serve
extras the suite uses) at exactly its lower bound, and the dev tools at the lock's versions: `.ci/oldest`'s
set."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def lower_bounds(project: dict, extras=("ocr", "clip", "vlm", "serve")) -> list[str]:
    lines = []
    for text in project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]:
        req = Requirement(text)
        low = [s.version for s in req.specifier if s.operator in (">=", "==")]
        if not low:
            sys.exit(f"pyproject.toml: {text!r} has no lower bound to test")
        lines.append(f"{req.name}=={low[0]}" + (f"; {req.marker}" if req.marker else ""))
    return lines


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lower_bounds(project)
    pinned = {canonicalize_name(Requirement(p).name) for p in pins}
    tools = [Requirement(r).name for r in project["optional-dependencies"]["dev"] if "fastcps" not in r]
    lock = {
        canonicalize_name(line.split("==")[0]): line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    pins += [lock[canonicalize_name(t)] for t in tools if canonicalize_name(t) not in pinned]
    print("\n".join(pins))


if __name__ == "__main__":
    main()
