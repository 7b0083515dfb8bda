"""``python -m fastcps.edit_sources``: the source images of an edit set made from its rows' text-to-image
prompts (counting_edit's were never published), on a tiny random-weight FLUX pipeline: where the rows name
them, seeded per image (the same picture for any split over processes), resumable, and the rows' mistakes
refused with their lines."""

import json

import pytest
from PIL import Image

from fastcps import edit_sources
from fastcps.edit_images import check_edit_images
from fastcps.testing import save_tiny_flux

ROWS = [
    {
        "prompt": "Make it two cats.",
        "image": "gen/image_0.png",
        "metadata": {"t2i_prompt": "a photo of one cat"},
    },
    {
        "prompt": "Make it three.",
        "image": "gen/image_0.png",
        "metadata": {"t2i_prompt": "a photo of one cat"},
    },
    {
        "prompt": "Make it one dog.",
        "image": "gen/image_1.png",
        "metadata": {"t2i_prompt": "a photo of two dogs"},
    },
]
FAST = ["--size", "32", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return str(save_tiny_flux(tmp_path_factory.mktemp("flux") / "pipe"))


def write_rows(folder, rows=ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def listing(out: str) -> list[str]:
    """The ``--dry-run`` listing's "path<TAB>prompt" lines (a log handler an earlier test left on stdout
    may add its lines)."""
    return [line for line in out.splitlines() if "\t" in line]


def run(*argv) -> int:
    return edit_sources.main([str(a) for a in argv])


def test_makes_each_image_once_where_the_rows_name_it_and_resumes(tmp_path, tiny_flux, monkeypatch):
    rows = write_rows(tmp_path / "data")
    assert run("--source", rows, "--pretrained", tiny_flux, *FAST) == 0
    made = {p.name: p.read_bytes() for p in (tmp_path / "data" / "gen").iterdir()}
    assert sorted(made) == ["image_0.png", "image_1.png"]  # two distinct images, not three rows
    for name in made:
        assert Image.open(tmp_path / "data" / "gen" / name).size == (32, 32)
    assert made["image_0.png"] != made["image_1.png"]
    assert check_edit_images(str(rows)) == 2  # what the trainer's start-up check reads now passes

    # a rerun loads no pipeline and keeps what is there; a file that does not decode is made again
    def no_pipeline(*a):
        raise AssertionError("nothing to make, yet the pipeline loaded")

    monkeypatch.setattr(edit_sources, "load_pipeline", no_pipeline)
    assert run("--source", rows, "--pretrained", tiny_flux, *FAST) == 0
    monkeypatch.undo()
    (tmp_path / "data" / "gen" / "image_1.png").write_bytes(b"half an image")
    assert run("--source", rows, "--pretrained", tiny_flux, *FAST) == 0
    assert (tmp_path / "data" / "gen" / "image_1.png").read_bytes() == made["image_1.png"]
    assert not list((tmp_path / "data" / "gen").glob(".*tmp"))  # no temporary file left behind


def test_an_image_is_the_same_whatever_the_split_over_processes(tmp_path, tiny_flux):
    one = write_rows(tmp_path / "one")
    assert run("--source", one, "--pretrained", tiny_flux, *FAST) == 0
    split = write_rows(tmp_path / "split")
    for shard in ("1/2", "0/2"):
        assert run("--source", split, "--pretrained", tiny_flux, "--shard", shard, *FAST) == 0
        if shard == "1/2":  # process 1 of 2 makes the second image only
            assert [p.name for p in (tmp_path / "split" / "gen").iterdir()] == ["image_1.png"]
    for name in ("image_0.png", "image_1.png"):
        assert (tmp_path / "one" / "gen" / name).read_bytes() == (
            tmp_path / "split" / "gen" / name
        ).read_bytes()
    other = write_rows(tmp_path / "other")
    assert run("--source", other, "--pretrained", tiny_flux, "--seed", "1", *FAST) == 0
    assert (tmp_path / "other" / "gen" / "image_0.png").read_bytes() != (
        tmp_path / "one" / "gen" / "image_0.png"
    ).read_bytes()


@pytest.mark.parametrize(
    "rows, said",
    [
        (ROWS[:2] + [{**ROWS[2], "metadata": {}}], ["line 3", "no 't2i_prompt'", "image_1.png"]),
        (
            ROWS[:1] + [{**ROWS[1], "metadata": {"t2i_prompt": "two cats"}}],
            ["line 2", "line 1", "'two cats'"],
        ),
        ([{"prompt": "a cat"}], ["no edit rows"]),
        ([{**ROWS[0], "image": "https://example.org/a.png"}], ["is a URL", "fastcps.fetch"]),
    ],
    ids=["no-prompt", "two-prompts", "no-edit-rows", "url"],
)
def test_rows_it_cannot_make_images_for_stop_it_naming_them(tmp_path, rows, said, capsys):
    assert run("--source", write_rows(tmp_path, rows), "--dry-run") == 2
    err = capsys.readouterr().err
    assert all(s in err for s in said), err
    assert not (tmp_path / "gen").exists()


def test_counting_edit_lists_flowcps_images_with_their_prompts(tmp_path, monkeypatch, capsys):
    """The shipped counting_edit sets: 310 train images, each made from its rows' t2i_prompt into the
    folder the trainer reads them from; the test set's 99 are among them (its instructions differ); 8
    processes split them without overlap."""
    monkeypatch.setenv("FASTCPS_CACHE", str(tmp_path))
    assert run("--source", "counting_edit:train", "--dry-run") == 0
    lines = listing(capsys.readouterr().out)
    assert len(lines) == 310
    root = tmp_path / "images" / "counting_edit" / "generated_images"
    assert f"{root / 'image_66.jpg'}\ta photo of one airplanes" in lines  # train_metadata.jsonl's first row
    shares = []
    for k in range(8):
        assert (
            run("--source", "counting_edit:train", "counting_edit:test", "--shard", f"{k}/8", "--dry-run")
            == 0
        )
        shares.append(set(listing(capsys.readouterr().out)))
    assert sum(map(len, shares)) == len(set().union(*shares)) == 310
    assert run("--source", "counting_edit:train", "--shard", "8/8", "--dry-run") == 2


def test_a_pipeline_that_does_not_load_stops_it_naming_the_flag(tmp_path, capsys):
    rows = write_rows(tmp_path / "data")
    assert run("--source", rows, "--pretrained", tmp_path / "no-such-pipeline", *FAST) == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "no-such-pipeline" in err, err
    assert not (tmp_path / "data" / "gen").exists()
