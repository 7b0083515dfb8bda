"""Make the source images of an edit set from the text-to-image prompts its rows carry:
``python -m fastcps.edit_sources --source counting_edit:train counting_edit:test``.

counting_edit's source images were never published: FlowCPS's dataset/counting_edit/process_data.py makes
each with FLUX.1-dev from the row's ``t2i_prompt`` (1024 x 1024, 50 steps, guidance 3.5,
max_sequence_length 512, no seed) and saves it where the rows name it (``generated_images/image_<i>.jpg``).
This command does the same with diffusers' pipeline (``DiffusionPipeline.from_pretrained``; FluxPipeline
for FLUX.1-dev), into the folder the trainer reads them from (``fastcps.prompt_sets.image_root``, or the
.jsonl file's folder), with two differences that matter on a cluster:

- every image has its own seed, derived from ``--seed`` and the image's path relative to that folder: a
  rerun, another number of processes or another machine makes the same picture (up to the GPU's kernels);
- it resumes: an image that is there and decodes is kept (``--overwrite`` makes it again), and each file
  is written under a temporary name and renamed, so a killed run leaves no half-written image.

Several processes share the work (``torchrun --nproc-per-node 8 -m fastcps.edit_sources ...``: process
``RANK`` of ``WORLD_SIZE`` makes every ``WORLD_SIZE``-th image, on ``cuda:LOCAL_RANK``); they share no
collective, so any launcher that sets those variables will do, or ``--shard K/N``. Then
``python -m fastcps.fetch --config CONFIG`` checks every image the config names.

The prompt of an image is the ``--prompt-key`` (``t2i_prompt``) of its rows: a named set's row, a .jsonl
row's ``metadata``. A row without it, or two rows giving one image different prompts, stop the command
(exit 2) naming the rows.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fastcps.edit_sources")

#: FlowCPS's dataset/counting_edit/process_data.py
DEFAULTS = dict(
    pretrained="black-forest-labs/FLUX.1-dev", size=1024, steps=50, guidance=3.5, max_sequence_length=512
)


@dataclass(frozen=True)
class Job:
    path: Path  # where the image goes
    name: str  # its path relative to the folder the rows resolve against: names it and seeds it
    prompt: str  # the text-to-image prompt


def image_base(source: str) -> Path:
    """The folder ``source``'s relative image paths resolve against (``fastcps.edit_images``)."""
    from fastcps import prompt_sets

    if prompt_sets.looks_like_name(source):
        return prompt_sets.image_root(prompt_sets.get(source, "--source"))
    return Path(source).resolve().parent


def jobs_for(sources: list[str], prompt_key: str) -> list[Job]:
    """One job per distinct local source image of ``sources``' edit rows, sorted by path. ValueError naming
    the rows for a row without ``prompt_key``, an image two rows give different prompts, a URL image (it is
    downloaded, not made) or a source without edit rows."""
    from fastcps.edit_images import SOURCE_IMAGES, is_url
    from fastcps.prompts import load_rows

    found: dict[Path, tuple[Job, str]] = {}
    problems: list[str] = []
    for source in sources:
        where, rows = load_rows(source, "--source")
        base = image_base(source)
        edit_rows = [(line, meta) for line, _, meta in rows if meta.get(SOURCE_IMAGES)]
        if not edit_rows:
            problems.append(f'{where} has no edit rows (rows with an "image"): nothing to make')
        for line, meta in edit_rows:
            prompt = meta.get(prompt_key)
            for ref in meta[SOURCE_IMAGES]:
                at = f"{where}, line {line}"
                if is_url(ref):
                    problems.append(f"{at}: {ref} is a URL: `python -m fastcps.fetch` downloads it")
                elif not isinstance(prompt, str) or not prompt.strip():
                    problems.append(f"{at}: no {prompt_key!r} to make {ref} from")
                else:
                    path = Path(ref)
                    job = Job(path, os.path.relpath(path, base), prompt)
                    seen = found.setdefault(path, (job, at))
                    if seen[0].prompt != prompt:
                        problems.append(
                            f"{at} gives {ref} the prompt {prompt!r}, {seen[1]} {seen[0].prompt!r}"
                        )
    if problems:
        shown = "\n  ".join(problems[:10]) + (
            f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise ValueError(f"cannot make the source images:\n  {shown}")
    return sorted((job for job, _ in found.values()), key=lambda j: str(j.path))


def image_seed(seed: int, name: str) -> int:
    """The seed of one image: ``seed`` and its relative path, hashed (independent of shard and machine)."""
    digest = hashlib.sha256(f"{seed}:{Path(name).as_posix()}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def is_done(path: Path) -> bool:
    from fastcps.edit_images import verify

    if not path.is_file():
        return False
    try:
        verify(path)
        return True
    except Exception:  # noqa: BLE001 - any decode failure means: make it again
        return False


def save(image, path: Path) -> None:
    """Write ``image`` (PIL) to ``path`` atomically, in the format its suffix names."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    os.replace(tmp, path)


def parse_shard(text: str | None) -> tuple[int, int]:
    """``K/N`` (or RANK/WORLD_SIZE from the launcher) as (K, N)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(
            f"--shard must be K/N (this process's share K of N, 0 <= K < N), got {text!r}"
        ) from None
    if not 0 <= k < n:
        raise ValueError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def load_pipeline(pretrained: str, device: str, dtype: str):
    import torch
    from diffusers import DiffusionPipeline

    from fastcps.rewards._util import hub_kwargs

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    try:  # torch_dtype, as the policies load (diffusers >= 0.40 takes it)
        pipe = DiffusionPipeline.from_pretrained(pretrained, torch_dtype=torch_dtype, **hub_kwargs())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load the pipeline {pretrained!r} (--pretrained): {err}; fetch it first "
            f"(`hf download {pretrained}`; FLUX.1-dev needs its licence accepted on the hub and HF_TOKEN)"
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def make(jobs: list[Job], pipe, args, device: str) -> int:
    """Make every job's image, one at a time; returns how many."""
    import torch
    from tqdm import tqdm

    for job in tqdm(jobs, desc="source images", disable=not sys.stderr.isatty()):
        generator = torch.Generator(device).manual_seed(image_seed(args.seed, job.name))
        image = pipe(
            job.prompt,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            max_sequence_length=args.max_sequence_length,
            generator=generator,
        ).images[0]
        save(image, job.path)
        log.info("made %s (%r)", job.path, job.prompt)
    return len(jobs)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fastcps.edit_sources", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--source", nargs="+", required=True, help="named edit sets or .jsonl files (prompts.source)"
    )
    p.add_argument(
        "--pretrained", default=DEFAULTS["pretrained"], help="a text-to-image pipeline (hub id, folder)"
    )
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="height and width in pixels")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--guidance", type=float, default=DEFAULTS["guidance"])
    p.add_argument("--max-sequence-length", type=int, default=DEFAULTS["max_sequence_length"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-key", default="t2i_prompt", help="the row key holding an image's prompt")
    p.add_argument("--shard", help="K/N: make every N-th image from the K-th (default: RANK/WORLD_SIZE)")
    p.add_argument("--limit", type=int, help="make at most this many (of this process's share)")
    p.add_argument("--overwrite", action="store_true", help="make images that are already there again")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--dry-run", action="store_true", help="list what would be made, load nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[fastcps] %(message)s")
    args = parse_args(argv)
    try:
        shard, shards = parse_shard(args.shard)
        jobs = jobs_for(args.source, args.prompt_key)
    except (ValueError, FileNotFoundError) as err:
        print(f"[fastcps] {err}", file=sys.stderr)
        return 2
    mine = jobs[shard::shards]
    kept = [] if args.overwrite else [j for j in mine if is_done(j.path)]
    todo = [j for j in mine if j not in kept][: args.limit]
    log.info(
        "%d source images in %s; process %d of %d: %d, %d already there, %d to make",
        *(len(jobs), ", ".join(args.source), shard, shards, len(mine), len(kept), len(todo)),
    )
    if args.dry_run or not todo:
        for job in todo:
            print(f"{job.path}\t{job.prompt}")
        return 0
    import torch

    cuda = torch.cuda.is_available()
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    try:
        pipe = load_pipeline(args.pretrained, device, dtype)
    except FileNotFoundError as err:
        print(f"[fastcps] {err}", file=sys.stderr)
        return 2
    made = make(todo, pipe, args, device)
    log.info("made %d images; check them with `python -m fastcps.fetch --config CONFIG`", made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
