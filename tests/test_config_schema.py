"""The run config on pydantic: the committed JSON Schema, every shipped config, configs saved by earlier
versions (``--resume``), and reward names and arguments checked when the config loads, before any
model, DeepSpeed or process group starts."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import jsonschema  # a dev dependency: the editors' view of the config is tested too
import pytest
from pydantic import BaseModel

from fastcps import rewards
from fastcps.config import (
    ConfigError,
    RunConfig,
    load_config,
    save_config,
    schema_json,
    to_dict,
    validate_tree,
)
from fastcps.config.models import main as config_main
from fastcps.train import load_run_config, main, parse_args

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SCHEMA = ROOT / "configs" / "schema.json"
# The run configs in configs/ (ds_*.json are DeepSpeed's, schema.json is the schema).
RUN_CONFIGS = sorted(
    p for p in (ROOT / "configs").glob("*.json") if p.name != "schema.json" and not p.name.startswith("ds_")
)
DIGITS = str(ROOT / "configs" / "digits_cps.json")
HEAVY = (
    "deepspeed",
    "diffusers",
    "transformers",
    "open_clip",
    "paddleocr",
    "rapidocr",
    "peft",
    "fastcps.trainer",
)


# --- JSON Schema --------------------------------------------------------------------------------------


def schema_fields(schema: dict) -> dict[str, tuple]:
    """{dotted key: (type, default, description, bounds, choices)} of every config key in a JSON Schema,
    through ``$ref`` / ``allOf`` (pydantic versions lay the same schema out differently: 2.7 wraps a
    section's ``$ref`` in ``allOf`` and writes a bound 0.0 as 0, 2.14 does not)."""
    defs, out = schema.get("$defs", {}), {}

    def ref(node):
        target = node.get("$ref") or (node.get("allOf") or [{}])[0].get("$ref")
        return defs[target.rsplit("/", 1)[-1]] if target else None

    def walk(props, prefix):
        for key, node in props.items():
            path = f"{prefix}{key}"
            options = node.get("anyOf", [node])
            kinds = sorted(str(o.get("type", o.get("const", o.get("enum")))) for o in options)
            bounds = tuple(float(node[b]) for b in ("minimum", "exclusiveMinimum", "maximum") if b in node)
            out[path] = (kinds, node.get("default"), node.get("description"), bounds)
            section = ref(node)
            if section is not None:
                walk(section.get("properties", {}), f"{path}.")

    walk(schema["properties"], "")
    return out


def test_the_committed_schema_is_the_export(tmp_path, capsys):
    """configs/schema.json cannot go stale: regenerate it with
    ``python -m fastcps.config --schema --out configs/schema.json``. Compared key by key (type, default,
    description, bounds), not as text: the text depends on the pydantic version that writes it."""
    committed, exported = (
        schema_fields(json.loads(SCHEMA.read_text())),
        schema_fields(json.loads(schema_json())),
    )
    stale = {k: (committed.get(k), exported.get(k)) for k in committed.keys() | exported.keys()
             if committed.get(k) != exported.get(k)}  # fmt: skip
    assert not stale, f"configs/schema.json is stale (re-export it): {stale}"
    assert len(committed) > 60 and "train.clip_range" in committed and "rewards" in committed
    assert config_main(["--schema", "--out", str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.json").read_text() == schema_json()
    assert config_main(["--schema"]) == 0
    assert capsys.readouterr().out == schema_json()


def test_the_schema_has_descriptions_ranges_and_reward_arguments():
    schema = json.loads(schema_json())
    train = schema["$defs"]["TrainConfig"]["properties"]
    assert train["lr"]["description"] == "AdamW learning rate."
    assert train["images_per_prompt"]["minimum"] == 2
    assert schema["$defs"]["TrainConfig"]["additionalProperties"] is False
    cases = {
        c["if"]["properties"]["name"]["const"]: c["then"]["properties"]["args"]
        for c in schema["$defs"]["RewardConfig"]["allOf"]
    }
    assert set(cases) == set(rewards.REGISTRY)
    assert set(cases["ocr"]["properties"]["engine"]["enum"]) == {"rapidocr", "paddleocr"}
    assert "model_config" in cases["hpsv2"]["properties"]  # the key, not the renamed field
    assert "$schema" in schema["properties"]  # a config file may name its schema


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(RunConfig, str(path))
    validate_tree(cfg, world_size=None)
    assert to_dict(
        load_config(RunConfig, None, [f"{k}={json.dumps(v)}" for k, v in to_dict(cfg).items()])
    ) == to_dict(cfg)
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(json.loads(path.read_text()))


def test_a_schema_key_in_a_config_file_is_ignored(tmp_path):
    data = json.loads(Path(DIGITS).read_text())
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"$schema": "../configs/schema.json", **data}))
    assert load_config(RunConfig, str(path)) == load_config(RunConfig, DIGITS)


# --- configs saved by earlier versions ------------------------------------------------------------------

# Written by the dataclass config (before pydantic): RunConfig() saved, and configs/digits_cps.json and
# configs/flux_pickscore.json loaded then saved, as a run directory's config.json.
OLD = {
    "default": {
        "name": "run",
        "train.num_epochs": 40,
        "rewards": [{"name": "digit", "weight": 1.0, "args": {}}],
    },
    "digits_cps": {"name": "digits_cps", "train.num_epochs": 24, "sampler.eta": 0.8, "eval.every": 4},
    "flux_pickscore": {
        "policy.name": "flux",
        "policy.dtype": "bf16",
        "rewards.0.name": "pickscore",
        "train.betas": [0.9, 0.999],
    },
}


def _get(data, dotted):
    for key in dotted.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


# keys added since the fixtures were saved, with the value an older run's config gets (nested: merged)
ADDED_SINCE = {
    "whole_model_sampling": "auto",
    "memory_reserve": {"fraction": 0.08, "gib": 0.0},
    "distributed": {"load_timeout_s": 1800.0, "step_timeout_s": 300.0, "heartbeat_timeout_s": 60.0},
    "train": {"micro_batch": None},
}


def with_added(saved: dict) -> dict:
    """``saved`` with the keys of ``ADDED_SINCE`` added, section by section."""
    out = dict(saved)
    for key, value in ADDED_SINCE.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and key in out else value
    return out


@pytest.mark.parametrize("name", sorted(OLD))
def test_configs_saved_by_earlier_versions_still_load(name, tmp_path):
    saved = DATA / f"old_config_{name}.json"
    cfg = load_config(RunConfig, str(saved))
    want = with_added(json.loads(saved.read_text()))
    assert to_dict(cfg) == want  # every value as saved, nothing lost, only the new keys' defaults added
    for key, value in OLD[name].items():
        assert _get(to_dict(cfg), key) == value
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(saved.read_text())
    assert load_run_config(parse_args(["--resume", str(run)])) == cfg  # what --resume reads
    save_config(cfg, run / "again.json")
    assert json.loads((run / "again.json").read_text()) == want  # saved the same as before, plus the new keys


def test_the_default_config_is_the_one_saved_before():
    assert to_dict(RunConfig()) == with_added(json.loads((DATA / "old_config_default.json").read_text()))


# --- rewards checked with the config ------------------------------------------------------------------


def test_an_unknown_reward_fails_at_config_time_with_one_line(capsys):
    assert main(["--config", DIGITS, "--set", "rewards.0.name=digt"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "config error: config key 'rewards.0.name': unknown reward 'digt'; did you mean 'digit'? "
        f"Registered rewards: {', '.join(sorted(rewards.REGISTRY))}\n"
    )


def test_an_unknown_reward_argument_fails_at_config_time(capsys):
    assert main(["--config", DIGITS, "--set", "rewards.0.args.bogus=1"]) == 2
    assert capsys.readouterr().err == (
        "config error: unknown config key 'rewards.0.args.bogus'. Valid keys "
        "under 'rewards.0.args': weights, device (arguments of reward 'digit')\n"
    )
    assert main(["--config", DIGITS, "--set", "rewards.0.args.weight=x.safetensors"]) == 2
    assert "did you mean 'rewards.0.args.weights'?" in capsys.readouterr().err


@pytest.mark.parametrize(
    "reward, args, message",
    [
        (
            "ocr",
            {"engine": "tesseract"},
            "config key 'rewards.0.args.engine': expected one of \"rapidocr\", "
            '"paddleocr"; got "tesseract" (str) (arguments of reward \'ocr\')',
        ),
        (
            "jpeg_compressibility",
            {"quality": "95"},
            "config key 'rewards.0.args.quality': expected int, got \"95\"",
        ),
        (
            "jpeg_compressibility",
            {"quality": True},
            "config key 'rewards.0.args.quality': expected int, got true",
        ),
        ("pickscore", {"dtype": "fp64"}, "config key 'rewards.0.args.dtype': expected one of"),
        (
            "hpsv2",
            {"model_config": 3},
            "config key 'rewards.0.args.model_config': expected dict | str | null, got 3",
        ),
    ],
)
def test_reward_arguments_are_typed(reward, args, message):
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, DIGITS, [f"rewards={json.dumps([{'name': reward, 'args': args}])}"])
    assert message in str(err.value)


def test_good_reward_arguments_pass_unchanged():
    args = {"model_config": {"embed_dim": 8}, "batch_size": 2, "dtype": "fp32"}
    cfg = load_config(
        RunConfig,
        DIGITS,
        [f"rewards={json.dumps([{'name': 'hpsv2', 'args': args}])}", "rewards.0.args.trust_checkpoint=true"],
    )
    assert cfg.rewards[0].args == {**args, "trust_checkpoint": True}  # as given: the reward fills defaults


def test_a_reward_named_twice_fails_at_config_time():
    with pytest.raises(
        ConfigError, match=r"^config key 'rewards': a reward may appear once, got \['digit', 'digit'\]$"
    ):
        load_config(RunConfig, DIGITS, ['rewards=[{"name": "digit"}, {"name": "digit", "weight": 2}]'])


def test_config_errors_load_no_model_and_no_deepspeed():
    """The CLI's config errors come from the config alone: neither DeepSpeed, a diffusion or reward
    library, nor the trainer is imported (so no policy is built and no process group starts)."""
    code = (
        "import json, sys\nfrom fastcps.train import main\n"
        "rcs = [main(['--config', sys.argv[1], '--set', s]) for s in sys.argv[2:]]\n"
        "from fastcps.rewards import REGISTRY, args_model\n"
        "[args_model(n) for n in REGISTRY]  # every reward's arguments: still nothing heavy\n"
        f"print(json.dumps([rcs, [m for m in {list(HEAVY)!r} if m in sys.modules]]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, DIGITS, "rewards.0.name=digt", "rewards.0.args.bogus=1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [[2, 2], []]
    assert out.stderr.count("config error: ") == 2


def test_every_reward_declares_its_constructor_arguments():
    """A reward's ``Args`` has one field per constructor argument (by key), with the same default."""
    for name in rewards.REGISTRY:
        module, cls_name = rewards.REGISTRY[name].split(":")
        cls = getattr(__import__(module, fromlist=[cls_name]), cls_name)
        params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        fields = {f.alias or k: f.default for k, f in cls.Args.model_fields.items()}
        assert fields == params, name


class _Args(BaseModel):
    model_config = {"extra": "forbid"}
    size: int = 1


def test_external_rewards_with_and_without_an_args_model(monkeypatch):
    monkeypatch.setattr(rewards, "_EXTERNAL_ARGS", {})
    monkeypatch.setitem(rewards.REGISTRY, "mine", "not_imported_module:Reward")
    rewards.register("mine", "not_imported_module:Reward")  # no args model: any dict, module not imported
    cfg = load_config(RunConfig, DIGITS, ['rewards=[{"name": "mine", "args": {"anything": [1, 2]}}]'])
    assert cfg.rewards[0].args == {"anything": [1, 2]}
    rewards.register("mine", "not_imported_module:Reward", args=_Args)
    with pytest.raises(ConfigError, match=r"unknown config key 'rewards\.0\.args\.anything'"):
        load_config(RunConfig, DIGITS, ['rewards=[{"name": "mine", "args": {"anything": 1}}]'])
    assert load_config(RunConfig, DIGITS, ["rewards.0.name=mine", "rewards.0.args.size=3"]).rewards[
        0
    ].args == {"size": 3}


def test_micro_batch_and_memory_reserve_are_typed_and_checked():
    """train.micro_batch: "auto", a divisor of the images per optimizer step, or null; the error of one
    that does not divide names the key and the divisors. memory_reserve: a share below 1, GiB >= 0."""
    flux = str(ROOT / "configs" / "flux_pickscore.json")
    for value, want in (("auto", "auto"), ("4", 4), ("null", None)):
        cfg = load_config(RunConfig, flux, [f"train.micro_batch={value}"])
        validate_tree(cfg, world_size=8)
        assert cfg.train.micro_batch == want
    cfg = load_config(RunConfig, flux, ["train.micro_batch=5"])  # checked with the world size
    with pytest.raises(
        ConfigError, match=r"train.micro_batch = 5 does not divide the 24 images per optimizer"
    ):
        validate_tree(cfg, world_size=8)
    for bad in ("0", '"4"', "true"):
        with pytest.raises(ConfigError, match="train.micro_batch"):
            load_config(RunConfig, flux, [f"train.micro_batch={bad}"])
    for bad in ("memory_reserve.fraction=1", "memory_reserve.fraction=-0.1", "memory_reserve.gib=-1"):
        with pytest.raises(ConfigError, match="memory_reserve"):
            load_config(RunConfig, flux, [bad])
