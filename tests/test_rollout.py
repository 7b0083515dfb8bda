"""The rollout's contract (fastcps.rollout), in one process: which prompt slots each rank samples, a sample's
noise and trajectory whatever its batch or rank, the prompt-encoding cache, the eval set and its noise. The
same across real processes: tests/test_wiring_runs.py; rollout vs training log-probs:
tests/test_rollout_training_agreement.py."""

import threading
import time

import numpy as np
import pytest
import torch

import fastcps.rollout as rollout_mod
from fastcps.policies import build_policy
from fastcps.prompts import load_prompts
from fastcps.rollout import (
    PromptEncodings,
    Trajectory,
    epoch_slots,
    epoch_steps,
    eval_noise,
    eval_prompt_set,
    initial_noise,
    sample,
    sampling_steps,
    select,
)
from fastcps.runtime import derive_seed, synchronize, to_device
from fastcps.samplers import step_coeffs
from wiring_support import brightness_reward, toy_config, toy_rollout

CPU = torch.device("cpu")


def toy(sets=()):
    cfg = toy_config(["sampler.num_steps=4", *sets])
    return cfg, build_policy(cfg.policy, "cpu")


def test_derive_seed_is_a_31_bit_hash_of_all_its_parts_in_order():
    seeds = [derive_seed(0, e, 2, i) for e in range(20) for i in range(50)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)
    assert {s & 1 for s in seeds} == {0, 1} and max(seeds) >= 2**30  # all 31 bits are used
    assert derive_seed(1, 2) != derive_seed(2, 1) and derive_seed(7, 1) != derive_seed(7, 2)
    assert derive_seed(7, 0) == derive_seed(7)  # SeedSequence drops trailing zeros (see the docstring)
    assert derive_seed(-1) == derive_seed(2**32 - 1)  # negative parts are taken as 32-bit words
    # Pinned: every run's prompts, noise and minibatch orders follow from derive_seed; another value here
    # means a resumed checkpoint of an older run would continue with other samples than it started with.
    assert (derive_seed(0, 0, 1), derive_seed(0, 0, 2, 0)) == (1683718082, 779308542)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_epoch_slots_deal_k_copies_of_each_chosen_prompt_over_the_ranks(world):
    cfg, _ = toy(["train.prompts_per_epoch=4", "train.images_per_prompt=2"])  # 8 samples an epoch
    parts = [epoch_slots(cfg, 3, 10, rank, world) for rank in range(world)]
    chosen, one_rank, _ = epoch_slots(cfg, 3, 10, 0, 1)
    assert all(np.array_equal(c, chosen) for c, _, _ in parts)  # every rank draws the same prompts
    assert len(set(chosen.tolist())) == 4 and all(0 <= c < 10 for c in chosen)
    assert [len(s) for _, s, _ in parts] == [8 // world] * world
    assert np.array_equal(np.concatenate([s for _, s, _ in parts]), one_rank)  # one order, cut into shares
    assert [lo for *_, lo in parts] == [rank * 8 // world for rank in range(world)]  # first global sample
    assert sorted(one_rank.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3] and one_rank.tolist() != sorted(
        one_rank.tolist()
    )
    nxt, nxt_slots, _ = epoch_slots(cfg, 4, 10, 0, 1)
    assert not (
        np.array_equal(nxt, chosen) and np.array_equal(nxt_slots, one_rank)
    )  # another epoch, another draw
    other_run, _ = toy(["seed=1", "train.prompts_per_epoch=4", "train.images_per_prompt=2"])
    run_chosen, run_slots, _ = epoch_slots(other_run, 3, 10, 0, 1)
    assert not (
        np.array_equal(run_chosen, chosen) and np.array_equal(run_slots, one_rank)
    )  # another run seed too


def test_epoch_slots_repeat_prompts_only_when_the_pool_is_too_small():
    cfg, _ = toy(["train.prompts_per_epoch=4", "train.images_per_prompt=2"])
    assert sorted(epoch_slots(cfg, 0, 4, 0, 1)[0].tolist()) == [0, 1, 2, 3]  # as many as needed: no repeat
    small = epoch_slots(cfg, 0, 3, 0, 1)[0]
    assert len(small) == 4 and set(small.tolist()) <= {0, 1, 2}


def test_a_samples_noise_and_trajectory_do_not_depend_on_its_batch():
    """Samples 0-3 as one batch and as two batches (first_index 0 and 2, as two ranks would run them):
    the same x1, the same per-step noise, the same stored steps. Another epoch's seed parts: other noise."""
    cfg, policy = toy()
    sampling = epoch_steps(cfg, 0, policy)
    x1 = initial_noise(policy, (0, 0, 3), [0, 1, 2, 3], CPU)
    assert torch.equal(x1[2:], initial_noise(policy, (0, 0, 3), [2, 3], CPU))
    assert not torch.equal(x1, initial_noise(policy, (0, 1, 3), [0, 1, 2, 3], CPU))
    assert x1.dtype == torch.float32 and x1.shape == (4, *policy.latent_shape())
    pool = load_prompts("digits")[0]
    cond, index = PromptEncodings(policy).for_prompts([pool[0], pool[5], pool[9], pool[5]], CPU)
    seeds = [derive_seed(0, 0, 2, i) for i in range(len(sampling.coeffs))]
    run = lambda s: sample(
        policy,
        policy.transformer,
        select(cond, index[s]),
        x1[s],
        sampling,
        step_seeds=seeds,
        first_index=s.start,
    )
    whole, halves = run(slice(0, 4)), [run(slice(0, 2)), run(slice(2, 4))]
    for field in Trajectory._fields:
        torch.testing.assert_close(
            torch.cat([getattr(h, field) for h in halves]),
            getattr(whole, field),
            rtol=1e-5,
            atol=1e-6,
            msg=field,
        )
    j = len(sampling.trained)
    assert sampling.trained == list(range(j)) and j == 3  # cps, 4 steps: the last one has no noise
    assert whole.x_t.shape == whole.x_next.shape == (
        4,
        j,
        *policy.latent_shape(),
    ) and whole.log_prob.shape == (4, j)
    assert torch.equal(whole.x_t[:, 0], x1) and torch.equal(whole.x_t[:, 1:], whole.x_next[:, :-1])
    assert torch.isfinite(whole.log_prob).all() and not torch.equal(whole.final, whole.x_next[:, -1])


def test_prompt_encodings_encode_each_prompt_once_and_index_its_rows(monkeypatch):
    _, policy = toy()
    real, calls = policy.encode, []
    monkeypatch.setattr(
        policy, "encode", lambda prompts, meta=None: (calls.append(list(prompts)), real(prompts, meta))[1]
    )
    enc = PromptEncodings(policy)
    cond, index = enc.for_prompts(["b", "a", "b"], CPU)
    assert calls == [["b", "a"]] and index.tolist() == [0, 1, 0] and index.dtype == torch.long
    cond2, index2 = enc.for_prompts(["a", "c"], CPU)
    assert calls == [["b", "a"], ["c"]] and index2.tolist() == [0, 1]  # only the new prompt is encoded
    for got, prompts in ((cond, ["b", "a"]), (cond2, ["a", "c"])):
        want = real(prompts)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, cond[k][[0, 1, 0]]) for k, v in select(cond, index).items())


@pytest.mark.parametrize("n, picked", [(4, [0, 10, 20, 30]), (40, list(range(40))), (99, list(range(40)))])
def test_eval_set_spreads_its_prompts_over_the_pool(n, picked):
    cfg, _ = toy([f"eval.num_prompts={n}"])
    pool, meta = load_prompts("digits")
    prompts, prompt_meta = eval_prompt_set(cfg)
    assert prompts == [pool[i] for i in picked] and prompt_meta == [meta[i] for i in picked]


def test_eval_noise_gives_every_image_of_every_prompt_its_own_draw():
    _, policy = toy()
    x = torch.cat([eval_noise(policy, 0, p, 3, CPU) for p in range(3)])
    assert x.shape == (9, *policy.latent_shape())
    assert len({tuple(row.flatten()[:4].tolist()) for row in x}) == 9  # no image shares another's x1
    assert torch.equal(x[3:6], eval_noise(policy, 0, 1, 3, CPU)) and not torch.equal(
        x[:3], eval_noise(policy, 1, 0, 3, CPU)
    )


def test_the_gpu_branches_pin_and_synchronize_only_for_cuda(monkeypatch):
    """to_device/synchronize's CUDA paths, with torch.cuda stubbed (no GPU here): a host tensor bound for a
    GPU goes through pinned memory without blocking; a CPU target is a plain copy; only a CUDA device is
    synchronised, that device."""
    moves, syncs = [], []

    class Pinned:
        def to(self, device, non_blocking=False):
            moves.append((device, non_blocking))
            return "moved"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: Pinned())
    gpu = torch.device("cuda", 1)
    assert to_device(torch.ones(2), gpu) == "moved" and moves == [(gpu, True)]
    assert torch.equal(to_device(torch.ones(2), CPU), torch.ones(2)) and len(moves) == 1
    synchronize("cpu")
    synchronize(gpu)
    assert syncs == [gpu]


def test_two_ranks_roll_out_the_one_rank_epoch_cut_in_two():
    """In process, what tests/test_wiring_runs.py checks across processes: rank r of 2 samples the one-rank
    epoch's samples r·n .. (r+1)·n − 1, with the same prompts, noise, steps and rewards; so do rollout batches
    of 4 instead of 2; a repeat of the epoch is the same to the bit; the reward timers count the reward calls
    (busy) and what of them the sampling did not hide (at least the last batch's)."""
    cfg, policy = toy(
        ["train.prompts_per_epoch=2", "train.images_per_prompt=4", "train.rollout_batch_size=2"]
    )
    t0 = time.perf_counter()
    one = toy_rollout(cfg, policy, 1, reward=brightness_reward(delay=0.05))  # 8 samples in 4 rollout batches
    wall = time.perf_counter() - t0
    assert 4 * 0.05 <= one.reward_busy_time < min(wall, 4 * 0.05 + 0.5)
    assert 0.05 <= one.reward_time < wall
    ranks = [toy_rollout(cfg, policy, 1, rank=r, world=2) for r in range(2)]
    for field in ("x_t", "x_next", "log_prob", "reward", "group"):
        torch.testing.assert_close(
            torch.cat([getattr(d, field) for d in ranks]),
            getattr(one, field),
            rtol=1e-5,
            atol=1e-6,
            msg=field,
        )
    assert sum((d.prompts for d in ranks), []) == one.prompts
    torch.testing.assert_close(
        torch.cat([d.components["brightness"] for d in ranks]), one.components["brightness"]
    )
    again = toy_rollout(cfg, policy, 1)
    assert all(
        torch.equal(getattr(again, f), getattr(one, f)) for f in ("x_t", "x_next", "log_prob", "reward")
    )
    cfg4, _ = toy(["train.prompts_per_epoch=2", "train.images_per_prompt=4", "train.rollout_batch_size=4"])
    wide = toy_rollout(cfg4, policy, 1)  # batches of 4: each sample keeps its own step noise
    for field in ("x_t", "x_next", "log_prob", "reward"):
        torch.testing.assert_close(getattr(wide, field), getattr(one, field), rtol=1e-5, atol=1e-6, msg=field)
    assert one.preview.shape[0] == 2 and one.x_t.shape[0] == 8  # the first rollout batch's images:
    torch.testing.assert_close(
        one.preview.float().mean(dim=(1, 2, 3)), one.reward[:2]
    )  # (reward = brightness)
    assert torch.equal(ranks[0].preview, one.preview)


def test_each_step_of_each_epoch_of_each_run_draws_its_own_noise(monkeypatch):
    """The Philox seeds rollout_epoch hands to ``sample``: one per step, all different, and different for
    another epoch or another run seed."""
    seen = {}
    real = rollout_mod.sample
    monkeypatch.setattr(
        rollout_mod,
        "sample",
        lambda *a, step_seeds, **kw: (
            seen.setdefault(key, step_seeds),
            real(*a, step_seeds=step_seeds, **kw),
        )[1],
    )
    for key in [(0, 0), (0, 1), (1, 0)]:
        cfg, policy = toy(
            [
                f"seed={key[0]}",
                "train.prompts_per_epoch=1",
                "train.images_per_prompt=2",
                "train.rollout_batch_size=2",
            ]
        )
        toy_rollout(cfg, policy, key[1])
    assert all(len(s) == 4 for s in seen.values())  # one seed per step
    every = [s for seeds in seen.values() for s in seeds]
    assert len(set(every)) == len(every)


@pytest.mark.parametrize("logprob, kl", [("gaussian", "paper"), ("paper", "flow_grpo")])
def test_epoch_plan_uses_the_configured_logprob_and_kl_forms(logprob, kl):
    cfg, policy = toy([f"sampler.logprob={logprob}", f"sampler.kl={kl}"])
    sampling, default = epoch_steps(cfg, 0, policy), epoch_steps(toy()[0], 0, policy)
    sigmas = policy.sigmas(4, device="cpu")
    want = step_coeffs(
        "cps", sigmas[0], sigmas[1], cfg.sampler.eta, sigma_max=sigmas[1], logprob=logprob, kl=kl
    )
    assert all(torch.equal(a, b) for a, b in zip(sampling.coeffs[0], want))
    assert not all(
        torch.equal(a, b) for a, b in zip(sampling.coeffs[0], default.coeffs[0])
    )  # the forms matter here


@pytest.mark.parametrize("sampler", ["cps", "flow_sde"])
def test_epoch_plan_steps_with_the_configured_eta(sampler):
    """η sets each stochastic step's noise share: the plan's coefficients are step_coeffs' at the configured η
    (and flow_sde's σ = 1 step takes the schedule's second σ for σ_max, as Flow-GRPO does)."""
    cfg, policy = toy(["sampler.eta=0.3", f"sampler.name={sampler}"])
    sampling, default = (
        epoch_steps(cfg, 0, policy),
        epoch_steps(toy([f"sampler.name={sampler}"])[0], 0, policy),
    )
    sigmas = policy.sigmas(4, device="cpu")
    assert float(sigmas[0]) == 1.0 and sampling.trained
    for i in sampling.trained:
        want = step_coeffs(sampler, sigmas[i], sigmas[i + 1], 0.3, sigma_max=sigmas[1])
        assert all(torch.equal(a, b) for a, b in zip(sampling.coeffs[i], want)), i
    assert toy()[0].sampler.eta != 0.3 and not torch.equal(sampling.coeffs[0].s, default.coeffs[0].s)


def test_plan_steps_computes_in_fp32_whatever_the_schedules_dtype():
    """The steps' σ (the model's timesteps) and coefficients are fp32 (the kernels' dtype) from a float64
    schedule too."""
    _, policy = toy()
    sigmas = policy.sigmas(4, device="cpu")
    sampling, wide = sampling_steps("cps", 0.7, sigmas), sampling_steps("cps", 0.7, sigmas.double())
    assert sampling.sigmas.dtype == wide.sigmas.dtype == torch.float32 and torch.equal(
        sampling.sigmas, wide.sigmas
    )
    assert all(
        torch.equal(a, b) and a.dtype == b.dtype
        for c, w in zip(sampling.coeffs, wide.coeffs)
        for a, b in zip(c, w)
    )


def test_prompt_encodings_keep_the_most_recently_used_within_their_bytes(monkeypatch):
    """A bound of two prompts' encodings: the least recently used goes first, a prompt of the current
    call is used before it may go, an evicted prompt is encoded again (and equal) when it comes back."""
    _, policy = toy()
    real, calls = policy.encode, []
    monkeypatch.setattr(
        policy, "encode", lambda prompts, meta=None: (calls.append(list(prompts)), real(prompts, meta))[1]
    )
    one = sum(t.nbytes for t in real(["a"]).values())
    enc = PromptEncodings(policy, max_bytes=2 * one)
    enc.for_prompts(["a", "b"], CPU)
    enc.for_prompts(["a"], CPU)  # a is now the most recent: c pushes b out
    enc.for_prompts(["c"], CPU)
    assert list(enc.host) == ["a", "c"] and enc.nbytes == 2 * one
    cond, index = enc.for_prompts(["b", "d", "e"], CPU)  # three at once: all encoded, used, then bounded
    assert calls == [["a", "b"], ["c"], ["b", "d", "e"]] and index.tolist() == [0, 1, 2]
    assert list(enc.host) == ["d", "e"] and enc.nbytes == 2 * one
    want = real(["b", "d", "e"])
    assert all(torch.equal(cond[k], want[k]) for k in want)


def test_a_negative_prompt_cache_is_refused_with_its_key():
    from fastcps.config import validate_tree

    cfg, _ = toy(["policy.prompt_cache_gib=0"])
    validate_tree(cfg, world_size=1)  # 0: every prompt encoded each time it is used
    message = r"config key 'policy.prompt_cache_gib': expected float >= 0.0, got -0.5 \(float\)"
    with pytest.raises(ValueError, match=message):  # when the config loads
        toy(["policy.prompt_cache_gib=-0.5"])
    cfg.policy.prompt_cache_gib = -0.5
    with pytest.raises(ValueError, match=message):  # and when set in code after that
        validate_tree(cfg, world_size=1)


class Recorded:
    """A reward (``RewardOutput``) that records the thread of each call, sleeps ``delay`` s per call (so the
    sampler runs meanwhile), and raises on call number ``fail_at``."""

    def __init__(self, inner, delay=0.0, fail_at=None):
        self.inner, self.delay, self.fail_at = inner, delay, fail_at
        self.threads, self.calls, self.prompts, self.totals = [], 0, [], []

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        if self.calls == self.fail_at:
            explode_in_the_reward(self.calls)
        out = self.inner(images, prompts, metadata)
        self.prompts += prompts
        self.totals.append(out.total)
        return out


def explode_in_the_reward(n):
    raise ValueError(f"reward call {n} failed")


def test_overlapped_rewards_give_the_synchronous_epoch_to_the_bit():
    """Scoring batch i on a worker thread while batch i+1 denoises changes no value and no order: the
    digit classifier and JPEG sizes (a model and host work) give the EpochData of the synchronous loop."""
    from fastcps.rewards import WeightedReward

    cfg, policy = toy(
        ["train.prompts_per_epoch=3", "train.images_per_prompt=4", "train.rollout_batch_size=2"]
    )
    specs = [("digit", 1.0, {}), ("jpeg_compressibility", 0.1, {})]
    runs = {}
    for overlap in (False, True):
        reward = Recorded(WeightedReward(specs), delay=0.02)
        runs[overlap] = toy_rollout(cfg, policy, 2, reward=reward, overlap_rewards=overlap)
        main = threading.current_thread().name
        assert reward.calls == 6 and all((t != main) == overlap for t in reward.threads), reward.threads
        # each batch's scores sit in the rows of the batch scored, in rollout order
        assert reward.prompts == runs[overlap].prompts and torch.equal(
            torch.cat(reward.totals), runs[overlap].reward
        )
    sync, over = runs[False], runs[True]
    for field in ("x_t", "x_next", "log_prob", "reward", "group", "cond_index", "preview"):
        assert torch.equal(getattr(over, field), getattr(sync, field)), field
    assert over.components.keys() == sync.components.keys() == {"digit", "jpeg_compressibility"}
    assert all(torch.equal(over.components[k], sync.components[k]) for k in sync.components)
    assert over.prompts == sync.prompts and len(set(over.reward.tolist())) > 1
    assert sync.reward_time >= sync.reward_busy_time >= 6 * 0.02  # synchronous: nothing hidden
    assert over.reward_busy_time >= 6 * 0.02
    assert not [t for t in threading.enumerate() if t.name.startswith("fastcps-reward")]  # worker gone


@pytest.mark.parametrize("overlap", [True, False])
def test_a_reward_exception_reaches_the_caller_with_its_traceback(overlap):
    import traceback

    cfg, policy = toy(
        ["train.prompts_per_epoch=2", "train.images_per_prompt=4", "train.rollout_batch_size=2"]
    )
    reward = Recorded(brightness_reward(), fail_at=2)
    with pytest.raises(ValueError, match="reward call 2 failed") as err:
        toy_rollout(cfg, policy, 0, reward=reward, overlap_rewards=overlap)
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert "explode_in_the_reward" in frames and "rollout_epoch" in frames
    assert reward.calls <= 3  # raised at most one batch late, the rest never scored
    assert not [t for t in threading.enumerate() if t.name.startswith("fastcps-reward")]


def test_a_stop_leaves_the_rollout_after_the_batch_in_flight():
    """check_stop raising (a SIGTERM) ends the rollout at once: a reward call in flight finishes, one
    still queued is dropped, no later batch is sampled or scored, no worker thread is left behind."""

    class Stop(Exception):
        pass

    cfg, policy = toy(
        ["train.prompts_per_epoch=2", "train.images_per_prompt=4", "train.rollout_batch_size=2"]
    )
    reward, checks = Recorded(brightness_reward(), delay=0.1), []

    def check_stop():
        checks.append(reward.calls)
        if len(checks) == 2:
            raise Stop()

    with pytest.raises(Stop):
        toy_rollout(cfg, policy, 0, reward=reward, check_stop=check_stop)
    assert len(checks) == 2 and 1 <= reward.calls <= 2
    assert not [t for t in threading.enumerate() if t.name.startswith("fastcps-reward")]
