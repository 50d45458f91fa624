"""Where results and cache entries come from: code digests, cache keys, the provenance every result records."""

import json
import shutil

import pytest

from hydra_rank import builtin
from hydra_rank.cache import BUILD_FILE, cached, entry_name, file_sha256, sha256
from hydra_rank.provenance import PACKAGE, code_digest, environment

BUILDER = "hydra_rank.builtin"


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the package's source to edit (code_digest reads the files, it does not import them)."""
    copy = tmp_path / "hydra_rank"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def edit(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_changing_the_builders_code_changes_the_cache_key(package_copy, monkeypatch):
    """The built-in VLM's key covers the code it runs, down to the modules it imports; comments, docstrings and
    formatting do not count. (monkeypatch: `build_inputs` asks `code_digest` about the copy.)"""
    original = code_digest(BUILDER, package_copy)
    assert original == code_digest(BUILDER)  # the copy is the same code

    edit(
        package_copy / "models" / "language.py", '"""Load SmolLM2-135M-Instruct', '"""Load, say, SmolLM2-135M-Instruct'
    )
    edit(package_copy / "loop.py", "def batches_forever(", "# a comment\n\n\ndef batches_forever(")
    code_digest.cache_clear()
    assert code_digest(BUILDER, package_copy) == original

    edit(package_copy / "loop.py", "epoch += 1", "epoch += 2")  # the stage-1 loop now behaves differently
    code_digest.cache_clear()
    changed = code_digest(BUILDER, package_copy)
    assert changed != original

    monkeypatch.setattr(builtin, "code_digest", lambda module: code_digest(module, package_copy))
    key = entry_name("tiny-vlm", builtin.build_inputs(recipe={}))
    monkeypatch.undo()
    assert key != entry_name("tiny-vlm", builtin.build_inputs(recipe={}))


def test_a_module_outside_the_build_does_not_change_its_key(package_copy):
    original = code_digest(BUILDER, package_copy)
    edit(package_copy / "cli.py", "def methods() -> None:", "def methods() -> None:\n    _ = 1")
    code_digest.cache_clear()
    assert code_digest(BUILDER, package_copy) == original
    assert code_digest("hydra_rank.cli", package_copy) != code_digest("hydra_rank.cli")


def test_cache_entries_are_named_by_their_inputs_and_record_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_RANK_CACHE", str(tmp_path / "cache"))
    builds = []

    def build(directory):
        builds.append(directory)
        (directory / "config.json").write_text("{}")

    first = cached("thing", {"code": "a", "seed": 0}, build)
    assert cached("thing", {"seed": 0, "code": "a"}, build) == first and len(builds) == 1  # reused, key order free
    second = cached("thing", {"code": "b", "seed": 0}, build)
    assert second != first and len(builds) == 2 and second.name.startswith("thing-")
    record = json.loads((first / BUILD_FILE).read_text())
    assert record == {
        "name": first.name,
        "inputs": {"code": "a", "seed": 0},
        "files": {"config.json": sha256(first / "config.json")},
    }


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_RANK_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"abc")
    assert file_sha256(weights) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert len(json.loads((tmp_path / "cache" / "file-hashes.json").read_text())) == 1
    weights.write_bytes(b"abcd")
    assert (
        file_sha256(weights) == sha256(weights) != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_environment_names_commit_versions_and_machine():
    found = environment()
    assert set(found) == {"git", "versions", "machine"}
    assert found["versions"]["torch"] and found["versions"]["transformers"] and found["versions"]["peft"]
    assert found["machine"]["cores"] >= 1 and found["machine"]["python"].count(".") == 2
    if found["git"]["commit"] is not None:  # tests run from a checkout: a full hash
        assert len(found["git"]["commit"]) == 40 and isinstance(found["git"]["dirty"], bool)


def test_a_run_records_the_code_it_loaded(tiny_llava_dir, colour_dataset, tmp_path, monkeypatch):
    """Provenance is taken when the inputs are loaded: a checkout that moves to another commit during a long run
    must not relabel the run's results with the new commit."""
    from hydra_rank import provenance
    from hydra_rank.inputs import load_inputs

    from .test_train import tiny_config

    inputs = load_inputs(tiny_config(tiny_llava_dir, colour_dataset, tmp_path / "out"))
    loaded = inputs.provenance()["git"]
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": "f" * 40, "dirty": False})
    assert environment()["git"]["commit"] == "f" * 40  # what a later call would record
    assert inputs.provenance()["git"] == loaded
