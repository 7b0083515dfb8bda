"""Each reward's preprocessing against its anchor's code, transcribed: flow_grpo's ``flow_grpo/rewards.py``
quantises every image to ``(images * 255).round().clamp(0, 255).to(torch.uint8)`` and hands it to a scorer
that takes PIL images or arrays (yifan123/flow_grpo at 94e23ee: pickscore_scorer.py, hpsv2_scorer.py,
aesthetic_scorer.py, ocr.py; its setup.py pins transformers 4.40.0, whose CLIPImageProcessor resized with
PIL; HPSv2's preprocess_val is open_clip's eval transform on a PIL image). Ours start from float tensors;
each is checked equal to the transcription on random 512 x 512 images (the recipes' resolution), both
unquantised and on the k/255 levels the FLUX/SD3 policies decode to."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastcps.rewards import build_reward
from tiny_rewards import TINY_OPEN_CLIP, _tiny_hf_clip, tiny_hps_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 512
PROMPTS = ["a photo of a cat", "the red dog", "a blue cat"]  # words of the tiny CLIP vocabulary


def images(seed: int, levels: bool = False, b: int = 3) -> torch.Tensor:
    """Random images in [0, 1] at the recipes' resolution; ``levels``: on the 8-bit grid k/255."""
    x = torch.rand(b, 3, RES, RES, generator=torch.Generator().manual_seed(seed))
    return (x * 255).round() / 255 if levels else x


# --- flow_grpo's code, transcribed ----------------------------------------------------------------------


def anchor_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    """flow_grpo/rewards.py, every reward: NCHW float -> NHWC uint8."""
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return u8.transpose(0, 2, 3, 1)


def anchor_hf_clip_pixels(x, size: int, crop: int, mean, std) -> torch.Tensor:
    """transformers 4.40's CLIPImageProcessor on ``Image.fromarray`` of each image: convert_rgb,
    get_resize_output_image_size (short side ``size``, long side ``int(size * long / short)``), PIL
    bicubic resize, center_crop at ``(h - crop) // 2``, rescale ``astype(float64) * (1 / 255)`` cast to
    float32, normalize in float32."""
    out = []
    for a in anchor_uint8_hwc(x):
        img = Image.fromarray(a).convert("RGB")
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
        arr = np.array(img.resize((nw, nh), resample=Image.BICUBIC))
        top, left = (nh - crop) // 2, (nw - crop) // 2
        arr = arr[top : top + crop, left : left + crop]
        arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        arr = (arr - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
        out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    return torch.stack(out)


def anchor_open_clip_pixels(x, size: int, mean, std) -> torch.Tensor:
    """HPSv2's ``preprocess_val`` (open_clip's eval transform) on ``Image.fromarray`` of each image:
    torchvision Resize(size, BICUBIC) on the PIL image (short side ``size``, long side
    ``int(size * long / short)``), CenterCrop at ``round((h - size) / 2)``, convert RGB, ToTensor
    (``float32 / 255``), Normalize in float32."""
    out = []
    for a in anchor_uint8_hwc(x):
        img = Image.fromarray(a)
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        nw, nh = (size, new_long) if w <= h else (new_long, size)
        img = img.resize((nw, nh), resample=Image.BICUBIC).convert("RGB")
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        t = torch.from_numpy(np.array(img)[top : top + size, left : left + size].copy())
        t = t.permute(2, 0, 1).float().div(255)
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        out.append((t - m[:, None, None]) / s[:, None, None])
    return torch.stack(out)


def clip_image_embeds(model, pixel_values):
    """transformers 4.40's ``CLIPModel.get_image_features``: the projected pooled vision output."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


# --- the levels every reward starts from --------------------------------------------------------------


def test_to_uint8_is_the_anchors_quantisation_and_exact_on_the_policies_levels():
    from fastcps.rewards._util import to_uint8, uint8_hwc_batch

    x = images(0, b=2)
    x[0, 0, 0, :4] = torch.tensor([-0.2, 1.3, 0.5 / 255, 254.5 / 255])  # out of range, ties
    given = x.clone()
    assert np.array_equal(to_uint8(x).permute(0, 2, 3, 1).numpy(), anchor_uint8_hwc(x))
    assert torch.equal(x, given)  # rounded and clamped in place, but in its own temporary
    assert all(np.array_equal(a, b) for a, b in zip(uint8_hwc_batch(x), anchor_uint8_hwc(x)))
    k = torch.arange(256, dtype=torch.float32)
    assert torch.equal(to_uint8(k / 255), k.to(torch.uint8))  # k/255 in fp32 gives k back


# --- pickscore and aesthetic: transformers CLIP -------------------------------------------------------


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyclip")
    _tiny_hf_clip(root)
    return root


@pytest.mark.parametrize("levels", [False, True])
def test_pickscore_preprocesses_and_scores_as_flow_grpos_scorer(hf_clip_dir, levels):
    """flow_grpo ``pickscore_score`` -> ``PickScoreScorer.__call__``: the processor on PIL images, the
    image and text features normalised, ``logit_scale.exp() * diag(text @ image.T)`` (then / 26: our
    ``scale``)."""
    from transformers import CLIPModel, CLIPProcessor

    from fastcps.rewards._util import hf_pixel_values

    x = images(1, levels)
    proc = CLIPProcessor.from_pretrained(hf_clip_dir / "processor")
    ip = proc.image_processor
    want = anchor_hf_clip_pixels(
        x, ip.size["shortest_edge"], ip.crop_size["height"], ip.image_mean, ip.image_std
    )
    assert torch.equal(hf_pixel_values(ip, x), want)

    model = CLIPModel.from_pretrained(hf_clip_dir / "model").eval()
    with torch.no_grad():
        img = clip_image_embeds(model, want)
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        tok = proc.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.text_projection(model.text_model(**tok).pooler_output)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        anchor = (model.logit_scale.exp() * (txt @ img.T)).diag() / 26
    r = build_reward(
        "pickscore",
        {"model": str(hf_clip_dir / "model"), "processor": str(hf_clip_dir / "processor"), "scale": 1 / 26},
    )
    torch.testing.assert_close(r(x, PROMPTS), anchor, rtol=0, atol=1e-6)


def test_aesthetic_preprocesses_as_flow_grpos_scorer(hf_clip_dir, tmp_path):
    """flow_grpo ``aesthetic_score`` -> ``AestheticScorer.__call__``: the processor on the uint8 NCHW
    tensor, the image features normalised, the MLP."""
    from transformers import CLIPModel, CLIPProcessor

    from fastcps.rewards.aesthetic import AestheticHead

    torch.manual_seed(2)
    head = AestheticHead((16, 32, 16, 8, 4, 1)).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    x = images(2)
    ip = CLIPProcessor.from_pretrained(hf_clip_dir / "processor").image_processor
    pix = anchor_hf_clip_pixels(
        x, ip.size["shortest_edge"], ip.crop_size["height"], ip.image_mean, ip.image_std
    )
    model = CLIPModel.from_pretrained(hf_clip_dir / "model").eval()
    with torch.no_grad():
        e = clip_image_embeds(model, pix)
        anchor = head(e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)).squeeze(1)
    r = build_reward(
        "aesthetic",
        {
            "head": str(tmp_path / "head.pth"),
            "model": str(hf_clip_dir / "model"),
            "processor": str(hf_clip_dir / "processor"),
        },
    )
    torch.testing.assert_close(r(x, PROMPTS), anchor, rtol=0, atol=1e-6)


# --- hpsv2: open_clip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [False, True])
def test_hpsv2_preprocesses_and_scores_as_the_authors_scorer(tmp_path, levels):
    """flow_grpo ``hpsv2_score`` -> ``HPSv2RewardInferencer.reward`` (HPSv2's img_score.py alike): each
    image's PIL through ``preprocess_val``, the cosine of the normalised features."""
    import open_clip

    from fastcps.rewards._util import open_clip_pixel_values
    from fastcps.rewards.hpsv2 import OPENAI_MEAN, OPENAI_STD

    path, cfg = tiny_hps_checkpoint(tmp_path)
    size = TINY_OPEN_CLIP["vision_cfg"]["image_size"]
    x = images(3, levels)
    want = anchor_open_clip_pixels(x, size, OPENAI_MEAN, OPENAI_STD)
    assert torch.equal(open_clip_pixel_values(x, size, OPENAI_MEAN, OPENAI_STD), want)

    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    model.load_state_dict(torch.load(path)["state_dict"])
    model.eval()
    tok = open_clip.SimpleTokenizer()
    with torch.no_grad():
        anchor = torch.stack(
            [
                (
                    model.encode_image(want[i : i + 1], normalize=True)
                    @ model.encode_text(tok([p]), normalize=True).T
                )[0, 0]
                for i, p in enumerate(PROMPTS)
            ]
        )
    r = build_reward("hpsv2", {"checkpoint": str(path), "model_config": str(cfg)})
    torch.testing.assert_close(r(x, PROMPTS), anchor, rtol=0, atol=1e-6)


# --- ocr, geneval, jpeg: the uint8 image itself ---------------------------------------------------------


class RecordingPaddle:
    """PaddleOCR 2.x's ``ocr(img, cls)`` (flow_grpo/ocr.py calls it so), recording what it is given."""

    use_angle_cls = False

    def __init__(self):
        self.seen = []

    def ocr(self, img, cls=True):
        self.seen.append(np.array(img, copy=True))
        return [[[None, ("blue cat", 0.9)]]]


class RecordingRapid:
    def __init__(self):
        self.seen = []

    def __call__(self, img):
        self.seen.append(np.array(img))
        from types import SimpleNamespace

        return SimpleNamespace(txts=("blue cat",), scores=(0.9,))


@pytest.mark.parametrize("engine", ["paddleocr", "rapidocr"])
def test_ocr_engines_see_the_anchors_uint8_rgb_image(engine):
    """flow_grpo ``ocr_score``: ``OcrScorer(images_nhwc_uint8, prompts)`` hands each RGB array to
    ``PaddleOCR.ocr`` as it is (no BGR conversion). RapidOCR (no anchor) gets a PIL image of the same
    array."""
    from fastcps.rewards.ocr import OcrReward

    r = OcrReward(engine=engine)
    r._ocr = RecordingPaddle() if engine == "paddleocr" else RecordingRapid()
    x = images(4)
    s = r(x, PROMPTS, [{"text": "blue cat"}] * 3)
    assert torch.equal(s, torch.ones(3))
    for seen, want in zip(r._ocr.seen, anchor_uint8_hwc(x)):
        assert seen.dtype == np.uint8 and np.array_equal(seen, want)


def test_geneval_sends_the_anchors_levels_losslessly():
    """flow_grpo ``geneval_score`` quantises as every reward, then sends JPEG at PIL's default quality
    (lossy); ours sends the same levels as PNG, which GenEval's evaluator reads from disk: lossless."""
    from fastcps.rewards.geneval import ServerDetector

    x = images(5, b=2)
    for im, want in zip(x, anchor_uint8_hwc(x)):
        png = Image.open(io.BytesIO(base64.b64decode(ServerDetector.encode(im))))
        assert np.array_equal(np.array(png), want)


def test_jpeg_sizes_are_flow_grpos():
    """flow_grpo ``jpeg_incompressibility``: each uint8 image saved as JPEG quality 95, size in kB; its
    ``jpeg_compressibility`` returns minus that / 500, ours minus that."""
    x = images(6, b=2)
    sizes = []
    for a in anchor_uint8_hwc(x):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    ours = build_reward("jpeg_compressibility")(x)
    assert ours.tolist() == [-s for s in np.array(sizes, dtype=np.float32).tolist()]
