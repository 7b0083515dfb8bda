"""``vlm_judge``: a vision-language model served behind an OpenAI-compatible chat endpoint (``vllm serve``,
SGLang's ``launch_server``) is asked about each image; the score is parsed from its answer.

By default it asks what flow_grpo's UnifiedReward client asks (yifan123/flow_grpo ``flow_grpo/rewards.py``
``unifiedreward_score_sglang``; FlowCPS carries the same code), and as it asks:

- each image's 8-bit levels as a PIL image resized to 512 x 512 (PIL's default filter, bicubic), PNG,
  base64, in a data URL (flow_grpo writes ``data:image;base64,``; we write the full MIME type
  ``data:image/png;base64,``, which vLLM and SGLang read alike and strict OpenAI-style servers require);
- one user message whose content is that ``image_url`` part then a ``text`` part: the question with
  ``{prompt}`` replaced by the image's prompt (UnifiedReward-7b-v1.5's caption-alignment-and-quality
  question, 1 to 5 after 'Final Score:'); ``temperature`` 0, model ``UnifiedReward-7b-v1.5``;
- the score is the first group of the first match of ``Final Score:\\s*([1-5](?:\\.\\d+)?)`` in the answer,
  divided by 5 (``score_max``), so in [0.2, 1]; an answer without one scores 0 there, silently: here it
  scores ``fallback_score`` (0, the anchor's) with a logged warning count, or stops the run
  (``on_unparsable: "error"``).

Unlike the anchor (every request of a batch at once, no timeout below the client's 10 minutes, the openai
client's 2 hidden retries), requests run on at most ``max_concurrency`` threads, each with ``timeout_s``,
``retries`` with exponential backoff on connection errors, timeouts and HTTP 408/429/5xx (any other HTTP
error is raised at once: a wrong model name does not get better), and a clear error after the last retry
naming the URL, the model and the last error. ``load`` checks the endpoint answers (``GET {url}/models``)
before training starts.

Client: httpx (the ``vlm`` extra), not the ``openai`` package: the request is one JSON POST, and httpx's
thread-safe pooled ``Client`` with explicit timeouts lets the retries, backoff and concurrency be ours
and visible, where the openai client adds its own retry loop and its version churn for no gain here.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Literal

import torch
from pydantic import Field, field_validator

from fastcps.rewards import RewardArgs
from fastcps.rewards._util import check_inputs, uint8_hwc_batch

__all__ = ["VlmJudgeReward", "VlmJudgeError", "UNIFIEDREWARD_QUESTION", "UNIFIEDREWARD_PATTERN"]

log = logging.getLogger("fastcps.rewards.vlm_judge")

UNIFIEDREWARD_QUESTION = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to "
    "evaluate this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this "
    "image aligns with the provided caption. Consider the accuracy of depicted objects, their relationships, "
    "and attributes as described in the caption.\n2. Overall Image Quality: Examine the visual quality of "
    "this image, including clarity, detail preservation, color accuracy, and overall aesthetic appeal.\n"
    "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided "
    "as follows:\nText Caption: [{prompt}]"
)
"""flow_grpo's UnifiedReward question, verbatim (``{prompt}``: the image's prompt)."""
UNIFIEDREWARD_PATTERN = r"Final Score:\s*([1-5](?:\.\d+)?)"
"""flow_grpo's score pattern: the first group is the score."""

#: answers worth asking again: timeout, conflict, too early, rate-limited, the server's own failures
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class VlmJudgeError(RuntimeError):
    """The endpoint gave no usable answer (after the retries, or an error no retry mends). ``status``:
    the HTTP status of an error answered at once (not retried), else None."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Stopped(Exception):
    """Another request of the batch failed: this one gives up too."""


class VlmJudgeReward:
    """``(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]``: the judge's scores / score_max."""

    name = "vlm_judge"

    class Args(RewardArgs):
        url: str = "http://127.0.0.1:17140/v1"
        """Base URL of the OpenAI-compatible API (the part before /chat/completions), e.g.
        http://HOST:8000/v1 for `vllm serve`."""
        model: str = "UnifiedReward-7b-v1.5"
        """Model name the server serves (vLLM: the model path, or --served-model-name)."""
        question: str = UNIFIEDREWARD_QUESTION
        """The text sent with each image; {prompt} is replaced by the image's prompt."""
        score_pattern: str = UNIFIEDREWARD_PATTERN
        """Regular expression whose first group, in the first match in the answer, is the score."""
        score_max: float = Field(5.0, gt=0)
        """The parsed score is divided by it (5: UnifiedReward's 1-5 scale to [0.2, 1], as flow_grpo)."""
        image_size: int | None = Field(512, ge=1)
        """Images are resized to image_size x image_size (PIL bicubic) before sending; None = as generated."""
        temperature: float = 0.0
        """Sampling temperature of the judge (0: its most likely answer, as flow_grpo asks)."""
        max_tokens: int | None = Field(None, ge=1)
        """Answer length limit sent to the server; None = the server's default."""
        timeout_s: float = Field(120.0, gt=0)
        """Seconds to wait for a connection and for each answer (one attempt)."""
        retries: int = Field(3, ge=0)
        """Attempts after the first on connection errors, timeouts and HTTP 408/429/5xx."""
        backoff_s: float = Field(1.0, ge=0)
        """Wait before the first retry; it doubles for each further one."""
        max_concurrency: int = Field(16, ge=1)
        """Requests in flight at once (threads)."""
        on_unparsable: Literal["fallback", "error"] = "fallback"
        """An answer without a score: "fallback" scores fallback_score and logs a warning with the count
        (flow_grpo scores 0, silently), "error" stops the run naming the answer."""
        fallback_score: float = 0.0
        """The reward of an unparsable answer (after normalisation; flow_grpo's: 0)."""
        api_key_env: str | None = None
        """Environment variable holding the API key sent as a Bearer token; None = none (vLLM and SGLang
        need one only when started with --api-key)."""

        @field_validator("url")
        @classmethod
        def _http_url(cls, v: str) -> str:
            if not v.startswith(("http://", "https://")):
                raise ValueError(
                    f"expected an http:// or https:// base URL such as http://HOST:8000/v1, got {v!r}"
                )
            return v

        @field_validator("score_pattern")
        @classmethod
        def _one_group(cls, v: str) -> str:
            try:
                groups = re.compile(v).groups
            except re.error as err:
                raise ValueError(f"not a regular expression ({err}): {v!r}") from err
            if groups < 1:
                raise ValueError(f"needs a group around the score, e.g. 'Score:\\s*(\\d+)'; got {v!r}")
            return v

    def __init__(
        self,
        url: str = "http://127.0.0.1:17140/v1",
        model: str = "UnifiedReward-7b-v1.5",
        question: str = UNIFIEDREWARD_QUESTION,
        score_pattern: str = UNIFIEDREWARD_PATTERN,
        score_max: float = 5.0,
        image_size: int | None = 512,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_concurrency: int = 16,
        on_unparsable: str = "fallback",
        fallback_score: float = 0.0,
        api_key_env: str | None = None,
    ):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.args = self.Args.model_validate(args)  # the same checks when built outside a config
        self.endpoint = self.args.url.rstrip("/") + "/chat/completions"
        self._pattern = re.compile(self.args.score_pattern)
        self._client = None
        self._client_lock = threading.Lock()
        self.unparsable_total = 0  # answers without a score over the reward's life
        self.answered_total = 0

    @classmethod
    def files(cls, args: dict) -> list:
        """Nothing on disk: the model is the server's."""
        return []

    # --- HTTP ---------------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"reward {self.name!r}: {self.endpoint} (model {self.args.model!r})"

    def client(self):
        """The pooled httpx client (made once; shared by the request threads: httpx clients are
        thread-safe)."""
        with self._client_lock:
            if self._client is None:
                try:
                    import httpx
                except ImportError as err:
                    raise ImportError("reward 'vlm_judge' needs httpx: pip install 'fastcps[vlm]'") from err
                headers = {}
                if self.args.api_key_env is not None:
                    key = os.environ.get(self.args.api_key_env)
                    if not key:
                        raise ValueError(
                            f"reward 'vlm_judge': environment variable {self.args.api_key_env!r} (config key "
                            "rewards[].args.api_key_env) is not set; export the API key there"
                        )
                    headers["Authorization"] = f"Bearer {key}"
                n = self.args.max_concurrency
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.args.timeout_s),
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                    headers=headers,
                )
            return self._client

    def close(self) -> None:
        """Close the connections (a later call opens new ones)."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _request(self, method: str, url: str, what: str, stop: threading.Event, **kw):
        """The response to one request, retried with backoff on connection errors, timeouts and
        RETRY_STATUS; any other HTTP error at once. ``what`` names the request in errors."""
        import httpx

        client, last, a = self.client(), None, self.args
        for attempt in range(a.retries + 1):
            if stop.is_set():
                raise _Stopped
            try:
                resp = client.request(method, url, **kw)
            except httpx.TransportError as err:  # refused, reset, connect/read/write timeouts
                last = f"{type(err).__name__}: {err}"
            else:
                if resp.status_code < 400:
                    return resp
                last = f"HTTP {resp.status_code}: {resp.text[:300]!r}"
                if resp.status_code not in RETRY_STATUS:
                    raise VlmJudgeError(f"{self._where()}: {what}: {last} (not retried)", resp.status_code)
            if attempt < a.retries:
                delay = a.backoff_s * 2**attempt
                log.warning(
                    "%s: %s: %s; retry %d/%d in %.1f s",
                    self._where(),
                    what,
                    last,
                    attempt + 1,
                    a.retries,
                    delay,
                )
                if stop.wait(delay):
                    raise _Stopped
        raise VlmJudgeError(
            f"{self._where()}: {what}: no answer after {a.retries + 1} attempts (rewards[].args.retries = "
            f"{a.retries}, timeout_s = {a.timeout_s}); last error: {last}. Is the server up and serving "
            f"{a.model!r} at {a.url}?"
        )

    def load(self, device=None) -> None:
        """Check the endpoint before training starts: ``GET {url}/models`` must answer (within the retries);
        a model list without ``model``, or a server without that route, is warned about."""
        resp = None
        try:
            resp = self._request(
                "GET", self.args.url.rstrip("/") + "/models", "listing models", threading.Event()
            )
        except VlmJudgeError as err:
            if err.status not in (404, 405):  # unreachable, or refused (e.g. 401: a wrong API key)
                raise
            log.warning("%s; the model list is not checked", err)
            return
        try:
            served = [m["id"] for m in resp.json()["data"]]
        except (ValueError, KeyError, TypeError):
            log.warning("%s: GET /models answered no model list; not checked", self._where())
            return
        if self.args.model not in served:
            # a warning, not an error: SGLang answers whatever name a request gives (flow_grpo asks for
            # "UnifiedReward-7b-v1.5" from a server it starts with --model-path CodeGoat24/...); vLLM
            # refuses an unknown name, and the first request then stops the run with its 404
            log.warning(
                "%s: the server lists %s, not %r (config key rewards[].args.model); SGLang answers any "
                "name, vLLM refuses it",
                self._where(),
                served,
                self.args.model,
            )

    # --- one image ----------------------------------------------------------------------------------

    def data_url(self, hwc) -> str:
        """The image as flow_grpo sends it: PIL, resized to image_size (bicubic), PNG, base64."""
        from PIL import Image

        img = Image.fromarray(hwc)
        if self.args.image_size is not None:
            img = img.resize((self.args.image_size, self.args.image_size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def body(self, prompt: str, hwc) -> dict:
        """The chat completion request of one image: an image_url part, then the question."""
        a = self.args
        content = [
            {"type": "image_url", "image_url": {"url": self.data_url(hwc)}},
            {"type": "text", "text": a.question.replace("{prompt}", prompt)},
        ]
        body = {
            "model": a.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": a.temperature,
        }
        if a.max_tokens is not None:
            body["max_tokens"] = a.max_tokens
        return body

    def _ask(self, row: int, prompt: str, hwc, stop: threading.Event) -> str:
        what = f"prompt row {row} ({prompt!r})"
        resp = self._request("POST", self.endpoint, what, stop, json=self.body(prompt, hwc))
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise VlmJudgeError(
                f"{self._where()}: {what}: the answer is not a chat completion "
                f"({type(err).__name__}: {err}): {resp.text[:300]!r}"
            ) from err
        return "" if content is None else str(content)

    def parse(self, answer: str) -> float | None:
        """The score of an answer / score_max, or None when the pattern finds none."""
        m = self._pattern.search(answer)
        if m is None:
            return None
        try:
            return float(m.group(1)) / self.args.score_max
        except (TypeError, ValueError):
            return None

    # --- a batch ------------------------------------------------------------------------------------

    def answers(self, images: torch.Tensor, prompts: list[str]) -> list[str]:
        """The judge's answer for each image, in order (at most max_concurrency requests at once)."""
        arrays = uint8_hwc_batch(images)
        if not arrays:
            return []
        stop = threading.Event()
        workers = min(self.args.max_concurrency, len(arrays))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastcps-vlm-judge") as pool:
            futs = [pool.submit(self._ask, i, p, a, stop) for i, (p, a) in enumerate(zip(prompts, arrays))]
            try:
                done, _ = wait(futs, return_when=FIRST_EXCEPTION)
                failed = [f for f in futs if f in done and f.exception() is not None]
                if failed:
                    raise failed[0].exception()
            except BaseException:  # a failed request, or the caller interrupted (Ctrl-C)
                stop.set()  # the others stop at their next attempt; the pool's exit joins its threads
                for f in futs:
                    f.cancel()
                raise
        return [f.result() for f in futs]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        check_inputs(self.name, images, prompts, metadata)
        answers = self.answers(images, prompts)
        scores, bad = [], []
        for i, ans in enumerate(answers):
            s = self.parse(ans)
            if s is None:
                bad.append(i)
                s = self.args.fallback_score
            scores.append(s)
        self.answered_total += len(answers)
        if bad:
            i = bad[0]
            example = f"prompt row {i} ({prompts[i]!r}) got {answers[i][:200]!r}"
            if self.args.on_unparsable == "error":
                raise VlmJudgeError(
                    f"{self._where()}: {len(bad)} of {len(answers)} answers have no score matching "
                    f"{self.args.score_pattern!r}; e.g. {example}. Set rewards[].args.on_unparsable = "
                    f'"fallback" to score them {self.args.fallback_score} instead'
                )
            self.unparsable_total += len(bad)
            log.warning(
                "%s: %d of %d answers have no score matching %r, scored %s (%d of %d so far); e.g. %s",
                self._where(),
                len(bad),
                len(answers),
                self.args.score_pattern,
                self.args.fallback_score,
                self.unparsable_total,
                self.answered_total,
                example,
            )
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
