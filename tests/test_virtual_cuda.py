"""Virtual CUDA: the trainer's tensor paths with every model tensor on a fake CUDA device.

The class of bug this file exists for: a tensor on the wrong device, or a host synchronisation, in the
code that only a GPU run would exercise. The CPU suite cannot see either: on a CPU every tensor is on
the same device and reading a value costs nothing. The first of them was real: on main at 1fd2617 the
rewards were moved to the CPU, ``distributed.all_gather_cat`` returned CPU tensors, and the advantages
met CUDA log-probs in ``grpo_loss`` (``-adv * ratio``): the first update on a GPU would have raised.
Run against that code, ``test_rollout_and_micro_step_on_fake_cuda`` fails the same way
(``FakeTensorDeviceMismatchError`` in ``grpo_loss``); it passes now because ``epoch_advantages`` moves
them to the model's device once per epoch.

What runs here, for the toy, tiny FLUX and tiny SD3 (true CFG), LoRA and full fine-tuning, with
β_KL > 0 (the reference forward): the trainer's own functions — ``epoch_steps`` (host values),
``rollout_epoch`` (several steps, an SDE window, decode, rewards), ``epoch_advantages``, ``minibatches``,
``recompute_old_logprobs`` and ``micro_step_loss`` — on fake CUDA tensors; the rollout steps and the
loss micro-step under ``NoHostTraffic`` (no value read on the host, nothing moved between devices);
and the micro-step's backward on fake CPU tensors (the autograd engine needs a real CUDA context for a
backward on CUDA tensors), which must reach every trained parameter and no frozen one.
"""

import os
from pathlib import Path

import pytest
import torch
from fake_cuda import (  # noqa: E402
    HostSyncError,
    NoHostTraffic,
    fake_policy,
    full_size_transformer,
    rollout_and_micro_step,
)
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from wiring_support import FlagOptimizer, RecordingEngine, toy_config  # noqa: E402

from fastcps.config import RunConfig, load_config
from fastcps.policies import build_policy
from fastcps.prompts import load_prompts
from fastcps.rewards import RewardOutput
from fastcps.rollout import PromptEncodings, epoch_steps, rollout_epoch, sample, select
from fastcps.testing import save_tiny_flux, save_tiny_sd3  # noqa: E402
from fastcps.update import epoch_advantages, micro_step_loss, minibatches, recompute_old_logprobs, run_update

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")
# 4 steps with a 2-step SDE window, 2 prompts x 2 images, rollout batch 2, minibatch 2, beta_KL > 0.
COMMON = [
    "sampler.num_steps=4",
    "sampler.sde_window_size=2",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=2",
    "train.rollout_batch_size=2",
    "train.minibatch_size=2",
    "train.beta_kl=0.01",
]
CASES = {
    "toy-full": [],
    "toy-lora": ['policy.lora={"r": 4, "alpha": 8}'],
    "flux-lora": [
        "policy.name=flux",
        "policy.resolution=64",
        "policy.max_sequence_length=32",
        "policy.guidance=3.5",
        'policy.lora={"r": 4, "alpha": 8}',
    ],
    "flux-lora-ckpt": [
        "policy.name=flux",
        "policy.resolution=64",
        "policy.max_sequence_length=32",
        "policy.guidance=3.5",
        'policy.lora={"r": 4, "alpha": 8}',
        "policy.gradient_checkpointing=true",
    ],
    "flux-full": [
        "policy.name=flux",
        "policy.resolution=64",
        "policy.max_sequence_length=32",
        "policy.guidance=3.5",
    ],
    "sd3-cfg-lora": [
        "policy.name=sd3",
        "policy.resolution=64",
        "policy.max_sequence_length=32",
        "policy.cfg_scale=4.5",
        'policy.lora={"r": 4, "alpha": 8}',
    ],
    "sd3-cfg-full": [
        "policy.name=sd3",
        "policy.resolution=64",
        "policy.max_sequence_length=32",
        "policy.cfg_scale=4.5",
    ],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"flux": save_tiny_flux(root / "flux"), "sd3": save_tiny_sd3(root / "sd3")}


class HostReward:
    """Scores like ``WeightedReward``: one fp32 value per image, on the CPU (rewards may compute
    where they like; the trainer moves what the update needs)."""

    parts = [("host", 1.0, None)]

    def __init__(self, device):
        self.device = device

    def __call__(self, images, prompts, metadata):
        assert images.device.type == self.device.type and images.shape[:2] == (len(prompts), 3), images
        r = torch.rand(len(prompts))
        return RewardOutput(r, {"host": r})


def build(case: str, tiny, device="cpu"):
    sets = COMMON + CASES[case]
    if "policy.name=flux" in sets:
        sets.append(f"policy.pretrained={tiny['flux']}")
    if "policy.name=sd3" in sets:
        sets.append(f"policy.pretrained={tiny['sd3']}")
    cfg = toy_config(sets)
    policy = build_policy(cfg.policy, "cpu")
    if cfg.policy.lora is None and cfg.policy.name != "toy":
        with policy.reference(policy.transformer):  # full FT loads its frozen base on first use: do it now
            pass
    return cfg, policy


def on(device: torch.device, *tensors):
    for t in tensors:
        assert t.device.type == device.type, f"{tuple(t.shape)} on {t.device}, expected {device}"


def epoch_on_fake(cfg, policy, device):
    """The trainer's epoch up to one micro-step's loss, with the policy on a fake ``device``."""
    sampling = epoch_steps(cfg, 0, policy)  # host values, before any fake tensor
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_policy(policy, mode, device)
    with mode:
        encodings = PromptEncodings(policy)
        data = rollout_epoch(
            cfg,
            0,
            sampling,
            policy,
            policy.transformer,
            HostReward(device),
            encodings,
            load_prompts("digits"),
            device=device,
        )
        adv = epoch_advantages(data, cfg.train, device)
        batches = minibatches(data.x_t.shape[0], cfg.train.minibatch_size, (0, 0, 4, 0, 0), device)
        old = recompute_old_logprobs(
            policy, policy.transformer, data, batches, clip_range=cfg.train.clip_range
        )
        mb = batches[0]
        with NoHostTraffic():
            out, logp = micro_step_loss(
                policy,
                policy.transformer,
                data,
                mb,
                0,
                old[mb, 0],
                adv.local[mb],
                clip_range=cfg.train.clip_range,
                beta_kl=cfg.train.beta_kl,
            )
    return data, adv, old, out, logp, mode, sampling


@pytest.mark.parametrize("case", [c for c in CASES if c != "flux-lora-ckpt"])
def test_rollout_and_micro_step_on_fake_cuda(case, tiny):
    cfg, policy = build(case, tiny)
    data, adv, old, out, logp, mode, sampling = epoch_on_fake(cfg, policy, CUDA)
    n, j = 4, len(data.sampling.trained)
    assert j >= 1 and data.sampling.stochastic.count(True) == 2  # the window's noisy steps are trained
    assert data.x_t.shape[:2] == (n, j) and data.log_prob.shape == (n, j)
    on(
        CUDA,
        data.x_t,
        data.x_next,
        data.log_prob,
        data.cond_index,
        data.sampling.sigmas,
        *data.sampling.coeffs[0],
        *data.cond.values(),
        data.preview,
        adv.local,
        old,
        out.loss,
        out.kl_mean,
        logp,
    )
    assert data.reward.device.type == "cpu" and adv.rewards.shape == (n,)
    assert out.loss.shape == () and logp.shape == (cfg.train.minibatch_size,)

    # A rollout batch's steps (velocity, fused step, log-prob) neither read nor move device values.
    with mode, NoHostTraffic():
        x1 = torch.randn(2, *policy.latent_shape(), device=CUDA)
        traj = sample(
            policy,
            policy.transformer,
            select(data.cond, data.cond_index[:2]),
            x1,
            data.sampling,
            step_seeds=[1, 2, 3, 4],
        )
    on(CUDA, traj.final, traj.x_t, traj.log_prob)


@pytest.mark.parametrize("case", ["toy-full", "flux-lora-ckpt", "sd3-cfg-full"])
def test_micro_step_backward_reaches_the_trained_parameters(case, tiny):
    """The autograd graph of a micro-step, on fake CPU tensors: gradients reach every trained
    parameter (LoRA's, or all of the transformer's) and no frozen one (base weights, reference), also
    through gradient checkpointing's re-forwards (the FLUX recipe's LoRA + checkpointing)."""
    cfg, policy = build(case, tiny)
    trained = {n for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert trained
    *_, out, _, mode, _ = epoch_on_fake(cfg, policy, torch.device("cpu"))
    with mode:
        out.loss.backward()
    for name, p in policy.transformer.named_parameters():
        if name in trained:
            assert p.grad is not None and p.grad.shape == p.shape, f"trained {name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    if cfg.policy.lora is None and case.startswith("toy"):
        assert all(p.grad is None for p in policy._reference.parameters())


@pytest.mark.parametrize("case", ["toy-lora", "sd3-cfg-full"])
def test_update_loop_reads_nothing_on_the_host(case, tiny):
    """``run_update`` end to end (old log-probs recomputed, two passes, accumulation over minibatches
    and steps) under ``NoHostTraffic``: its statistics and non-finite flag stay on the device."""
    cfg, policy = build(case, tiny)
    cfg.train.num_inner_epochs, cfg.train.gradient_accumulation_steps = 2, 2
    data, adv, *_, mode, _ = epoch_on_fake(cfg, policy, CUDA)
    opt, skips = FlagOptimizer(), []
    engine = RecordingEngine(policy.transformer, opt)
    guard = NoHostTraffic(allow_uploads=True)
    with mode, guard:
        stats = run_update(
            engine,
            opt,
            policy,
            data,
            adv.local,
            cfg.train,
            epoch=0,
            seed=0,
            after_optimizer_step=skips.append,
        )
    assert guard.uploads == 2  # one minibatch order per pass
    j = len(data.sampling.trained)
    assert len(engine.losses) == 2 * 2 * j and engine.boundaries.count(True) == 2 == len(
        skips
    )  # 2 passes x 2 mb
    on(CUDA, stats.sums, stats.ratio_dev, *engine.losses)


def test_advantages_left_on_the_host_are_caught(tiny):
    """The guard works: advantages not moved to the device fail the micro-step as on a GPU."""
    cfg, policy = build("toy-full", tiny)
    data, adv, old, *_, mode, _ = epoch_on_fake(cfg, policy, CUDA)
    with mode:
        host_adv = torch.zeros(cfg.train.minibatch_size)  # what main at 1fd2617 handed over
        mb = minibatches(4, 2, (0,), CUDA)[0]
        with pytest.raises(FakeTensorDeviceMismatchError):
            micro_step_loss(
                policy,
                policy.transformer,
                data,
                mb,
                0,
                old[mb, 0],
                host_adv,
                clip_range=cfg.train.clip_range,
                beta_kl=0.0,
            )


def test_no_host_traffic_catches_a_sync_and_a_transfer():
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        x = torch.ones(3, device=CUDA)
        with NoHostTraffic(), pytest.raises(HostSyncError, match="read on the host"):
            float(x.sum())
        with NoHostTraffic(), pytest.raises(HostSyncError, match="moves data"):
            x.cpu()
        with NoHostTraffic():
            (x * torch.tensor(2.0)).sum()  # a 0-dim CPU scalar is fine


@pytest.mark.slow
def test_flux_dev_recipe_at_full_size_on_fake_cuda(tiny):
    """configs/flux_pickscore.json at FLUX.1-dev's real size: the 11.9 B-parameter transformer built from
    configs/models/flux1-dev_transformer.json (no weights: meta, then fake CUDA), LoRA r 64, bf16,
    gradient checkpointing, 512 px (1024 image + 128 text tokens), 6 steps with a 3-step SDE window,
    T5/CLIP-sized conditioning. Rollout, advantages and a training micro-step all stay on the device."""
    sets = [
        f"policy.pretrained={tiny['flux']}",
        "policy.offload_frozen=false",
        "train.prompts_per_epoch=1",
        "train.images_per_prompt=2",
        "train.rollout_batch_size=2",
        "train.minibatch_size=2",
        "train.gradient_accumulation_steps=1",
        "sampler.sde_window_range=[0, 1]",
    ]
    cfg = load_config(RunConfig, str(ROOT / "configs" / "flux_pickscore.json"), sets)
    policy = build_policy(cfg.policy, "cpu")  # tiny encoders and VAE; the transformer is replaced below
    assert full_size_transformer(policy, "flux", "flux1-dev_transformer.json", cfg.policy.lora) > 11.9e9
    sampling = epoch_steps(cfg, 0, policy)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_policy(policy, mode, CUDA)
    L = cfg.policy.max_sequence_length

    def encode(prompts, metadata=None):  # T5-XXL and CLIP-L shapes (the tiny pipeline's encoders are 32 wide)
        return {
            "encoder_hidden_states": torch.zeros(len(prompts), L, 4096, dtype=torch.bfloat16, device=CUDA),
            "pooled_projections": torch.zeros(len(prompts), 768, dtype=torch.bfloat16, device=CUDA),
        }

    policy.encode = encode
    with mode:
        data, out, logp = rollout_and_micro_step(
            cfg,
            sampling,
            policy,
            HostReward(CUDA),
            PromptEncodings(policy),
            load_prompts(cfg.prompts.source),
            CUDA,
            2,
        )
    assert data.x_t.shape == (2, 3, 1024, 64) and data.preview.shape == (2, 3, 512, 512)
    on(CUDA, data.x_t, data.log_prob, out.loss, logp)
    assert out.loss.requires_grad


@pytest.mark.slow
def test_sd35_large_recipe_at_full_size_on_fake_cuda(tiny):
    """configs/sd35l_geneval.json at SD3.5-Large's real size: the 8 B-parameter transformer built from
    configs/models/sd3.5-large_transformer.json (no weights: meta, then fake CUDA), LoRA r 32 on flow_grpo's
    SD3 targets, bf16, gradient checkpointing, 512 px (64 x 64 latents, 2x2 patches), true CFG (one forward
    of 2B), CLIP's 77 + T5's 128 text tokens, 10 steps with a 4-step SDE window. Rollout, advantages and a
    training micro-step all stay on the device."""
    sets = [
        f"policy.pretrained={tiny['sd3']}",
        "policy.offload_frozen=false",
        "prompts.source=geneval:test",  # the shipped split: geneval:train downloads (the count is the same)
        "train.prompts_per_epoch=1",
        "train.images_per_prompt=2",
        "train.rollout_batch_size=2",
        "train.minibatch_size=2",
        "train.gradient_accumulation_steps=1",
        "sampler.sde_window_range=[0, 1]",
    ]
    cfg = load_config(RunConfig, str(ROOT / "configs" / "sd35l_geneval.json"), sets)
    assert cfg.policy.cfg_scale > 1
    policy = build_policy(cfg.policy, "cpu")  # tiny encoders and VAE; the transformer is replaced below
    assert full_size_transformer(policy, "sd3", "sd3.5-large_transformer.json", cfg.policy.lora) > 8.0e9
    sampling = epoch_steps(cfg, 0, policy)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_policy(policy, mode, CUDA)
    L = 77 + cfg.policy.max_sequence_length  # CLIP-L/G's 77 tokens, then T5-XXL's

    def encode(
        prompts, metadata=None
    ):  # CLIP-L + CLIP-G (pooled 2048) and T5-XXL (4096) shapes; the tiny ones are narrow
        cond = {
            "encoder_hidden_states": torch.zeros(len(prompts), L, 4096, dtype=torch.bfloat16, device=CUDA),
            "pooled_projections": torch.zeros(len(prompts), 2048, dtype=torch.bfloat16, device=CUDA),
        }
        if policy._negative is None:  # what SD3Policy.encode keeps for true CFG
            policy._negative = {k: v[:1] for k, v in cond.items()}
        return cond

    policy.encode = encode
    with mode:
        data, out, logp = rollout_and_micro_step(
            cfg,
            sampling,
            policy,
            HostReward(CUDA),
            PromptEncodings(policy),
            load_prompts(cfg.prompts.source),
            CUDA,
            2,
        )
    assert data.x_t.shape == (2, 4, 16, 64, 64) and data.preview.shape == (2, 3, 512, 512)
    on(CUDA, data.x_t, data.log_prob, out.loss, logp)
    assert out.loss.requires_grad


def test_prompt_encodings_keep_their_cache_in_host_memory():
    """The encoder runs on the GPU, but its outputs are cached on the CPU (FLUX's T5 states are 4 MiB a
    prompt: a GPU cache would grow by a prompt set's worth beside the model); each call copies its rows
    over."""

    class Encoder:
        def encode(self, prompts, metadata=None):
            return {"states": torch.zeros(len(prompts), 3, 8, dtype=torch.bfloat16, device=CUDA)}

    with FakeTensorMode(allow_non_fake_inputs=True):
        encodings = PromptEncodings(Encoder())
        cond, index = encodings.for_prompts(["a", "b", "a"], CUDA)
    assert [v["states"].device.type for v in encodings.host.values()] == ["cpu", "cpu"]
    on(CUDA, cond["states"], index)
    assert cond["states"].shape == (2, 3, 8) and cond["states"].dtype == torch.bfloat16


def test_each_rank_takes_its_local_gpu(monkeypatch):
    """On a node of 8 GPUs each rank builds its policy on cuda:LOCAL_RANK and joins NCCL from there;
    DeepSpeed's engine sets the device only later, so without this every rank's policy, prompt
    encodings and rollout would sit on GPU 0 (and meet the engine's weights on another GPU)."""
    import fastcps.distributed as distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert distributed.local_device() == torch.device("cuda", 5) and calls == [5]
    monkeypatch.setattr(
        distributed.dist, "is_initialized", lambda: True
    )  # init(): no real process group here
    for key, default in (
        ("MASTER_PORT", "29500"),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        monkeypatch.setenv(key, os.environ.get(key, default))  # init() fills these in: restore them after
    calls.clear()
    distributed.init()
    assert calls == [5]
