"""``image_similarity`` on a tiny random-weight CLIP (no download): equal to FlowCPS's scorer transcribed,
each row scored against its own reference, references read once, clear errors for a missing key, file or
unreadable image."""

from __future__ import annotations


from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastcps.rewards import WeightedReward, build_reward
from tiny_rewards import _tiny_hf_clip

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 64  # generated images: RES x RES, as FlowCPS generates square images at config.resolution


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """The tiny CLIP, and a processor that resizes the short side to 40 and crops 32 (so the anchor's
    resize and center crop both act; the vision tower takes 32 x 32)."""
    from transformers import CLIPProcessor

    root = tmp_path_factory.mktemp("tinyclip")
    _tiny_hf_clip(root)
    proc = CLIPProcessor.from_pretrained(root / "processor")
    proc.image_processor.size = {"shortest_edge": 40}
    proc.save_pretrained(root / "processor40")
    return root


@pytest.fixture()
def refs(tmp_path):
    """Three reference images of different sizes and content under tmp_path/refs."""
    g = np.random.default_rng(0)
    (tmp_path / "refs").mkdir()
    names = []
    for i, (h, w) in enumerate([(80, 60), (50, 50), (33, 70)]):
        name = f"refs/{i}.png"
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        names.append(name)
    return tmp_path, names


def gen_images(b: int, levels: bool, seed: int = 1, h: int = RES, w: int = RES) -> torch.Tensor:
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return (x * 255).round() / 255 if levels else x


def reward(clip_dir, root, **kw):
    args = {
        "model": str(clip_dir / "model"),
        "processor": str(clip_dir / "processor40"),
        "image_root": str(root),
    }
    return build_reward("image_similarity", {**args, **kw})


# --- FlowCPS's code, transcribed (IamCreateAI/FlowCPS @ b402c7a) ------------------------------------------


def anchor_transform(x: torch.Tensor, proc) -> torch.Tensor:
    """``clip_scorer.get_image_transform(processor)`` on float tensors, spelled out as torchvision 0.21 (the
    anchor's pin) runs it: ``T.Resize(shortest_edge)`` = antialiased bilinear ``interpolate`` of the short
    side to ``size`` (long side ``int(size * long / short)``), ``T.CenterCrop`` at ``round((h - c) / 2)``,
    ``T.Normalize`` = ``(x - mean) / std``."""
    size, (ch, cw) = proc.size["shortest_edge"], (proc.crop_size["height"], proc.crop_size["width"])
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    x = x[..., top : top + ch, left : left + cw]
    mean = torch.tensor(proc.image_mean, dtype=x.dtype)[:, None, None]
    std = torch.tensor(proc.image_std, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


def anchor_similarity(clip_dir, images: torch.Tensor, ref_paths, resolution: int | None) -> torch.Tensor:
    """scripts/train_flux_kontext.py reads each reference (``Image.open(os.path.join(dataset, path))
    .convert('RGB')``, ``.resize((resolution, resolution))``); rewards.py ``image_similarity_score`` makes
    them ``torch.tensor(uint8) / 255.0`` and hands the float images as they are to
    ``ClipScorer.image_similarity``: transform both, ``get_image_features``, L2-normalise,
    ``diag(pixel @ ref.T)``."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir / "model").eval()
    proc = CLIPProcessor.from_pretrained(clip_dir / "processor40").image_processor
    pils = [Image.open(p).convert("RGB") for p in ref_paths]
    if resolution is not None:
        pils = [p.resize((resolution, resolution)) for p in pils]
    out = []
    with torch.no_grad():
        for img, pil in zip(images, pils):  # one pair at a time: references of unequal size stack nowhere
            ref = torch.tensor(np.array(pil)[None].transpose(0, 3, 1, 2), dtype=torch.uint8) / 255.0
            pe = model.visual_projection(
                model.vision_model(pixel_values=anchor_transform(img[None], proc)).pooler_output
            )
            re = model.visual_projection(
                model.vision_model(pixel_values=anchor_transform(ref, proc)).pooler_output
            )
            pe = pe / pe.norm(p=2, dim=-1, keepdim=True)
            re = re / re.norm(p=2, dim=-1, keepdim=True)
            out.append(torch.diagonal(pe @ re.T, 0))
    return torch.cat(out)


@pytest.mark.parametrize("levels", [False, True], ids=["float", "levels"])
def test_scores_as_flowcps_scorer_each_row_against_its_own_reference(clip_dir, refs, levels):
    """Four rows, three references (row 3 shares row 0's), in one batch of 3 forwards (batch_size 3): each
    row's cosine with its own reference, as FlowCPS computes it, both on float images (the anchor does not
    quantise) and on the policies' k/255 levels."""
    root, names = refs
    rows = [0, 1, 2, 0]
    x = gen_images(len(rows), levels)
    meta = [{"image": names[r], "other": 1} for r in rows]
    got = reward(clip_dir, root, batch_size=3)(x, ["a", "b", "c", "d"], meta)
    want = anchor_similarity(clip_dir, x, [root / names[r] for r in rows], RES)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.shape == (4,) and bool((got.abs() <= 1 + 1e-6).all())
    # a different pairing of the same images gives other scores: the rows are not scored against one reference
    swapped = reward(clip_dir, root)(x, ["a", "b", "c", "d"], [meta[1], meta[0], meta[2], meta[3]])
    assert not torch.allclose(swapped[:2], got[:2], atol=1e-4)


def test_without_resize_the_reference_goes_to_clip_at_its_own_size(clip_dir, refs):
    root, names = refs
    x = gen_images(3, True)
    meta = [{"ref": n} for n in names]
    got = reward(clip_dir, root, key="ref", resize_reference=False)(x, ["a"] * 3, meta)
    want = anchor_similarity(clip_dir, x, [root / n for n in names], None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    resized = reward(clip_dir, root, key="ref")(x, ["a"] * 3, meta)
    assert not torch.allclose(got, resized, atol=1e-4)


def test_each_reference_is_read_once_per_generated_size(clip_dir, refs, monkeypatch):
    from fastcps.rewards import image_similarity

    root, names = refs
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    r = reward(clip_dir, root)
    meta = [{"image": names[i]} for i in (0, 1, 0, 1)]
    first = r(gen_images(4, True), ["a"] * 4, meta)
    assert sorted(opened) == sorted(str(root / n) for n in names[:2])  # once each, though each is used twice
    second = r(gen_images(4, True), ["a"] * 4, meta)
    assert len(opened) == 2  # from the cache
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    r(gen_images(2, True, h=48, w=RES), ["a"] * 2, meta[:2])
    assert len(opened) == 4  # another generated size: the references are resized anew
    # a fresh reward (nothing cached) scores alike
    opened.clear()
    torch.testing.assert_close(reward(clip_dir, root)(gen_images(4, True), ["a"] * 4, meta), first)
    assert image_similarity.ImageSimilarityReward.name == "image_similarity"


def test_relative_paths_start_at_image_root_or_the_launch_directory(clip_dir, refs, monkeypatch):
    root, names = refs
    x = gen_images(1, True)
    absolute = reward(clip_dir, root)(x, ["a"], [{"image": str(root / names[1])}])
    relative = reward(clip_dir, root)(x, ["a"], [{"image": names[1]}])
    monkeypatch.chdir(root)
    no_root = build_reward(
        "image_similarity", {"model": str(clip_dir / "model"), "processor": str(clip_dir / "processor40")}
    )(x, ["a"], [{"image": names[1]}])
    torch.testing.assert_close(relative, absolute, rtol=0, atol=0)
    torch.testing.assert_close(no_root, absolute, rtol=0, atol=0)


def test_a_missing_key_file_or_unreadable_image_is_named(clip_dir, refs):
    root, names = refs
    r = reward(clip_dir, root)
    x = gen_images(2, True)
    with pytest.raises(
        ValueError,
        match=r"prompt row 1 \('the dog'\) has no reference image: its metadata has no "
        r"'source_images' \(an edit row's image\) nor 'image'.*got metadata keys \['img'\]",
    ):
        r(x, ["a cat", "the dog"], [{"image": names[0]}, {"img": names[1]}])
    with pytest.raises(
        ValueError,
        match=r"prompt row 1 \('the dog'\) has no reference image: its metadata has no "
        r"'image' \(config key rewards\[\]\.args\.key\).*got metadata keys \['img'\]",
    ):
        reward(clip_dir, root, key="image")(x, ["a cat", "the dog"], [{"image": names[0]}, {"img": names[1]}])
    with pytest.raises(
        FileNotFoundError,
        match=r"prompt row 0 \('a cat'\): reference image '.*refs/gone\.png' "
        r"\(metadata key 'image' = 'refs/gone\.png'\) does not exist; rewards\[\]\.args\.image_root",
    ):
        r(x, ["a cat", "the dog"], [{"image": "refs/gone.png"}, {"image": names[1]}])
    (root / "refs" / "broken.png").write_text("not a png")
    with pytest.raises(
        ValueError,
        match=r"prompt row 1 \('the dog'\): reference image '.*broken\.png' \(metadata "
        r"key 'image'\) cannot be read as an image",
    ):
        r(x, ["a cat", "the dog"], [{"image": names[0]}, {"image": "refs/broken.png"}])
    with pytest.raises(ValueError, match="needs each prompt's metadata"):
        r(x, ["a cat", "the dog"], None)
    # through the trainer's WeightedReward: the run stops naming the reward and the file
    w = WeightedReward(
        [
            (
                "image_similarity",
                1.0,
                {
                    "model": str(clip_dir / "model"),
                    "processor": str(clip_dir / "processor40"),
                    "image_root": str(root),
                },
            )
        ]
    )
    with pytest.raises(
        RuntimeError, match=r"reward 'image_similarity' raised FileNotFoundError.*refs/gone\.png"
    ):
        w(x, ["a", "b"], [{"image": "refs/gone.png"}, {"image": names[0]}])


def test_files_declare_the_model_processor_and_image_root():
    from fastcps.rewards.image_similarity import ImageSimilarityReward

    items = ImageSimilarityReward.files({"image_root": "/data/edits"})
    assert [(type(i).__name__, i.label, i.key) for i in items] == [
        ("HubRepo", "openai/clip-vit-large-patch14", "model"),
        ("HubRepo", "openai/clip-vit-large-patch14", "processor"),
        ("LocalPath", "/data/edits", "image_root"),
    ]
    assert len(ImageSimilarityReward.files({})) == 2


# --- edit rows (issue 29): the source image by default, and the anchors' weighting with GenEval -----------


def counting_edit_rows(tmp_path, monkeypatch, n: int) -> tuple[list[str], list[dict]]:
    """The first ``n`` rows of ``counting_edit:test`` as ``load_prompts`` gives them (the GenEval row, its
    relative ``image`` and the resolved ``source_images``), their source images written (random JPEGs of
    another size than the generated one) under a temporary cache."""
    from fastcps.prompts import load_prompts

    monkeypatch.setenv("FASTCPS_CACHE", str(tmp_path / "cache"))
    prompts, meta = load_prompts("counting_edit:test")
    g = np.random.default_rng(5)
    for m in meta[:n]:
        path = Path(m["source_images"][0])
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(path)
    return prompts[:n], meta[:n]


def test_edit_rows_are_scored_against_their_source_image_with_no_key_or_root(clip_dir, tmp_path, monkeypatch):
    prompts, meta = counting_edit_rows(tmp_path, monkeypatch, 3)
    x = gen_images(3, True)
    r = build_reward(
        "image_similarity", {"model": str(clip_dir / "model"), "processor": str(clip_dir / "processor40")}
    )
    got = r(x, prompts, meta)
    want = anchor_similarity(clip_dir, x, [m["source_images"][0] for m in meta], RES)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # an explicit key wins: the rows' own "image" is relative to the set's image root, not the launch folder
    with pytest.raises(FileNotFoundError, match=r"metadata key 'image' = 'generated_images/"):
        reward(clip_dir, tmp_path, key="image")(x, prompts, meta)
    with pytest.raises(ValueError, match=r"prompt row 1 \(.*\) has no reference image.*'source_images'"):
        r(x[:2], prompts[:2], [meta[0], {"tag": "counting", "source_images": []}])


def test_source_pixels_sent_to_a_service_score_as_the_file(clip_dir, tmp_path, monkeypatch):
    """What a reward service gets instead of a path (``wire.SOURCE_PIXELS``: the file opened and resized by
    the client as the anchor does) scores as the file in process, with the path unreadable here."""
    from fastcps.edit_images import load_image_uint8
    from fastcps.rewards.service.wire import SOURCE_PIXELS

    prompts, meta = counting_edit_rows(tmp_path, monkeypatch, 2)
    x = gen_images(2, True)
    args = {"model": str(clip_dir / "model"), "processor": str(clip_dir / "processor40")}
    want = build_reward("image_similarity", args)(x, prompts, meta)
    sent = [
        {**m, "source_images": ["/elsewhere/src.jpg"], SOURCE_PIXELS: load_image_uint8(src, RES).numpy()}
        for m, src in zip(meta, [m["source_images"][0] for m in meta])
    ]
    r = build_reward("image_similarity", args)
    assert r.wants_source_images
    torch.testing.assert_close(r(x, prompts, sent), want, rtol=0, atol=0)
    assert not build_reward("image_similarity", {**args, "key": "image"}).wants_source_images


def test_the_anchors_weighting_of_similarity_and_geneval_on_edit_rows(clip_dir, tmp_path, monkeypatch):
    """FlowCPS counting_flux_kontext: image_similarity 0.5 + geneval 0.5, on counting_edit rows (GenEval's
    rules read the rows' tag/include/exclude; detections given): the weighted sum, both components kept."""
    prompts, meta = counting_edit_rows(tmp_path, monkeypatch, 2)
    cls = meta[0]["include"][0]["class"]
    want_n = meta[0]["include"][0]["count"]
    box = [10, 10, 60, 60]
    dets = [{"label": cls, "box": box, "score": 0.95, "color": None}] * want_n
    meta = [{**meta[0], "detections": dets}, {**meta[1], "detections": []}]  # row 0 passes, row 1 not
    x = gen_images(2, True)
    clip = {"model": str(clip_dir / "model"), "processor": str(clip_dir / "processor40")}
    w = WeightedReward([("image_similarity", 0.5, clip), ("geneval", 0.5, {"detector": "given"})])
    out = w(x, prompts, meta)
    sim = build_reward("image_similarity", clip)(x, prompts, meta)
    assert set(out.components) == {"image_similarity", "geneval"}
    assert out.components["geneval"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(out.components["image_similarity"], sim, rtol=0, atol=0)
    torch.testing.assert_close(out.total, 0.5 * sim + 0.5 * torch.tensor([1.0, 0.0]), rtol=0, atol=1e-7)
