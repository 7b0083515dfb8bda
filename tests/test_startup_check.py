"""The trainer's start-up check (fastcps.fetch.ensure_local) and its eager loading: every file the config
needs is on the node before anything loads (offline: a clear error on every rank at once; online: each
rank downloads what its node lacks, then loads), and every reward model loads before the first collective
(lazily as before for a reward used on its own)."""

import logging
import sys
import time

import pytest
import hub_standin
from hub_standin import StandinHub, cfg_of
from multi_run import child_env, free_port, start, stop

from fastcps.fetch import ensure_local


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory):
    return hub_standin.tiny_repos(tmp_path_factory.mktemp("repos"))


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    return hub_standin.empty_hf_home(tmp_path, monkeypatch)


def test_offline_and_missing_fails_at_once_naming_repo_key_and_fix(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        ensure_local(cfg_of("flux_schnell_hpsv2"))
    assert time.perf_counter() - t0 < 30
    msg = str(err.value)
    for part in (
        "HF_HUB_OFFLINE=1",
        "policy.pretrained: black-forest-labs/FLUX.1-schnell",
        "rewards.0.args.checkpoint: xswu/HPSv2",
        "prompts.source: hpd:train",
        "python -m fastcps.fetch --config",
        "shared HF_HOME",
        ".deepspeed_env",
    ):
        assert part in msg, part
    assert "pickscore:test" not in msg  # shipped: never missing


def test_online_and_missing_downloads_first_and_says_so(tiny_repos, hf_home, monkeypatch, caplog):

    repos, _ = tiny_repos
    standin = StandinHub(repos).install(monkeypatch)
    cfg = cfg_of("flux_pickscore")
    with caplog.at_level(logging.WARNING, logger="fastcps"):
        ensure_local(cfg)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "lacks files the run needs" in said and "every rank downloads what its node lacks now" in said
    assert "black-forest-labs/FLUX.1-dev" in said and len(standin.downloads) == 3
    caplog.clear()
    listed = len(standin.listed)
    ensure_local(cfg)  # all there: no hub call at all
    assert len(standin.listed) == listed and len(standin.downloads) == 3 and not caplog.records
    assert ensure_local(cfg, policy=False) is None  # a given policy object: its files are not looked for


def test_a_local_path_that_does_not_exist_fails_online_too(hf_home):
    with pytest.raises(FileNotFoundError, match=r"rewards\.0\.args\.head: \(not set\)"):
        ensure_local(cfg_of("digits_cps", ['rewards=[{"name": "aesthetic"}]']))


@pytest.mark.slow
def test_two_ranks_with_an_empty_cache_offline_exit_2_at_start_up(tmp_path):
    """Today's code loaded the reward inside the first eval, after DeepSpeed started (exit 3 there, or a
    collective timeout on the ranks that had the files); now every rank stops before loading anything."""
    from test_trainer import CONFIG, TINY, sets

    two = ["train.prompts_per_epoch=3", "train.rollout_batch_size=6", "train.minibatch_size=3"]
    reward = 'rewards=[{"name": "digit"}, {"name": "pickscore"}]'
    run = sets(TINY + two + [f"output_dir={tmp_path}", "train.num_epochs=1", reward])
    port, procs, t0 = free_port(), [], time.perf_counter()
    try:
        for rank in range(2):
            env = child_env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                HF_HOME=str(tmp_path / "empty"),
                HF_HUB_OFFLINE="1",
            )
            env.pop("FASTCPS_CACHE", None)
            procs.append(start([sys.executable, "-m", "fastcps.train", "--config", CONFIG] + run, env))
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            stop(p)
    took = time.perf_counter() - t0
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 2, f"rank {rank} exited {p.returncode}:\n{log[-3000:]}"
        assert (
            "rewards.1.args.model: yuvalkirstain/PickScore_v1" in log and "python -m fastcps.fetch" in log
        ), log[-3000:]
        assert "eval/" not in log and "epoch 1/1" not in log
    assert took < 240, took  # imports and the process group's start on a loaded 2-core machine


def test_rewards_load_at_start_up_for_the_trainer_and_on_first_call_for_direct_users(tmp_path, monkeypatch):
    import torch
    from tiny_rewards import _tiny_hf_clip

    from fastcps.rewards import RewardFailed, WeightedReward, build_reward

    _tiny_hf_clip(tmp_path)
    args = {"model": str(tmp_path / "model"), "processor": str(tmp_path / "processor"), "max_length": 16}
    both = WeightedReward([("pickscore", 1.0, args), ("digit", 1.0, {}), ("jpeg_compressibility", 1.0, {})])
    pick, digit = both.parts[0][2], both.parts[1][2]
    assert pick._model is None and digit._model is None
    both.load("cpu")  # the trainer's call
    assert pick._model is not None and digit._model is not None
    direct = build_reward("pickscore", args)  # lazy as before: loads on its first call
    assert direct._model is None
    assert direct(torch.rand(1, 3, 32, 32), ["a cat"]).shape == (1,) and direct._model is not None
    monkeypatch.delenv("FASTCPS_GENEVAL_URL", raising=False)
    with pytest.raises(RewardFailed, match=r"reward 'geneval' could not load: .*rewards\[\]\.args\.url"):
        WeightedReward([("geneval", 1.0, {"detector": "server"})]).load("cpu")
    with pytest.raises(FileNotFoundError, match=r"rewards\[\]\.args\.model"):
        WeightedReward([("pickscore", 1.0, {**args, "model": str(tmp_path / "none")})]).load("cpu")
