"""The `flux` and `sd3` policies on tiny random-weight pipelines (fastcps.testing): they
agree with the stock diffusers pipelines, their LoRA exports load with ``load_lora_weights``, a
missing weights path is named, and one GRPO epoch runs under ZeRO-3 with 2 processes."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastcps.config import LoraConfig, PolicyConfig
from fastcps.policies import build_policy

from multi_run import launch  # noqa: E402
from fastcps.testing import save_tiny_flux, save_tiny_sd3  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEQ = 32  # T5 tokens: the tiny tokenizer is character-level


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "flux": save_tiny_flux(root / "flux"),
        "schnell": save_tiny_flux(root / "schnell", schnell=True),
        "sd3": save_tiny_sd3(root / "sd3"),
    }


def policy_cfg(name, path, **kw):
    base = dict(name=name, pretrained=str(path), dtype="fp32", resolution=64, max_sequence_length=SEQ)
    return PolicyConfig(**{**base, **kw})


def euler(policy, x, cond, n):
    sig = policy.sigmas(n)
    with torch.no_grad():
        for i in range(n):
            v = policy.velocity(policy.transformer, x, sig[i].expand(x.shape[0]), cond)
            x = x + (sig[i + 1] - sig[i]) * v
    return policy.decode(x)


def assert_same_levels(ours, stock):
    """Our decode gives the 8-bit levels k/255 flow_grpo's rewards score: the stock pipeline's images,
    quantised as they quantise them. Sampling agrees to ~1e-6, so a level may differ by one where the
    pipeline's value lies that close to a rounding edge (a handful of the 24576 values here)."""
    stock = (stock.float() * 255).round().clamp(0, 255) / 255
    assert torch.equal(ours * 255, (ours * 255).round())  # levels, nothing between
    torch.testing.assert_close(ours, stock, atol=1 / 255 + 1e-6, rtol=0)
    assert float((ours != stock).float().mean()) < 1e-3


# --- the policies are the pipelines -----------------------------------------------------------------


def test_flux_dev_matches_flux_pipeline(tiny):
    from diffusers import FluxPipeline

    policy = build_policy(policy_cfg("flux", tiny["flux"], guidance=3.5), "cpu")
    assert policy.latent_shape() == (16, 64) and policy.guidance == 3.5
    prompts = ["a cat", 'a sign that reads "hi"']
    cond = policy.encode(prompts)
    assert cond["encoder_hidden_states"].shape == (2, SEQ, 32) and cond["pooled_projections"].shape == (2, 32)
    x1 = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    ours = euler(policy, x1, cond, 4)
    pipe = FluxPipeline.from_pretrained(tiny["flux"])
    ref = pipe(
        prompts,
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=3.5,
        latents=x1.clone(),
        max_sequence_length=SEQ,
        output_type="pt",
    ).images
    assert ours.shape == (2, 3, 64, 64) and 0 <= float(ours.min()) and float(ours.max()) <= 1
    assert_same_levels(ours, ref)
    # the dynamic shift is the pipeline's: sigmas of 6 steps at 16 tokens
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    retrieve_timesteps(pipe.scheduler, 6, "cpu", sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    torch.testing.assert_close(policy.sigmas(6), pipe.scheduler.sigmas.float())


def test_flux_schnell_has_no_guidance(tiny):
    with pytest.raises(ValueError, match="policy.guidance"):
        build_policy(policy_cfg("flux", tiny["schnell"], guidance=3.5), "cpu")
    with pytest.warns(UserWarning, match="needs CUDA; using SDPA"):  # flash-attn is CUDA-only
        policy = build_policy(
            policy_cfg("flux", tiny["schnell"], attention_backend="flash", offload_frozen=True), "cpu"
        )
    assert policy.guidance is None and policy.attention_backend == "sdpa" and not policy.lora
    torch.testing.assert_close(policy.sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))  # static shift 1
    # full fine-tuning: every transformer weight trains; the reference is the base, loaded again
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    cond = policy.encode(["a cat"])
    x, s = torch.randn(1, *policy.latent_shape()), torch.tensor([0.5])
    with torch.no_grad():
        base = policy.velocity(policy.transformer, x, s, cond)
        for p in policy.transformer.parameters():
            p.add_(0.01)
        with policy.reference(policy.transformer) as ref:
            assert ref is not policy.transformer and not any(q.requires_grad for q in ref.parameters())
            torch.testing.assert_close(policy.velocity(ref, x, s, cond), base)


def test_sd3_true_cfg_matches_sd3_pipeline(tiny):
    from diffusers import StableDiffusion3Pipeline

    policy = build_policy(policy_cfg("sd3", tiny["sd3"], cfg_scale=4.5), "cpu")
    assert policy.latent_shape() == (16, 8, 8)
    prompts = ["a red bus", "three apples"]
    cond = policy.encode(prompts)
    x1 = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(1))
    ours = euler(policy, x1, cond, 4)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"])
    ref = pipe(
        prompts,
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=4.5,
        latents=x1.clone(),
        sigmas=list(np.linspace(1.0, 1 / 4, 4)),
        max_sequence_length=SEQ,
        output_type="pt",
    ).images
    assert_same_levels(ours, ref)
    plain = build_policy(policy_cfg("sd3", tiny["sd3"]), "cpu")  # no CFG: a different velocity
    v_cfg = policy.velocity(policy.transformer, x1, torch.full((2,), 0.5), cond)
    v_plain = plain.velocity(plain.transformer, x1, torch.full((2,), 0.5), plain.encode(prompts))
    assert not torch.allclose(v_cfg, v_plain)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_lora_export_loads_in_stock_diffusers(tiny, tmp_path, name):
    """Adapters off = the base; the exported file, read by ``pipeline.load_lora_weights``, gives the
    trained policy's velocity exactly (alpha/r = 2 travels in the file's metadata)."""
    from diffusers import DiffusionPipeline

    from fastcps.checkpoint import save_diffusers_lora

    policy = build_policy(policy_cfg(name, tiny[name], lora=LoraConfig(r=4, alpha=8.0)), "cpu")
    cond = policy.encode(["a dog"])
    x = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.6])
    with torch.no_grad():
        base = policy.velocity(policy.transformer, x, s, cond)
        torch.manual_seed(3)
        named = {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}
        assert named and all("lora_" in n for n in named)
        for p in named.values():
            p.normal_(0, 0.3)
        trained = policy.velocity(policy.transformer, x, s, cond)
        with policy.reference(policy.transformer) as ref:
            torch.testing.assert_close(policy.velocity(ref, x, s, cond), base)
    assert not torch.allclose(trained, base)
    save_diffusers_lora(
        {n: p.detach().clone() for n, p in named.items()},
        policy.transformer.peft_config["default"],
        tmp_path / "pytorch_lora_weights.safetensors",
    )
    pipe = DiffusionPipeline.from_pretrained(tiny[name])
    pipe.load_lora_weights(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            policy.velocity(pipe.transformer, x, s, cond), trained, atol=1e-6, rtol=1e-5
        )


def test_lora_starts_as_the_anchors_initialise_it(tiny):
    """A ~ N(0, 1/r²) and B = 0 (peft's "gaussian" init, FlowCPS's and flow_grpo's scripts/train_*.py):
    the policy starts as the base, and A has the anchors' scale (peft's default Kaiming-uniform A has
    std 1/sqrt(3·fan_in), 0.085 over these layers, not 1/r = 0.25)."""
    policy = build_policy(policy_cfg("flux", tiny["flux"], lora=LoraConfig(r=4, alpha=8.0)), "cpu")
    named = {n: p.detach() for n, p in policy.transformer.named_parameters()}
    a = torch.cat([p.flatten() for n, p in named.items() if "lora_A" in n])
    b = torch.cat([p.flatten() for n, p in named.items() if "lora_B" in n])
    assert a.numel() > 2000 and bool((b == 0).all())
    assert abs(float(a.std()) - 1 / 4) < 0.02, float(a.std())
    assert abs(float(a.mean())) < 0.01


# --- errors a user can meet --------------------------------------------------------------------------


def test_missing_weights_path_is_named(tiny, tmp_path, capsys):
    for name in ("flux", "sd3"):
        with pytest.raises(FileNotFoundError) as err:
            build_policy(policy_cfg(name, "/no/such/model"), "cpu")
        assert "/no/such/model" in str(err.value) and "policy.pretrained" in str(err.value)
        with pytest.raises(FileNotFoundError, match="policy.pretrained"):
            build_policy(policy_cfg(name, ""), "cpu")
    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing vae/"):
        build_policy(policy_cfg("flux", tmp_path / "half"), "cpu")
    from fastcps.train import main

    assert (
        main(
            [
                "--config",
                str(ROOT / "configs" / "flux_pickscore.json"),
                "--set",
                "policy.pretrained=/no/such/flux",
                "--set",
                f"output_dir={tmp_path}",
                "--set",
                f"prompts.source={ROOT}/configs/prompts/pickscore.txt",
                "--set",
                f"deepspeed_config={ROOT}/configs/ds_zero3.json",
            ]
        )
        == 2
    )
    assert "/no/such/flux" in capsys.readouterr().err


# --- one GRPO epoch, ZeRO-3, 2 processes ----------------------------------------------------------------


def tiny_run_args(path, out, name, rewards):
    sample = ROOT / "configs" / "prompts" / ("pickscore.txt" if name == "flux" else "ocr.txt")
    sets = [
        f"policy.pretrained={path}",
        f"prompts.source={sample}",  # the recipes' train splits: ocr:train downloads; a sample file here
        "policy.dtype=fp32",
        "policy.resolution=64",
        f"policy.max_sequence_length={SEQ}",
        'policy.lora={"r": 4, "alpha": 8.0}',
        "policy.offload_frozen=false",
        f"rewards={json.dumps(rewards)}",
        "sampler.num_steps=4",
        "sampler.sde_window_size=2",
        "sampler.sde_window_range=[0, 2]",
        "train.num_epochs=1",
        "train.prompts_per_epoch=2",
        "train.images_per_prompt=4",
        "train.rollout_batch_size=4",
        "train.minibatch_size=2",
        "train.gradient_accumulation_steps=2",
        "eval.every=0",
        "log.progress=false",
        "checkpoint.every=0",
        f"output_dir={out}",
        f"name={name}",
        f"deepspeed_config={ROOT / 'configs' / 'ds_zero3.json'}",
    ]
    return [a for kv in sets for a in ("--set", kv)]


@pytest.mark.slow
def test_one_grpo_epoch_flux_and_sd3_zero3_two_processes(tiny, tmp_path):
    """Two ranks (a process each, rendezvous through the environment as the launcher sets it up)
    run a FLUX epoch, then an SD3 epoch: one interpreter and DeepSpeed start-up for both."""
    from diffusers import DiffusionPipeline

    from tiny_rewards import _tiny_hf_clip, tiny_hps_checkpoint

    clip = tmp_path / "tiny_pickscore"
    _tiny_hf_clip(clip)
    hps_ckpt, hps_cfg = tiny_hps_checkpoint(tmp_path)
    pickscore = [
        {
            "name": "pickscore",
            "args": {"model": str(clip / "model"), "processor": str(clip / "processor"), "max_length": 16},
        }
    ]
    hpsv2 = [{"name": "hpsv2", "args": {"checkpoint": str(hps_ckpt), "model_config": str(hps_cfg)}}]
    launch(
        [
            ["--config", str(ROOT / "configs" / "flux_pickscore.json")]
            + tiny_run_args(tiny["flux"], tmp_path, "flux", pickscore),
            ["--config", str(ROOT / "configs" / "sd35_ocr.json")]
            + tiny_run_args(tiny["sd3"], tmp_path, "sd3", hpsv2),
        ],
        world=2,
        timeout=400,
    )
    for name in ("flux", "sd3"):
        run = tmp_path / name
        last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
        assert last["train/ratio_dev"] == 0.0 and np.isfinite(last["train/loss"])
        assert f"reward/{'pickscore' if name == 'flux' else 'hpsv2'}/mean" in last
        final = run / "checkpoints" / "final"
        assert len(list(final.glob("*zero_pp_rank_1_*"))) >= 1  # rank 1 held its own ZeRO-3 partition
        trained = load_file(str(final / "policy.safetensors"))
        assert trained and all("lora_" in k for k in trained)
        assert any(float(t.abs().max()) > 0 for k, t in trained.items() if "lora_B" in k)  # it moved
        pipe = DiffusionPipeline.from_pretrained(tiny[name])
        pipe.load_lora_weights(final)  # the saved adapter, in stock diffusers
        plain = lambda k: re.sub(r"\.default(_\d+)?\.", ".", k)  # noqa: E731  (adapter names differ)
        loaded = {plain(k): v for k, v in pipe.transformer.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(trained)
        for k, t in trained.items():
            torch.testing.assert_close(loaded[plain(k)], t)


# --- configs (no weights; the plan is tested in tests/test_plan.py) ------------------------------------


@pytest.mark.parametrize(
    "name", ["flux_pickscore", "flux_schnell_hpsv2", "sd35_ocr", "sd35_geneval", "qwenimage_pickscore"]
)
def test_shipped_configs_load_and_name_their_prompts(name):
    from fastcps.config import RunConfig
    from fastcps.config import load_config, validate_tree
    from fastcps.prompts import load_prompts

    cfg = load_config(RunConfig, str(ROOT / "configs" / f"{name}.json"))
    for world in (1, 2, 4, 8):
        validate_tree(cfg, world_size=world)
    # the recipes name flow_grpo's / DanceGRPO's sets (tests/test_prompt_sets.py); the test splits ship
    assert cfg.prompts.source.endswith(":train") and cfg.prompts.eval_source.endswith(":test")
    prompts, meta = load_prompts(cfg.prompts.eval_source)
    assert len(prompts) >= 8 and cfg.policy.lora is not None and cfg.policy.dtype == "bf16"
    if name == "sd35_geneval":
        assert all(m["tag"] and m["include"] for m in meta)
    if name == "sd35_ocr":
        assert all(p.count('"') == 2 for p in prompts)


# --- text length: counted before the cut, reported once ----------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_text_token_counts_are_the_t5_tokens_encode_would_cut(tiny, family):
    policy = build_policy(policy_cfg(family, tiny[family]), "cpu")
    long = "x" * (3 * SEQ)  # character-level tiny tokenizer: one token a character, plus </s>
    counts = policy.text_token_counts(["a cat", long])
    tok = getattr(policy.pipe, "tokenizer_2" if family == "flux" else "tokenizer_3")
    assert counts == [len(tok("a cat")["input_ids"]), len(tok(long)["input_ids"])]
    assert counts[0] < SEQ < counts[1]
    # what encode gives the long prompt is its first SEQ tokens: the count is of what gets cut
    clip_tokens = 77 if family == "sd3" else 0  # SD3 puts CLIP's 77 tokens before T5's
    assert policy.encode([long])["encoder_hidden_states"].shape[1] == clip_tokens + SEQ


def test_truncation_report_counts_the_cut_prompts_and_the_length_that_keeps_them():
    from fastcps.prompts import truncation_report

    assert truncation_report([10, 128, 5], 128) is None
    line = truncation_report([10, 129, 200, 150], 128)
    assert line.startswith(
        "3 of 4 prompts have more than policy.max_sequence_length = 128 T5 tokens (the longest 200)"
    )
    assert "--set policy.max_sequence_length=208 keeps every one whole" in line
    assert "max_sequence_length=144 " in truncation_report([129], 128) + " "


def test_trainer_reports_cut_prompts_once_at_start_up(tiny, tmp_path, caplog):
    from types import SimpleNamespace

    from fastcps.trainer import Trainer

    policy = build_policy(policy_cfg("flux", tiny["flux"]), "cpu")
    fake = SimpleNamespace(
        policy=policy,
        prompts=["a cat", "y" * 40],
        eval_prompts=[("z" * 50, {})],
        cfg=SimpleNamespace(policy=SimpleNamespace(max_sequence_length=SEQ)),
    )
    with caplog.at_level("WARNING", logger="fastcps"):
        Trainer._report_truncation(fake)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("2 of 3 prompts have more than policy.max_sequence_length = 32" in m for m in warned) == 1, (
        warned
    )
    caplog.clear()
    fake.prompts, fake.eval_prompts = ["a cat"], []
    Trainer._report_truncation(fake)
    assert not caplog.records
