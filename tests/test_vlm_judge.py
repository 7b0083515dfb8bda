"""``vlm_judge`` against a stand-in OpenAI-compatible endpoint on 127.0.0.1 (a free port): the stand-in
answers each image with a score it derives from that image's pixels, so each score can be traced to its
image; it records the requests, the most in flight at once, and can fail, stall or answer nonsense. Every
test is bounded in requests and time; the server, its handler threads and the reward's threads are gone at
the end of each test."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import pydantic
import torch
from PIL import Image

from fastcps.rewards import WeightedReward, build_reward
from fastcps.rewards.vlm_judge import UNIFIEDREWARD_QUESTION, VlmJudgeError, VlmJudgeReward

pytest.importorskip("httpx", reason="vlm_judge needs httpx: pip install 'fastcps[vlm]' (in the dev extra)")

MODEL = "judge-test"
# flow_grpo flow_grpo/rewards.py unifiedreward_score_sglang, evaluate_image: the question, verbatim
ANCHOR_QUESTION = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is "
    "to evaluate this image based on two key criteria:\n1. Alignment with the Caption: Assess how well "
    "this image aligns with the provided caption. Consider the accuracy of depicted objects, their "
    "relationships, and attributes as described in the caption.\n2. Overall Image Quality: Examine the "
    "visual quality of this image, including clarity, detail preservation, color accuracy, and overall "
    "aesthetic appeal.\nBased on the above criteria, assign a score from 1 to 5 after 'Final "
    "Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)


class StandIn:
    """POST /v1/chat/completions answers ``Final Score: {1 + 4 * mean / 255:.4f}`` (mean: the sent image's
    mean level; ``{10 * mean / 255:.3f}/10`` when the question asks out of 10; no score when the question
    holds UNPARSABLE); GET /v1/models lists ``model``. Request n (from 0) fails with ``fail_status`` while
    n < fail_first, stalls ``stall_s`` while n < stall_first, and every answer is held ``hold_s``."""

    def __init__(self, model=MODEL, fail_first=0, fail_status=503, stall_first=0, stall_s=0.0, hold_s=0.0):
        self.model, self.fail_first, self.fail_status = model, fail_first, fail_status
        self.stall_first, self.stall_s, self.hold_s = stall_first, stall_s, hold_s
        self.lock, self.release = threading.Lock(), threading.Event()
        self.count = self.active = self.max_active = 0
        self.seen: list[dict] = []  # {"prompt text", "size", "mean", "body"} of each answered request
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": stand_in.model, "object": "model"}]})
                else:
                    self._send(404, {"error": "no route"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stand_in.lock:
                    n = stand_in.count
                    stand_in.count += 1
                    stand_in.active += 1
                    stand_in.max_active = max(stand_in.max_active, stand_in.active)
                try:
                    self._answer(n, body)
                finally:
                    with stand_in.lock:
                        stand_in.active -= 1

            def _answer(self, n: int, body: dict) -> None:
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "no route"})
                if body.get("model") != stand_in.model:
                    return self._send(404, {"error": f"The model `{body.get('model')}` does not exist."})
                if n < stand_in.fail_first:
                    return self._send(stand_in.fail_status, {"error": f"failure {n}"})
                if n < stand_in.stall_first:
                    stand_in.release.wait(stand_in.stall_s)
                stand_in.release.wait(stand_in.hold_s)
                image_part, text_part = body["messages"][0]["content"]
                url = image_part["image_url"]["url"]
                assert url.startswith("data:image/png;base64,")
                img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                mean = float(np.asarray(img.convert("RGB"), dtype=np.float64).mean())
                text = text_part["text"]
                with stand_in.lock:
                    auth = self.headers.get("Authorization")
                    stand_in.seen.append(
                        {"text": text, "size": img.size, "mean": mean, "body": body, "auth": auth}
                    )
                if "UNPARSABLE" in text:
                    answer = "I cannot rate this image."
                elif "out of 10" in text:
                    answer = f"Rating: {10 * mean / 255:.3f}/10"
                else:
                    answer = f"The image matches the caption.\nFinal Score: {1 + 4 * mean / 255:.4f}"
                self._send(
                    200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def close(self) -> None:
        self.release.set()  # stalled handlers return now
        self.server.shutdown()
        self.server.server_close()  # joins the handler threads
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture()
def standin():
    made = []

    def make(**kw) -> StandIn:
        made.append(StandIn(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()
    left = [t.name for t in threading.enumerate() if t.name.startswith("fastcps-vlm-judge")]
    assert not left, f"reward threads left behind: {left}"


def judge(url: str, **kw) -> VlmJudgeReward:
    return build_reward("vlm_judge", {"url": url, "model": MODEL, **kw})


def flat_images(levels: list[int], size: int = 24) -> torch.Tensor:
    """One flat image per level k (value k/255): the stand-in's score then depends on k alone."""
    return (
        torch.tensor(levels, dtype=torch.float32).div(255).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()
    )


def expected(level: int) -> float:
    return float(f"{1 + 4 * level / 255:.4f}") / 5  # the stand-in's answer, parsed, / 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_image_gets_its_own_score_in_order_asked_as_flow_grpo_asks(standin):
    s = standin()
    levels = [0, 200, 51, 255, 128, 7, 90]
    prompts = [f"prompt {i}" for i in range(len(levels))]
    r = judge(s.url, max_concurrency=4)
    got = r(flat_images(levels), prompts, [{}] * len(levels))
    assert got.tolist() == pytest.approx([expected(k) for k in levels], abs=1e-7)
    assert len(s.seen) == len(levels)
    assert UNIFIEDREWARD_QUESTION == ANCHOR_QUESTION
    by_text = {x["text"]: x for x in s.seen}
    for p, k in zip(prompts, levels):
        seen = by_text[ANCHOR_QUESTION.replace("{prompt}", p)]  # its own prompt in the anchor's question
        assert seen["size"] == (512, 512) and seen["mean"] == pytest.approx(k, abs=1e-9)
        body = seen["body"]
        assert body["model"] == MODEL and body["temperature"] == 0.0 and "max_tokens" not in body
        assert [c["type"] for c in body["messages"][0]["content"]] == ["image_url", "text"]
        assert body["messages"][0]["role"] == "user"
    r.close()


def test_custom_question_pattern_scale_and_size(standin):
    s = standin()
    r = judge(
        s.url,
        question='How good is {prompt}? Rate it out of 10 as N/10. {"json": 1}',
        score_pattern=r"(\d+(?:\.\d+)?)/10",
        score_max=10.0,
        image_size=None,
        max_tokens=32,
    )
    got = r(flat_images([255, 102], size=20), ["a cat", "a dog"], [{}, {}])
    assert got.tolist() == pytest.approx([1.0, 0.4], abs=1e-6)
    texts = sorted(x["text"] for x in s.seen)
    assert texts == [
        'How good is a cat? Rate it out of 10 as N/10. {"json": 1}',
        'How good is a dog? Rate it out of 10 as N/10. {"json": 1}',
    ]
    assert {x["size"] for x in s.seen} == {(20, 20)} and s.seen[0]["body"]["max_tokens"] == 32
    r.close()


def test_at_most_max_concurrency_requests_are_in_flight(standin):
    s = standin(hold_s=0.3)
    r = judge(s.url, max_concurrency=3)
    t0 = time.monotonic()
    got = r(flat_images(list(range(0, 250, 25))), ["p"] * 10, [{}] * 10)
    elapsed = time.monotonic() - t0
    assert len(got) == 10 and s.count == 10
    assert 2 <= s.max_active <= 3, s.max_active  # concurrent, and never more than 3
    assert elapsed < 10 * 0.3, elapsed  # not one at a time
    r.close()


def test_failed_requests_are_retried_with_backoff(standin):
    s = standin(fail_first=2, fail_status=503)
    r = judge(s.url, retries=3, backoff_s=0.2, max_concurrency=1)
    t0 = time.monotonic()
    got = r(flat_images([10, 20, 30]), ["a", "b", "c"], [{}] * 3)
    assert got.tolist() == pytest.approx([expected(k) for k in (10, 20, 30)], abs=1e-7)
    assert s.count == 5  # image 0: two failures, then its answer
    assert time.monotonic() - t0 >= 0.2 + 0.4  # waited 0.2 s, then 0.4 s
    r.close()


def test_a_stalled_request_times_out_and_is_asked_again(standin):
    s = standin(stall_first=1, stall_s=30.0)
    r = judge(s.url, timeout_s=0.5, retries=1, backoff_s=0.0)
    t0 = time.monotonic()
    got = r(flat_images([60]), ["a"], [{}])
    assert got.tolist() == pytest.approx([expected(60)], abs=1e-7)
    assert s.count == 2 and 0.5 <= time.monotonic() - t0 < 15


def test_a_clear_error_after_the_last_retry_names_url_model_and_last_error(standin):
    s = standin(fail_first=10**6, fail_status=503)
    r = judge(s.url, retries=2, backoff_s=0.05)
    with pytest.raises(VlmJudgeError) as err:
        r(flat_images([1]), ["a red cat"], [{}])
    msg = str(err.value)
    assert f"{s.url}/chat/completions (model '{MODEL}')" in msg
    assert "prompt row 0 ('a red cat'): no answer after 3 attempts" in msg and "last error: HTTP 503" in msg
    assert s.count == 3
    # nothing listens on the port: the transport error is named
    down = judge(f"http://127.0.0.1:{free_port()}/v1", retries=1, backoff_s=0.0)
    with pytest.raises(VlmJudgeError, match=r"no answer after 2 attempts.*last error: ConnectError"):
        down(flat_images([1]), ["a"], [{}])
    # through the trainer's WeightedReward: the run stops naming the reward
    w = WeightedReward([("vlm_judge", 1.0, {"url": s.url, "model": MODEL, "retries": 0})])
    with pytest.raises(RuntimeError, match=r"reward 'vlm_judge' raised VlmJudgeError.*HTTP 503"):
        w(flat_images([1]), ["a"], [{}])


def test_an_error_no_retry_mends_stops_at_once_and_the_batch_gives_up(standin):
    s = standin(hold_s=0.3)
    r = build_reward(
        "vlm_judge", {"url": s.url, "model": "no-such-model", "backoff_s": 5.0, "max_concurrency": 2}
    )
    t0 = time.monotonic()
    with pytest.raises(VlmJudgeError, match=r"HTTP 404: .*does not exist.* \(not retried\)"):
        r(flat_images([1, 2, 3, 4, 5, 6]), ["a"] * 6, [{}] * 6)
    assert s.count <= 3 and time.monotonic() - t0 < 5  # the queued ones were not sent, no backoff waited


def test_unparsable_answers_fall_back_with_a_count_or_stop_the_run(standin, caplog):
    s = standin()
    prompts = ["a cat", "UNPARSABLE dog", "a bird"]
    r = judge(s.url)
    with caplog.at_level(logging.WARNING, logger="fastcps.rewards.vlm_judge"):
        got = r(flat_images([40, 50, 60]), prompts, [{}] * 3)
        r(flat_images([40, 50, 60]), prompts, [{}] * 3)
    assert got.tolist() == pytest.approx([expected(40), 0.0, expected(60)], abs=1e-7)  # flow_grpo's 0
    warnings = [m for m in caplog.messages if "have no score matching" in m]
    assert len(warnings) == 2 and "1 of 3 answers" in warnings[1] and "(2 of 6 so far)" in warnings[1]
    assert "prompt row 1 ('UNPARSABLE dog') got 'I cannot rate this image.'" in warnings[1]
    assert r.unparsable_total == 2
    got = judge(s.url, fallback_score=-1.0)(flat_images([40, 50]), prompts[:2], [{}] * 2)
    assert got.tolist() == pytest.approx([expected(40), -1.0], abs=1e-7)
    with pytest.raises(VlmJudgeError, match=r"1 of 2 answers have no score matching .*prompt row 1"):
        judge(s.url, on_unparsable="error")(flat_images([40, 50]), prompts[:2], [{}] * 2)


def test_load_checks_the_endpoint_answers_and_warns_about_an_unlisted_model(standin, caplog):
    s = standin()
    with caplog.at_level(logging.WARNING, logger="fastcps.rewards.vlm_judge"):
        judge(s.url).load("cpu")  # served: fine
        assert not caplog.messages
        build_reward("vlm_judge", {"url": s.url, "model": "other"}).load("cpu")
    assert "the server lists ['judge-test'], not 'other' (config key rewards[].args.model)" in caplog.text
    with pytest.raises(VlmJudgeError, match="listing models: no answer after 1 attempts"):
        judge(f"http://127.0.0.1:{free_port()}/v1", retries=0).load("cpu")
    assert s.count == 0  # nothing was scored


@pytest.mark.parametrize(
    "args, message",
    [
        ({"score_pattern": "Score: \\d"}, "needs a group around the score"),
        ({"score_pattern": "Score: ("}, "not a regular expression"),
        ({"url": "127.0.0.1:8000/v1"}, "expected an http:// or https:// base URL"),
        ({"max_concurrency": 0}, "greater than or equal to 1"),
        ({"on_unparsable": "ignore"}, "'fallback' or 'error'"),
    ],
)
def test_bad_arguments_are_refused_before_any_request(args, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        VlmJudgeReward.Args.model_validate(args)
    with pytest.raises(pydantic.ValidationError, match=message):
        VlmJudgeReward(**args)


def test_the_api_key_comes_from_the_named_environment_variable(standin, monkeypatch):
    s = standin()
    r = judge(s.url, api_key_env="FASTCPS_TEST_VLM_KEY")
    with pytest.raises(ValueError, match="environment variable 'FASTCPS_TEST_VLM_KEY'"):
        r(flat_images([1]), ["a"], [{}])
    monkeypatch.setenv("FASTCPS_TEST_VLM_KEY", "secret")
    r(flat_images([1]), ["a"], [{}])
    judge(s.url)(flat_images([1]), ["a"], [{}])
    assert [x["auth"] for x in s.seen] == ["Bearer secret", None]
    r.close()


def test_the_config_checks_both_new_rewards_arguments_when_it_loads():
    """``vlm_judge`` and ``image_similarity`` in a run config: typed arguments, errors naming the key."""
    from pathlib import Path

    from fastcps.config import ConfigError, RunConfig, load_config

    digits = str(Path(__file__).resolve().parent.parent / "configs" / "digits_cps.json")
    rewards = [
        {"name": "vlm_judge", "weight": 0.5, "args": {"url": "http://judge:8000/v1", "max_concurrency": 8}},
        {"name": "image_similarity", "args": {"image_root": "data/edit", "key": "source"}},
    ]
    cfg = load_config(RunConfig, digits, [f"rewards={json.dumps(rewards)}"])
    assert [r.name for r in cfg.rewards] == ["vlm_judge", "image_similarity"]
    for bad, message in [
        ("rewards.0.args.retries=-1", "config key 'rewards.0.args.retries'"),
        ("rewards.0.args.score_pattern=Score", "needs a group around the score"),
        ("rewards.1.args.image_roots=x", "unknown config key 'rewards.1.args.image_roots'"),
        ("rewards.1.args.resize_reference=3", "config key 'rewards.1.args.resize_reference'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(RunConfig, digits, [f"rewards={json.dumps(rewards)}", bad])


def test_an_interrupted_batch_sends_no_more_requests(standin, monkeypatch):
    """Ctrl-C while the batch waits: the queued requests are not sent, the threads end with it."""
    from fastcps.rewards import vlm_judge

    s = standin(hold_s=0.3)

    def interrupted(futs, return_when):
        deadline = time.monotonic() + 10
        while s.count < 2 and time.monotonic() < deadline:  # Ctrl-C once two requests are in flight
            time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(vlm_judge, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        judge(s.url, max_concurrency=2)(flat_images([1, 2, 3, 4, 5, 6]), ["a"] * 6, [{}] * 6)
    assert s.count == 2  # the two in flight; none of the four queued
