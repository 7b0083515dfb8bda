"""Conditioning as a named bundle of tensors: what a policy's ``encode`` returns, the rollout batches,
the update slices and the prompt cache keeps.

A bundle (``Cond``) is a dict of tensors whose first dim is the number of prompts. The families differ only
in what they put there: FLUX and SD3 per-token states (``encoder_hidden_states``) and a pooled vector
(``pooled_projections``); Qwen-Image per-token states of varying length and their mask
(``encoder_hidden_states_mask``, 1 on tokens, 0 on padding), no pooled vector. The rule for varying length
is one convention, not a per-family switch: a key ``K`` with a companion ``K_mask`` varies along dim 1.
The cache keeps each prompt at its own length and pads to the longest prompt of a batch, and drops the
mask when every prompt of the batch has the same length, as ``QwenImagePipeline.encode_prompt`` does (an
all-ones mask is None there): the same prompts give the transformer the same inputs as the stock pipeline.
All of it is decided on the host, from lengths the cache already holds: no device value is read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch
from torch._subclasses.fake_tensor import is_fake

from fastcps.runtime import to_device

Cond = dict[str, torch.Tensor]
MASK = "_mask"


def varying_keys(cond: Cond) -> list[str]:
    """The keys whose dim 1 varies from prompt to prompt: those with a ``<key>_mask`` companion."""
    return [k for k in cond if not k.endswith(MASK) and k + MASK in cond]


def split_prompts(cond: Cond) -> tuple[list[Cond], list[int]]:
    """One bundle per prompt, each trimmed to its own length (on the host), and those lengths (0 when the
    bundle has no varying key). Reads the masks' values: call it where the encodings come back, not in a
    step."""
    n = next(iter(cond.values())).shape[0]
    varying = varying_keys(cond)
    lengths = [0] * n
    if varying and any(is_fake(cond[k + MASK]) for k in varying):
        # fake tensors (the plan, the fake-CUDA suite) hold no values: every prompt keeps its full length
        lengths = [cond[varying[0]].shape[1]] * n
    elif varying:
        masks = {k: cond[k + MASK].detach().to("cpu") for k in varying}
        lengths = [int(masks[varying[0]][i].sum()) for i in range(n)]
        for k in varying[1:]:
            if [int(m.sum()) for m in masks[k]] != lengths:
                raise ValueError(f"conditioning keys {varying} have masks of different lengths")
    rows = []
    for i in range(n):
        row = {}
        for k, v in cond.items():
            base = k[: -len(MASK)] if k.endswith(MASK) else k
            v = v[i : i + 1].detach().to("cpu")
            if base in varying and lengths[i] != v.shape[1]:
                # the tokens a mask keeps are its leading ones (the encoders pad at the end); a mask with a
                # hole would lose tokens here: refuse it
                if not bool(masks[base][i, : lengths[i]].all()):
                    raise ValueError(f"{base + MASK} of prompt {i} is not ones followed by zeros")
                v = v[:, : lengths[i]]
            row[k] = v.clone()
        rows.append(row)
    return rows, lengths


def stack_prompts(rows: list[Cond], lengths: list[int]) -> Cond:
    """The bundle of ``rows`` (host tensors, one prompt each): varying keys zero-padded on dim 1 to the
    longest, their masks kept only when the lengths differ."""
    varying = varying_keys(rows[0])
    longest = max(lengths) if varying else 0
    ragged = len(set(lengths)) > 1
    out = {}
    for k in rows[0]:
        base = k[: -len(MASK)] if k.endswith(MASK) else k
        if base not in varying:
            out[k] = torch.cat([r[k] for r in rows])
        elif k.endswith(MASK) and not ragged:
            continue  # all tokens real: no mask, as the stock pipeline passes none
        else:
            out[k] = torch.cat([_pad_dim1(r[k], longest) for r in rows])
    return out


def _pad_dim1(t: torch.Tensor, length: int) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def expand_cond(cond: Cond, batch: int) -> Cond:
    """The bundle broadcast to ``batch`` rows: one prompt's conditioning serves every sample."""
    out = {}
    for k, v in cond.items():
        if v.shape[0] == batch:
            out[k] = v
        elif v.shape[0] == 1:
            out[k] = v.expand(batch, *v.shape[1:])
        else:
            raise ValueError(f"batch mismatch: latents {batch}, conditioning {k!r} {v.shape[0]}")
    return out


def select(cond: Cond, index: torch.Tensor) -> Cond:
    """The conditioning rows of ``index`` (a device tensor or slice of one): a gather on the device."""
    return {k: v[index] for k, v in cond.items()}


class PromptEncodings:
    """Encodings computed once per prompt and kept in host memory, least recently used first out past
    ``max_bytes``: FLUX's T5 states are 1 MiB a prompt at 128 tokens (4 MiB at 512), so a 25k-prompt
    file would hold 25-100 GiB per rank if every encoding stayed. ``for_prompts`` moves the distinct
    prompts of a list to the device in one copy and says which row each entry uses; an evicted prompt
    is encoded again when it comes back. Entries are keyed on what the encoder reads
    (``policy.encoding_key``)."""

    def __init__(self, policy, max_bytes: float = float("inf")):
        self.policy = policy
        self.max_bytes = max_bytes
        self.host: OrderedDict[Hashable, Cond] = OrderedDict()
        self.lengths: dict[Hashable, int] = {}  # tokens of each cached prompt's varying keys
        self.nbytes = 0

    def _key(self, prompt, meta) -> Hashable:
        key = getattr(self.policy, "encoding_key", None)
        return prompt if key is None else key(prompt, meta)

    def for_prompts(
        self, prompts: list[str], device, metadata: list[dict] | None = None
    ) -> tuple[Cond, torch.Tensor]:
        """(the bundle of the distinct prompts on ``device``, each entry's row of it). ``metadata``: one
        dict per prompt (an edit row's carries its source images: ``fastcps.edit_images``)."""
        metadata = [{}] * len(prompts) if metadata is None else list(metadata)
        if len(metadata) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata entries")
        keys = [self._key(p, m) for p, m in zip(prompts, metadata)]
        first: dict[Hashable, tuple[str, dict]] = {}  # a key's first prompt (the one encoded), in order
        for k, p, m in zip(keys, prompts, metadata):
            first.setdefault(k, (p, m))
        unique = list(first)
        todo = [k for k in unique if k not in self.host]
        if todo:
            texts, metas = [first[k][0] for k in todo], [first[k][1] for k in todo]
            rows, lengths = split_prompts(self.policy.encode(texts, metas))
            for k, row, n in zip(todo, rows, lengths):
                self.host[k], self.lengths[k] = row, n
                self.nbytes += sum(t.nbytes for t in row.values())
        for k in unique:
            self.host.move_to_end(k)
        row_of = {k: i for i, k in enumerate(unique)}
        bundle = stack_prompts([self.host[k] for k in unique], [self.lengths[k] for k in unique])
        cond = {k: to_device(v, device) for k, v in bundle.items()}
        index = to_device(torch.tensor([row_of[k] for k in keys], dtype=torch.long), device)
        # evict after the copy: this call's prompts may exceed the bound themselves
        while self.nbytes > self.max_bytes and self.host:
            key, dropped = self.host.popitem(last=False)
            del self.lengths[key]
            self.nbytes -= sum(t.nbytes for t in dropped.values())
        return cond, index
