"""After training: the run's logs (phase lines in a log file, where everything is at the end) and
``python -m fastcps.sample`` (base vs trained from the same noise; its means are the run's eval; the
exported LoRA in a stock diffusers pipeline gives the same trained images; bad input exits 2)."""

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from multi_run import child_env  # noqa: E402
from test_trainer import CONFIG, ROOT, sets  # noqa: E402

from fastcps.checkpoint import complete, export_weights
from fastcps.config import RunConfig, load_config, save_config
from fastcps.policies import build_policy
from fastcps.rollout import eval_noise
from fastcps.sample import compare, main

TINY_RUN = [
    "sampler.num_steps=4",
    "train.prompts_per_epoch=2",
    "train.images_per_prompt=4",
    "train.rollout_batch_size=4",
    "train.minibatch_size=4",
    "eval.num_prompts=2",
    "eval.images_per_prompt=2",
    "eval.every=1",
    "log.progress=true",
    "checkpoint.every=0",
    "train.num_epochs=1",
    f"deepspeed_config={ROOT / 'configs' / 'ds_zero3.json'}",
]


# --- a real (one-epoch) run, its log written to files ------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with open(out / "stdout.log", "w") as so, open(out / "stderr.log", "w") as se:
        proc = subprocess.run(
            [sys.executable, "-m", "fastcps.train", "--config", CONFIG]
            + sets(TINY_RUN + [f"output_dir={out}", "name=one"]),
            cwd=ROOT,
            env=child_env(),
            stdout=so,
            stderr=se,
            timeout=300,
        )
    stdout, stderr = (out / "stdout.log").read_text(), (out / "stderr.log").read_text()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return SimpleNamespace(dir=out / "one", stdout=stdout, stderr=stderr)


@pytest.mark.slow
def test_a_log_file_gets_phase_lines_not_bars_and_the_end_says_where_things_are(trained_run):
    assert "\r" not in trained_run.stderr  # no tqdm bars redrawn with carriage returns
    assert re.search(
        r"^\[fastcps\] epoch 1 rollout: 8 images in [\d.]+ s \([\d.]+ images/s\)$", trained_run.stderr, re.M
    )
    # 2 minibatches x 3 trained steps (CPS's last of 4 steps has no noise)
    assert re.search(
        r"^\[fastcps\] epoch 1 update: 6 micro-steps in [\d.]+ s \([\d.]+ micro-steps/s\)$",
        trained_run.stderr,
        re.M,
    ), trained_run.stderr[-2000:]
    run = trained_run.dir
    for label, path in (
        ("run directory", run),
        ("final checkpoint", run / "checkpoints" / "final"),
        ("reward curve", run / "reward_curve.png"),
    ):
        assert re.search(rf"^\[fastcps\]\s+{label}\s+{re.escape(str(path))}", trained_run.stdout, re.M), label
    assert f"python -m fastcps.sample --run {run} --out" in trained_run.stdout


@pytest.mark.slow
def test_the_printed_sample_command_reproduces_the_runs_eval(trained_run, tmp_path, capsys):
    """With the eval set's K, the default prompts and seed are the trainer's eval: base = eval/digit at
    epoch 0, trained = eval/digit after the last epoch (no EMA)."""
    line = next(x for x in trained_run.stdout.splitlines() if "python -m fastcps.sample" in x)
    argv = shlex.split(line.split("python -m fastcps.sample", 1)[1])
    argv[argv.index("--out") + 1] = str(tmp_path / "grid.png")
    assert main(argv + ["--images-per-prompt", "2"]) == 0
    printed = capsys.readouterr().out
    evals = {
        r["epoch"]: r["eval/digit"]
        for r in map(json.loads, (trained_run.dir / "metrics.jsonl").open())
        if "eval/digit" in r
    }
    summary = json.loads((tmp_path / "grid.json").read_text())
    assert summary["mean"]["base"]["digit"] == pytest.approx(evals[0], abs=1e-6)
    assert summary["mean"]["trained"]["digit"] == pytest.approx(evals[1], abs=1e-6)
    assert re.search(rf"base\s+{summary['mean']['base']['total']:.4f}", printed)
    assert re.search(rf"trained\s+{summary['mean']['trained']['total']:.4f}", printed)
    rows = list(csv.DictReader((tmp_path / "grid.csv").open()))
    assert len(rows) == 2 * 2 * 2 and {r["model"] for r in rows} == {"base", "trained"}
    assert all(Path(r["file"]).is_file() for r in rows) and (tmp_path / "grid.png").stat().st_size > 0


# --- the toy, with a checkpoint folder written here ---------------------------------------------------


def fake_run(root: Path, overrides=(), *, perturb=0.05, family=None, lora=None) -> tuple[Path, object]:
    """A run directory as the trainer leaves it: config.json and a complete checkpoints/final (the
    trainer's own export, then its marker) holding the base weights plus seeded noise."""
    cfg = load_config(RunConfig, CONFIG, ["eval.num_prompts=2", "eval.images_per_prompt=2", *overrides])
    run = root / "run"
    save_config(cfg, run / "config.json")
    if lora is not None:
        cfg = load_config(RunConfig, CONFIG, [f"policy.lora={json.dumps(lora)}"])
    policy = build_policy(cfg.policy, "cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen))
    final = run / "checkpoints" / "final"
    final.mkdir(parents=True)
    export_weights(SimpleNamespace(module=policy.transformer), family or cfg.policy.name, policy.lora, final)
    complete.seal(final, tag="final", epoch=1, rank=0, world=1)
    return run, policy


def euler_images(policy, model, prompt, x, steps):
    """An independent ODE sampler (plain Euler) as the oracle."""
    sig = policy.sigmas(steps, device="cpu")
    cond = policy.encode([prompt])
    with torch.no_grad():
        for i in range(steps):
            x = x + (sig[i + 1] - sig[i]) * policy.velocity(model, x, sig[i].expand(x.shape[0]), cond)
    return policy.decode(x)


def test_toy_full_finetune_base_row_then_trained_row_from_the_same_noise(tmp_path, one_thread):
    from fastcps.rewards import WeightedReward
    from fastcps.rollout import sampling_steps

    run, trained = fake_run(tmp_path)
    cfg = load_config(RunConfig, str(run / "config.json"))
    prompts = ["a handwritten digit three", "the number 7"]
    reward = WeightedReward([("digit", 1.0, {})])
    weights = run / "checkpoints" / "final"
    policy = build_policy(cfg.policy, "cpu")
    base = build_policy(cfg.policy, "cpu")
    ode = sampling_steps("ode", None, policy.sigmas(4, device="cpu"))
    c = compare(policy, weights, prompts, [{}, {}], reward, ode, k=3, seed=5, device="cpu")
    for p, prompt in enumerate(prompts):
        x1 = eval_noise(policy, 5, p, 3, "cpu")
        torch.testing.assert_close(
            c.images["base"][p], euler_images(base, base.transformer, prompt, x1, 4), atol=1e-5, rtol=0
        )
        want = euler_images(trained, trained.transformer, prompt, x1, 4)
        torch.testing.assert_close(c.images["trained"][p], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            c.total["trained"][p], reward(want, [prompt] * 3, [{}] * 3).total, atol=1e-5, rtol=0
        )
    assert (c.images["base"] - c.images["trained"]).abs().max() > 0.05  # the checkpoint was loaded
    # A stochastic sampler draws the same seeded noise for both rows: equal weights, equal images.
    same, _ = fake_run(tmp_path / "same", perturb=0.0)
    cps = sampling_steps("cps", None, policy.sigmas(4, device="cpu"))
    fresh = build_policy(cfg.policy, "cpu")
    s = compare(
        fresh,
        same / "checkpoints" / "final",
        prompts[:1],
        [{}],
        reward,
        cps,
        k=2,
        seed=5,
        device="cpu",
    )
    torch.testing.assert_close(s.images["base"], s.images["trained"], atol=0, rtol=0)
    assert (s.images["base"][0] - c.images["base"][0, :2]).abs().max() > 1e-3  # cps is not the ODE


def test_the_grid_and_files_for_prompts_given_on_the_command_line(tmp_path, one_thread, capsys):
    from PIL import Image

    run, _ = fake_run(
        tmp_path, ['rewards=[{"name": "digit"}, {"name": "jpeg_compressibility", "weight": 0.5}]']
    )
    out = tmp_path / "out" / "cmp.png"
    assert (
        main(
            [
                "--run",
                str(run),
                "--prompt",
                "a handwritten digit three",
                "--prompt",
                "the number 7",
                "--images-per-prompt",
                "3",
                "--steps",
                "3",
                "--sampler",
                "cps",
                "--seed",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["sampler"] == "cps" and summary["steps"] == 3 and summary["seed"] == 2
    assert summary["rewards"] == {"digit": 1.0, "jpeg_compressibility": 0.5}
    rows = summary["images"]
    assert len(rows) == 2 * 2 * 3 and len(list((tmp_path / "out" / "cmp_images").glob("*.png"))) == 12
    for r in rows:  # the total is the weighted sum of the components
        assert r["total"] == pytest.approx(r["digit"] + 0.5 * r["jpeg_compressibility"], abs=1e-6)
    for which in ("base", "trained"):
        mean = np.mean([r["digit"] for r in rows if r["model"] == which])
        assert summary["mean"][which]["digit"] == pytest.approx(mean, abs=1e-6)
        assert re.search(rf"^\s+{which}\s+{summary['mean'][which]['total']:.4f}\s+{mean:.4f}", printed, re.M)
    assert "jpeg_compressibility" in printed and out.with_suffix(".csv").is_file()
    grid = Image.open(out)
    assert grid.width > 3 * 128 and grid.height > 4 * 128  # 2 prompts x (base + trained) rows of 3 images


def test_help_says_what_trained_means_and_how_to_use_the_lora_in_diffusers(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "not the EMA" in text and 'pipe.load_lora_weights("runs/<name>/checkpoints/final")' in text
    assert "pytorch_lora_weights.safetensors" in text


# --- bad input: exit 2 and the message names the argument ---------------------------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("toy"))[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "no run",
        "not a run",
        "no checkpoint",
        "prompt file suffix",
        "jsonl line",
        "other family",
        "run's prompts gone",
        "lora weights",
        "missing --out",
        "not png",
        "cpws steps",
        "image for a text model",
        "edit rows for a text model",
    ],
)
def test_bad_input_exits_2_naming_the_argument(case, toy_run, tmp_path, capsys):
    run, out = str(toy_run), ["--out", str(tmp_path / "g.png")]
    if case == "no run":
        argv, want = ["--run", "/no/such/run"] + out, "--run /no/such/run: no such run directory"
    elif case == "not a run":
        argv, want = ["--run", str(tmp_path)] + out, "no config.json"
    elif case == "no checkpoint":
        argv, want = ["--run", run, "--checkpoint", "epoch00099"] + out, "checkpoints of this run: final"
    elif case == "prompt file suffix":
        argv, want = ["--run", run, "--prompts", str(write(tmp_path / "p.csv", "a,b\n"))] + out, ".txt file"
    elif case == "jsonl line":
        bad = write(tmp_path / "p.jsonl", '{"prompt": "the number 1"}\nthe number 2\n')
        argv, want = ["--run", run, "--prompts", str(bad)] + out, f"--prompts {bad}: {bad}:2:"
    elif case == "other family":
        cfg = load_config(RunConfig, str(toy_run / "config.json"), ["policy.name=flux"])
        save_config(cfg, tmp_path / "r" / "config.json")
        (tmp_path / "r" / "checkpoints").symlink_to(toy_run / "checkpoints")
        argv, want = (
            ["--run", str(tmp_path / "r")] + out,
            "weights of a 'toy' policy, but the run's config.json says ",
        )
    elif case == "run's prompts gone":
        cfg = load_config(RunConfig, str(toy_run / "config.json"), ["prompts.source=/no/such/prompts.txt"])
        save_config(cfg, tmp_path / "r" / "config.json")
        (tmp_path / "r" / "checkpoints").symlink_to(toy_run / "checkpoints")
        argv, want = ["--run", str(tmp_path / "r")] + out, "Give --prompts FILE or --prompt TEXT"
    elif case == "lora weights":  # a LoRA export in a full fine-tuning run
        argv, want = ["--run", str(fake_run(tmp_path, lora={"r": 2, "alpha": 2})[0])] + out, "(policy.lora)"
    elif case == "image for a text model":
        img = tmp_path / "src.png"
        Image.new("RGB", (8, 8)).save(img)
        argv = ["--run", run, "--prompt", "the number 1", "--image", str(img)] + out
        want = "--image: the run's policy (toy) generates from text alone"
    elif case == "edit rows for a text model":
        Image.new("RGB", (8, 8)).save(tmp_path / "src.png")
        rows = write(tmp_path / "e.jsonl", '{"prompt": "the number 1", "image": "src.png"}\n')
        argv, want = ["--run", run, "--prompts", str(rows)] + out, "row 1 ('the number 1') is an edit row"
    elif case == "missing --out":
        argv, want = ["--run", run], "the following arguments are required: --out"
    elif case == "not png":
        argv, want = ["--run", run, "--out", str(tmp_path / "g.jpg")], "--out"
    else:
        argv, want = ["--run", run, "--sampler", "cpws", "--steps", "4"] + out, "--sampler cpws"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert want in err, err
    assert not (tmp_path / "g.png").exists()


# --- FLUX / SD3: the exported LoRA in a stock diffusers pipeline --------------------------------------


def same_levels(ours, stock):
    """Our images are the 8-bit levels of the stock pipeline's (``(x * 255).round()``, what a saved image
    holds and flow_grpo's rewards score); sampling agrees to ~1e-6, so a level may differ by one where the
    pipeline's value lies that close to a rounding edge."""
    stock = (stock.float() * 255).round().clamp(0, 255) / 255
    torch.testing.assert_close(ours, stock, atol=1 / 255 + 1e-6, rtol=0)
    assert float((ours != stock).float().mean()) < 1e-3


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_stock_pipeline_with_the_exported_lora_gives_the_trained_images(name, tmp_path, one_thread):
    from diffusers import DiffusionPipeline

    from fastcps.rewards import WeightedReward
    from fastcps.rollout import sampling_steps
    from fastcps.testing import save_tiny_flux, save_tiny_sd3

    path = (save_tiny_flux if name == "flux" else save_tiny_sd3)(tmp_path / name)
    config = ROOT / "configs" / ("flux_pickscore.json" if name == "flux" else "sd35_ocr.json")
    cfg = load_config(
        RunConfig,
        str(config),
        [
            f"policy.pretrained={path}",
            "policy.dtype=fp32",
            "policy.resolution=64",
            "policy.max_sequence_length=32",
            'policy.lora={"r": 4, "alpha": 8.0}',
            'rewards=[{"name": "jpeg_compressibility"}]',
            "eval.num_steps=4",
        ],
    )
    run = tmp_path / "run"
    save_config(cfg, run / "config.json")
    trained = build_policy(cfg.policy, "cpu")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    final = run / "checkpoints" / "final"
    final.mkdir(parents=True)
    export_weights(SimpleNamespace(module=trained.transformer), name, True, final)

    policy = build_policy(cfg.policy, "cpu")
    prompt = "a photo of a cat"
    sampling = sampling_steps("ode", None, policy.sigmas(4, device="cpu"))
    c = compare(
        policy,
        final,
        [prompt],
        [{}],
        WeightedReward([("jpeg_compressibility", 1, {})]),
        sampling,
        k=2,
        seed=cfg.eval.seed,
        device="cpu",
    )
    x1 = eval_noise(policy, cfg.eval.seed, 0, 2, "cpu")
    pipe = DiffusionPipeline.from_pretrained(path)
    kw = dict(
        height=64,
        width=64,
        num_inference_steps=4,
        latents=x1.clone(),
        max_sequence_length=32,
        output_type="pt",
    )
    if name == "flux":
        kw["guidance_scale"] = 3.5
    else:  # true CFG 4.5 (sd35_ocr.json's cfg_scale) and fastcps's schedule
        kw.update(guidance_scale=4.5, sigmas=list(np.linspace(1.0, 1 / 4, 4)))
    with torch.no_grad():
        same_levels(c.images["base"][0], pipe([prompt] * 2, **kw).images)
        pipe.load_lora_weights(final)  # pytorch_lora_weights.safetensors, written beside policy.safetensors
        stock = pipe([prompt] * 2, **kw).images.float()
    same_levels(c.images["trained"][0], stock)
    assert (c.images["trained"] - c.images["base"]).abs().max() > 1e-3  # the adapters change the images


def test_an_edit_grid_shows_each_source_beside_its_base_and_trained_edits(tmp_path):
    """An editing run's outputs: each prompt's source image saved as the policy read it and drawn left of the
    base and trained rows (the grid is wider by a column), its file named in the JSON."""
    from fastcps.sample.comparison import Comparison
    from fastcps.sample.outputs import write_outputs

    gen = torch.Generator().manual_seed(0)
    levels = lambda *shape: torch.randint(0, 256, shape, generator=gen).float() / 255  # noqa: E731
    images = {w: levels(2, 3, 3, 32, 32) for w in ("base", "trained")}
    total = {w: torch.rand(2, 3, generator=gen) for w in images}
    comps = {w: {"geneval": total[w]} for w in images}
    info = dict(run="r", checkpoint="final", sampler="ode", steps=4, seed=0)
    plain = write_outputs(
        Comparison(["a", "b"], images, total, comps), tmp_path / "t2i.png", info, {"geneval": 1}
    )
    sources = [levels(1, 3, 32, 32), levels(1, 3, 32, 32)]
    edit = Comparison(["a", "b"], images, total, comps, sources)
    summary = write_outputs(edit, tmp_path / "edit.png", info, {"geneval": 1})
    assert "source_images" not in plain
    for p, (files,) in enumerate(summary["source_images"]):
        saved = torch.from_numpy(np.asarray(Image.open(files))).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(saved, sources[p][0], atol=0, rtol=0)
    assert Image.open(tmp_path / "edit.png").width > Image.open(tmp_path / "t2i.png").width
