"""The inputs of ``python -m fastcps.sample``: the run directory, its config, its checkpoint and exported
weights, and the prompts; every bad one is a ``UsageError`` that names the argument."""

from __future__ import annotations

from pathlib import Path


class UsageError(Exception):
    """Bad input; the message names the argument. Exit code 2."""


def load_run_config(run: str):
    from fastcps.config import RunConfig
    from fastcps.config import ConfigError, load_config

    path = Path(run)
    if not path.is_dir():
        raise UsageError(
            f"--run {run}: no such run directory (runs are made by `deepspeed fastcps/train.py "
            "--config ...` under <output_dir>/<name>)"
        )
    if not (path / "config.json").is_file():
        raise UsageError(f"--run {run}: no config.json there, so it is not a fastcps run directory")
    try:
        return load_config(RunConfig, str(path / "config.json"))
    except (ConfigError, ValueError) as err:
        raise UsageError(f"--run {run}: its config.json does not load: {err}") from err


def resolve_checkpoint(run: str, tag: str | None) -> Path:
    """<run>/checkpoints/<tag>, a complete checkpoint (``fastcps.checkpoint.complete``); default ``final``,
    else the newest complete one."""
    from fastcps.checkpoint import complete

    root = Path(run) / "checkpoints"
    found = {f.folder.name: f for f in complete.scan(root)}
    done = sorted(name for name, f in found.items() if f.complete)
    if tag is None:
        newest = complete.newest_complete(list(found.values()))
        tag = "final" if "final" in done else (newest.folder.name if newest else None)
        if tag is None:
            raise UsageError(f"--run {run}: no complete checkpoint under {root} yet")
    if tag not in done:
        why = f" is incomplete ({found[tag].why})" if tag in found else ": no such checkpoint"
        have = ", ".join(done) if done else "none"
        raise UsageError(f"--checkpoint {tag}{why}; checkpoints of this run: {have}")
    return root / tag


def check_weights_file(checkpoint: Path, family: str):
    """The checkpoint's export is fastcps's and was written for this policy family (before any model
    loads); returns it (``fastcps.checkpoint.ExportedWeights``)."""
    from fastcps.checkpoint import ExportedWeights

    try:
        weights = ExportedWeights(checkpoint)
        meta = weights.metadata
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise UsageError(f"--checkpoint: {checkpoint} holds no readable exported weights ({err})") from err
    path = weights.path
    if meta.get("format") != "fastcps-policy-weights":
        raise UsageError(
            f"--checkpoint: {path} is not fastcps's policy export (metadata format={meta.get('format')!r})"
        )
    if meta.get("policy") != family:
        raise UsageError(
            f"--run / --checkpoint: {path} holds weights of a {meta.get('policy')!r} policy, but the "
            f"run's config.json says policy.name = {family!r}; pick the run that wrote this checkpoint"
        )
    return weights


def run_prompts(cfg) -> tuple[list[str], list[dict]]:
    """The run's fixed eval set, as the trainer picks it (``rollout.eval_prompt_set``)."""
    from fastcps.rollout import eval_prompt_set

    try:
        return eval_prompt_set(cfg)
    except (FileNotFoundError, ValueError) as err:  # e.g. a relative path from another working directory
        source = cfg.prompts.eval_source or cfg.prompts.source
        raise UsageError(
            f"the run's eval prompts ({source!r}) do not load: {err}. Give --prompts FILE or --prompt TEXT"
        ) from err


def chosen_prompts(args, cfg) -> tuple[list[str], list[dict]]:
    """The prompts (and metadata) to sample: ``--prompt`` (with ``--image`` for an editing run), a
    ``--prompts`` file, else the run's eval set; checked to fit the run's policy (an editing policy needs a
    source image per prompt, a text-to-image policy none) and every source image there."""
    from fastcps.edit_images import check_edit_images, check_rows_fit_policy
    from fastcps.policies.families import family

    prompts, meta = _prompts(args, cfg)
    editing = family(cfg.policy.name).editing
    if args.prompt and editing and not args.image:
        raise UsageError(
            f"--prompt: the run's policy ({cfg.policy.name}) edits images: give each --prompt its source "
            "image with --image PATH (one --image for all prompts, or one per --prompt, in order)"
        )
    if args.image and not editing:
        raise UsageError(
            f"--image: the run's policy ({cfg.policy.name}) generates from text alone; drop --image"
        )
    where = (
        "--prompt" if args.prompt else ("--prompts " + args.prompts if args.prompts else "the run's eval set")
    )
    try:
        check_rows_fit_policy(cfg.policy.name, editing, prompts, meta, where)
        if editing and not args.prompt:  # every source image is there and decodes, before a model loads
            source = args.prompts or cfg.prompts.eval_source or cfg.prompts.source
            check_edit_images(source, "--prompts" if args.prompts else where)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    return prompts, meta


def _prompts(args, cfg) -> tuple[list[str], list[dict]]:
    from fastcps.prompts import load_prompts

    if args.prompt:
        return list(args.prompt), _command_line_images(args)
    if args.prompts:
        if Path(args.prompts).suffix not in (".txt", ".jsonl"):
            raise UsageError(
                f"--prompts {args.prompts}: give a .txt file (one prompt a line) or a .jsonl file "
                '({"prompt": ..., "metadata": {...}} a line), see configs/prompts/README.md'
            )
        try:
            return load_prompts(args.prompts)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--prompts {args.prompts}: {err}") from err
    return run_prompts(cfg)


def _command_line_images(args) -> list[dict]:
    """Each ``--prompt``'s metadata: its ``--image`` (one for all, or one each) resolved and checked."""
    from fastcps.edit_images import SOURCE_IMAGES, UnreadableImage, download, is_url, local_file, verify

    images = list(args.image or [])
    if not images:
        return [{} for _ in args.prompt]
    if len(images) not in (1, len(args.prompt)):
        raise UsageError(
            f"--image given {len(images)} times for {len(args.prompt)} --prompt: give one image for all "
            "prompts or one per prompt"
        )
    refs = []
    for ref in images:
        ref = ref if is_url(ref) else str(Path(ref).expanduser().resolve())
        try:
            if is_url(ref) and not local_file(ref).is_file():
                download(ref)
            verify(local_file(ref))
        except (FileNotFoundError, UnreadableImage, OSError) as err:
            raise UsageError(f"--image {ref}: {err}") from err
        refs.append(ref)
    refs = refs * len(args.prompt) if len(refs) == 1 else refs
    return [{SOURCE_IMAGES: [r]} for r in refs]
