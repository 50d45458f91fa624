"""The method registry: what each entry implies, and that a new method is one entry away."""

import pytest

from hydra_rank.config import from_dict
from hydra_rank.errors import ConfigError
from hydra_rank.methods import METHODS, Method, Start, Trainable, get_method
from hydra_rank.rank.budget import Allocation
from hydra_rank.train import run

from .test_train import tiny_config


def names(predicate) -> set[str]:
    return {name for name, method in METHODS.items() if predicate(method)}


def test_what_each_method_implies():
    assert names(lambda m: m.calibrates("warmup", None)) == {
        "hydra-static",
        "hydra-coarse",
        "hydra-fine",
        "control-shuffled",
        "eva",
    }
    assert names(lambda m: m.calibrates("calibrated", None)) == names(lambda m: m.calibrates("warmup", None)) | {
        "hydra"
    }
    assert names(lambda m: m.calibrates("calibrated", "allocation.json")) == set()  # a saved allocation replaces it
    assert names(lambda m: m.allocates) == set(METHODS) - {"lora", "rslora", "eva", "adalora", "full"}
    assert names(lambda m: m.rslora) == {"rslora"}
    assert names(lambda m: m.in_trainer) == set(METHODS) - {"adalora", "full"}
    assert names(lambda m: m.dynamic) == {"hydra"}
    assert names(lambda m: m.resume_blocker is not None) == {"adalora"}
    assert {m.mode for m in METHODS.values()} == {"hierarchical", "coarse", "fine"}


def test_unknown_methods_are_one_clear_error():
    with pytest.raises(ConfigError, match="unknown method 'qlora'; choose from hydra, lora"):
        get_method("qlora")
    with pytest.raises(ConfigError, match=r"adapter\.method must be one of"):
        from_dict({"adapter": {"method": "qlora"}})
    with pytest.raises(ConfigError, match=r"lora uses adapter\.rank"):
        from_dict({"adapter": {"method": "lora", "budget_params": 1000}})


def test_a_new_method_is_one_registry_entry(tiny_llava_dir, colour_dataset, tmp_path, monkeypatch):
    """An entry alone (here: a calibrated coarse-only start that the scheduler then moves) validates, trains,
    calibrates, writes its starting ranks and stays within the budget, without touching any other module."""
    entry = Method(
        "hydra-coarse-dynamic",
        "test: coarse start, then HyDRA decisions",
        start=Start.CALIBRATED,
        mode="coarse",
        dynamic=True,
    )
    monkeypatch.setitem(METHODS, entry.name, entry)
    config = tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "out", max_steps=6, debug_checks=True)
    config.adapter.method = entry.name
    config.adapter.calibration_batches = 1
    result = run(config, show_progress=False)
    assert entry.trainable is Trainable.LORA and result.metrics["method"] == entry.name
    assert result.metrics["calibration_time_s"] > 0 and result.metrics["decisions"] >= 1
    start = Allocation.load(result.output_dir / "allocation_start.json")
    assert start.info["method"] == entry.name
    assert result.metrics["max_trainable_params"] <= result.metrics["budget_params"]
