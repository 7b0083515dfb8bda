"""The reward service's overhead per image against scoring in process, on localhost.

    python bench/bench_reward_service.py [--reward jpeg_compressibility] [--sizes 64,512] [--batch 8]

Starts ``python -m fastcps.rewards.serve --reward R --max-batch B`` (a request that fills the batch is
scored at once: no batching wait) and times, interleaved round-robin, one batch of B images scored by the
reward in this process and by the ``remote`` reward through the service (the wire encoding, HTTP on
localhost, the service's decoding and batcher, the same reward there). Overhead per image =
(service - in process) / B, also as % of in process; the goal is <= 10 % at batch 8. The scores of both
must be equal (the images travel losslessly). Rows append to bench/results/reward_service.csv.

Rewards whose in-process cost is real at these sizes, with no downloaded weights: jpeg_compressibility
(the default: PIL encodes each image on the CPU, a few ms at 512x512, the cheap end of the rewards) and
ocr (RapidOCR's shipped detection and recognition models on the CPU, the OCR recipe's reward). The images:
smooth noise with the prompt's quoted text drawn on it. 64x64 shows the fixed cost of a request where the
reward itself costs almost nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

# this checkout's fastcps (not another one installed editable), and bench/common.py
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from common import RESULTS, append_csv, meta, print_table, time_cpu  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    "timestamp",
    "device",
    "threads",
    "torch",
    "fastcps",
    "commit",
    "reward",
    "image_size",
    "batch",
    "inproc_ms",
    "inproc_p20_ms",
    "inproc_p80_ms",
    "service_ms",
    "service_p20_ms",
    "service_p80_ms",
    "overhead_ms_per_image",
    "overhead_%",
    "wire_encode_ms",
    "scores_equal",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", default="jpeg_compressibility")
    p.add_argument("--args", default="{}", help="the reward's arguments, JSON")
    p.add_argument("--sizes", default="64,512", help="image sizes (square), comma-separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--csv", default=str(RESULTS / "reward_service.csv"))
    return p.parse_args(argv)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(reward: str, args: str, port: int, batch: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "fastcps.rewards.serve", "--reward", reward, "--args", args]
    cmd += ["--port", str(port), "--max-batch", str(batch), "--device", "cpu"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.loads(r.read())["ready"]:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the service at {url} was not ready after {timeout} s")


def sign_images(n: int, size: int) -> torch.Tensor:
    """n images [n, 3, size, size] of 8-bit levels (as the policies decode them): smooth noise, closer to
    a photo than pixel noise, with the prompt's text drawn on it (what the OCR reward reads)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    g = torch.Generator().manual_seed(size)
    low = torch.rand(n, 3, max(2, size // 8), max(2, size // 8), generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    out = []
    font = ImageFont.load_default(size=max(8, size // 8))
    for i, a in enumerate((smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        img = Image.fromarray(a)
        ImageDraw.Draw(img).text((size // 10, size // 3), f"open {i}", fill=(255, 255, 255), font=font)
        out.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def measure(args, url: str, size: int) -> dict:
    from fastcps.rewards import build_reward
    from fastcps.rewards.remote import RemoteReward
    from fastcps.rewards.service import wire

    local = build_reward(args.reward, json.loads(args.args))
    if hasattr(local, "load"):
        local.load(torch.device("cpu"))
    remote = RemoteReward(url=url, batch_size=args.batch, retries=0)
    prompts = [f'a shop sign that says "open {i}"' for i in range(args.batch)]
    metadata = [{} for _ in prompts]
    images = sign_images(args.batch, size)
    equal = torch.equal(local(images, prompts, metadata).float().cpu(), remote(images, prompts, metadata))
    t = time_cpu(
        {
            "inproc": lambda: local(images, prompts, metadata),
            "service": lambda: remote(images, prompts, metadata),
            "encode": lambda: wire.encode(images, prompts, metadata),
        },
        args.repeats,
        args.warmup,
    )
    (li, l20, l80), (si, s20, s80) = t["inproc"], t["service"]
    row = {
        "reward": args.reward + ("" if args.args == "{}" else f" {args.args}"),
        "image_size": size,
        "batch": args.batch,
        "inproc_ms": f"{li:.3f}",
        "inproc_p20_ms": f"{l20:.3f}",
        "inproc_p80_ms": f"{l80:.3f}",
        "service_ms": f"{si:.3f}",
        "service_p20_ms": f"{s20:.3f}",
        "service_p80_ms": f"{s80:.3f}",
        "overhead_ms_per_image": f"{(si - li) / args.batch:.3f}",
        "overhead_%": f"{100 * (si - li) / li:.1f}",
        "wire_encode_ms": f"{t['encode'][0]:.3f}",
        "scores_equal": equal,
    }
    return row


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_service(args.reward, args.args, port, args.batch)
    try:
        wait_ready(url, proc)
        base = {k: v for k, v in meta(torch.device("cpu")).items() if k in COLUMNS}
        rows = [{**base, **measure(args, url, int(s))} for s in args.sizes.split(",")]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    append_csv(args.csv, rows, COLUMNS)
    print_table(rows, COLUMNS[6:])
    bad = [r["image_size"] for r in rows if not r["scores_equal"]]
    if bad:
        raise SystemExit(f"the service's scores differ from the in-process ones at sizes {bad}")
    return rows


if __name__ == "__main__":
    main()
