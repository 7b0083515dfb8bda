"""``python -m fastcps.fetch`` (fastcps.fetch): the files each shipped config needs, that the loaders find
everything they open among them (offline, in a cache holding only those, loading what the stand-ins' own
folders load), and the command against a stand-in hub (downloads, sizes, a second run finds all cached,
gated / unreachable hub errors). The trainer's start-up check: tests/test_startup_check.py."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import hub_standin
from hub_standin import StandinHub, cfg_of
from multi_run import child_env

from fastcps.fetch import LocalPath, config_items, ensure_local, hub
from fastcps.fetch.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
FLUX_SUBFOLDERS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)
SD3_SUBFOLDERS = FLUX_SUBFOLDERS + ("text_encoder_3", "tokenizer_3")
QWENIMAGE_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def labels(items):
    return {(type(i).__name__, i.key, i.label) for i in items}


# --- what each shipped config needs --------------------------------------------------------------------


def test_the_shipped_configs_need_their_policy_reward_models_and_prompt_sets():
    from fastcps.rewards.pickscore import DEFAULT_MODEL, DEFAULT_PROCESSOR

    need = {
        "flux_pickscore": {
            ("HubRepo", "policy.pretrained", "black-forest-labs/FLUX.1-dev"),
            ("HubRepo", "rewards.0.args.model", DEFAULT_MODEL),
            ("HubRepo", "rewards.0.args.processor", DEFAULT_PROCESSOR),
            ("PromptSetFile", "prompts.source", "pickscore:train"),
            ("PromptSetFile", "prompts.eval_source", "pickscore:test"),
        },
        "flux_schnell_hpsv2": {
            ("HubRepo", "policy.pretrained", "black-forest-labs/FLUX.1-schnell"),
            ("HubRepo", "rewards.0.args.checkpoint", "xswu/HPSv2"),
            ("PromptSetFile", "prompts.source", "hpd:train"),
            ("PromptSetFile", "prompts.eval_source", "pickscore:test"),
        },
        "sd35_ocr": {  # rapidocr's wheel ships its models
            ("HubRepo", "policy.pretrained", "stabilityai/stable-diffusion-3.5-medium"),
            ("PromptSetFile", "prompts.source", "ocr:train"),
            ("PromptSetFile", "prompts.eval_source", "ocr:test"),
        },
        "sd35_geneval": {  # GenEval's detector in process: Mask2Former and the colour classifier's CLIP
            ("HubRepo", "policy.pretrained", "stabilityai/stable-diffusion-3.5-medium"),
            ("HubRepo", "rewards.0.args.model", "facebook/mask2former-swin-small-coco-instance"),
            ("HubRepo", "rewards.0.args.clip_pretrained", "timm/vit_large_patch14_clip_224.openai"),
            ("PromptSetFile", "prompts.source", "geneval:train"),
            ("PromptSetFile", "prompts.eval_source", "geneval:test"),
        },
        "qwenimage_pickscore": {  # the family's registry entry names the policy class
            ("HubRepo", "policy.pretrained", "Qwen/Qwen-Image"),
            ("HubRepo", "rewards.0.args.model", DEFAULT_MODEL),
            ("HubRepo", "rewards.0.args.processor", DEFAULT_PROCESSOR),
            ("PromptSetFile", "prompts.source", "pickscore:train"),
            ("PromptSetFile", "prompts.eval_source", "pickscore:test"),
        },
    }
    for name, expected in need.items():
        items = config_items(cfg_of(name))
        assert labels(items) == expected, name
        policy = next(i for i in items if i.key == "policy.pretrained")
        subfolders = SD3_SUBFOLDERS if name.startswith("sd35") else FLUX_SUBFOLDERS
        if name.startswith("qwenimage"):
            subfolders = QWENIMAGE_SUBFOLDERS
        assert set(policy.allow_patterns) == {"model_index.json", *(f"{s}/*" for s in subfolders)}
    hps = next(i for i in config_items(cfg_of("flux_schnell_hpsv2")) if i.key.startswith("rewards"))
    assert hps.allow_patterns == ("HPS_v2.1_compressed.pt",)  # one file of xswu/HPSv2, not its others
    paddle = config_items(cfg_of("sd35_ocr", ['rewards=[{"name": "ocr", "args": {"engine": "paddleocr"}}]']))
    assert [type(i).__name__ for i in paddle if i.key.startswith("rewards")] == ["EngineModels"]
    local = config_items(cfg_of("flux_pickscore", ["policy.pretrained=/some/folder", "prompts.source=x.txt"]))
    assert {(type(i).__name__, i.key) for i in local if isinstance(i, LocalPath)} == {
        ("LocalPath", "policy.pretrained"),
        ("LocalPath", "prompts.source"),
    }


# Real listings (huggingface.co, file names only): the root's single-file checkpoints and images must stay.
FLUX_DEV_ROOT_EXTRAS = ["flux1-dev.safetensors", "ae.safetensors", "README.md", "LICENSE.md", "dev_grid.jpg"]
CLIP_L = (
    "config.json flax_model.msgpack merges.txt model.safetensors preprocessor_config.json pytorch_model.bin "
)
CLIP_L += "special_tokens_map.json tf_model.h5 tokenizer.json tokenizer_config.json vocab.json README.md"


def test_a_repo_gives_its_loaded_subfolders_and_one_weight_format():
    from fastcps.fetch.items import transformers_model

    flux = cfg_of("flux_pickscore")
    item = config_items(flux)[0]
    listing = {f: 1 for f in FLUX_DEV_ROOT_EXTRAS}
    listing.update({f"{s}/config.json": 1 for s in FLUX_SUBFOLDERS})
    listing.update(
        {f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors": 1 for i in (1, 2, 3)}
    )
    listing["transformer/diffusion_pytorch_model.safetensors.index.json"] = 1
    listing["text_encoder/model.fp16.safetensors"] = 1  # a dtype variant: not what from_pretrained loads
    listing["text_encoder/model.safetensors"] = 1
    listing["vae/diffusion_pytorch_model.bin"] = 1  # a second format next to safetensors
    listing["vae/diffusion_pytorch_model.safetensors"] = 1
    chosen = set(hub.select(item, listing))
    assert not chosen & set(FLUX_DEV_ROOT_EXTRAS)
    assert {"text_encoder/model.fp16.safetensors", "vae/diffusion_pytorch_model.bin"}.isdisjoint(chosen)
    assert {f for f in listing if f.startswith("transformer/")} <= chosen
    clip = transformers_model("openai/clip-vit-large-patch14", "model", "CLIP")
    assert set(hub.select(clip, {f: 1 for f in CLIP_L.split()})) == {
        "config.json",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    }
    bin_only = {"config.json": 1, "pytorch_model.bin.index.json": 1, "pytorch_model-00001-of-00002.bin": 1}
    assert set(hub.select(clip, bin_only)) == set(bin_only)  # no safetensors: the .bin files


# --- a stand-in hub with tiny models under the real repo ids ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory):
    return hub_standin.tiny_repos(tmp_path_factory.mktemp("repos"))


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    return hub_standin.empty_hf_home(tmp_path, monkeypatch)


def flux_args(*sets):
    return ["--config", str(CONFIGS / "flux_pickscore.json")] + [a for s in sets for a in ("--set", s)]


def test_fetch_downloads_prints_sizes_and_a_second_run_finds_everything_cached(
    tiny_repos, hf_home, monkeypatch, capsys
):
    repos, _ = tiny_repos
    standin = StandinHub(repos).install(monkeypatch)
    assert main(flux_args() + ["--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert not standin.downloads and not (hf_home / "hub").exists()
    flux_item = config_items(cfg_of("flux_pickscore"))[0]
    flux_bytes = sum(
        len(repos[flux_item.repo_id][f])
        for f in hub.select(flux_item, {f: 0 for f in repos[flux_item.repo_id]})
    )
    assert f"{hub.human(flux_bytes)}  to download" in dry  # the hub's sizes of the files it would take
    assert "25432 prompts" in dry and "total " in dry

    assert main(flux_args()) == 0
    out = capsys.readouterr().out
    assert [r for r, _ in standin.downloads] == [
        "black-forest-labs/FLUX.1-dev",
        "yuvalkirstain/PickScore_v1",
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ]
    got = dict(standin.downloads)
    assert not {"flux1-dev.safetensors", "ae.safetensors", "README.md"} & set(
        got["black-forest-labs/FLUX.1-dev"]
    )
    assert got["yuvalkirstain/PickScore_v1"].count("pytorch_model.bin") == 0  # its safetensors is taken
    assert not [
        f for f in got["laion/CLIP-ViT-H-14-laion2B-s32B-b79K"] if f.endswith((".bin", ".safetensors"))
    ]
    assert "everything is here" in out and ".deepspeed_env" in out

    assert main(flux_args()) == 0
    again = capsys.readouterr().out
    assert len(standin.downloads) == 3  # nothing fetched twice
    rows = [line for line in again.splitlines() if line.startswith("  ")]
    assert len(rows) == 5 and all(("cached" in r) or ("shipped" in r) for r in rows), again

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, the cache alone says all is there
    assert main(flux_args()) == 0 and "cached" in capsys.readouterr().out


def test_fetch_offline_lists_unknown_sizes_and_fails_on_what_is_missing(hf_home, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(flux_args() + ["--dry-run"]) == 0
    assert "unknown  to download" in capsys.readouterr().out
    assert main(flux_args()) == 2
    err = capsys.readouterr().err
    assert (
        "black-forest-labs/FLUX.1-dev (config key `policy.pretrained`): not here and HF_HUB_OFFLINE=1" in err
    )


def gated(repo):
    from huggingface_hub.errors import GatedRepoError

    answer = SimpleNamespace(status_code=403, headers={}, request=None)  # what the error reads of a response
    return GatedRepoError(f"403 Client Error: access to {repo} is restricted", response=answer)


def test_a_gated_repo_fails_with_the_fix(tiny_repos, hf_home, monkeypatch, capsys):
    repos, _ = tiny_repos
    StandinHub({**repos, "black-forest-labs/FLUX.1-dev": gated("black-forest-labs/FLUX.1-dev")}).install(
        monkeypatch
    )
    assert main(flux_args()) == 2
    err = capsys.readouterr().err
    assert "black-forest-labs/FLUX.1-dev (config key `policy.pretrained`" in err
    assert "gated repo: accept the licence at https://huggingface.co/black-forest-labs/FLUX.1-dev" in err
    assert "HF_TOKEN" in err


def test_a_config_error_exits_2(capsys):
    assert main(flux_args("train.lrr=1")) == 2
    assert "train.lrr" in capsys.readouterr().err


# --- the loaders find what they open among the fetched files ------------------------------------------

LOADERS = r"""
import json, sys, torch
import fastcps.policies.flux as flux, fastcps.policies.sd3 as sd3
from fastcps.config import RunConfig, load_config
from fastcps.policies import build_policy
from fastcps.rewards import build_reward
from fastcps.fetch import config_items
from fastcps.fetch.hub import missing_locally

local = json.loads(sys.argv[1])  # the stand-ins' own folders: what the hub copies must load the same as
opened = {}
real = flux.load_component
def record(cls, path, subfolder, **kw):
    opened.setdefault(path, []).append(subfolder)
    return real(cls, path, subfolder, **kw)
flux.load_component = sd3.load_component = record
sets = ["policy.dtype=fp32", "policy.resolution=64", "policy.max_sequence_length=32", "policy.lora=null",
        "policy.offload_frozen=false", "prompts.source=pickscore:test"]
for name, folder in (("flux_pickscore", local["flux"]), ("sd35_ocr", local["sd3"])):
    cfg = load_config(RunConfig, f"configs/{name}.json", sets)
    assert not any(missing_locally(i) for i in config_items(cfg) if hasattr(i, "repo_id"))
    hub_policy = build_policy(cfg.policy, "cpu")
    own_cfg = load_config(RunConfig, f"configs/{name}.json", sets + [f"policy.pretrained={folder}"])
    own = build_policy(own_cfg.policy, "cpu")
    for a, b in zip(hub_policy.encode(["a cat", "a dog"]).values(), own.encode(["a cat", "a dog"]).values()):
        assert torch.equal(a, b), name
    for (k, a), b in zip(hub_policy.transformer.state_dict().items(), own.transformer.state_dict().values()):
        assert torch.equal(a, b), k
images = torch.rand(2, 3, 40, 48)
prompts = ["a cat", "a red dog"]
pick = build_reward("pickscore", {})(images, prompts)
own = {"model": local["clip"] + "/model", "processor": local["clip"] + "/processor"}
assert torch.equal(pick, build_reward("pickscore", own)(images, prompts))
hps = build_reward("hpsv2", {"model_config": local["hps_cfg"]})(images, prompts)
own = {"checkpoint": local["hps"], "model_config": local["hps_cfg"]}
assert torch.equal(hps, build_reward("hpsv2", own)(images, prompts))
print("OPENED " + json.dumps(opened))
"""


@pytest.mark.slow
def test_the_loaders_open_nothing_but_the_fetched_files(tiny_repos, hf_home, monkeypatch, capsys):
    """Fetch into an empty cache, then load offline from the hub ids: every loader finds what it opens, and
    what it loads equals the stand-in's own folder (a tokenizer missing its vocabulary would load empty)."""
    repos, hps_cfg = tiny_repos
    StandinHub(repos).install(monkeypatch)
    hps = ['rewards=[{"name": "hpsv2", "args": {"model_config": "%s"}}]' % hps_cfg, "prompts.source=ocr:test"]
    assert main(flux_args()) == 0
    assert main(["--config", str(CONFIGS / "sd35_ocr.json")] + [a for s in hps for a in ("--set", s)]) == 0
    capsys.readouterr()
    root = hps_cfg.parent
    local = {"flux": root / "flux", "sd3": root / "sd3", "clip": root / "clip", "hps": root / "hps_tiny.pt"}
    local = {k: str(v) for k, v in {**local, "hps_cfg": hps_cfg}.items()}
    env = child_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, "-c", LOADERS, json.dumps(local)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    opened = json.loads(r.stdout.split("OPENED ", 1)[1])
    assert set(opened["black-forest-labs/FLUX.1-dev"]) == set(FLUX_SUBFOLDERS)
    assert set(opened["stabilityai/stable-diffusion-3.5-medium"]) == set(SD3_SUBFOLDERS)


def test_a_missing_shard_is_named(tiny_repos, hf_home, monkeypatch):
    repos, _ = tiny_repos
    StandinHub(repos).install(monkeypatch)
    assert main(flux_args()) == 0
    item = config_items(cfg_of("flux_pickscore"))[0]
    assert hub.missing_locally(item) == []
    shard = sorted((hub.snapshot(item) / "transformer").glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    assert hub.missing_locally(item) == [f"transformer/{shard.name}"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match=rf"policy\.pretrained: black-forest-labs/FLUX\.1-dev.*{shard.name}"
    ):
        ensure_local(cfg_of("flux_pickscore"))


def test_a_cached_repo_stays_usable_when_the_hub_cannot_be_reached(tiny_repos, hf_home, monkeypatch, capsys):
    repos, _ = tiny_repos
    StandinHub(repos).install(monkeypatch)
    assert main(flux_args()) == 0
    down = ConnectionError("Name or service not known")
    StandinHub({r: down for r in repos}).install(monkeypatch)
    assert main(flux_args()) == 0  # everything is here: a run can start
    out = capsys.readouterr().out
    assert out.count("not checked with the hub") == 3 and "Name or service not known" in out
    hps = ["--set", 'rewards=[{"name": "hpsv2"}]']
    assert main(flux_args() + hps) == 2  # not here, and the hub unreachable: a clear failure
    err = capsys.readouterr().err
    assert "xswu/HPSv2 (config key `rewards.0.args.checkpoint`" in err and "is the hub reachable" in err
