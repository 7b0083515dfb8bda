from __future__ import annotations  # on purpose: configlib must resolve string annotations

import json
from typing import Literal, Optional

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from fastcps.config import ConfigError, from_dict, load_config, save_config, to_dict, validate_tree


# Module-level models: pydantic resolves their string annotations from the module's names.
class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RewardCfg(Section):
    name: str
    weight: float = 1.0


class OptimCfg(Section):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: Optional[int] = None  # noqa: UP045 -- the typing.Optional spelling is tested on purpose


class TrainCfg(Section):
    batch_size: int = 8
    grad_accum: int = 1
    sampler: Literal["cps", "flow_sde", "ode"] = "cps"
    use_lora: bool = True
    optim: OptimCfg = Field(default_factory=OptimCfg)

    @model_validator(mode="after")
    def _divisible(self, info: ValidationInfo) -> TrainCfg:
        world_size = (info.context or {}).get("world_size")  # given by validate_tree only
        if world_size is not None and self.batch_size % world_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by world size {world_size}")
        return self


class Root(Section):
    run_name: str = "run"
    seed: int = 0
    resume: str | None = None
    train: TrainCfg = Field(default_factory=TrainCfg)
    rewards: list[RewardCfg] = Field(default_factory=lambda: [RewardCfg(name="pickscore")])
    extra: dict[str, float] = Field(default_factory=dict)


class Required(Section):
    path: str
    steps: int = 3


class Ranged(Section):
    epochs: int = Field(1, ge=1)
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    checkpointing: bool | Literal["auto"] = False
    stages: list[int] = Field(default_factory=lambda: [3], min_length=1)


def test_defaults_and_nested():
    cfg = from_dict(Root, {"train": {"optim": {"lr": 3e-5}}})
    assert cfg.train.optim.lr == 3e-5
    assert cfg.train.batch_size == 8
    assert cfg.rewards == [RewardCfg(name="pickscore", weight=1.0)]


def test_unknown_key_names_full_path_and_suggests():
    with pytest.raises(ConfigError) as e:
        from_dict(Root, {"train": {"optim": {"lrr": 1e-5}}})
    msg = str(e.value)
    assert "'train.optim.lrr'" in msg
    assert "did you mean 'train.optim.lr'" in msg
    assert "lr, betas, warmup" in msg  # the valid keys, in field order


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'zzzz'.*run_name, seed") as e:
        from_dict(Root, {"zzzz": 1})
    assert "did you mean" not in str(e.value)


def test_unknown_key_inside_list_of_models():
    with pytest.raises(ConfigError, match=r"'rewards\.1\.wieght'.*did you mean 'rewards\.1\.weight'"):
        from_dict(Root, {"rewards": [{"name": "a"}, {"name": "b", "wieght": 2}]})


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"seed": "3"}, r"'seed': expected int, got \"3\" \(str\)"),
        ({"seed": 1.5}, r"'seed': expected int, got 1.5"),
        ({"train": {"optim": {"lr": "fast"}}}, r"'train.optim.lr': expected float"),
        ({"train": {"use_lora": 1}}, r"'train.use_lora': expected bool"),
        ({"train": "big"}, r"'train': expected an object \(TrainCfg\)"),
        ({"rewards": {"name": "a"}}, r"'rewards': expected a list"),
        ({"extra": {"a": "x"}}, r"'extra.a': expected float"),
        ({"train": {"optim": {"betas": [0.9]}}}, r"'train.optim.betas': expected 2 elements"),
    ],
)
def test_wrong_types(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Root, data)


def test_bool_is_not_int_but_int_is_float():
    with pytest.raises(ConfigError, match=r"'seed': expected int, got true \(bool\)"):
        from_dict(Root, {"seed": True})
    with pytest.raises(ConfigError, match="expected float"):
        from_dict(Root, {"train": {"optim": {"lr": False}}})
    cfg = from_dict(Root, {"train": {"optim": {"lr": 1}}})
    assert cfg.train.optim.lr == 1.0 and type(cfg.train.optim.lr) is float


def test_literal_lists_choices():
    with pytest.raises(ConfigError, match=r"'train.sampler': expected one of \"cps\", \"flow_sde\", \"ode\""):
        from_dict(Root, {"train": {"sampler": "sde"}})
    assert from_dict(Root, {"train": {"sampler": "ode"}}).train.sampler == "ode"


def test_optional():
    assert from_dict(Root, {"resume": None}).resume is None
    assert from_dict(Root, {"resume": "ckpt/5"}).resume == "ckpt/5"
    assert from_dict(Root, {"train": {"optim": {"warmup": 10}}}).train.optim.warmup == 10
    with pytest.raises(ConfigError, match="'train.optim.warmup': expected int"):
        from_dict(Root, {"train": {"optim": {"warmup": "10"}}})


def test_tuple_and_dict():
    cfg = from_dict(Root, {"train": {"optim": {"betas": [0.8, 1]}}, "extra": {"a": 2}})
    assert cfg.train.optim.betas == (0.8, 1.0)
    assert cfg.extra == {"a": 2.0}


def test_missing_required():
    with pytest.raises(ConfigError, match="missing required config key 'path'"):
        from_dict(Required, {"steps": 2})
    with pytest.raises(ConfigError, match="missing required config key 'rewards.0.name'"):
        from_dict(Root, {"rewards": [{"weight": 2}]})


def test_overrides(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"seed": 1, "rewards": [{"name": "a"}, {"name": "b", "weight": 0.5}]}))
    cfg = load_config(
        Root,
        str(p),
        [
            "seed=7",
            "train.optim.lr=1e-5",  # section absent from the file: its other defaults stay
            "train.use_lora=false",
            "train.optim.betas=[0.5, 0.6]",
            "resume=null",
            "run_name=my run",  # not JSON -> plain string
            "rewards.1.weight=2",
            "extra.bonus=3",
        ],
    )
    assert cfg.seed == 7
    assert cfg.train.optim.lr == 1e-5 and cfg.train.optim.betas == (0.5, 0.6)
    assert cfg.train.batch_size == 8 and cfg.train.use_lora is False
    assert cfg.resume is None and cfg.run_name == "my run"
    assert cfg.rewards == [RewardCfg(name="a", weight=1.0), RewardCfg(name="b", weight=2.0)]
    assert cfg.extra == {"bonus": 3.0}


def test_override_string_field_with_json_looking_text():
    # "123" parses as an int, but the field is a str: the user meant the text.
    assert load_config(Root, None, ["run_name=123"]).run_name == "123"


def test_override_list_index_into_default_list():
    cfg = load_config(Root, None, ["rewards.0.weight=2"])
    assert cfg.rewards == [RewardCfg(name="pickscore", weight=2.0)]


def test_override_errors():
    with pytest.raises(ConfigError, match=r"'train.optim.lrr'.*did you mean 'train.optim.lr'"):
        load_config(Root, None, ["train.optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"'tran'.*did you mean 'train'"):
        load_config(Root, None, ["tran.batch_size=1"])
    with pytest.raises(
        ConfigError, match=r"cannot set 'seed.x': 'seed' is a value of type int, not a section"
    ):
        load_config(Root, None, ["seed.x=1"])
    with pytest.raises(ConfigError, match=r"index 3 out of range, 'rewards' has 1 elements"):
        load_config(Root, None, ["rewards.3.weight=1"])
    with pytest.raises(ConfigError, match=r"'rewards' is a list"):
        load_config(Root, None, ["rewards.first.weight=1"])
    with pytest.raises(ConfigError, match=r"'train.batch_size': expected int.*from override"):
        load_config(Root, None, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="expected 'dotted.key=value'"):
        load_config(Root, None, ["seed"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Root, str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"seed": 1,}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(Root, str(bad))
    dup = tmp_path / "dup.json"
    dup.write_text('{"seed": 1, "seed": 2}')
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_config(Root, str(dup))


def test_defaults_merge_under_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"train": {"batch_size": 4}}))
    cfg = load_config(Root, str(p), defaults={"seed": 5, "train": {"grad_accum": 2, "batch_size": 16}})
    assert (cfg.seed, cfg.train.batch_size, cfg.train.grad_accum) == (5, 4, 2)


def test_round_trip(tmp_path):
    cfg = load_config(Root, None, ["train.sampler=ode", 'rewards=[{"name": "x", "weight": 0.25}]'])
    out = tmp_path / "run" / "config.json"
    save_config(cfg, str(out))
    text = out.read_text()
    # field order, not sorted
    assert list(json.loads(text)) == ["run_name", "seed", "resume", "train", "rewards", "extra"]
    assert load_config(Root, str(out)) == cfg
    assert to_dict(cfg)["train"]["optim"]["betas"] == [0.9, 0.999]


def test_validate_tree():
    cfg = from_dict(Root, {"train": {"batch_size": 6}})
    validate_tree(cfg, world_size=None)
    validate_tree(cfg, world_size=3)
    with pytest.raises(ConfigError, match=r"^train: batch_size 6 is not divisible by world size 4"):
        validate_tree(cfg, world_size=4)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"epochs": 0}, "config key 'epochs': expected int >= 1, got 0 (int)"),
        ({"fraction": 1.5}, "config key 'fraction': expected float <= 1.0, got 1.5 (float)"),
        ({"checkpointing": "yes"}, 'config key \'checkpointing\': expected bool | "auto", got "yes" (str)'),
        ({"stages": []}, "config key 'stages': expected at least 1 elements, got [] (list)"),
    ],
)
def test_ranges_and_unions_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Ranged, data)
    assert str(e.value) == message
    assert from_dict(Ranged, {"checkpointing": "auto", "fraction": 1}).fraction == 1.0


def test_validate_tree_checks_values_set_in_code():
    cfg = from_dict(Ranged, {})
    cfg.epochs = 0  # pydantic does not check assignments: validate_tree does, before any model loads
    with pytest.raises(ConfigError, match=r"^config key 'epochs': expected int >= 1, got 0"):
        validate_tree(cfg)
