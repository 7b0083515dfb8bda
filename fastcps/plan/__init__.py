"""The resource plan: what a run costs before any weight loads (``python -m fastcps.plan``).

- ``resources``: the plan itself and the command line;
- ``choose``: the ``auto`` settings (ZeRO stage, checkpointing, whole-model sampling, micro-batch) for a
  GPU's memory minus a reserve, and the trainer's ``resolve_auto`` (the smallest GPU of the run decides);
- ``epoch``: one epoch counted on the trainer's own code (every transformer call, backward, optimizer
  step and ZeRO fetch) and flow_grpo's anchor recipe;
- ``measure``: FLOPs, live bytes and per-module parameter uses of the real architecture on fake tensors
  (the trainer's ``perf`` ledger uses it too);
- ``costs``: memory per GPU per phase and stage, ZeRO traffic, from sizes;
- ``load``: the load phase's peak; ``report``: the printed table.
"""

from fastcps.plan.choose import choose, resolve_auto
from fastcps.plan.resources import Loader, main, plan, policy_sigmas

__all__ = ["Loader", "choose", "main", "plan", "policy_sigmas", "resolve_auto"]
