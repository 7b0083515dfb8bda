"""Serve any registered reward over HTTP, for the ``remote`` reward of one or many training runs:

    python -m fastcps.rewards.serve --reward pickscore --port 8000 [--args '{"dtype": "bf16"}']
        [--host 0.0.0.0] [--device cuda:0] [--max-batch 32] [--max-wait-ms 5]

``--reward`` is a registered name (``fastcps.rewards.REGISTRY``) or ``module:Class`` (a reward of your
own, importable here). The reward loads once, at start-up, on ``--device``; requests arriving together
(from every rank of a run, or several runs) are scored in batches of up to ``--max-batch`` images.
Endpoints and request format: ``fastcps.rewards.service.app`` / ``.wire``. Built on FastAPI + uvicorn
(the ``serve`` extra: ``pip install "fastcps[serve]"``). Exit codes: 2 bad arguments, 3 the reward
failed to load.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading

log = logging.getLogger("fastcps.rewards.serve")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastcps.rewards.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--reward", required=True, help="registered reward name, or module:Class")
    p.add_argument("--args", default="{}", help="the reward's arguments as JSON (its config `args`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=32, help="most images per reward call (default 32)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch that is not full waits for more requests (default 5 ms)",
    )
    p.add_argument("--device", default=None, help="where the reward runs (default: cuda if there, else cpu)")
    p.add_argument("--max-body-mb", type=float, default=1024.0, help="largest request body (default 1024 MB)")
    return p.parse_args(argv)


def reward_args(name: str, text: str) -> dict:
    """``--args`` parsed and checked against the reward's ``Args`` (as the config checks them)."""
    from fastcps.rewards import REGISTRY, args_model, register, unknown_reward_message

    if name not in REGISTRY:
        if ":" not in name:
            raise ValueError(f"--reward: {unknown_reward_message(name)}; or give module:Class")
        register(name, name)
    try:
        args = json.loads(text)
    except ValueError as err:
        raise ValueError(f"--args is not JSON ({err}): {text!r}") from None
    if not isinstance(args, dict):
        raise ValueError(f"--args must be a JSON object, got {text!r}")
    model = args_model(name)
    if model is not None:
        from pydantic import ValidationError

        try:
            model.model_validate(args, strict=True)
        except ValidationError as err:
            e = err.errors()[0]
            key = ".".join(str(k) for k in e["loc"]) or "(the object)"
            got = e.get("input")
            raise ValueError(f"--args of reward {name!r}: {key}: {e['msg']} (got {got!r})") from None
    return args


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[fastcps.serve] %(message)s")
    try:
        import uvicorn

        from fastcps.rewards.service.app import RewardService, create_app
    except ImportError as err:
        print(f'fastcps.rewards.serve: needs pip install "fastcps[serve]" ({err})', file=sys.stderr)
        return 2
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if a.max_batch < 1 or a.max_wait_ms < 0 or a.max_body_mb <= 0:
            raise ValueError("--max-batch must be >= 1, --max-wait-ms >= 0 and --max-body-mb > 0")
        args = reward_args(a.reward, a.args)
        service = RewardService(a.reward, args, device, a.max_batch, a.max_wait_ms / 1000)
    except (ValueError, ImportError) as err:
        print(f"fastcps.rewards.serve: {err}", file=sys.stderr)
        return 2
    app = create_app(service, int(a.max_body_mb * 2**20))
    server = uvicorn.Server(
        uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", access_log=False)
    )

    def load() -> None:
        log.info("loading reward %r (args %s) on %s", a.reward, json.dumps(args), device)
        try:
            service.load()
        except Exception as err:
            log.error("reward %r could not load, stopping: %s: %s", a.reward, type(err).__name__, err)
            server.should_exit = True
            return
        log.info("ready: http://%s:%d (max batch %d images)", a.host, a.port, a.max_batch)

    threading.Thread(target=load, name="reward-load", daemon=True).start()
    server.run()
    service.batcher.close()
    return 3 if service.error else 0


if __name__ == "__main__":
    sys.exit(main())
