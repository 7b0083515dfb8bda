"""``python -m fastcps.analysis noise-levels|theorem1|residual-noise|reward-noise [--out-dir DIR]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(","))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fastcps.analysis", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("noise-levels", help="Figure 2: total noise level per step vs the scheduler's σ'")
    p.add_argument("--steps", type=_ints, default=(10, 4))
    p = sub.add_parser("theorem1", help="Flow-SDE → CPWS as the number of steps grows, fitted order")
    p.add_argument("--steps", type=_ints, default=(8, 16, 32, 64, 128))
    p.add_argument("--samples", type=int, default=20)
    p = sub.add_parser("residual-noise", help="noise left in final toy samples per sampler and step count")
    p.add_argument("--steps", type=_ints, default=(4, 6, 10))
    p.add_argument("--noises-per-digit", type=int, default=24)
    p = sub.add_parser(
        "reward-noise",
        help="digit vs digit_clean_trained: score vs added noise, and of each sampler's base-policy samples",
    )
    p.add_argument("--noises-per-digit", type=int, default=24)
    for p in sub.choices.values():
        p.add_argument(
            "--out-dir", default="docs/figures", help="where the PNG (and a JSON of the numbers) go"
        )
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    if args.cmd == "noise-levels":
        from fastcps.analysis.noise_levels import main as run

        res = run(out, steps=args.steps)
    elif args.cmd == "theorem1":
        from fastcps.analysis.theorem1 import main as run

        res = run(out, steps=args.steps, samples=args.samples)
    elif args.cmd == "reward-noise":
        from fastcps.analysis.reward_noise import main as run

        res = run(out, noises_per_digit=args.noises_per_digit)
    else:
        from fastcps.analysis.residual_noise import main as run

        res = run(out, steps=args.steps, noises_per_digit=args.noises_per_digit)
    name = args.cmd.replace("-", "_")
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out / (name + '.json')}")


if __name__ == "__main__":
    main()
