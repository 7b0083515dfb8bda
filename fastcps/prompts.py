"""Prompt sources: the toy's digit prompts, a named set (``fastcps.prompt_sets``: ``pickscore:train``, ...),
or a .txt / .jsonl file named in the config."""

from __future__ import annotations

import json
from pathlib import Path


def load_prompts(source: str, key: str = "prompts.source") -> tuple[list[str], list[dict]]:
    """(prompts, metadata) from `digits`, a named set (``family:split``, see ``fastcps.prompt_sets``), a
    .txt file (one prompt a line) or a .jsonl file. ``key`` names the config key in errors."""
    if source == "digits":
        from fastcps.toy.digits import all_prompts, parse_digit

        prompts = all_prompts()
        return prompts, [{"digit": parse_digit(p)} for p in prompts]
    from fastcps import prompt_sets

    if prompt_sets.looks_like_name(source):
        return prompt_sets.load(source, key)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {source!r} (config key `{key}`) does not exist; give a named set "
            f"({', '.join(prompt_sets.SETS)}), a .txt (one prompt per line) or .jsonl file, or `digits` for "
            "the toy"
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


def held_out_warning(
    source: str, eval_source: str | None, train: list[str], evaluated: list[str]
) -> str | None:
    """Why an eval on training prompts misleads, and the fix; None when the eval prompts are held out (or
    for the toy, whose 40 prompts are its whole task: there is nothing to hold out)."""
    if source == "digits":
        return None
    same = eval_source is None or eval_source == source
    shared = set(evaluated) & set(train)
    if not same and not shared:
        return None
    from fastcps import prompt_sets

    family, _, split = source.partition(":")
    test = f"{family}:test"
    fix = (
        f"--set prompts.eval_source={test}"
        if prompt_sets.looks_like_name(source) and split != "test" and test in prompt_sets.SETS
        else "set prompts.eval_source to a held-out prompt set (a named test split, e.g. pickscore:test, or "
        "a file none of whose prompts is in prompts.source)"
    )
    where = (
        "prompts.eval_source is not set, so the eval prompts are drawn from prompts.source"
        if eval_source is None
        else (
            f"prompts.eval_source is prompts.source ({source!r})"
            if eval_source == source
            else f"{len(shared)} of the {len(set(evaluated))} eval prompts ({eval_source!r}) are also "
            f"training prompts ({source!r})"
        )
    )
    return (
        f"{where}: eval/<reward> then measures the prompts the policy is trained on, which a policy can "
        "overfit (their reward climbs while other prompts get worse), not how it does on prompts it never "
        f"saw; fix: {fix}"
    )
