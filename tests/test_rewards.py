"""Rewards on CPU, offline: pickscore/hpsv2/aesthetic on tiny random backbones saved to tmp dirs, the
ocr reward for real with RapidOCR on PIL-rendered text, geneval rules on synthetic detections (and the
detection-server client against a loopback server), errors for missing weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastcps.rewards import REGISTRY, WeightedReward, build_reward
from test_reward_anchors import anchor_hf_clip_pixels, anchor_open_clip_pixels
from tiny_rewards import TINY_OPEN_CLIP, WORDS, _tiny_hf_clip, tiny_hps_checkpoint  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_names():
    for name in ("pickscore", "hpsv2", "ocr", "geneval", "aesthetic"):
        assert name in REGISTRY


# --- tiny transformers CLIP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyclip")
    _tiny_hf_clip(root)
    return root


def _images(b=3, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def test_tiny_tokenizer_is_word_level(hf_clip_dir):
    from transformers import CLIPProcessor

    tok = CLIPProcessor.from_pretrained(hf_clip_dir / "processor").tokenizer
    ids = tok("a photo of the cat")["input_ids"]
    assert len(ids) == 7  # bos + 5 words + eos


def test_pickscore_tiny(hf_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    from fastcps.rewards.pickscore import PickScoreReward

    r = build_reward(
        "pickscore",
        {"model": str(hf_clip_dir / "model"), "processor": str(hf_clip_dir / "processor"), "batch_size": 2},
    )
    assert isinstance(r, PickScoreReward) and r._model is None  # lazy
    x = _images()
    prompts = ["a photo of a cat", "the red dog", "a blue cat"]
    s = r(x, prompts, [{}] * 3)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert not r._model.training and not any(p.requires_grad for p in r._model.parameters())
    # reference: flow_grpo's preprocessing (transcribed; 40 x 48: the short side resized, then cropped)
    # and CLIPModel by hand, logit_scale.exp() * cos
    model = CLIPModel.from_pretrained(hf_clip_dir / "model").eval()
    proc = CLIPProcessor.from_pretrained(hf_clip_dir / "processor")
    ip = proc.image_processor
    with torch.no_grad():
        pix = anchor_hf_clip_pixels(x, 32, 32, ip.image_mean, ip.image_std)
        tok = proc.tokenizer(prompts, padding=True, return_tensors="pt")
        vi = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        te = model.text_projection(model.text_model(**tok).pooler_output)
        ref = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(vi, te, dim=-1)
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-4)
    # batched == one by one, and the scale argument
    one = torch.cat([r(x[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(s, one, rtol=1e-4, atol=1e-4)
    r2 = PickScoreReward(
        model=str(hf_clip_dir / "model"), processor=str(hf_clip_dir / "processor"), scale=1 / 26
    )
    torch.testing.assert_close(r2(x, prompts), s / 26, rtol=1e-4, atol=1e-4)


# --- tiny open_clip (HPSv2) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hps_ckpt(tmp_path_factory):
    return tiny_hps_checkpoint(tmp_path_factory.mktemp("tinyhps"))


def test_hpsv2_tiny(hps_ckpt):
    import open_clip

    path, cfg_path = hps_ckpt
    r = build_reward("hpsv2", {"checkpoint": str(path), "model_config": str(cfg_path), "batch_size": 2})
    x = _images(seed=1)
    prompts = ["a photo of a cat", "a red dog", "a beautiful landscape, 4k"]
    s = r(x, prompts, None)
    assert s.shape == (3,) and s.dtype == torch.float32 and (s.abs() <= 1 + 1e-5).all()
    # reference: hpsv2's img_score.py preprocessing (transcribed) on PIL images of the 8-bit levels
    from fastcps.rewards.hpsv2 import OPENAI_MEAN, OPENAI_STD

    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    model.load_state_dict(torch.load(path)["state_dict"])
    model.eval()
    tok = open_clip.SimpleTokenizer()
    with torch.no_grad():
        ie = model.encode_image(anchor_open_clip_pixels(x, 32, OPENAI_MEAN, OPENAI_STD), normalize=True)
        te = model.encode_text(tok(prompts), normalize=True)
    ref = (ie * te).sum(-1)
    torch.testing.assert_close(s, ref, rtol=0, atol=1e-6)
    # a dict config works too, and the order of the batch does not matter
    r2 = build_reward("hpsv2", {"checkpoint": str(path), "model_config": TINY_OPEN_CLIP})
    torch.testing.assert_close(r2(x.flip(0), prompts[::-1]).flip(0), s, rtol=1e-4, atol=1e-5)


def test_reward_precision_defaults_follow_the_authors(hps_ckpt):
    """HPSv2 scores with fp32 weights under fp16 autocast (``amp``: tgxs002/HPSv2 img_score.py, DanceGRPO),
    PickScore and the aesthetic predictor in fp32 (flow_grpo/rewards.py); on the CPU ``amp`` is fp32."""
    import inspect

    from fastcps.rewards._util import autocast, resolve_dtype
    from fastcps.rewards.aesthetic import AestheticReward
    from fastcps.rewards.hpsv2 import HPSv2Reward
    from fastcps.rewards.pickscore import PickScoreReward

    default = {
        cls: inspect.signature(cls).parameters["dtype"].default
        for cls in (HPSv2Reward, PickScoreReward, AestheticReward)
    }
    assert default == {HPSv2Reward: "amp", PickScoreReward: "float32", AestheticReward: "float32"}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("hpsv2", "amp", cuda) == resolve_dtype("hpsv2", "amp", cpu) == torch.float32
    assert (
        isinstance(autocast("amp", cuda), torch.autocast)
        and autocast("amp", cuda).fast_dtype == torch.float16
    )
    assert not isinstance(autocast("amp", cpu), torch.autocast)
    assert not isinstance(autocast("float32", cuda), torch.autocast)
    with pytest.raises(ValueError, match="float32/float16/bfloat16/amp"):
        resolve_dtype("hpsv2", "fp8", cpu)
    path, cfg_path = hps_ckpt
    x, prompts = _images(seed=2), ["a cat", "a dog", "a tree"]
    scores = [
        build_reward("hpsv2", {"checkpoint": str(path), "model_config": str(cfg_path), **extra})(x, prompts)
        for extra in ({}, {"dtype": "float32"})
    ]
    assert torch.equal(scores[0], scores[1])


def test_hpsv2_checkpoint_mismatch(tmp_path, hps_ckpt):
    path, _ = hps_ckpt
    bad = dict(TINY_OPEN_CLIP, embed_dim=8)
    r = build_reward("hpsv2", {"checkpoint": str(path), "model_config": bad})
    with pytest.raises(RuntimeError, match="hpsv2"):
        r(_images(1), ["a cat"])


# --- missing weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,args,key",
    [
        ("pickscore", {"model": "/nonexistent/pickscore", "processor": "/nonexistent/proc"}, "processor"),
        ("hpsv2", {"checkpoint": "/nonexistent/HPS_v2.1_compressed.pt"}, "checkpoint"),
        ("aesthetic", {"head": "/nonexistent/sac+logos+ava1-l14-linearMSE.pth"}, "head"),
    ],
)
def test_missing_weights_error(name, args, key):
    r = build_reward(name, args)  # constructing is cheap and loads nothing
    with pytest.raises(FileNotFoundError) as err:
        r(_images(1), ["a cat"], [{}])
    msg = str(err.value)
    assert f"reward {name!r}" in msg and f"rewards[].args.{key}" in msg and "/nonexistent/" in msg


def test_missing_weights_error_is_named_by_weighted_reward(hf_clip_dir):
    from fastcps.rewards import RewardFailed

    wr = WeightedReward(
        [("pickscore", 1.0, {"model": "/nonexistent/m", "processor": str(hf_clip_dir / "processor")})]
    )
    with pytest.raises(RewardFailed, match=r"rewards\[\]\.args\.model"):
        wr(_images(1), ["a cat"], [{}])


def test_aesthetic_tiny(hf_clip_dir, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from fastcps.rewards.aesthetic import AestheticHead

    torch.manual_seed(2)
    head = AestheticHead((16, 32, 16, 8, 4, 1))
    torch.save(head.state_dict(), tmp_path / "head.pth")
    r = build_reward(
        "aesthetic",
        {
            "head": str(tmp_path / "head.pth"),
            "model": str(hf_clip_dir / "model"),
            "processor": str(hf_clip_dir / "processor"),
        },
    )
    x = _images(2, seed=3)
    s = r(x, ["", ""], [{}, {}])
    assert s.shape == (2,) and torch.isfinite(s).all()
    model = CLIPModel.from_pretrained(hf_clip_dir / "model").eval()
    ip = CLIPProcessor.from_pretrained(hf_clip_dir / "processor").image_processor
    with torch.no_grad():
        pix = anchor_hf_clip_pixels(x, 32, 32, ip.image_mean, ip.image_std)
        e = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        ref = head.eval()(e / e.norm(dim=-1, keepdim=True))[:, 0]
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-5)


# --- ocr (real RapidOCR) --------------------------------------------------------------------------------


def _render(text: str, size=(384, 128)) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((20, 40), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def test_ocr_formula():
    from fastcps.rewards.ocr import edit_distance, ocr_score, quoted_text

    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert quoted_text('a sign saying "Hello World" on a wall') == "Hello World"
    assert quoted_text("a neon sign “Open 24h”") == "Open 24h"
    assert quoted_text("no quotes") is None
    assert ocr_score("xx HELLO  world yy", "Hello World") == 1.0  # substring after normalization
    assert ocr_score("helo world", "Hello World") == pytest.approx(0.9)  # d = 1, n = 10
    assert ocr_score("", "abc") == 0.0 and ocr_score("completely different text", "abc") == 0.0


def test_ocr_rapidocr_real():
    r = build_reward("ocr", {})  # default engine: rapidocr
    assert r.engine == "rapidocr"
    hello = _render("Hello World")
    x = torch.stack([hello, hello])
    s = r(x, ['a poster that says "Hello World"', 'a poster that says "Goodbye"'], [{}, {}])
    assert s.shape == (2,) and s.dtype == torch.float32
    assert s[0] >= 0.9, s
    assert s[1] <= 0.3, s
    with pytest.raises(ValueError, match="quotes no text"):
        r(x[:1], ["a poster with no quoted text"], [{}])
    # metadata['text'] overrides the prompt
    assert r(x[:1], ["anything"], [{"text": "hello world"}])[0] >= 0.9


def test_ocr_bad_engine():
    with pytest.raises(ValueError, match="engine"):
        build_reward("ocr", {"engine": "tesseract"})


# --- geneval rules on synthetic detections -----------------------------------------------------------------


def _det(label, box, score=0.95, color=None):
    return {"label": label, "box": list(box), "score": score, "color": color}


def _geneval_cases():
    L, R = (10, 40, 60, 90), (140, 40, 190, 90)  # left / right halves of a 200-px image
    T, B = (80, 5, 120, 45), (80, 150, 120, 190)  # top / bottom
    return [
        # (metadata, detections, strict, partial)
        ({"tag": "single_object", "include": [{"class": "bench", "count": 1}]}, [_det("bench", L)], 1, 1.0),
        (
            {"tag": "single_object", "include": [{"class": "bench", "count": 1}]},
            [_det("bench", L, score=0.2)],
            0,
            0.0,
        ),  # below the 0.3 threshold
        (
            {
                "tag": "two_object",
                "include": [{"class": "dog", "count": 1}, {"class": "umbrella", "count": 1}],
            },
            [_det("dog", L), _det("cat", R)],
            0,
            0.5,
        ),
        (
            {
                "tag": "counting",
                "include": [{"class": "cat", "count": 3}],
                "exclude": [{"class": "cat", "count": 4}],
            },
            [_det("cat", L), _det("cat", R), _det("cat", T)],
            1,
            1.0,
        ),
        (
            {
                "tag": "counting",
                "include": [{"class": "cat", "count": 3}],
                "exclude": [{"class": "cat", "count": 4}],
            },
            [_det("cat", L), _det("cat", R), _det("cat", T), _det("cat", B)],
            0,
            0.5,
        ),  # too many
        (
            {
                "tag": "counting",
                "include": [{"class": "cat", "count": 3}],
                "exclude": [{"class": "cat", "count": 4}],
            },
            [_det("cat", L), _det("cat", R), _det("cat", T), _det("cat", B, score=0.5)],
            1,
            1.0,
        ),  # 0.5 < 0.9
        (
            {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
            [_det("car", L, color="red")],
            1,
            1.0,
        ),
        (
            {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
            [_det("car", L, color="blue")],
            0,
            0.0,
        ),
        (
            {
                "tag": "color_attr",
                "include": [
                    {"class": "car", "count": 1, "color": "red"},
                    {"class": "vase", "count": 1, "color": "green"},
                ],
            },
            [_det("car", L, color="red"), _det("vase", R, color="green")],
            1,
            1.0,
        ),
        (
            {
                "tag": "color_attr",
                "include": [
                    {"class": "car", "count": 1, "color": "red"},
                    {"class": "vase", "count": 1, "color": "green"},
                ],
            },
            [_det("car", L, color="green"), _det("vase", R, color="red")],
            0,
            0.0,
        ),  # swapped binding
        (
            {
                "tag": "position",
                "include": [
                    {"class": "dog", "count": 1},
                    {"class": "cat", "count": 1, "position": ["right of", 0]},
                ],
            },
            [_det("dog", L), _det("cat", R)],
            1,
            1.0,
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class": "dog", "count": 1},
                    {"class": "cat", "count": 1, "position": ["left of", 0]},
                ],
            },
            [_det("dog", L), _det("cat", R)],
            0,
            0.5,
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class": "dog", "count": 1},
                    {"class": "cat", "count": 1, "position": ["below", 0]},
                ],
            },
            [_det("dog", T), _det("cat", B)],
            1,
            1.0,
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class": "dog", "count": 1},
                    {"class": "cat", "count": 1, "position": ["above", 0]},
                ],
            },
            [_det("cat", R)],
            0,
            0.0,
        ),  # no target: both rules fail
    ]


@pytest.mark.parametrize("mode", ["strict", "partial"])
def test_geneval_rules(mode):
    cases = _geneval_cases()
    r = build_reward("geneval", {"detector": "given", "score": mode})
    meta = [dict(m, detections=d) for m, d, _, _ in cases]
    s = r(torch.zeros(len(cases), 3, 8, 8), ["p"] * len(cases), meta)
    want = torch.tensor([float(st if mode == "strict" else pa) for _, _, st, pa in cases])
    torch.testing.assert_close(s, want)
    assert r.last_reasons[0] == [] and r.last_reasons[1] == ["expected bench>=1, found 0"]


def test_geneval_relative_position_threshold():
    from fastcps.rewards.geneval import Detection, relative_position

    a = Detection("a", (0, 0, 10, 10))
    assert relative_position(Detection("b", (30, 0, 40, 10)), a) == {"right of"}
    assert relative_position(Detection("b", (30, 30, 40, 40)), a) == {"right of", "below"}
    # centres 1.5 px apart with boxes of 10: inside 0.1·(10+10) = 2 px, no relation
    assert relative_position(Detection("b", (1.5, 0, 11.5, 10)), a) == set()
    # mostly vertical offset: only "above"
    assert relative_position(Detection("b", (3, -30, 13, -20)), a) == {"above"}


def test_geneval_errors():
    r = build_reward("geneval", {"detector": "given"})
    with pytest.raises(ValueError, match="no colours"):
        r(
            torch.zeros(1, 3, 8, 8),
            ["a red car"],
            [
                {
                    "tag": "colors",
                    "include": [{"class": "car", "count": 1, "color": "red"}],
                    "detections": [_det("car", (0, 0, 4, 4))],
                }
            ],
        )
    with pytest.raises(ValueError, match="GenEval metadata"):
        r(torch.zeros(1, 3, 8, 8), ["a car"], [{}])
    with pytest.raises(ValueError, match=r"rewards\[\]\.args\.url"):
        build_reward("geneval", {"detector": "server"})(
            torch.zeros(1, 3, 8, 8),
            ["a car"],
            [{"tag": "single_object", "include": [{"class": "car", "count": 1}]}],
        )


@pytest.fixture
def loopback_server():
    """A detection server on 127.0.0.1 that checks the PNGs and answers with metadata['detections']."""
    import base64
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/broken":
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"detector crashed")
                return
            sizes = [Image.open(io.BytesIO(base64.b64decode(s))).size for s in body["images"]]
            seen.append((sizes, body["prompts"]))
            out = json.dumps({"detections": [m["detections"] for m in body["metadata"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    srv.shutdown()
    srv.server_close()
    th.join(timeout=5)


def test_geneval_server_detector(loopback_server):
    url, seen = loopback_server
    cases = _geneval_cases()[:6]
    meta = [dict(m, detections=d) for m, d, _, _ in cases]
    r = build_reward("geneval", {"detector": "server", "url": url + "/detect", "timeout": 10})
    s = r(torch.rand(len(cases), 3, 12, 16), [f"p{i}" for i in range(len(cases))], meta)
    torch.testing.assert_close(s, torch.tensor([float(c[2]) for c in cases]))
    assert seen == [([(16, 12)] * len(cases), [f"p{i}" for i in range(len(cases))])]
    bad = build_reward("geneval", {"detector": "server", "url": url + "/broken", "timeout": 10})
    with pytest.raises(RuntimeError, match="HTTP 500: detector crashed"):
        bad(torch.rand(1, 3, 8, 8), ["p"], meta[:1])


def test_geneval_server_unreachable():
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = build_reward("geneval", {"detector": "server", "url": f"http://127.0.0.1:{port}/", "timeout": 2})
    with pytest.raises(RuntimeError, match="unreachable"):
        r(
            torch.rand(1, 3, 8, 8),
            ["p"],
            [{"tag": "single_object", "include": [{"class": "car", "count": 1}]}],
        )


def test_hub_id_offline_error_names_key(hf_clip_dir, monkeypatch):
    from fastcps.rewards._util import is_local_path

    assert (
        not is_local_path("yuvalkirstain/PickScore_v1") and is_local_path("/x/y") and is_local_path("a/b/c")
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = build_reward(
        "pickscore", {"model": "fastcps-test/no-such-model", "processor": str(hf_clip_dir / "processor")}
    )
    with pytest.raises(OSError, match=r"rewards\[\]\.args\.model.*HF_HUB_OFFLINE"):
        r(_images(1), ["a cat"])
