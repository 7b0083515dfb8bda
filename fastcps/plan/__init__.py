"""The resource plan: what a run costs before any weight loads (``python -m fastcps.plan``).

- ``resources``: the plan itself (short sections, top to bottom) and the command line;
- ``loader``: the measured model of a config, from what its family's registry entry knows
  (``fastcps.policies.families``, ``fastcps.policies.plan_facts``: no switch on family names here);
- ``choose``: the ``auto`` settings (ZeRO stage, checkpointing, whole-model sampling, micro-batch) for a
  GPU's memory minus a reserve, and the trainer's ``resolve_auto`` (the smallest GPU of the run decides);
- ``epoch``: one epoch counted on the trainer's own code (every transformer call, backward, optimizer
  step and ZeRO fetch; ``standins``: what it runs on) and the family's anchor recipe. The trainer's eval
  is passed in (``evaluate``): the trainer imports the plan, the plan never imports the trainer;
- ``measure`` (``fake``: its fake-tensor machinery): FLOPs, live bytes and per-module parameter uses of
  the real architecture on fake tensors (the trainer's ``perf`` ledger uses it too);
- ``costs``: memory per GPU per phase and stage, ZeRO traffic, from sizes; ``suggest``: what makes it fit;
- ``load``: the load phase's peak; ``report``: the printed table.
"""

from fastcps.plan.choose import choose, resolve_auto
from fastcps.plan.loader import Loader, policy_sigmas
from fastcps.plan.resources import main, plan

__all__ = ["Loader", "choose", "main", "plan", "policy_sigmas", "resolve_auto"]
