"""Tiny reward backbones with random weights, built offline: a transformers CLIP (PickScore's shape,
word-level BPE vocab) and an open_clip CLIP (HPSv2's). Shared by the reward and policy tests."""

import json

import torch

WORDS = ["a", "cat", "dog", "photo", "of", "red", "blue", "the"]


def _tiny_hf_clip(root):
    """A tiny CLIPModel + CLIPProcessor with random weights and a word-level BPE vocab, saved to disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = sorted(set("".join(WORDS)))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in WORDS:  # merge each word left to right into one token
        cur = w[0]
        for i, c in enumerate(w[1:], 1):
            nxt = c + ("</w>" if i == len(w) - 1 else "")
            merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = CLIPProcessor(image_processor=ip, tokenizer=tok)
    proc.save_pretrained(root / "processor")
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": eos - 1,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root / "model")
    return tok


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_hps_checkpoint(root):
    """An open_clip CLIP with random weights as an HPS-style checkpoint + its model config."""
    import open_clip

    torch.manual_seed(1)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    path = root / "hps_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    (root / "cfg.json").write_text(json.dumps(TINY_OPEN_CLIP))
    return path, root / "cfg.json"


class ScriptedReward:
    """A stand-in reward for the multi-process failure tests (tests/test_failing_together.py): from its
    ``from_call``-th call on (0 = the first), the global ranks in ``raise_on`` raise and those in
    ``sleep_on`` (rank -> seconds) sleep; it scores every image 0. Each call first creates
    ``<marker_dir>/rank<r>.call<n>``, so that a test knows where each rank is. Registered in a rank
    process with ``tests/multi_run.py --reward scripted=tiny_rewards:ScriptedReward``."""

    def __init__(self, raise_on=(), sleep_on=None, from_call: int = 0, marker_dir: str | None = None):
        self.raise_on, self.sleep_on = set(raise_on), {int(k): float(v) for k, v in (sleep_on or {}).items()}
        self.from_call, self.marker_dir, self.calls = from_call, marker_dir, 0

    def __call__(self, images, prompts, metadata):
        import time
        from pathlib import Path

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        call, self.calls = self.calls, self.calls + 1
        if self.marker_dir:
            Path(self.marker_dir, f"rank{rank}.call{call}").touch()
        if call >= self.from_call:
            if rank in self.raise_on:
                raise RuntimeError(f"scripted failure on rank {rank}")
            time.sleep(self.sleep_on.get(rank, 0.0))
        return torch.zeros(images.shape[0])
