"""Images per second of each local reward on CPU, on tiny random-weight models (the real code paths:
preprocessing, the model forward, the scoring), so the figures measure fastcps's reward code and the
libraries' preprocessing, not the real backbones (PickScore's CLIP-H costs far more per image).

    python bench/bench_rewards.py [--sizes 64,512] [--batch 8] [--repeats 10] [--rewards pickscore,ocr]

Rewards: pickscore, hpsv2, aesthetic, image_similarity (tiny transformers / open_clip CLIPs of
tests/tiny_rewards.py, 32 x 32 model input), ocr (RapidOCR for real: it ships its ONNX models; the
images hold rendered text), jpeg_compressibility, digit and digit_clean_trained (the toy's shipped
classifiers, on the toy's 16 x 16 images whatever --sizes says), geneval (the in-process detector's tiny
Mask2Former + CLIP from ``fastcps.testing.save_tiny_geneval``; the row is skipped, with the reason
printed, where that is not available). Remote rewards (vlm_judge, a reward service) are not local.
Each reward is timed on one batch per call, the rewards interleaved round-robin (bench/common.py
``time_cpu``), after untimed warm-up calls (the first loads the model; image_similarity's references are
then cached, as they are across a GRPO group). Rows append to bench/results/rewards.csv with the device,
the threads, library versions and the commit.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# this checkout's fastcps (not an installed one), tests/tiny_rewards.py (the tiny models), bench/common.py
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
sys.path.insert(2, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from common import CLOCKS, RESULTS, append_csv, meta, print_table, time_cpu  # noqa: E402

COLUMNS = [
    "timestamp",
    "device",
    "threads",
    "timer",
    "torch",
    "triton",
    "fastcps",
    "commit",
    "libs",
    "reward",
    "model",
    "image_size",
    "batch",
    "median_ms_per_batch",
    "p20_ms",
    "p80_ms",
    "images_per_s",
    "note",
]
LOCAL = [
    "pickscore",
    "hpsv2",
    "aesthetic",
    "image_similarity",
    "ocr",
    "jpeg_compressibility",
    "digit",
    "digit_clean_trained",
    "geneval",
]
PROMPTS = ["a photo of a cat", "the red dog", "a blue cat", "a photo of the dog"]  # the tiny CLIP's words


def libs() -> str:
    out = []
    for name in ("transformers", "open_clip_torch", "rapidocr", "onnxruntime", "pillow", "torchvision"):
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return "; ".join(out)


class Skip(Exception):
    """This reward cannot be benchmarked here; the message says why."""


def text_images(b: int, size: int) -> torch.Tensor:
    """Black text on white, as the OCR recipe's images hold (RapidOCR finds and reads it)."""
    from PIL import Image, ImageDraw, ImageFont

    out = []
    for i in range(b):
        img = Image.new("RGB", (size, size), "white")
        font = ImageFont.load_default(size=max(8, size // 8))
        ImageDraw.Draw(img).text((size // 10, size // 3), f"Hello {i}", fill="black", font=font)
        out.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def random_images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (x * 255).round() / 255  # the k/255 levels the policies decode to


def case(name: str, root: Path, b: int, size: int):
    """(reward, images, prompts, metadata, model description, note) of one reward at batch b, size."""
    from fastcps.rewards import build_reward
    from tiny_rewards import _tiny_hf_clip, tiny_hps_checkpoint

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
    metadata = [{} for _ in range(b)]
    clip = root / "clip"
    if name in ("pickscore", "aesthetic", "image_similarity") and not (clip / "model").exists():
        _tiny_hf_clip(clip)
    tiny_clip = "tiny CLIPModel (ViT 2 x 32, 32 px input)"
    if name == "pickscore":
        r = build_reward("pickscore", {"model": str(clip / "model"), "processor": str(clip / "processor")})
        return r, random_images(b, size), prompts, metadata, tiny_clip, "fp32"
    if name == "aesthetic":
        from fastcps.rewards.aesthetic import AestheticHead

        head = root / "aesthetic_head.pth"
        torch.save(AestheticHead((16, 32, 16, 8, 4, 1)).state_dict(), head)
        args = {"head": str(head), "model": str(clip / "model"), "processor": str(clip / "processor")}
        return build_reward("aesthetic", args), random_images(b, size), prompts, metadata, tiny_clip, "fp32"
    if name == "hpsv2":
        (root / "hps").mkdir(exist_ok=True)
        ckpt, cfg = tiny_hps_checkpoint(root / "hps")
        r = build_reward("hpsv2", {"checkpoint": str(ckpt), "model_config": str(cfg)})
        return r, random_images(b, size), prompts, metadata, "tiny open_clip CLIP (ViT 2 x 32, 32 px)", "fp32"
    if name == "image_similarity":
        from PIL import Image

        (root / "refs").mkdir(exist_ok=True)
        for i in range(2):
            arr = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "refs" / f"{i}.png")
        metadata = [{"image": f"refs/{i % 2}.png"} for i in range(b)]
        args = {"model": str(clip / "model"), "processor": str(clip / "processor"), "image_root": str(root)}
        r = build_reward("image_similarity", args)
        return (
            r,
            random_images(b, size),
            prompts,
            metadata,
            tiny_clip,
            "fp32; 2 references, cached after warm-up",
        )
    if name == "ocr":
        r = build_reward("ocr", {})
        prompts = [f'a sign that says "Hello {i}"' for i in range(b)]
        return r, text_images(b, size), prompts, metadata, "RapidOCR (shipped ONNX models)", "rendered text"
    if name == "jpeg_compressibility":
        return build_reward(name, {}), random_images(b, size), prompts, metadata, "PIL JPEG, quality 95", ""
    if name in ("digit", "digit_clean_trained"):
        from fastcps.toy.digits import IMAGE_SIZE, prompt_for

        prompts = [prompt_for(i % 10) for i in range(b)]
        x = random_images(b, IMAGE_SIZE)
        return (
            build_reward(name, {}),
            x,
            prompts,
            metadata,
            "toy CNN (shipped)",
            f"toy images {IMAGE_SIZE} px",
        )
    if name == "geneval":
        import fastcps.testing

        save = getattr(fastcps.testing, "save_tiny_geneval", None)
        if save is None:
            raise Skip(
                "fastcps.testing.save_tiny_geneval is not here: GenEval's in-process detector is not merged"
            )
        args = save(root / "geneval")
        metadata = [{"tag": "single_object", "include": [{"class": "car", "count": 1}]} for _ in range(b)]
        prompts = ["a photo of a car"] * b
        model = "tiny Mask2Former + tiny open_clip CLIP"
        return (
            build_reward("geneval", args),
            random_images(b, size),
            prompts,
            metadata,
            model,
            "in-process detector",
        )
    raise SystemExit(f"--rewards: {name!r} is not a local reward here; choose from {', '.join(LOCAL)}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rewards", default=",".join(LOCAL), help=f"comma-separated subset of {','.join(LOCAL)}")
    p.add_argument("--sizes", default="64,512", help="comma-separated image sizes (square), e.g. 64,512")
    p.add_argument("--batch", type=int, default=8, help="images per reward call")
    p.add_argument("--repeats", type=int, default=10, help="timed calls of each reward per size")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first loads the model)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: a shared machine)")
    p.add_argument(
        "--timer",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall (time.perf_counter) or cpu (time.process_time: CPU time of all this process's threads, "
        "leaving out the time other processes held the cores of a shared machine)",
    )
    p.add_argument("--csv", default=str(RESULTS / "rewards.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    base = {**meta(device, args.timer), "libs": libs()}
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [int(s) for s in args.sizes.split(",")]
        for size in sizes:
            cases, fns = {}, {}
            for name in [n.strip() for n in args.rewards.split(",") if n.strip()]:
                if name.startswith("digit") and size != sizes[0]:
                    continue  # the toy's images are 16 x 16 at every --sizes
                try:
                    cases[name] = c = case(name, Path(tmp), args.batch, size)
                except Skip as why:
                    skipped.append((name, str(why)))
                    continue
                r, x, prompts, md_ = c[:4]
                fns[name] = lambda r=r, x=x, prompts=prompts, md_=md_: r(x, prompts, md_)
            with torch.no_grad():
                timings = time_cpu(fns, args.repeats, args.warmup, CLOCKS[args.timer])
            for name, (med, p20, p80) in timings.items():
                _, x, _, _, model, note = cases[name]
                rows.append(
                    {
                        **base,
                        "reward": name,
                        "model": model,
                        "image_size": f"{x.shape[-2]}x{x.shape[-1]}",
                        "batch": x.shape[0],
                        "median_ms_per_batch": f"{med:.3f}",
                        "p20_ms": f"{p20:.3f}",
                        "p80_ms": f"{p80:.3f}",
                        "images_per_s": f"{x.shape[0] / (med * 1e-3):.1f}",
                        "note": note,
                    }
                )
    print(
        f"\nlocal rewards on {base['device']}, threads={args.threads}, commit {base['commit']} -> {args.csv}"
    )
    print_table(
        rows, ["reward", "image_size", "batch", "median_ms_per_batch", "p20_ms", "p80_ms", "images_per_s"]
    )
    for name, why in dict(skipped).items():
        print(f"skipped {name}: {why}")
    append_csv(args.csv, rows, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
