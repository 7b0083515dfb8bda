"""The edit rewards as services (issue 29): ``image_similarity`` served on a machine without the trainer's
files scores each edit row against the source image the client sends (``wire``'s ``sources``), equal to
the reward in process; ``geneval`` over the service equals it in process; the wire's ``sources`` section
round-trips, is refused malformed, and a client sends it only to a service that asks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from multi_run import free_port, stop
from PIL import Image
from test_reward_service import serve, wait_ready

from fastcps import edit_images
from fastcps.rewards import build_reward
from fastcps.rewards.remote import RemoteReward
from fastcps.rewards.service import wire

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 48


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """The tiny random-weight CLIP of tests/test_image_similarity.py (nothing downloaded)."""
    from tiny_rewards import _tiny_hf_clip

    root = tmp_path_factory.mktemp("tinyclip")
    _tiny_hf_clip(root)
    return root


def started(tmp_path, reward: str, args: dict) -> tuple[str, object, dict]:
    port, log = free_port(), tmp_path / "service.log"
    proc = serve(port, reward, "--args", json.dumps(args), "--device", "cpu", log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_ready(url, proc, log)
    except BaseException:
        stop(proc)
        raise
    return url, proc, health


def test_a_served_image_similarity_scores_against_the_source_images_the_client_sends(
    clip_dir, tmp_path, monkeypatch
):
    """The rows name source images at paths only the client resolves (``/client-only/...``, mapped to temp
    files in this process alone): the service, which would fail on the path, scores the pixels sent, equal
    to the reward in process on the real files; three rows in requests of two (a request of one too)."""
    g = np.random.default_rng(3)
    real = []
    for i, (h, w) in enumerate([(70, 50), (40, 40)]):
        real.append(tmp_path / f"src{i}.jpg")
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(real[-1])
    client_only = {f"/client-only/src{i}.jpg": p for i, p in enumerate(real)}
    rows = [0, 1, 0]
    prompts = [f"Change the number of cat in the image to {k}." for k in ("two", "one", "three")]
    local = [{"tag": "counting", "source_images": [str(real[r])]} for r in rows]
    remote_meta = [{"tag": "counting", "source_images": [f"/client-only/src{r}.jpg"]} for r in rows]
    x = torch.randint(0, 256, (3, 3, RES, RES), generator=torch.Generator().manual_seed(0)).float() / 255
    args = {"model": str(clip_dir / "model"), "processor": str(clip_dir / "processor")}
    want = build_reward("image_similarity", args)(x, prompts, local)

    url, proc, health = started(tmp_path, "image_similarity", args)
    try:
        assert health["source_images"] is True
        real_local_file = edit_images.local_file
        monkeypatch.setattr(
            edit_images, "local_file", lambda ref: client_only.get(ref) or real_local_file(ref)
        )
        got = RemoteReward(url=url, batch_size=2, retries=0)(x, prompts, remote_meta)
        gone = [remote_meta[0], {"source_images": [str(tmp_path / "gone.jpg")]}]
        with pytest.raises(ValueError, match=r"the source image '.*gone\.jpg' of a request's row 1 cannot"):
            RemoteReward(url=url, retries=0)(x[:2], prompts[:2], gone)
    finally:
        stop(proc)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_geneval_over_the_service_equals_in_process_and_no_source_is_sent(tmp_path):
    """GenEval (detections given) on counting_edit rows: the service's scores are the in-process ones. Its
    /health does not ask for source images, so the client opens none (the rows' paths exist nowhere)."""
    row = {
        "tag": "counting",
        "include": [{"class": "airplane", "count": 2}],
        "exclude": [{"class": "airplane", "count": 3}],
        "t2i_prompt": "a photo of three airplanes",
        "prompt": "Change the number of airplane in the image to two.",
        "image": "generated_images/image_286.jpg",
        "source_images": ["/nowhere/image_286.jpg"],
    }
    plane = {"label": "airplane", "score": 0.95, "color": None}
    boxes = [[20, 200, 140, 320], [370, 200, 490, 320], [200, 40, 320, 160]]
    meta = [dict(row, detections=[dict(plane, box=b) for b in boxes[:n]]) for n in (2, 3, 1, 2)]
    prompts = [row["prompt"]] * 4
    x = torch.zeros(4, 3, 8, 8)
    args = {"detector": "given", "score": "partial"}
    want = build_reward("geneval", args)(x, prompts, meta)
    assert want.tolist() == [1.0, 0.5, 0.5, 1.0]
    url, proc, health = started(tmp_path, "geneval", args)
    try:
        assert health["source_images"] is False
        got = RemoteReward(url=url, batch_size=3, retries=0)(x, prompts, meta)
    finally:
        stop(proc)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_wires_sources_section_round_trips_and_is_checked():
    x = torch.rand(2, 3, 4, 5)
    src = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    req = wire.decode(bytearray(wire.encode(x, ["a", "b"], [{"k": 1}, {}], src)))
    assert np.array_equal(req.sources, src.numpy()) and req.metadata == [{"k": 1}, {}]
    assert [
        np.array_equal(m[wire.SOURCE_PIXELS], s) for m, s in zip(req.metadata_with_sources(), src.numpy())
    ] == [
        True,
        True,
    ]
    old = wire.decode(bytearray(wire.encode(x, ["a", "b"])))  # an old client's request: no sources
    assert old.sources is None and old.metadata_with_sources() == [{}, {}]
    body = wire.encode(x, ["a", "b"], None, src)
    with pytest.raises(wire.BadRequest, match="needs 120 bytes of uint8 pixels and 120 of source images"):
        wire.decode(body[:-1])
    end = body.index(b"\n")
    header = json.loads(body[:end])
    header["sources"]["shape"] = [1, 3, 4, 5]
    with pytest.raises(wire.BadRequest, match=r"header 'sources' must be \{\"shape\": \[2, 3, H, W\]"):
        wire.decode(json.dumps(header).encode() + body[end:])
    with pytest.raises(ValueError, match=r"source images must be uint8 \[2, 3, H, W\]"):
        wire.encode(x, ["a", "b"], None, src.float())
