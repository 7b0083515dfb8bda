"""Prompt sources: the toy's digit prompts, or a .txt / .jsonl file named in the config."""

from __future__ import annotations

import json
from pathlib import Path


def load_prompts(source: str) -> tuple[list[str], list[dict]]:
    """(prompts, metadata) from `digits`, a .txt file (one prompt a line) or a .jsonl file."""
    if source == "digits":
        from fastcps.toy.digits import all_prompts, parse_digit

        prompts = all_prompts()
        return prompts, [{"digit": parse_digit(p)} for p in prompts]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {source!r} (config key `prompts.source`) does not exist; give a "
            ".txt (one prompt per line) or .jsonl file, or `digits` for the toy"
        )
    if path.suffix == ".jsonl":
        prompts, meta = [], []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(str(row["prompt"]))
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(
                    f"{path}:{i + 1}: each line must be a JSON object with a 'prompt' ({err})"
                ) from err
            meta.append(dict(row.get("metadata", {})))
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        meta = [{} for _ in prompts]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts, meta


def truncation_report(counts: list[int], limit: int, what: str = "prompts") -> str | None:
    """One line saying how many of ``counts`` (tokens per prompt) exceed ``limit`` and the
    ``policy.max_sequence_length`` that keeps them whole (rounded up to a multiple of 16); None when
    none does."""
    over = [c for c in counts if c > limit]
    if not over:
        return None
    keep = -(-max(over) // 16) * 16
    return (
        f"{len(over)} of {len(counts)} {what} have more than policy.max_sequence_length = {limit} T5 tokens "
        f"(the longest {max(over)}) and are cut to {limit}, as the pipelines cut them; "
        f"--set policy.max_sequence_length={keep} keeps every one whole (at more FLOPs per forward)"
    )
