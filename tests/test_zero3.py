"""Real ZeRO-3 on CPU: 2 ranks over gloo with ``stage3_param_persistence_threshold = 0``, so every tensor
of the model is partitioned and gathered for each forward, as FLUX.1-dev's are on 8 GPUs (the tiny
models' tensors all lie below DeepSpeed's default threshold of 1e5 elements: everywhere else in the
suite they stay whole on every rank and nothing is ever gathered).

One run shape, the one a FLUX user trains: tiny FLUX (fastcps.testing), LoRA on the frozen base, gradient
checkpointing, ``train.beta_kl > 0`` (the reference forward: the same partitioned base with the adapters
off), EMA on (eval samples with the EMA weights). Four trainings in one pair of rank processes
(tests/multi_run.py):

- ``part``: 2 epochs, threshold 0;
- ``whole``: the same 2 epochs with the default threshold (nothing partitioned) — the same ranks, batches
  and gradient reduction, so the adapter, EMA and every logged number must agree bit for bit: gathering
  a partitioned tensor returns its bytes unchanged;
- ``stop``: threshold 0, 1 epoch, then ``--resume`` for the second: must end as ``part`` ends, bit for bit;
- ``fullft``: full fine-tuning, threshold 0, 1 epoch: its export, gathered block by block.

``tests/wiring_support.PartitionProbe`` records how ZeRO-3 held each parameter and what the LoRA layers'
frozen weights were in each forward, so the test cannot pass with nothing partitioned.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multi_run import ROOT, launch

pytestmark = pytest.mark.slow

SEQ = 32  # T5 tokens: the tiny tokenizer is character-level


def sets(items):
    return [a for kv in items for a in ("--set", kv)]


def ds_config(folder: Path, threshold: int | None) -> Path:
    """configs/ds_zero3.json, with ``stage3_param_persistence_threshold`` set when ``threshold`` is given."""
    ds = json.loads((ROOT / "configs" / "ds_zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    if threshold is not None:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    path = folder / f"ds_zero3_threshold_{threshold}.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


def flux_run(flux: Path, out: Path, name: str, epochs: int, ds: Path, extra: tuple = ()) -> list[str]:
    """Tiny FLUX with LoRA, gradient checkpointing, KL to the frozen base and EMA; 2 ranks x 4 images an
    epoch, 2 optimizer steps an epoch (so the second step's reference forward differs from the policy's),
    eval of the EMA weights before the first epoch and after each."""
    items = [
        f"policy.pretrained={flux}",
        "policy.dtype=fp32",
        "policy.resolution=64",
        f"policy.max_sequence_length={SEQ}",
        'policy.lora={"r": 4, "alpha": 8.0}',
        "policy.offload_frozen=false",
        "policy.gradient_checkpointing=true",
        'rewards=[{"name": "jpeg_compressibility"}]',
        "sampler.num_steps=4",
        "sampler.sde_window_size=2",
        "sampler.sde_window_range=[0, 2]",
        "train.prompts_per_epoch=2",
        "train.images_per_prompt=4",
        "train.rollout_batch_size=4",
        "train.minibatch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.micro_batch=null",  # the layout as written (the recipe's "auto" ties rollout to minibatch)
        "train.beta_kl=0.1",
        "train.ema_decay=0.5",
        "train.lr=1e-3",
        "eval.every=1",
        "eval.num_prompts=2",
        "eval.images_per_prompt=2",
        "eval.num_steps=2",
        "log.progress=false",
        "log.tensorboard=false",
        "log.images_every=0",
        "checkpoint.every=0",
        f"output_dir={out}",
        f"name={name}",
        f"train.num_epochs={epochs}",
        f"deepspeed_config={ds}",
        *extra,
    ]
    return ["--config", str(ROOT / "configs" / "flux_pickscore.json")] + sets(items)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fastcps.testing import save_tiny_flux

    out = tmp_path_factory.mktemp("zero3")
    flux = save_tiny_flux(out / "flux")
    zero, default = ds_config(out, 0), ds_config(out, None)
    plan = [
        flux_run(flux, out, "part", 2, zero),
        flux_run(flux, out, "whole", 2, default),
        flux_run(flux, out, "stop", 1, zero),
        ["--resume", str(out / "stop"), "--set", "train.num_epochs=2"],
        flux_run(flux, out, "reuse", 2, zero, ("train.rollout_batch_size=2",)),
        flux_run(flux, out, "nokl", 1, zero, ("train.beta_kl=0", "train.ema_decay=0")),
        flux_run(
            flux,
            out,
            "sampled",
            1,
            zero,
            ("train.beta_kl=0", "train.ema_decay=0", "whole_model_sampling=true"),
        ),
        flux_run(flux, out, "fullft", 1, zero, ("policy.lora=null", "train.beta_kl=0", "train.ema_decay=0")),
    ]
    logs = launch(plan, 2, probe=out / "probe", timeout=1200)  # ~70 s on 2 idle cores; a guard against hangs
    (out / "rank0.log").write_text(logs[0])
    probes = {
        (k, r): json.loads((out / "probe" / f"run{k}.rank{r}.json").read_text())
        for k in range(4)
        for r in range(2)
    }
    return {"out": out, "log": logs[0], "probe": probes}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "final"


def assert_same_end(a: Path, b: Path, what: str) -> None:
    """Adapter (policy.safetensors and the diffusers LoRA file), each rank's EMA and every logged number
    except timings and memory: equal, bit for bit."""
    for f in ("policy.safetensors", "pytorch_lora_weights.safetensors"):
        wa, wb = load_file(str(final(a) / f)), load_file(str(final(b) / f))
        assert wa.keys() == wb.keys() and wa, f
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert worst == 0.0, f"{what}: {f} differs by up to {worst:.3g}"
    for rank in range(2):
        sa, sb = (torch.load(final(r) / f"ema_rank{rank}.pt")["shadow"] for r in (a, b))
        assert len(sa) == len(sb) and sa
        worst = max(float((x - y).abs().max()) for x, y in zip(sa, sb))
        assert worst == 0.0, f"{what}: EMA of rank {rank} differs by up to {worst:.3g}"
    ma, mb = metrics(a), metrics(b)
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb] == [0, 1, 2]
    for ra, rb in zip(ma, mb):
        skip = ("time/", "perf/", "memory/", "zero/")  # measurements of the run, not its numbers
        keys = {k for k in ra if not k.startswith(skip)}
        assert keys == {k for k in rb if not k.startswith(skip)}
        diff = {k: (ra[k], rb[k]) for k in sorted(keys) if ra[k] != rb[k]}
        assert not diff, f"{what}: epoch {ra['epoch']} logged different numbers: {diff}"


def test_threshold_zero_partitions_every_tensor_and_gathers_the_frozen_base(runs):
    """With the threshold at 0 every parameter, frozen base and LoRA alike, is split over the 2 ranks and
    released at rest; the LoRA layers' frozen weights are partitioned and gathered whole in every forward,
    adapters on (policy) and off (reference). With the default threshold nothing is partitioned."""
    for k in (0, 2, 3):  # part, stop, and the resume of stop
        for rank in range(2):
            probe = runs["probe"][(k, rank)]
            params = probe["params"]
            frozen = [p for p in params.values() if not p["trained"]]
            trained = [p for p in params.values() if p["trained"]]
            assert len(frozen) > 60 and len(trained) > 20, (len(frozen), len(trained))
            for name, p in params.items():
                assert not p["persist"] and p["local"] == -(-p["numel"] // 2) and p["held"] == 0, (
                    k,
                    rank,
                    name,
                    p,
                )
            for key in ("policy", "reference"):
                f = probe["forwards"].get(key, {"calls": 0})
                assert f["calls"] > 0 and f["partitioned"] == f["gathered"] == f["calls"], (k, rank, key, f)
    for rank in range(2):
        probe = runs["probe"][(1, rank)]
        assert all(p["persist"] for p in probe["params"].values())
        f = probe["forwards"].get("reference", {"calls": 0})
        assert f["calls"] > 0 and f["partitioned"] == 0 and f["gathered"] == f["calls"], f
    out = runs["out"]
    for name in ("part", "stop"):
        assert len(list(final(out / name).glob("*zero_pp_rank_1_*"))) >= 1


def test_partitioned_run_equals_the_unpartitioned_one(runs):
    """Same ranks, batches and reduction: the threshold only changes where the bytes live, so the adapter,
    the EMA and every logged number (rewards, loss, KL, eval of the EMA weights) must be identical. The
    run moved (the adapter is not zero, the KL to the reference is not zero). Seen failing (adapter 1.2e-3
    apart) when EMA.applied wrote only the partitions: the default threshold's whole copies kept the live
    weights for eval, then a re-gather left the EMA weights in them for the next epoch's rollout."""
    out = runs["out"]
    assert_same_end(out / "part", out / "whole", "threshold 0 vs the default threshold")
    lora = load_file(str(final(out / "part") / "policy.safetensors"))
    assert all(".lora_" in k for k in lora) and any(
        float(t.abs().max()) > 0 for k, t in lora.items() if "lora_B" in k
    )
    last = metrics(out / "part")[-1]
    assert last["train/kl"] > 0 and torch.isfinite(torch.tensor(last["train/loss"]))


def test_resumed_partitioned_run_equals_the_uninterrupted_one(runs):
    """1 epoch, stop, ``--resume`` for the second: ends where the 2-epoch run ends, bit for bit."""
    out = runs["out"]
    assert f"[fastcps] resumed {out / 'stop'} at epoch 1" in runs["log"]
    assert_same_end(out / "part", out / "stop", "resumed vs uninterrupted (threshold 0)")


def test_rollout_log_probs_stand_in_for_the_recompute_under_zero3(runs):
    """Minibatches laid out as the rollout's batches (2 and 2): with every tensor partitioned, LoRA,
    gradient checkpointing and the reference forward, the first window's log-probs equal the rollout's
    bit for bit on both ranks every epoch, so the later window takes the rollout's (no recompute
    forward); with rollout batches of 4 over minibatches of 2 (the other runs) every epoch recomputes.
    The first window's ratio is exactly 1 in both."""
    out = runs["out"]
    for name, recomputed in (("reuse", 0.0), ("part", 1.0)):
        trained = [m for m in metrics(out / name) if "train/loss" in m]
        assert [m["train/old_logprob_recomputed"] for m in trained] == [recomputed] * 2, name
        assert [m["train/ratio_dev"] for m in trained] == [0.0, 0.0], name


def test_zero3_gathers_what_the_plan_counts(runs):
    """The plan's ZeRO-3 parameter traffic against the all-gathers DeepSpeed really made in the same run.
    Plan (``fastcps.plan``): the trainer's counted calls of one epoch times the parameters each call
    fetches (``measure.ModuleUses`` on the same tiny FLUX). Real: ``zero/<phase>_gathers``
    (``fastcps.perf.GatherMeter``: every partitioned parameter's all-gather, counted where DeepSpeed
    starts it), rollout + update + the eval after the epoch (eval.every 1), in whole-model gathers.

    ``nokl`` (the FLUX recipes' shape: no KL reference forward) shows the re-forward's fetch kept for the
    backward; ``part`` has the reference forward between forward and backward, after which DeepSpeed
    fetches again. Not modelled, and the reason for the tolerances: DeepSpeed re-gathers some LoRA
    matrices in a backward (6 % of this tiny model's elements, 1.5 % of FLUX.1-dev's), and after a
    reference forward also block weights whose backward is not needed (measured: the plan 0.8 % low
    for ``nokl``, 3.3 % low for ``part``). Seen failing with the re-forward's fetch counted twice
    without the reference forward (plan 10.5 % high) and counted once after one (plan 11.3 % low)."""
    from fastcps.config import RunConfig
    from fastcps.config import load_config
    from fastcps.plan import plan
    from fastcps.trainer import evaluate_with

    out = runs["out"]
    for name, tolerance in (("nokl", 0.03), ("part", 0.06)):
        cfg = load_config(RunConfig, str(out / name / "config.json"), [])
        report = plan(cfg, 2, out / "flux" / "transformer" / "config.json", evaluate=evaluate_with)
        planned = report["zero_traffic_bytes_per_gpu"]["zero3+ckpt"]["gathers"]
        rows = metrics(out / name)[1:]
        assert rows
        for m in rows:
            real = sum(m[f"zero/{phase}_gathers"] for phase in ("rollout", "update", "eval"))
            assert abs(real / planned - 1) <= tolerance, (name, m["epoch"], real, planned)


def test_whole_model_sampling_gathers_once_per_sampling_phase_and_changes_no_number(runs):
    """``whole_model_sampling``: the rollout and the eval gather the whole transformer once each
    (DeepSpeed's ``unwrap_model_for_generation``) instead of each module at each forward; the update is
    untouched. Same run as ``nokl`` otherwise: the same adapter and every logged number bit for bit, the
    rollout's and the eval's gathers exactly one whole-model gather each (``nokl``: one per forward, and
    the rollout's 4 steps make 4), the update's as ``nokl``'s; the plan's count within 3 %."""
    from fastcps.config import RunConfig, load_config
    from fastcps.plan import plan
    from fastcps.trainer import evaluate_with

    out = runs["out"]
    a, b = out / "nokl", out / "sampled"
    for f in ("policy.safetensors", "pytorch_lora_weights.safetensors"):
        wa, wb = load_file(str(final(a) / f)), load_file(str(final(b) / f))
        assert wa.keys() == wb.keys() and wa and all(torch.equal(wa[k], wb[k]) for k in wa), f
    skip = ("time/", "perf/", "memory/", "zero/")
    for ra, rb in zip(metrics(a), metrics(b), strict=True):
        assert {k: v for k, v in ra.items() if not k.startswith(skip)} == {
            k: v for k, v in rb.items() if not k.startswith(skip)
        }
    last_a, last_b = metrics(a)[-1], metrics(b)[-1]
    assert last_b["zero/rollout_gathers"] == 1.0 and last_b["zero/eval_gathers"] == 1.0
    assert last_a["zero/rollout_gathers"] > 3.0  # 4 sampling steps, each forward fetching
    # the update fetches less: DeepSpeed's prefetcher no longer follows a trace the sampler recorded
    assert last_b["zero/update_gathers"] <= last_a["zero/update_gathers"]
    cfg = load_config(RunConfig, str(b / "config.json"), [])
    report = plan(cfg, 2, out / "flux" / "transformer" / "config.json", evaluate=evaluate_with)
    assert report["zero_stage"] == 3 and report["whole_model_sampling"] is True
    planned = report["zero_traffic_bytes_per_gpu"]["zero3+ckpt, whole-model sampling"]["gathers"]
    real = sum(last_b[f"zero/{phase}_gathers"] for phase in ("rollout", "update", "eval"))
    # the plan counts the update's module uses (as for nokl, within 3 %): an upper bound here, measured
    # 25 % above the real 8.06 whole-model gathers (10.81), by the update's smaller real fetches
    assert 0.7 <= real / planned <= 1.03, (real, planned)


def test_full_finetuning_export_at_two_ranks_is_deepspeeds_own_weights_in_diffusers_layout(runs):
    """Every tensor partitioned over the 2 ranks, the export gathered block by block on both, rank 0
    wrote diffusers' sharded layout: ``from_pretrained`` loads it, and it equals DeepSpeed's own
    consolidation of the same checkpoint (``zero_to_fp32``: each rank's fp32 partition, read from every
    rank's optimizer file; fp32 training: the module's weights are those), bit for bit, and it moved
    away from the base."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from diffusers import FluxTransformer2DModel

    out = runs["out"]
    ckpts = out / "fullft" / "checkpoints"
    assert len(list((ckpts / "final").glob("*zero_pp_rank_1_*optim_states.pt"))) == 1
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="final")
    exported = FluxTransformer2DModel.from_pretrained(ckpts / "final" / "transformer").state_dict()
    base = FluxTransformer2DModel.from_pretrained(out / "flux" / "transformer").state_dict()
    assert exported.keys() == consolidated.keys() == base.keys()
    assert all(torch.equal(exported[k], consolidated[k]) for k in exported)
    assert any(not torch.equal(exported[k], base[k]) for k in exported)


def test_whole_model_sampling_puts_deepspeeds_hooks_back_after_an_exception(monkeypatch):
    """A stop (SIGTERM, Ctrl-C) inside a sampling phase: DeepSpeed's ``unwrap_model_for_generation``
    re-registers its fetch hooks only on a normal exit; ``rollout.whole_model`` does it on the way out of
    an exception too, so the checkpoint that follows and any later step see a partitioned, hooked model.
    One process, ZeRO-3 over gloo, every tensor partitioned (seen failing without the re-registration:
    no hooks left; DeepSpeed 0.19.8 still fetches a forward's weights without them, an older one did not)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from fastcps.rollout import whole_model
    from multi_run import free_port

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()) for _ in range(3)]
    )
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    gathered = lambda: sum(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in engine.module.parameters())  # noqa: E731
    x = torch.randn(2, 16)
    offload = engine.optimizer.parameter_offload
    hooks = lambda: (len(offload.forward_hooks), len(offload.backward_hooks))  # noqa: E731
    before = hooks()
    with torch.no_grad():
        want = engine(x)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), whole_model(engine, True):
        assert gathered() == 6  # every weight and bias at once
        assert torch.equal(engine(x), want)
        raise KeyboardInterrupt
    assert gathered() == 0 and hooks() == before and before[0] > 0
    loss = engine(x).pow(2).mean()  # fetched by the hooks again: a real loss, a real step
    engine.backward(loss)
    engine.step()
    assert gathered() == 0 and torch.isfinite(loss)
