"""Prompt sources: the toy's digit prompts, a named set (``fastcps.prompt_sets``: ``pickscore:train``, ...),
or a .txt / .jsonl file named in the config."""

from __future__ import annotations

import json
from pathlib import Path


def load_prompts(source: str, key: str = "prompts.source") -> tuple[list[str], list[dict]]:
    """(prompts, metadata) from `digits`, a named set (``family:split``, see ``fastcps.prompt_sets``), a
    .txt file (one prompt a line) or a .jsonl file. ``key`` names the config key in errors. An edit row's
    source images are in its metadata (``fastcps.edit_images.SOURCE_IMAGES``)."""
    _, rows = load_rows(source, key)
    return [p for _, p, _ in rows], [m for _, _, m in rows]


def load_rows(source: str, key: str = "prompts.source") -> tuple[str, list[tuple[int, str, dict]]]:
    """(what ``source`` is, in words; (line, prompt, metadata) of each row): ``load_prompts`` with the line
    each row comes from, for errors that name it."""
    if source == "digits":
        from fastcps.toy.digits import all_prompts, parse_digit

        return "the toy's digit prompts", [
            (i + 1, p, {"digit": parse_digit(p)}) for i, p in enumerate(all_prompts())
        ]
    from fastcps import prompt_sets

    if prompt_sets.looks_like_name(source):
        return f"prompt set {source!r}", prompt_sets.load_rows(source, key)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {source!r} (config key `{key}`) does not exist; give a named set "
            f"({', '.join(prompt_sets.SETS)}), a .txt (one prompt per line) or .jsonl file, or `digits` for "
            "the toy"
        )
    lines = [(i + 1, line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    if path.suffix == ".jsonl":
        rows = [_jsonl_row(path, n, line, key) for n, line in lines]
    else:
        rows = [(n, line.strip(), {}) for n, line in lines]
    if not rows:
        raise ValueError(f"prompt file {path} holds no prompts")
    return str(path), rows


def _jsonl_row(path: Path, n: int, line: str, key: str) -> tuple[int, str, dict]:
    """One line of a .jsonl prompt file: ``{"prompt", "metadata"?, "image"?}`` (configs/prompts/README.md);
    an ``image`` makes it an edit row, its paths resolved against the file's folder."""
    from fastcps.edit_images import SOURCE_IMAGES, row_images

    try:
        row = json.loads(line)
        prompt = str(row["prompt"])
        meta = dict(row.get("metadata", {}))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}:{n}: each line must be a JSON object with a 'prompt' ({err})") from err
    images = row_images(row, path.resolve().parent, f"{path}:{n} (config key `{key}`)")
    if images is not None:
        meta[SOURCE_IMAGES] = images
    return n, prompt, meta


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


def prompt_identity(prompt: str, meta: dict | None) -> tuple:
    """What makes a prompt the same prompt: its text, and an edit row's source images with it (the same
    instruction asked of another image is another task)."""
    from fastcps.edit_images import SOURCE_IMAGES

    return (prompt, *((meta or {}).get(SOURCE_IMAGES, ())))


def held_out_warning(
    source: str,
    eval_source: str | None,
    train: list[str],
    evaluated: list[str],
    train_meta: list[dict] | None = None,
    eval_meta: list[dict] | None = None,
) -> str | None:
    """Why an eval on training prompts misleads, and the fix; None when the eval prompts are held out (or
    for the toy, whose 40 prompts are its whole task: there is nothing to hold out). With the metadata,
    edit rows compare as instruction and source images (``prompt_identity``): counting_edit's test split
    asks the train split's instructions of other images, or of the same images other instructions."""
    if source == "digits":
        return None
    same = eval_source is None or eval_source == source
    eval_ids = {prompt_identity(p, m) for p, m in zip(evaluated, eval_meta or [None] * len(evaluated))}
    shared = eval_ids & {prompt_identity(p, m) for p, m in zip(train, train_meta or [None] * len(train))}
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
            else f"{len(shared)} of the {len(eval_ids)} eval prompts ({eval_source!r}) are also "
            f"training prompts ({source!r})"
        )
    )
    return (
        f"{where}: eval/<reward> then measures the prompts the policy is trained on, which a policy can "
        "overfit (their reward climbs while other prompts get worse), not how it does on prompts it never "
        f"saw; fix: {fix}"
    )
