"""What ``python -m fastcps.sample`` writes and prints: the grid of base and trained images with their
rewards, every image as a PNG, the per-image rewards and means as JSON and CSV, the means table."""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path

import torch

from fastcps.sample.comparison import Comparison, means


def to_pil(img: torch.Tensor):
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def draw_block(c: Comparison, p: int, names: list[str], show_total: bool, cell: int, font):
    """One prompt: its text, a base row and a trained row; under every image its reward components
    (and the weighted total when it differs from the single component)."""
    from PIL import Image, ImageDraw

    line, pad, label_w = 16, 6, 84
    k = c.images["base"].shape[1]
    caption = line * (len(names) + show_total)
    # an edit: the source image(s) in a column left of both rows, then the edits
    src = [] if c.sources is None else list(c.sources[p])
    label_w += len(src) * (cell + pad)
    width = label_w + k * (cell + pad)
    head = textwrap.wrap(c.prompts[p], max(20, int(width / 7.5)))[:3] or [""]
    height = len(head) * line + pad + 2 * (cell + caption + pad)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(head):
        draw.text((pad, i * line), text, fill="black", font=font)
    y = len(head) * line + pad
    for i, image in enumerate(src):
        x = pad + i * (cell + pad)
        img.paste(to_pil(image).resize((cell, cell), Image.NEAREST), (x, y + (cell + caption + pad) // 2))
        draw.text((x, y + (cell + caption + pad) // 2 + cell + 1), "source", fill="black", font=font)
    x_label = label_w - 84
    for which in ("base", "trained"):
        draw.text((x_label + pad, y + cell // 2 - line), which, fill="black", font=font)
        mean = f"mean {float(c.total[which][p].mean()):.3f}"
        draw.text((x_label + pad, y + cell // 2), mean, fill=(90, 90, 90), font=font)
        for j in range(k):
            x = label_w + j * (cell + pad)
            img.paste(to_pil(c.images[which][p, j]).resize((cell, cell), Image.NEAREST), (x, y))
            rows = [f"{n} {float(c.components[which][n][p, j]):.3f}" for n in names]
            rows += [f"total {float(c.total[which][p, j]):.3f}"] if show_total else []
            for r, text in enumerate(rows):
                draw.text((x, y + cell + 1 + r * line), text, fill="black", font=font)
        y += cell + caption + pad
    return img


def draw_grid(c: Comparison, weights: dict[str, float], title: str):
    """Every prompt's block (``draw_block``), tiled in columns so that the grid is about as wide as it
    is tall. Small images (the toy's 16 px) are enlarged without smoothing."""
    from PIL import Image, ImageDraw, ImageFont

    side = c.images["base"].shape[-1]
    cell = side * math.ceil(128 / side) if side < 128 else min(side, 256)
    names = list(c.components["base"])
    show_total = len(names) > 1 or weights[names[0]] != 1
    font = ImageFont.load_default(size=13)
    blocks = [draw_block(c, p, names, show_total, cell, font) for p in range(len(c.prompts))]
    bw, bh = max(b.width for b in blocks), max(b.height for b in blocks)
    cols = max(1, min(len(blocks), round(math.sqrt(len(blocks) * bh / bw))))
    rows = math.ceil(len(blocks) / cols)
    gap, top = 12, 28
    grid = Image.new("RGB", (cols * (bw + gap) + gap, top + rows * (bh + gap)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((gap, 6), title, fill="black", font=font)
    for i, block in enumerate(blocks):
        x, y = gap + (i % cols) * (bw + gap), top + (i // cols) * (bh + gap)
        draw.line([(x, y - gap // 2), (x + bw, y - gap // 2)], fill=(180, 180, 180))
        grid.paste(block, (x, y))
    return grid


def write_outputs(c: Comparison, out: Path, info: dict, weights: dict[str, float]) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    img_dir = out.with_name(out.stem + "_images")
    img_dir.mkdir(exist_ok=True)
    names = list(c.components["base"])
    rows, sources = [], {}
    for p, prompt in enumerate(c.prompts):
        for i, image in enumerate([] if c.sources is None else c.sources[p]):
            file = img_dir / f"p{p:02d}_source_{i}.png"
            to_pil(image).save(file)
            sources.setdefault(p, []).append(str(file))
        for which in ("base", "trained"):
            for j in range(c.images[which].shape[1]):
                file = img_dir / f"p{p:02d}_{which}_{j}.png"
                to_pil(c.images[which][p, j]).save(file)
                rows.append(
                    {
                        "prompt_index": p,
                        "prompt": prompt,
                        "model": which,
                        "image": j,
                        "file": str(file),
                        "total": float(c.total[which][p, j]),
                        **{n: float(c.components[which][n][p, j]) for n in names},
                    }
                )
    summary = {**info, "rewards": weights, "mean": means(c), "images": rows}
    if c.sources is not None:  # an edit run: the sources as the policy read them, per prompt
        summary["source_images"] = [sources.get(p, []) for p in range(len(c.prompts))]
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = (
        f"{info['run']} @ {info['checkpoint']}: {info['sampler']}, {info['steps']} steps, seed "
        f"{info['seed']}; "
        + ("source, then " if c.sources is not None else "")
        + "base vs trained from the same noise"
    )
    draw_grid(c, weights, title).save(out)
    return summary


def print_means(m: dict[str, dict[str, float]]) -> None:
    keys = list(m["base"])
    w = max(10, *(len(k) for k in keys)) + 2
    print(f"{'mean reward':<16}" + "".join(f"{k:>{w}}" for k in keys))
    for which in ("base", "trained"):
        print(f"  {which:<14}" + "".join(f"{m[which][k]:>{w}.4f}" for k in keys))
    print(f"  {'trained - base':<14}" + "".join(f"{m['trained'][k] - m['base'][k]:>+{w}.4f}" for k in keys))
