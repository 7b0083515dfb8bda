"""End-to-end trainer throughput on a config (default: the digits toy), fused ops vs the reference ops.

    python bench/bench_train.py [--config configs/digits_cps.json] [--epochs 3] [--set k=v ...]

For each implementation (`fused`: the dispatching ops, as the trainer ships; `reference`: the plain
fp32 PyTorch `_ref` ops, autograd for the backward) it builds the Trainer in this process (one rank,
DeepSpeed ZeRO-3 as configured), runs a warm-up epoch plus ``--epochs`` timed epochs, and reports
the epoch time split into rollout, reward and update, images per second, peak memory, and the share
of the epoch spent in the step and log-prob/KL math. That share is measured by re-timing, in
isolation, every op call the epochs made (same shapes, forward and backward), so it does not
depend on profiler overhead. Rows append to bench/results/train.csv.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from common import append_csv, meta, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [
    "timestamp",
    "device",
    "threads",
    "torch",
    "triton",
    "fastcps",
    "commit",
    "config",
    "impl",
    "epochs",
    "images_per_epoch",
    "epoch_s",
    "rollout_s",
    "reward_s",
    "update_s",
    "images_per_s",
    "op_math_s",
    "op_math_share_%",
    "peak_mem_gib",
]


class OpRecorder:
    """Wraps the trainer's two ops: counts calls by shape, so they can be re-timed in isolation."""

    def __init__(self, impl: str):
        import fastcps.rollout as rollout_mod
        import fastcps.update as update_mod
        from fastcps.ops.cps_logprob_kl import LogprobKL, cps_logprob_kl, cps_logprob_kl_ref
        from fastcps.ops.cps_step import StepResult, cps_step, cps_step_ref

        self.calls: Counter = Counter()
        self.impl = impl
        rec = self

        def step(x, v, c, **kw):
            rec.calls[("step", tuple(x.shape), x.dtype)] += 1
            if impl == "fused":
                return cps_step(x, v, c, **kw)
            noise = kw.get("noise")
            if noise is None:  # the reference has no in-kernel RNG: draw the same Philox noise
                from fastcps.ops.philox import philox_randn

                noise = philox_randn(kw["seed"], kw.get("offset", 0) + torch.arange(x.numel())).reshape(
                    x.shape
                )
            out = cps_step_ref(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, noise=noise)
            return StepResult(out.prev_sample, out.log_prob, out.mean if kw.get("return_mean") else None)

        def logprob_kl(x, v, prev, c, v_ref=None):
            rec.calls[("logprob_kl", tuple(x.shape), v.dtype, v_ref is not None)] += 1
            if impl == "fused":
                return cps_logprob_kl(x, v, prev, c, v_ref)
            return LogprobKL(
                *cps_logprob_kl_ref(x, v, prev, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w, v_ref=v_ref)
            )

        self.originals = (rollout_mod.cps_step, update_mod.cps_logprob_kl)
        rollout_mod.cps_step = step
        update_mod.cps_logprob_kl = logprob_kl

    def restore(self):
        import fastcps.rollout as rollout_mod
        import fastcps.update as update_mod

        rollout_mod.cps_step, update_mod.cps_logprob_kl = self.originals

    def isolated_seconds(self, repeats: int = 5) -> float:
        """Time every recorded call again, alone, with the implementation the epochs used."""
        from fastcps import cps_logprob_kl, cps_logprob_kl_ref, cps_step, cps_step_ref, step_coeffs

        total = 0.0
        for key, count in self.calls.items():
            shape, dtype = key[1], key[2]
            b = shape[0]
            x, v, e = (torch.randn(shape, dtype=dtype) for _ in range(3))
            c = step_coeffs("cps", torch.full((b,), 0.6), torch.full((b,), 0.5))
            if key[0] == "step":
                if self.impl == "fused":

                    def fn():
                        return cps_step(x, v, c, seed=1)
                else:  # the same Philox noise the trainer's reference path draws
                    from fastcps.ops.philox import philox_randn

                    def fn():
                        eps = philox_randn(1, torch.arange(x.numel())).reshape(x.shape)
                        return cps_step_ref(x, v, c.alpha, c.beta, c.s, c.lp_w, c.lp_c, noise=eps)
            else:
                ref = e if key[3] else None

                def fn():
                    vv = v.clone().requires_grad_(True)
                    if self.impl == "fused":
                        lp, kl = cps_logprob_kl(x, vv, e, c, ref)
                    else:
                        lp, kl = cps_logprob_kl_ref(
                            x, vv, e, c.alpha, c.beta, c.lp_w, c.lp_c, c.kl_w, v_ref=ref
                        )
                    (lp.sum() + kl.sum()).backward()

            fn()  # warm-up (compilation, if any)
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            total += sorted(samples)[len(samples) // 2] * count
        return total


def run(config: str, impl: str, epochs: int, overrides: list[str]) -> dict:
    from fastcps import distributed as dist
    from fastcps.config import RunConfig
    from fastcps.config import load_config, validate_tree
    from fastcps.trainer import Trainer

    sets = [
        "eval.every=0",
        "log.progress=false",
        "log.images_every=0",
        "checkpoint.every=0",
        f"train.num_epochs={epochs + 1}",
        *overrides,
    ]
    cfg = load_config(RunConfig, config, sets)
    validate_tree(cfg, world_size=1)
    dist.init()
    recorder = OpRecorder(impl)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, Path(tmp) / impl)
            trainer.run_epoch(0)  # warm-up: allocator, DeepSpeed buffers, compilation
            recorder.calls.clear()
            rows = [trainer.run_epoch(e) for e in range(1, epochs + 1)]
            trainer.logger.close()
    finally:
        recorder.restore()
    mean = {
        k: sum(r[k] for r in rows) / len(rows)
        for k in ("time/epoch_s", "time/rollout_s", "time/reward_s", "time/update_s", "perf/images_per_s")
    }
    op_s = recorder.isolated_seconds() / epochs
    t = cfg.train
    return {
        "config": Path(config).name,
        "impl": impl,
        "epochs": epochs,
        "images_per_epoch": t.prompts_per_epoch * t.images_per_prompt,
        "epoch_s": round(mean["time/epoch_s"], 3),
        "rollout_s": round(mean["time/rollout_s"], 3),
        "reward_s": round(mean["time/reward_s"], 3),
        "update_s": round(mean["time/update_s"], 3),
        "images_per_s": round(mean["perf/images_per_s"], 2),
        "op_math_s": round(op_s, 4),
        "op_math_share_%": round(100 * op_s / mean["time/epoch_s"], 2),
        "peak_mem_gib": round(max(r["memory/peak_gib"] for r in rows), 3),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "digits_cps.json"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--impls", default="fused,reference")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--csv", default=str(ROOT / "bench" / "results" / "train.csv"))
    args = p.parse_args(argv)
    base = meta(torch.device("cpu"))
    rows = [{**base, **run(args.config, impl, args.epochs, args.overrides)} for impl in args.impls.split(",")]
    print_table(
        rows,
        [
            "impl",
            "epoch_s",
            "rollout_s",
            "reward_s",
            "update_s",
            "images_per_s",
            "op_math_s",
            "op_math_share_%",
            "peak_mem_gib",
        ],
    )
    append_csv(args.csv, rows, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
