"""The toy's text encoder: a word-level tokenizer over a fixed vocabulary and a tiny ``CLIPTextModel``.

It plays the part of FLUX's T5 + CLIP pair: per-token hidden states become ``encoder_hidden_states``
and the pooled (EOS-token) vector becomes ``pooled_projections``. It runs offline and is
deterministic: the vocabulary is fixed in this file and the weights are trained jointly with the
transformer by ``fastcps.toy.pretrain`` (from a seeded random init) and ship in the same file. At RL
time it is frozen.

Prompts are padded to ``MAX_LENGTH`` tokens and all of them are fed to the transformer without a mask,
as FluxPipeline does with T5.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from fastcps.toy.digits import DIGIT_WORDS

__all__ = ["MAX_LENGTH", "VOCAB", "ToyTextEncoder", "WordTokenizer", "default_text_config"]

_SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "handwritten",
    "digit",
    "number",
    "sketch",
    "drawing",
    "written",
    "picture",
    "image",
    "photo",
    "numeral",
    "hand",
    "by",
    "in",
    "black",
    "white",
    "and",
)
VOCAB: tuple[str, ...] = _SPECIAL + _WORDS + DIGIT_WORDS + tuple(str(d) for d in range(10))
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
MAX_LENGTH = 12  # longest template is 6 words + <bos> + <eos>
_TOKEN_RE = re.compile(r"[a-z]+|[0-9]")


class WordTokenizer:
    """Lower-cases, splits into words and single numerals, maps to ids; unknown words -> <unk>.

    Output: ``[<bos>, w1, ..., wn, <eos>, <pad>, ...]`` of length MAX_LENGTH (truncated words keep the
    <eos> at the end so the pooled vector always exists).
    """

    def __init__(self, vocab: tuple[str, ...] = VOCAB, max_length: int = MAX_LENGTH):
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        rows = []
        for p in prompts:
            ids = [self.index.get(t, UNK_ID) for t in _TOKEN_RE.findall(p.lower())]
            ids = [BOS_ID] + ids[: self.max_length - 2] + [EOS_ID]
            rows.append(ids + [PAD_ID] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def default_text_config() -> dict:
    return {
        "vocab_size": len(VOCAB),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_LENGTH,
        "projection_dim": 64,
        # Our <eos> has id 2, which sends CLIP's own pooler_output down its legacy argmax rule (it
        # would pool at the largest token id); ToyTextEncoder therefore pools at <eos> itself.
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }


class ToyTextEncoder(nn.Module):
    """``encode(prompts) -> (hidden [B, MAX_LENGTH, H], pooled [B, H])``, fp32."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = dict(default_text_config() if config is None else config)
        self.config_dict = cfg
        self.tokenizer = WordTokenizer(max_length=cfg["max_position_embeddings"])
        if len(self.tokenizer.vocab) != cfg["vocab_size"]:
            raise ValueError(
                f"text encoder config has vocab_size={cfg['vocab_size']} but the toy "
                f"vocabulary has {len(self.tokenizer.vocab)} words"
            )
        self.model = CLIPTextModel(CLIPTextConfig(**cfg))

    @property
    def hidden_size(self) -> int:
        return self.config_dict["hidden_size"]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids)
        pooled = _pool_at_eos(out.last_hidden_state, input_ids)
        return out.last_hidden_state, pooled

    def encode(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        device = device or next(self.parameters()).device
        return self(self.tokenizer(prompts).to(device))


def _pool_at_eos(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    # We pool ourselves (hidden state at the first <eos>) rather than rely on CLIPTextModel's
    # pooler_output, whose rule depends on eos_token_id == 2 (a legacy argmax path).
    pos = (input_ids == EOS_ID).int().argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
