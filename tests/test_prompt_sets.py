"""The named prompt sets (fastcps.prompt_sets): the shipped ones load with flow_grpo's counts and git
checksums, a download is verified against its checksum (a local HTTP server stands in for GitHub), a
corrupted cached copy is refused, the config accepts the names and rejects unknown ones, the shipped
recipes train on a train split and evaluate on its held-out test split, and a run whose eval prompts are
training prompts gets a warning."""

import dataclasses
import gzip
import http.server
import logging
import threading
from pathlib import Path

import pytest

from fastcps import prompt_sets
from fastcps.config import ConfigError, RunConfig, load_config
from fastcps.prompts import held_out_warning, load_prompts

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["flux_pickscore", "flux_schnell_hpsv2", "sd35_ocr", "sd35_geneval"]

# flow_grpo at ac4c86e: `git ls-tree HEAD dataset` (blob SHA-1) and the line counts of its files, as its
# TextPromptDataset / GenevalPromptDataset read them (ocr/test.txt has no newline after its last line)
SHIPPED = {
    "pickscore:train": (25432, "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b"),
    "pickscore:test": (2048, "45f05231b969fb5f74c8debd606b22cd3be27f8e"),
    "ocr:test": (1018, "8deb4f8d8f2e863f45353354243669b3c991a6a2"),
    "geneval:test": (2212, "27cdaf5cc1356fe15aeadbb8df55682ca74228f0"),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_sets_load_with_their_count_and_checksum(name):
    count, blob = SHIPPED[name]
    s = prompt_sets.SETS[name]
    assert s.blob_sha1 == blob and s.count == count and s.shipped
    data = gzip.decompress((prompt_sets.DATA / s.shipped).read_bytes())
    assert prompt_sets.git_blob_sha1(data) == blob
    prompts, meta = load_prompts(name)
    assert len(prompts) == len(meta) == count and all(prompts)
    if s.geneval:  # the GenEval row is the metadata, as flow_grpo hands it to its reward
        assert all(m["prompt"] == p and m["tag"] and m["include"] for p, m in zip(prompts, meta))
    else:
        assert meta == [{}] * count
    if name == "ocr:test":
        assert all(p.count('"') >= 2 for p in prompts)


def test_the_licence_of_the_shipped_files_ships_with_them():
    text = (prompt_sets.DATA / "LICENSE.flow_grpo").read_text()
    assert "MIT License" in text and "Jie Liu" in text


def test_train_and_test_splits_share_no_prompt():
    train, test = load_prompts("pickscore:train")[0], load_prompts("pickscore:test")[0]
    assert not set(train) & set(test)


def serve(files: dict[str, bytes]):
    """An HTTP server on a free loopback port answering GET/HEAD of ``files`` (URL path -> bytes)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self, body=False):
            data = files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            if body and data is not None:
                self.wfile.write(data)

        def do_GET(self):
            self.do_HEAD(body=True)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def github(monkeypatch):
    files: dict[str, bytes] = {}
    server = serve(files)
    monkeypatch.setenv(prompt_sets.URL_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    yield files
    server.shutdown()


def as_download(monkeypatch, name: str) -> prompt_sets.PromptSet:
    """``name`` as if it were not shipped: it downloads from its repository's URL (the real path, commit
    and checksum)."""
    s = dataclasses.replace(prompt_sets.SETS[name], shipped=None)
    monkeypatch.setitem(prompt_sets.SETS, name, s)
    return s


def test_a_download_is_verified_then_cached(cache, github, monkeypatch):
    real = gzip.decompress((prompt_sets.DATA / "pickscore_test.txt.gz").read_bytes())
    s = as_download(monkeypatch, "pickscore:test")
    with pytest.raises(FileNotFoundError, match="not downloaded on this machine"):
        load_prompts("pickscore:test")
    path = f"/yifan123/flow_grpo/{prompt_sets.FLOW_GRPO[1]}/dataset/pickscore/test.txt"
    github[path] = real
    got = prompt_sets.download(s)
    assert got.parent == cache / "prompts" and got.read_bytes() == real
    github.clear()  # cached: no server needed any more
    assert len(load_prompts("pickscore:test")[0]) == 2048


def test_a_download_with_another_checksum_is_refused_and_not_cached(cache, github, monkeypatch):
    s = as_download(monkeypatch, "pickscore:test")
    real = gzip.decompress((prompt_sets.DATA / "pickscore_test.txt.gz").read_bytes())
    github[f"/{s.url_path}"] = real.replace(b"gym", b"gim", 1)
    with pytest.raises(prompt_sets.CorruptDownload) as err:
        prompt_sets.download(s)
    msg = str(err.value)
    assert (
        "pickscore:test" in msg
        and s.blob_sha1 in msg
        and prompt_sets.git_blob_sha1(github[f"/{s.url_path}"]) in msg
    )
    assert not prompt_sets.local_path(s).exists()


def test_a_corrupted_cached_copy_is_refused(cache, monkeypatch):
    s = as_download(monkeypatch, "pickscore:test")
    path = prompt_sets.local_path(s)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a truncated download\n")
    with pytest.raises(prompt_sets.CorruptDownload, match=rf"{path}.*{s.blob_sha1}"):
        load_prompts("pickscore:test")
    assert not prompt_sets.is_available(s)


def test_fetch_downloads_a_named_set_and_replaces_a_corrupted_copy(cache, github, monkeypatch, capsys):
    from fastcps.fetch.__main__ import main

    s = as_download(monkeypatch, "pickscore:test")
    github[f"/{s.url_path}"] = gzip.decompress((prompt_sets.DATA / "pickscore_test.txt.gz").read_bytes())
    prompt_sets.local_path(s).parent.mkdir(parents=True)
    prompt_sets.local_path(s).write_bytes(b"corrupt")
    assert main(["--prompt-set", "pickscore:test"]) == 0
    out = capsys.readouterr().out
    assert "wrong checksum: replaced" in out and "239.9 KB" in out  # the size from the server's metadata
    assert prompt_sets.is_available(s)
    assert main(["--prompt-set", "pickscore:test"]) == 0
    assert "cached" in capsys.readouterr().out


def test_fetch_names_the_file_and_both_checksums_on_a_mismatch(cache, github, capsys):
    from fastcps.fetch.__main__ import main

    s = prompt_sets.SETS["ocr:train"]
    github[f"/{s.url_path}"] = b'a sign that says "hello"\n'
    assert main(["--prompt-set", "ocr:train"]) == 2
    err = capsys.readouterr().err
    assert (
        "ocr:train" in err
        and s.blob_sha1 in err
        and prompt_sets.git_blob_sha1(b'a sign that says "hello"\n') in err
    )


def test_offline_nothing_downloads(cache, github, monkeypatch, capsys):
    from fastcps.fetch.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--prompt-set", "ocr:train"]) == 2
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err


# --- config ------------------------------------------------------------------------------------------


def test_the_config_accepts_named_sets_and_rejects_unknown_names_with_a_suggestion():
    cfg = load_config(RunConfig, None, ["prompts.source=ocr:train", "prompts.eval_source=ocr:test"])
    assert (cfg.prompts.source, cfg.prompts.eval_source) == ("ocr:train", "ocr:test")
    with pytest.raises(
        ConfigError, match=r"prompts\.source.*'pickscore:tran'.*did you mean 'pickscore:train'"
    ):
        load_config(RunConfig, None, ["prompts.source=pickscore:tran"])
    with pytest.raises(ConfigError, match=r"prompts\.eval_source.*unknown prompt set 'coco:test'"):
        load_config(RunConfig, None, ["prompts.eval_source=coco:test"])


@pytest.mark.parametrize("name", RECIPES)
def test_the_recipes_train_on_a_train_split_and_evaluate_on_its_held_out_test_split(name):
    cfg = load_config(RunConfig, str(ROOT / "configs" / f"{name}.json"))
    src, ev = cfg.prompts.source, cfg.prompts.eval_source
    assert (
        src.endswith(":train") and ev.endswith(":test") and src in prompt_sets.SETS and ev in prompt_sets.SETS
    )
    assert prompt_sets.SETS[src].path != prompt_sets.SETS[ev].path
    test = load_prompts(ev)[0]
    assert len(test) >= 1000  # the real test split, not a sample file
    if prompt_sets.SETS[src].shipped:  # the sets here: their prompts are disjoint
        assert held_out_warning(src, ev, load_prompts(src)[0], test) is None


def test_the_eval_set_takes_each_prompt_once():
    from fastcps.rollout import eval_prompt_set

    cfg = load_config(RunConfig, str(ROOT / "configs" / "sd35_geneval.json"))
    prompts, meta = eval_prompt_set(cfg)  # geneval:test lists each of its 553 prompts 4 times
    assert len(prompts) == len(set(prompts)) == cfg.eval.num_prompts == 16
    assert all(m["prompt"] == p for p, m in zip(prompts, meta))


# --- the warning ---------------------------------------------------------------------------------------


def test_the_warning_says_why_and_the_fix():
    train = load_prompts("pickscore:train")[0]
    unset = held_out_warning("pickscore:train", None, train, train[:16])
    assert "prompts.eval_source is not set" in unset and "overfit" in unset
    assert "--set prompts.eval_source=pickscore:test" in unset
    same = held_out_warning("configs/prompts/ocr.txt", "configs/prompts/ocr.txt", ["a"], ["a"])
    assert "prompts.eval_source is prompts.source" in same and "held-out" in same
    overlap = held_out_warning("a.txt", "b.txt", ["x", "y", "z"], ["y", "w"])
    assert overlap.startswith("1 of the 2 eval prompts ('b.txt') are also training prompts")
    assert held_out_warning("a.txt", "b.txt", ["x"], ["w"]) is None
    assert held_out_warning("digits", None, ["x"], ["x"]) is None  # the toy's prompts are its whole task


def trainer_log(tmp_path, monkeypatch, caplog, sets):
    """The trainer's start-up (toy policy, one process) up to deepspeed.initialize; its log records."""
    import deepspeed

    from fastcps import distributed as fdist
    from fastcps.trainer import Trainer

    class Reached(Exception):
        pass

    def initialize(*args, **kwargs):
        raise Reached

    cfg = load_config(RunConfig, str(ROOT / "configs" / "digits_cps.json"), [f"output_dir={tmp_path}", *sets])
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    monkeypatch.setattr(fdist, "is_main", lambda: True)
    monkeypatch.setattr(fdist, "rank", lambda: 0)
    monkeypatch.setattr(fdist, "world", lambda: 1)
    with caplog.at_level(logging.WARNING, logger="fastcps"), pytest.raises(Reached):
        Trainer(cfg, tmp_path / "run")
    return [r.getMessage() for r in caplog.records if r.name.startswith("fastcps")]


def test_the_trainer_warns_at_start_up_when_it_evaluates_on_training_prompts(tmp_path, monkeypatch, caplog):
    prompts = tmp_path / "digits.txt"
    prompts.write_text("\n".join(load_prompts("digits")[0]))
    same = trainer_log(tmp_path, monkeypatch, caplog, [f"prompts.source={prompts}"])
    assert any("prompts.eval_source is not set" in m for m in same), same
    caplog.clear()
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a handwritten digit seven, upside down\n")
    apart = trainer_log(
        tmp_path, monkeypatch, caplog, [f"prompts.source={prompts}", f"prompts.eval_source={held_out}"]
    )
    assert not any("eval_source" in m for m in apart), apart
