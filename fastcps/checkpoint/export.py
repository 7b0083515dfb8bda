"""The trained weights a checkpoint exports beside DeepSpeed's states, for use outside fastcps.

- Full fine-tuning: ``<tag>/transformer/``, the transformer in diffusers' sharded layout
  (``diffusion_pytorch_model-0000k-of-0000n.safetensors``, ``diffusion_pytorch_model.safetensors.index.json``
  with its ``weight_map``, and the model's ``config.json``): ``FluxTransformer2DModel.from_pretrained``
  (or SD3's) reads the folder. It is gathered from the ZeRO-3 partitions one block at a time (a
  ``transformer_blocks.<i>``, an embedder...) and rank 0 writes a shard as soon as it is full, so no
  host ever holds more than one shard (``max_shard_bytes``, 5 GB; a block larger than that is a shard of
  its own). The tensors keep the dtype they train in (bf16 for a bf16 run): that is every bit the
  module holds (DeepSpeed keeps the fp32 master weights in the optimizer, in DeepSpeed's own files), an
  fp32 copy would double the bytes written and held for no information, and it is what the diffusers
  checkpoints of these models ship in.
- LoRA: ``policy.safetensors`` (the adapter, fp32, peft's names) and ``pytorch_lora_weights.safetensors``
  (diffusers' format, for ``pipe.load_lora_weights``): small, gathered at once.

Checkpoints of full fine-tuning written before the sharded export hold ``policy.safetensors`` (the
trained parameters, fp32); ``ExportedWeights`` reads either layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastcps.checkpoint import files

FORMAT = "fastcps-policy-weights"
FOLDER = "transformer"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9


def save_diffusers_lora(state: dict[str, torch.Tensor], peft_config, path: Path) -> None:
    """peft adapter weights as stock diffusers writes them (``save_lora_weights``): keys
    ``transformer.<module>.lora_A.weight`` and the adapter's LoraConfig (r, lora_alpha, targets) in the
    ``lora_adapter_metadata`` header. Without that header ``load_lora_weights`` assumes alpha = r and
    would scale the update by r / alpha (off by 2x for r 64, alpha 128)."""
    from safetensors.torch import save_file

    tensors = {"transformer." + n.replace(".default", ""): t for n, t in state.items()}
    meta = {
        f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()
    }
    save_file(
        tensors,
        str(path),
        metadata={
            "format": "pt",
            "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True, default=str),
        },
    )


def export_weights(
    engine, policy_name: str, lora: bool, folder: Path, *, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """Collective: the trained weights into checkpoint folder ``folder`` (rank 0 writes), see above."""
    if lora:
        export_lora(engine.module, policy_name, Path(folder))
    else:
        export_sharded(engine.module, policy_name, Path(folder) / FOLDER, max_shard_bytes)


def export_lora(module: torch.nn.Module, policy_name: str, folder: Path) -> None:
    import deepspeed
    from safetensors.torch import save_file

    from fastcps import distributed as dist

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if dist.is_main():
            state = {n: p.detach().to("cpu", torch.float32).contiguous().clone() for n, p in named}
            meta = {"format": FORMAT, "policy": policy_name}
            save_file(state, str(folder / "policy.safetensors"), metadata=meta)
            # diffusers' LoRA format: pipeline.load_lora_weights(folder) reads it
            save_diffusers_lora(
                state, module.peft_config["default"], folder / "pytorch_lora_weights.safetensors"
            )


# --- full fine-tuning: block by block, shard by shard ----------------------------------------------


def state_entries(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What ``module.state_dict()`` holds, as (name, parameter or buffer), without reading any data:
    ZeRO-3 parameters are placeholders until gathered."""
    out = list(module.named_parameters())
    for prefix, m in module.named_modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, b))
    return out


def block_of(name: str) -> str:
    """The block a tensor belongs to: its name up to the first list index (``transformer_blocks.3``),
    else its first component (``x_embedder``, ``norm_out``)."""
    parts = name.split(".")
    cut = next((i + 1 for i, s in enumerate(parts[:-1]) if s.isdigit()), 1)
    return ".".join(parts[:cut])


def full_bytes(t: torch.Tensor) -> int:
    """The tensor's whole size, also while ZeRO-3 holds only this rank's partition of it."""
    return int(getattr(t, "ds_numel", t.numel())) * t.element_size()


def plan_shards(entries, max_shard_bytes: int) -> list[list[list[tuple[str, torch.Tensor]]]]:
    """Shards, each a list of blocks (each a list of entries), in the module's order: a block goes whole
    into the current shard while it fits under ``max_shard_bytes``, else it opens the next one."""
    blocks: dict[str, list] = {}
    for name, t in entries:
        blocks.setdefault(block_of(name), []).append((name, t))
    shards, size = [[]], 0
    for block in blocks.values():
        b = sum(full_bytes(t) for _, t in block)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(block)
        size += b
    return shards


def shard_name(k: int, n: int) -> str:
    return f"diffusion_pytorch_model-{k:05d}-of-{n:05d}.safetensors"


def export_sharded(module: torch.nn.Module, policy_name: str, folder: Path, max_shard_bytes: int) -> None:
    """Collective: every rank gathers the same blocks in the same order (ZeRO-3's all-gathers), rank 0
    copies each gathered block to host memory and writes a shard once it is full, then the config and
    (last) the index."""
    import deepspeed
    from safetensors.torch import save_file

    from fastcps import distributed as dist

    main = dist.is_main()
    shards = plan_shards(state_entries(module), max_shard_bytes)
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        held: dict[str, torch.Tensor] = {}
        for block in shard:
            params = [t for _, t in block if isinstance(t, torch.nn.Parameter)]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if main:  # a copy: the gathered tensor is released on the way out
                    held.update({n: t.detach().to("cpu", copy=True).contiguous() for n, t in block})
        if main:
            name = shard_name(k, len(shards))
            save_file(held, str(folder / name), metadata={"format": "pt"})
            weight_map.update({n: name for n in held})
            total += sum(t.numel() * t.element_size() for t in held.values())
        del held
    if not main:
        return
    if hasattr(module, "to_json_string"):  # a diffusers model: from_pretrained builds it from this
        files.write_atomic(folder / "config.json", module.to_json_string())
    index = {
        "metadata": {"total_size": total, "format": FORMAT, "policy": policy_name},
        "weight_map": weight_map,
    }
    files.write_atomic(folder / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")


# --- reading an export ------------------------------------------------------------------------------


class ExportedWeights:
    """The exported weights of one checkpoint folder, in either layout: ``keys()``, ``shape(name)``,
    ``get(name)`` (one tensor at a time: a full FLUX export never sits in memory twice), ``metadata``
    (``format``, ``policy``) and ``path`` (what was read, for messages)."""

    def __init__(self, checkpoint: Path):
        from safetensors import safe_open

        checkpoint = Path(checkpoint)
        self._open, self._handles = safe_open, {}
        index = checkpoint / FOLDER / INDEX
        if index.is_file():
            self.path = checkpoint / FOLDER
            data = json.loads(index.read_text())
            self.metadata = dict(data.get("metadata", {}))
            self._where = {n: self.path / f for n, f in data["weight_map"].items()}
        elif (checkpoint / "policy.safetensors").is_file():
            self.path = checkpoint / "policy.safetensors"
            self.metadata = dict(self._handle(self.path).metadata() or {})
            self._where = {n: self.path for n in self._handle(self.path).keys()}
        else:
            raise FileNotFoundError(
                f"{checkpoint} holds no exported weights (neither {FOLDER}/{INDEX} nor policy.safetensors)"
            )

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._open(str(path), framework="pt")
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self._where[name]).get_tensor(name)

    def load_all(self) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in self._where}
