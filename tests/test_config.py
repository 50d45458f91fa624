import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate.utils import DistributedType

from hydra_rank.config import RunConfig, from_dict, load_config, parse_override
from hydra_rank.errors import ConfigError
from hydra_rank.shard import check_launcher

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_demo_configs():
    """configs/tiny-hydra.yaml spells out every key of the embedded defaults, in order; tiny-lora.yaml differs only in
    method (and where it writes). They must not drift apart."""
    defaults = RunConfig()
    hydra = load_config(CONFIGS / "tiny-hydra.yaml")
    assert hydra == from_dict({"train": {"output_dir": "runs/tiny-hydra"}})
    spelled = yaml.safe_load((CONFIGS / "tiny-hydra.yaml").read_text())
    assert {s: list(keys) for s, keys in spelled.items()} == {s: list(keys) for s, keys in defaults.to_dict().items()}
    assert hydra.adapter.method == defaults.adapter.method == "hydra"
    lora = load_config(CONFIGS / "tiny-lora.yaml")
    assert lora == from_dict({"adapter": {"method": "lora"}, "train": {"output_dir": "runs/tiny-lora"}})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert isinstance(load_config(path), RunConfig)


def test_overrides_win_and_parse_as_yaml():
    config = from_dict({"train": {"lr": 0.1}}, ["train.lr=1e-3", "adapter.target_modules=[q_proj, v_proj]"])
    assert config.train.lr == pytest.approx(1e-3)
    assert config.adapter.target_modules == ["q_proj", "v_proj"]
    assert parse_override("data.system_prompt=null") == (["data", "system_prompt"], None)


def test_bare_no_is_a_word_not_a_boolean(tmp_path):
    """YAML 1.1 reads a bare `no` as False; the documented value of train.mixed_precision is the word "no"."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\n  save: false\n", encoding="utf-8")
    config = load_config(path)
    assert (config.train.mixed_precision, config.train.save) == ("no", False)
    with pytest.raises(ConfigError, match=re.escape("train.save: expected bool")):
        load_config(None, ["train.save=no"])


def test_ints_are_accepted_as_floats():
    assert from_dict({"adapter": {"alpha": 16}}).adapter.alpha == 16.0


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({"trian": {}}, [], "Did you mean 'train'"),
        ({"train": {"lrr": 1}}, [], "Did you mean 'train.lr'"),
        ({"train": {"max_steps": "ten"}}, [], "train.max_steps: expected int"),
        ({"adapter": {"rank": 0}}, [], "adapter.rank must be at least 1"),
        ({"data": {"dataset": "coco"}}, [], "data.dataset must be one of"),
        ({"data": {"dataset": "llava-json"}}, [], "needs data.train_path"),
        ({"train": 3}, [], "train: expected a mapping"),
        ({}, ["train.lr"], "--set expects key=value"),
        ({}, ["model.dtype=int8"], "model.dtype must be one of"),
        ({}, ["adapter.rank_scale=linear"], "adapter.rank_scale must be one of ('fixed', 'sqrt')"),
        ({}, ["adapter.spectrum=mean"], "adapter.spectrum must be one of ('stacked', 'coherent')"),
        ({}, ["schedule.attribution=held-out"], "schedule.attribution must be one of ('optimizer', 'probe')"),
        ({}, ["schedule.curves=values"], "schedule.curves must be one of ('gradient', 'held_out', 'worth', 'pooled"),
        ({}, ["schedule.curves=worth", "schedule.attribution=probe"], "nothing would read schedule.attribution probe"),
        ({}, ["adapter.spectrum=coherent", "schedule.signal_steps=1"], "schedule.signal_steps must be at least 2"),
        ({}, ["adapter.target_modules=[]"], "adapter.target_modules is empty"),
        ({"adapter": {"dropout": True}}, [], "adapter.dropout: expected float"),
    ],
)
def test_bad_configs_fail_with_a_named_key(data, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(data, overrides)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_yaml_round_trip(tmp_path):
    config = from_dict({"train": {"max_steps": 7}, "data": {"system_prompt": None}})
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_sharding_combinations_that_cannot_work_fail_at_start():
    with pytest.raises(ConfigError, match=r"train\.sharding must be one of"):
        load_config(None, ["train.sharding=zero3"])
    for extra, reason in [
        ("adapter.method=full", "trains other weights"),
        ("model.quantization=4bit", "cannot shard a quantized base"),
        ("train.mixed_precision=bf16", "outside Accelerate's autocast"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            load_config(None, ["train.sharding=fsdp", extra])


@pytest.mark.parametrize("engine", [DistributedType.DEEPSPEED, DistributedType.FSDP])
def test_sharding_engines_that_cannot_resize_stop_at_start_with_what_to_use(engine):
    with pytest.raises(ConfigError, match=r"set train\.sharding: fsdp"):
        check_launcher(SimpleNamespace(distributed_type=engine))  # what an Accelerator launched that way reports


@pytest.mark.parametrize(("rank", "ceiling"), [(1, 8), (2, 16), (4, 32), (5, 32), (8, 32), (16, 64), (32, 128)])
def test_default_rank_ceiling_is_8x_up_to_32_then_4x(rank, ceiling):
    """The sketch is max_rank + 8 columns wide, so the default ceiling sets HyDRA's signal cost: 8·r0 where the matrix
    cells used it (r0 ≤ 4), then 32 or 4·r0; an explicit adapter.max_rank still wins."""
    assert from_dict({"adapter": {"rank": rank}}).adapter.upper_rank == ceiling
    assert from_dict({"adapter": {"rank": rank, "max_rank": 3 * rank}}).adapter.upper_rank == 3 * rank
