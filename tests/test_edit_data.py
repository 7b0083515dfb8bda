"""Edit data (fastcps.edit_images): prompt rows with source images load with their images resolved
(relative to the file, absolute, URLs fetched into the cache), a missing or corrupt image is an error naming
its row, line, config key and fix, images load exactly as FlowCPS's Kontext trainer hands them to the
pipeline, the counting_edit sets ship with FlowCPS's counts and checksums, and the trainer's start-up check
stops a run with a missing image before any model is built (exit 2 on every rank)."""

import gzip
import http.server
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcps import prompt_sets
from fastcps.conditioning import PromptEncodings
from fastcps.edit_images import (
    SOURCE_IMAGES,
    ImageCache,
    UnreadableImage,
    check_edit_images,
    check_rows_fit_policy,
    load_image,
)
from fastcps.policies.base import Policy
from fastcps.prompts import load_prompts

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "configs" / "digits_cps.json")

# FlowCPS at b402c7a: `git ls-tree HEAD dataset/counting_edit` (blob SHA-1), the rows of each file, and
# the distinct source images they name (the test split's rows edit images the train split edits too)
COUNTING_EDIT = {
    "counting_edit:train": (818, "98b1491b63dd0f299ccfd961c6a8236d35f43fb1", 310),
    "counting_edit:test": (112, "bf5c44d94dbac2b0435f125c48bc8538a98631ee", 99),
}


def picture(path: Path, size=(96, 64), mode="RGB", seed=0) -> np.ndarray:
    """A random picture saved at ``path`` (format from the suffix); its pixels as saved."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    if mode == "P":
        img = img.quantize(64)
    elif mode == "RGBA":
        img = img.convert("RGBA")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return pixels


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over ``tmp_path / "www"`` standing in for an image host."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def write_rows(path: Path, rows: list, blank_after_first: bool = True) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:  # a blank line: rows and lines then differ, and errors must name both right
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def fetch(*argv) -> int:
    from fastcps.fetch.__main__ import main

    return main(list(argv))


def test_rows_with_relative_absolute_and_url_images_load(tmp_path, cache, server, capsys):
    www, base = server
    data = tmp_path / "data"
    rel = picture(data / "images" / "a.png", seed=1)
    absolute = picture(tmp_path / "elsewhere" / "b.png", seed=2)
    remote = picture(www / "c.png", seed=3)
    prompts_file = write_rows(
        data / "edits.jsonl",
        [
            {"prompt": "make it red", "image": "images/a.png", "metadata": {"tag": "x"}},
            {"prompt": "make it blue", "image": str(tmp_path / "elsewhere" / "b.png")},
            {"prompt": "combine them", "image": [f"{base}/c.png", "images/a.png"]},
            {"prompt": "a plain text-to-image prompt"},
        ],
    )
    prompts, meta = load_prompts(str(prompts_file))
    assert prompts == ["make it red", "make it blue", "combine them", "a plain text-to-image prompt"]
    assert meta[0] == {"tag": "x", SOURCE_IMAGES: [str(data / "images" / "a.png")]}
    assert meta[1][SOURCE_IMAGES] == [str(tmp_path / "elsewhere" / "b.png")]
    assert meta[2][SOURCE_IMAGES] == [f"{base}/c.png", str(data / "images" / "a.png")]
    assert SOURCE_IMAGES not in meta[3]

    config = ["--config", DIGITS, "--set", f"prompts.source={prompts_file}"]
    # the URL row's image is not here yet: the start-up check names it and the fetch command
    with pytest.raises(FileNotFoundError, match=r"row 3 \(line 4\): http://.*c\.png \(not downloaded\)"):
        check_edit_images(str(prompts_file))
    assert fetch(*config, "--dry-run") == 0
    listed = capsys.readouterr().out
    assert "edit source images" in listed and "1 of 3 images to download (URL rows)" in listed
    assert not (cache / "edit_images").exists()  # a dry run downloads nothing
    assert fetch(*config) == 0
    assert check_edit_images(str(prompts_file)) == 3  # distinct images
    assert fetch(*config, "--dry-run") == 0
    assert "3 images, 3 rows" in capsys.readouterr().out  # all here now

    def pixels(ref):  # at the picture's own size: exactly the saved pixels, [3, H, W] in [0, 1]
        return (load_image(ref, (64, 96)) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

    for ref, want in zip(meta[2][SOURCE_IMAGES] + meta[1][SOURCE_IMAGES], (remote, rel, absolute)):
        assert np.array_equal(pixels(ref), want), ref


def test_a_missing_image_is_an_error_naming_its_row_line_key_and_fix(tmp_path):
    picture(tmp_path / "a.png")
    source = write_rows(
        tmp_path / "edits.jsonl",
        [{"prompt": "one", "image": "a.png"}, {"prompt": "two", "image": ["a.png", "gone/b.png"]}],
    )
    with pytest.raises(FileNotFoundError) as err:
        check_edit_images(str(source), "prompts.eval_source")
    msg = str(err.value)
    assert not isinstance(err.value, UnreadableImage)
    for part in (
        "1 of the 2 source images",
        "named by 1 of its 2 edit rows",
        f"prompt file {source}",
        "config key `prompts.eval_source`",
        f"row 2 (line 3): {tmp_path / 'gone' / 'b.png'}",
        f"relative paths resolve against {tmp_path}",
    ):
        assert part in msg, (part, msg)
    picture(tmp_path / "gone" / "b.png")
    assert check_edit_images(str(source)) == 2


@pytest.mark.parametrize("damage", ["truncated jpeg", "not an image", "bad png checksum"])
def test_a_corrupt_image_is_an_error_naming_its_row(tmp_path, damage):
    picture(tmp_path / "ok.jpg", size=(256, 256))
    bad = tmp_path / ("bad.png" if "png" in damage else "bad.jpg")
    picture(bad, size=(256, 256), seed=5)
    data = bad.read_bytes()
    if damage == "truncated jpeg":  # PIL's verify() alone lets this one through
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "not an image":
        bad.write_bytes(b"<html>404 Not Found</html>")
    else:  # a flipped byte inside the first IDAT chunk's data
        i = data.index(b"IDAT") + 40
        bad.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    source = write_rows(
        tmp_path / "edits.jsonl",
        [
            {"prompt": "fine", "image": "ok.jpg"},
            {"prompt": "broken", "image": bad.name},
            {"prompt": "again", "image": ["ok.jpg", bad.name]},
        ],
    )
    with pytest.raises(UnreadableImage) as err:
        check_edit_images(str(source))
    msg = str(err.value)
    assert "1 of the 2 source images" in msg and "named by 2 of its 3 edit rows, do not decode" in msg
    assert (
        f"row 2 (line 3): {bad} (" in msg
        and "(and 1 more rows)" in msg
        and "config key `prompts.source`" in msg
    )
    assert "ok.jpg" not in msg
    assert isinstance(err.value, FileNotFoundError)  # the trainer's exit 2, as for a missing file


def test_a_malformed_image_field_names_the_line(tmp_path):
    source = write_rows(
        tmp_path / "e.jsonl", [{"prompt": "a", "image": "x.png"}, {"prompt": "b", "image": 3}]
    )
    with pytest.raises(ValueError, match=r"e\.jsonl:3 \(config key `prompts\.source`\): 'image' must be"):
        load_prompts(str(source))


@pytest.mark.parametrize("mode, size", [("RGB", (300, 200)), ("P", (100, 140)), ("RGBA", (512, 512))])
def test_loading_and_resizing_equal_the_anchor(tmp_path, mode, size):
    """FlowCPS scripts/train_flux_kontext.py (GenevalPromptImageDataset and the rollout), transcribed: the
    image as its Kontext pipeline receives it, then the pipeline's own preprocessing (diffusers' Kontext
    pipeline: image_processor.resize, then preprocess) to the [-1, 1] tensor the VAE encodes."""
    import os

    from diffusers.image_processor import VaeImageProcessor

    picture(tmp_path / "generated_images" / "image_7.png", size=size, mode=mode)
    dataset, image_path, resolution = str(tmp_path), "generated_images/image_7.png", 512

    # --- the anchor ---
    image = Image.open(os.path.join(dataset, image_path)).convert("RGB")
    ref_image = image.resize((resolution, resolution))
    processor = VaeImageProcessor(vae_scale_factor=8 * 2)  # FluxKontextPipeline: vae_scale_factor * 2
    ref_image = processor.resize(ref_image, resolution, resolution)
    anchor = processor.preprocess(ref_image, resolution, resolution)[0]
    # ---

    ours = load_image(str(tmp_path / image_path), resolution)
    assert ours.shape == (3, 512, 512) and ours.dtype == torch.float32
    assert 0 <= ours.min() and ours.max() <= 1
    assert torch.equal(ours * 2 - 1, anchor)  # the pipeline's [-1, 1] map of our [0, 1] tensor: exact


def test_the_image_cache_decodes_each_image_once_and_keeps_a_byte_budget(tmp_path):
    refs = [str(tmp_path / f"{i}.png") for i in range(3)]
    for i, r in enumerate(refs):
        picture(Path(r), seed=i)
    one = 3 * 32 * 32  # uint8 bytes of one 32 px image
    cache = ImageCache(32, max_bytes=2 * one)
    for r in refs[:2] + refs[:2]:
        assert torch.equal(cache.get(r), load_image(r, 32))
    assert (cache.misses, cache.hits, len(cache), cache.nbytes) == (2, 2, 2, 2 * one)
    cache.get(refs[0])  # most recent now: the third image evicts refs[1]
    cache.get(refs[2])
    assert list(cache.host) == [refs[0], refs[2]] and cache.nbytes == 2 * one
    cache.get(refs[1])
    assert cache.misses == 4


@pytest.mark.parametrize("name", sorted(COUNTING_EDIT))
def test_the_counting_edit_sets_ship_with_their_counts_checksums_and_image_root(name, cache):
    count, blob, distinct = COUNTING_EDIT[name]
    s = prompt_sets.SETS[name]
    assert (s.repo, s.commit[:7], s.blob_sha1, s.count) == ("IamCreateAI/FlowCPS", "b402c7a", blob, count)
    raw = gzip.decompress((prompt_sets.DATA / s.shipped).read_bytes())
    assert prompt_sets.git_blob_sha1(raw) == blob
    assert "MIT License" in (prompt_sets.DATA / "LICENSE.FlowCPS").read_text()
    prompts, meta = load_prompts(name)
    assert len(prompts) == len(meta) == count
    root = cache / "images" / "counting_edit"
    assert prompt_sets.image_root(s) == root
    for p, m in zip(prompts, meta):  # the GenEval row (its rules for the reward) plus the resolved image
        assert m["prompt"] == p and m["include"] and m[SOURCE_IMAGES] == [str(root / m["image"])]
    assert len({(p, m["image"]) for p, m in zip(prompts, meta)}) == count  # no row twice
    images = sorted({m["image"] for m in meta})
    assert len(images) == distinct

    with pytest.raises(FileNotFoundError) as err:  # not published: the error says how to make them
        check_edit_images(name)
    msg = str(err.value)
    assert (
        f"{distinct} of the {distinct} source images of prompt set {name!r} (config key `prompts.source`), "
        f"named by {count} of its {count} edit rows, do not exist" in msg
    )
    assert "python -m fastcps.edit_sources --source counting_edit:train" in msg
    assert f"put them under {root}" in msg
    assert msg.count("\n    row ") == 5 and f"... and {distinct - 5} more images" in msg
    for i, rel in enumerate(images):
        picture(root / rel, size=(32, 32), seed=i)
    assert check_edit_images(name) == distinct


def test_the_eval_set_keeps_each_instruction_on_each_image():
    """counting_edit:test asks the same instruction of several images: each pair is an eval prompt."""
    from fastcps.config import RunConfig, load_config
    from fastcps.rollout import eval_prompt_set

    sets = ["prompts.source=counting_edit:train", "prompts.eval_source=counting_edit:test"]
    cfg = load_config(RunConfig, DIGITS, sets + ["eval.num_prompts=1000"])
    prompts, meta = eval_prompt_set(cfg)
    assert len(prompts) == 112 and len(set(prompts)) == 99
    assert len({(p, m["image"]) for p, m in zip(prompts, meta)}) == 112


def test_train_and_test_edit_rows_compare_with_their_images():
    """counting_edit's splits share instructions (and images), never an instruction on the same image: no
    held-out warning when the metadata is given; a file sharing a pair gets it."""
    from fastcps.prompts import held_out_warning

    train, test = load_prompts("counting_edit:train"), load_prompts("counting_edit:test")
    assert set(train[0]) & set(test[0])  # by text alone they overlap
    assert held_out_warning("counting_edit:train", "counting_edit:test", *_zip(train, test)) is None
    one = (test[0][:1], test[1][:1])
    said = held_out_warning("counting_edit:train", "mine.jsonl", *_zip(train, one))
    assert said is None  # a test pair is not a training pair
    said = held_out_warning("counting_edit:train", "mine.jsonl", *_zip(train, (train[0][:3], train[1][:3])))
    assert said and "3 of the 3 eval prompts ('mine.jsonl') are also training prompts" in said


def _zip(train, evaluated):
    return train[0], evaluated[0], train[1], evaluated[1]


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_the_startup_check_runs_before_the_policy_builds(tmp_path, monkeypatch, problem):
    from fastcps import trainer
    from fastcps.config import RunConfig, load_config

    built = []
    monkeypatch.setattr(trainer, "build_policy", lambda *a, **kw: built.append(a) or pytest.fail("built"))
    monkeypatch.setattr(trainer, "resolve_auto", lambda *a, **kw: built.append(a) or pytest.fail("planned"))
    if problem == "corrupt":
        (tmp_path / "a.png").write_bytes(b"not a picture")
    source = write_rows(tmp_path / "e.jsonl", [{"prompt": "0", "image": "a.png"}], blank_after_first=False)
    cfg = load_config(RunConfig, DIGITS, [f"prompts.source={source}", f"output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"row 1 \(line 1\): .*a\.png") as err:
        trainer.Trainer(cfg, tmp_path / "run")
    assert isinstance(err.value, UnreadableImage) == (problem == "corrupt")
    assert built == []


def test_edit_rows_for_a_text_to_image_policy_stop_the_trainer_before_the_plan(tmp_path, monkeypatch):
    from fastcps import trainer
    from fastcps.config import ConfigError, RunConfig, load_config

    built = []
    monkeypatch.setattr(trainer, "build_policy", lambda *a, **kw: built.append(a) or pytest.fail("built"))
    monkeypatch.setattr(trainer, "resolve_auto", lambda *a, **kw: built.append(a) or pytest.fail("planned"))
    picture(tmp_path / "a.png")
    source = write_rows(tmp_path / "e.jsonl", [{"prompt": "0", "image": "a.png"}], blank_after_first=False)
    cfg = load_config(RunConfig, DIGITS, [f"prompts.source={source}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"prompts.source: row 1 \('0'\) is an edit row .*'toy'"):
        trainer.Trainer(cfg, tmp_path / "run")
    assert built == []


@pytest.mark.slow
def test_a_missing_edit_image_stops_every_rank_with_exit_2(tmp_path):
    from multi_run import TINY_DIGITS, child_env, free_port, start, stop

    picture(tmp_path / "here.png")
    source = write_rows(
        tmp_path / "e.jsonl", [{"prompt": "0", "image": "here.png"}, {"prompt": "1", "image": "lost.png"}]
    )
    run = [
        a
        for kv in TINY_DIGITS + [f"prompts.source={source}", f"output_dir={tmp_path}"]
        for a in ("--set", kv)
    ]
    port, procs, t0 = free_port(), [], time.perf_counter()
    try:
        for rank in range(2):
            env = child_env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                FASTCPS_CACHE=str(tmp_path / "cache"),
            )
            procs.append(start([sys.executable, "-m", "fastcps.train", "--config", DIGITS] + run, env))
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            stop(p)
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 2, f"rank {rank} exited {p.returncode}:\n{log[-3000:]}"
        assert f"row 2 (line 3): {tmp_path / 'lost.png'}" in log, log[-3000:]
        assert "epoch 1/" not in log
    assert time.perf_counter() - t0 < 240


class _EditEncoder:
    """A stand-in editing policy: its encoding of a row is the instruction's length and the source image's
    name, so a cache that keyed on the text alone would hand one image's encoding to another image."""

    editing = True
    encoding_key = Policy.encoding_key

    def __init__(self):
        self.calls = []

    def encode(self, prompts, metadata=None):
        self.calls.append([(p, tuple(m[SOURCE_IMAGES])) for p, m in zip(prompts, metadata)])
        return {
            "x": torch.tensor([[len(p), int(m[SOURCE_IMAGES][0][-5])] for p, m in zip(prompts, metadata)])
        }


def test_edit_encodings_are_keyed_on_instruction_and_image():
    enc = _EditEncoder()
    cache = PromptEncodings(enc)
    a, b = {SOURCE_IMAGES: ["/d/img1.jpg"]}, {SOURCE_IMAGES: ["/d/img2.jpg"]}
    cond, index = cache.for_prompts(["two cats", "two cats", "two cats"], torch.device("cpu"), [a, b, a])
    assert enc.calls == [[("two cats", ("/d/img1.jpg",)), ("two cats", ("/d/img2.jpg",))]]
    assert cond["x"][index].tolist() == [[8, 1], [8, 2], [8, 1]]
    cache.for_prompts(["two cats"], torch.device("cpu"), [b])  # cached: no second encode
    assert len(enc.calls) == 1
    with pytest.raises(ValueError, match="2 prompts but 1 metadata"):
        cache.for_prompts(["x", "y"], torch.device("cpu"), [a])


def test_rows_must_fit_the_policy_kind():
    prompts, edit, plain = ["two cats", "a dog"], {SOURCE_IMAGES: ["/d/img1.jpg"]}, {}
    check_rows_fit_policy("kontext", True, prompts, [edit, edit], "prompts.source")
    check_rows_fit_policy("flux", False, prompts, [plain, plain], "prompts.source")
    with pytest.raises(ValueError, match=r"prompts.source: row 2 \('a dog'\) has no source image.*kontext"):
        check_rows_fit_policy("kontext", True, prompts, [edit, plain], "prompts.source")
    with pytest.raises(ValueError, match=r"prompts.eval_source: row 1 .*edit row.*'flux'"):
        check_rows_fit_policy("flux", False, prompts, [edit, plain], "prompts.eval_source")
