"""Test-only check shared by the policy tests: the trained adapters, exported as the trainer exports them,
load in the family's stock diffusers pipeline and give the trained policy's velocity."""

from __future__ import annotations

import torch


def assert_exported_lora_loads_in_stock(policy, x, s, cond, pipe, folder) -> None:
    """Perturb ``policy``'s LoRA parameters, check adapters off = the base velocity and on != base, export
    them (``save_diffusers_lora``) into ``folder`` and check ``pipe.load_lora_weights(folder)`` gives the
    trained velocity (atol 1e-6, rtol 1e-5) with ``pipe.transformer``."""
    from fastcps.checkpoint import save_diffusers_lora

    named = {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}
    with torch.no_grad():
        base = policy.velocity(policy.transformer, x, s, cond)
        torch.manual_seed(4)
        for p in named.values():
            p.normal_(0, 0.3)
        trained = policy.velocity(policy.transformer, x, s, cond)
        with policy.reference(policy.transformer) as ref:
            torch.testing.assert_close(policy.velocity(ref, x, s, cond), base)
    assert not torch.allclose(trained, base)
    save_diffusers_lora(
        {n: p.detach().clone() for n, p in named.items()},
        policy.transformer.peft_config["default"],
        folder / "pytorch_lora_weights.safetensors",
    )
    pipe.load_lora_weights(folder)
    with torch.no_grad():
        loaded = policy.velocity(pipe.transformer, x, s, cond)
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=1e-5)
