"""Run configuration: nested dataclasses, read from YAML, overridden with `--set key=value`, validated up front.

The defaults *are* the embedded default: HyDRA at the budget of uniform LoRA r=4 on the built-in tiny VLM and
easy-VQA (`configs/tiny-hydra.yaml` spells every key out), so a config file only lists what differs. Every key is
checked before any model is loaded: an unknown key, a wrong type or an out-of-range value is one `ConfigError` that
names the key and suggests the fix, not a failure an hour into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, DataError
from .methods import DEFAULT_METHOD, METHODS, Method, Trainable, get_method
from .utils import one_line, read_text_file, short_repr

# Names of the built-in models (built on first use by `builtin.py`) and the system prompt the built-in VLM's
# projector was trained with; owned here because the defaults below use them.
TINY_VLM = "builtin:tiny-vlm"
SMOLLM2 = "builtin:smollm2"
DEFAULT_SYSTEM_PROMPT = "Answer briefly."

DATASETS = ("easy-vqa", "scenes", "text-tasks", "llava-json", "hf-dataset")
EVAL_SPLITS = ("test", "validation")
SCHEDULE_INITS = ("warmup", "calibrated")
RANK_SCALES = ("fixed", "sqrt")
SPECTRA = ("stacked", "coherent")  # what utility curves measure (`rank/signals.py`)
# what the decisions' utility curves measure (`rank/scheduler.py`)
CURVES = ("gradient", "held_out", "worth", "pooled_worth")
WORTH_CURVES = ("worth", "pooled_worth")  # the curves that replace the fitted performance model
ATTRIBUTIONS = ("optimizer", "probe")  # what the performance model learns from (`rank/scheduler.py`, `rank/probe.py`)
TOWERS = ("language", "vision", "projector")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "8bit", "4bit")
MIXED_PRECISIONS = ("no", "bf16")
SHARDINGS = ("none", "fsdp")


@dataclass
class ModelConfig:
    name_or_path: str = TINY_VLM  # "builtin:tiny-vlm", "builtin:smollm2", a local directory or a hub id
    dtype: str = "float32"
    trust_remote_code: bool = False  # only ever passed to transformers when set here
    # none | 8bit | 4bit: the frozen language model loaded quantized by bitsandbytes (4bit: NF4 with double
    # quantization, QLoRA's recipe); adapters train in `dtype` on top. `export` merges into the dequantized weights.
    quantization: str = "none"


@dataclass
class DataConfig:
    # easy-vqa | scenes (generated multi-shape VQA) | text-tasks (generated, text only) | llava-json (your .json/.jsonl
    # chats: LLaVA/ShareGPT or messages records) | hf-dataset (a folder from datasets' save_to_disk)
    dataset: str = "easy-vqa"
    train_path: str | None = None  # llava-json: .json list or .jsonl file; hf-dataset: the save_to_disk folder
    eval_path: str | None = None  # hf-dataset: optional when train_path holds a DatasetDict with a test split
    image_root: str | None = None  # folder image paths are relative to (default: the data file's folder)
    train_samples: int | None = None  # use a random subset of this size (None: all)
    eval_samples: int | None = 200  # evaluate on the first N of a fixed shuffle (None: all)
    # training samples held out (a fixed choice, never trained on) as a validation split for choosing
    # hyper-parameters such as the learning rate; 0: none, training uses every sample
    validation_samples: int = 0
    eval_split: str = "test"  # test | validation: what eval scores (bench --lrs sweeps on validation)
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None: whatever the chat template does by default
    max_length: int = 256


def default_max_rank(rank: int) -> int:
    """The rank ceiling when none is set: 8·r0, but no more than 32 or 4·r0, whichever is larger.

    Small budgets need room: at r0 = 2 and 4 the matrix cells' allocations kept modules at 8·r0 for most of a run.
    Above that no run went past about 3·r0 (r0 = 8: at most 26 but for one interval; r0 = 32: at most 100), while the
    gradient sketch costs in proportion to the ceiling (its width is max_rank + 8): at 8·r0 it took a third of the
    training time at r0 = 32 (BENCHMARKS.md, "Twenty-fifth session").
    """
    return min(8 * rank, max(32, 4 * rank))


@dataclass
class AdapterConfig:
    method: str = DEFAULT_METHOD  # one of `methods.METHODS` (`hydra-rank methods` lists them)
    rank: int = 4  # r0; the trainable-parameter budget is the size of uniform LoRA at this rank
    alpha: float = 8.0  # a module at rank r0 scales its update by alpha / r0 (as uniform LoRA does)
    # a module at another rank r (methods that allocate): sqrt: alpha/r0 · sqrt(r0/r), PEFT's rsLoRA rule, under
    # which one optimizer step moves a module's update by about the same amount at any rank; fixed: alpha/r0 too
    # (grown modules then learn faster than uniform LoRA's, and a learning rate tuned near LoRA's limit overshoots)
    rank_scale: str = "sqrt"
    dropout: float = 0.0
    target_modules: list[str] | None = None  # short names (q_proj, ...); None: every linear of every decoder layer
    # where adapters go: the language model, plus optionally every linear of the vision tower and/or the projector;
    # the budget (uniform LoRA at rank r0 on all of them) is then split across towers by the allocator
    towers: list[str] = field(default_factory=lambda: ["language"])
    budget_params: int | None = None  # hydra methods: explicit parameter budget instead of uniform LoRA's size
    min_rank: int = 1  # 0 lets a module lose its adapter entirely (its parameters are spent elsewhere)
    max_rank: int | None = None  # None: `default_max_rank(rank)` (and never above a module's width, min(d_in, d_out))
    rank_granularity: int = 1  # ranks are min_rank + k x granularity (e.g. 4 for kernel-friendly shapes)
    calibration_batches: int = 4  # batches whose gradient spectra drive the initial allocation
    # what a module's utility curve measures (`rank/signals.py`): stacked: the energy of every batch's gradient;
    # coherent: only what the batches' gradients share (per-batch noise removed; needs 2+ batches per spectrum)
    spectrum: str = "stacked"
    allocation_path: str | None = None  # use this allocation.json (from `hydra-rank allocate`) instead of calibrating

    @property
    def upper_rank(self) -> int:
        return self.max_rank if self.max_rank is not None else default_max_rank(self.rank)

    @property
    def spec(self) -> Method:
        """The registry entry of `method` (one clear error for an unknown name, also on a config built by hand)."""
        return get_method(self.method)


@dataclass
class ScheduleConfig:
    """When and how far `hydra` moves rank during training (fractions are of train.max_steps)."""

    init: str = "warmup"  # warmup: uniform r0 until the first decision | calibrated: start from hydra-static's ranks
    warmup_fraction: float = 0.1  # first decision at this point
    interval_fraction: float = 0.1  # then one decision per interval...
    freeze_fraction: float = 0.7  # ...until here; the ranks stay fixed afterwards
    max_move_fraction: float = 0.15  # at most this share of the budget changes hands per decision (not the first)
    margin: float = 0.2  # a rank moves only if the receiver's predicted gain/param beats the giver's loss by 1 + this
    signal_steps: int = 3  # steps before each decision whose gradients are sketched (more: less noisy spectra)
    resize_warmup_steps: int = 3  # learning-rate ramp for parameters created by a resize
    # what the performance model learns from: optimizer (each step's −⟨grad, update⟩ on the batch it trained on) |
    # probe (each interval's change of the loss on a training batch drawn afresh at the decision; rank/probe.py)
    attribution: str = "optimizer"
    # what the decisions' utility curves measure: gradient (the sketched gradient energy rank r captures, the same
    # measure as the calibration) | held_out (what each singular direction of the update holds on a fresh batch) |
    # worth (the update's whole held-out worth, scaled to other ranks by the response measured on randomised ranks;
    # replaces the fitted performance model, `rank/probe.py:worth_curves`) | pooled_worth (the same, each module's
    # level replaced by a per-layer plus per-kind fit over all modules)
    curves: str = "gradient"
    # measurement, not a method setting: at every decision but the last, this share of the budget is exchanged
    # between random pairs of equal-cost modules after the scheduler's own move (`rank/explore.py`); 0: off
    explore: float = 0.0

    @property
    def needs_probe(self) -> bool:
        """Whether decisions measure on probe batches (`rank/probe.py`), which the training loop must supply."""
        return self.attribution == "probe" or self.curves != "gradient"


@dataclass
class TrainConfig:
    max_steps: int = 48
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0  # steps between eval-loss checks during training (0: only at the end)
    output_dir: str = "runs/tiny-hydra"
    debug_checks: bool = False  # assert the parameter budget (and adapter sizes) after every step
    save: bool = True  # save the adapter (full: the model); benchmarks that only need metrics can skip it
    checkpoint_every: int = 0  # steps between checkpoints for --resume (0: none)
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    # recompute each decoder layer's activations in the backward pass instead of keeping them (less memory, ~30 %
    # more compute); HyDRA's gradient sketches see every module's gradient once either way
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16: Accelerate's autocast for forward and backward (weights stay as loaded)
    # none | fsdp: with several processes, the frozen base model sharded across them by torch FSDP2 (adapters stay
    # whole, gradients averaged); none: every process holds the whole model (DDP)
    sharding: str = "none"


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_new_tokens: int = 8


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Names other tools use for our keys, so that the suggestion for them is the right one.
ALIASES = {
    "learning_rate": "lr",
    "num_steps": "max_steps",
    "steps": "max_steps",
    "r": "rank",
    "lora_r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "model_name_or_path": "name_or_path",
}


def _suggest(key: str, options: list[str], prefix: str) -> str:
    close = [ALIASES[key]] if ALIASES.get(key) in options else difflib.get_close_matches(key, options, n=1)
    return f" Did you mean {prefix + close[0]!r}?" if close else f" Valid keys: {', '.join(options)}."


def _as_float(value: Any) -> float | None:
    """Numbers, and strings such as "1e-3" that PyYAML (YAML 1.1) leaves as text for lack of a decimal point."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Return `value` if it fits the type hint (ints and "1e-3" are accepted where floats are expected), else raise."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return value
        origin = typing.get_origin(option)
        if (
            origin is list
            and isinstance(value, list)
            and all(isinstance(v, typing.get_args(option)[0]) for v in value)
        ):
            return value
        if option is float and _as_float(value) is not None:
            if not math.isfinite(_as_float(value)):
                raise ConfigError(f"{key} must be a finite number, got {short_repr(value)}")
            return _as_float(value)
        if option in (int, str, bool) and type(value) is option:
            return value
    names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key}: expected {names}, got {short_repr(value)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    values = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}.{_suggest(key, names, prefix)}")
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build(hints[key], value, f"{path}.")
        else:
            values[key] = _check_type(value, hints[key], path)
    return cls(**values)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: RunConfig) -> RunConfig:
    """Range and consistency checks that types alone cannot express."""
    d, a, t = config.data, config.adapter, config.train
    m = config.model
    _require(m.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {m.dtype!r}")
    _require(
        m.quantization in QUANTIZATIONS, f"model.quantization must be one of {QUANTIZATIONS}, not {m.quantization!r}"
    )
    _require(d.dataset in DATASETS, f"data.dataset must be one of {DATASETS}, got {d.dataset!r}")
    if d.dataset == "llava-json":
        _require(
            bool(d.train_path and d.eval_path), "data.dataset llava-json needs data.train_path and data.eval_path"
        )
    if d.dataset == "hf-dataset":
        _require(bool(d.train_path), "data.dataset hf-dataset needs data.train_path (a datasets save_to_disk folder)")
    _require(d.eval_split in EVAL_SPLITS, f"data.eval_split must be one of {EVAL_SPLITS}, got {d.eval_split!r}")
    _require(d.validation_samples >= 0, f"data.validation_samples must be >= 0, got {d.validation_samples}")
    _require(
        d.eval_split != "validation" or d.validation_samples > 0,
        "data.eval_split validation needs data.validation_samples > 0 (the training samples to hold out)",
    )
    for key in ("train_samples", "eval_samples"):
        value = getattr(d, key)
        _require(value is None or value >= 1, f"data.{key} must be at least 1 (or null for all), got {value}")
    _require(d.max_length >= 8, f"data.max_length must be at least 8, got {d.max_length}")
    _require(a.method in METHODS, f"adapter.method must be one of {tuple(METHODS)}, got {a.method!r}")
    _require(
        m.quantization == "none" or a.spec.trainable is not Trainable.FULL,
        f"model.quantization {m.quantization} freezes the base weights in a quantized format that cannot be trained; "
        "full fine-tuning needs model.quantization none (or choose an adapter method)",
    )
    _require(a.rank >= 1, f"adapter.rank must be at least 1, got {a.rank}")
    _require(a.alpha > 0, f"adapter.alpha must be positive, got {a.alpha}")
    _require(a.rank_scale in RANK_SCALES, f"adapter.rank_scale must be one of {RANK_SCALES}, got {a.rank_scale!r}")
    _require(0 <= a.dropout < 1, f"adapter.dropout must be in [0, 1), got {a.dropout}")
    _require(
        a.target_modules is None or len(a.target_modules) > 0, "adapter.target_modules is empty; use null for all"
    )
    _require(bool(a.towers) and set(a.towers) <= set(TOWERS), f"adapter.towers must be a non-empty subset of {TOWERS}")
    _require(a.min_rank >= 0, f"adapter.min_rank must be at least 0, got {a.min_rank}")
    _require(a.rank_granularity >= 1, f"adapter.rank_granularity must be at least 1, got {a.rank_granularity}")
    _require(a.upper_rank >= a.min_rank, f"adapter.max_rank ({a.upper_rank}) is below adapter.min_rank ({a.min_rank})")
    _require(
        a.calibration_batches >= 1, f"adapter.calibration_batches must be at least 1, got {a.calibration_batches}"
    )
    _require(a.spectrum in SPECTRA, f"adapter.spectrum must be one of {SPECTRA}, got {a.spectrum!r}")
    _require(
        a.spectrum != "coherent" or min(a.calibration_batches, config.schedule.signal_steps) >= 2,
        "adapter.spectrum coherent compares batches with each other: adapter.calibration_batches and "
        "schedule.signal_steps must be at least 2",
    )
    _require(
        a.spec.allocates or (a.budget_params is None and a.allocation_path is None),
        f"adapter.budget_params and adapter.allocation_path apply to methods that allocate ranks; {a.method} uses "
        "adapter.rank",
    )
    _require(a.budget_params is None or a.budget_params >= 1, "adapter.budget_params must be positive")
    sc = config.schedule
    _require(sc.init in SCHEDULE_INITS, f"schedule.init must be one of {SCHEDULE_INITS}, got {sc.init!r}")
    for key in ("warmup_fraction", "interval_fraction", "freeze_fraction", "max_move_fraction"):
        _require(0 < getattr(sc, key) <= 1, f"schedule.{key} must be in (0, 1], got {getattr(sc, key)}")
    _require(sc.warmup_fraction <= sc.freeze_fraction, "schedule.warmup_fraction must not exceed freeze_fraction")
    _require(sc.margin >= 0, f"schedule.margin must be >= 0, got {sc.margin}")
    _require(0 <= sc.explore < 1, f"schedule.explore must be in [0, 1), got {sc.explore}")
    _require(
        sc.attribution in ATTRIBUTIONS, f"schedule.attribution must be one of {ATTRIBUTIONS}, got {sc.attribution!r}"
    )
    _require(sc.curves in CURVES, f"schedule.curves must be one of {CURVES}, got {sc.curves!r}")
    _require(
        not (sc.curves in WORTH_CURVES and sc.attribution == "probe"),
        f"schedule.curves {sc.curves} replaces the performance model, so nothing would read schedule.attribution "
        "probe: leave attribution at optimizer",
    )
    _require(sc.signal_steps >= 1, f"schedule.signal_steps must be at least 1, got {sc.signal_steps}")
    _require(sc.resize_warmup_steps >= 0, f"schedule.resize_warmup_steps must be >= 0, got {sc.resize_warmup_steps}")
    for key in ("max_steps", "batch_size", "grad_accum"):
        _require(getattr(t, key) >= 1, f"train.{key} must be at least 1, got {getattr(t, key)}")
    _require(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    _require(t.warmup_steps >= 0 and t.eval_every >= 0, "train.warmup_steps and train.eval_every must be >= 0")
    _require(t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}")
    _require(
        t.mixed_precision in MIXED_PRECISIONS,
        f"train.mixed_precision must be one of {MIXED_PRECISIONS}, got {t.mixed_precision!r}",
    )
    _require(t.sharding in SHARDINGS, f"train.sharding must be one of {SHARDINGS}, got {t.sharding!r}")
    if t.sharding == "fsdp":
        _require(
            a.spec.trainable is Trainable.LORA,
            f"train.sharding fsdp shards the frozen base under LoRA adapters; {a.method} trains other weights (use "
            "train.sharding none)",
        )
        _require(
            m.quantization == "none",
            "train.sharding fsdp cannot shard a quantized base (bitsandbytes' packed weights); choose one of them",
        )
        _require(
            t.mixed_precision == "no",
            "train.sharding fsdp runs the model outside Accelerate's autocast wrapper; use model.dtype bfloat16 for "
            "a 16-bit base instead of train.mixed_precision bf16",
        )
    _require(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be at least 1, got {t.keep_checkpoints}")
    _require(config.eval.batch_size >= 1 and config.eval.max_new_tokens >= 1, "eval sizes must be at least 1")
    return config


class _ConfigLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans (only true/false): under PyYAML's YAML 1.1 rules a bare `no`, `off` or `yes`
    becomes a boolean, so `train.mixed_precision: no`, the documented value, would fail as "expected str"."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse config text (a file or a `--set` value) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: builds no arbitrary objects


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001); the value is parsed as YAML (numbers, null, lists...)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-3), got {text!r}")
    return key.strip().split("."), load_yaml(raw) if raw.strip() else ""


def from_dict(data: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """Build and validate a config from nested dicts plus `key=value` overrides (which win)."""
    merged: dict[str, Any] = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {part!r} is not a section")
        node[path[-1]] = value
    return validate(_build(RunConfig, merged, ""))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or start from the defaults when `path` is None) and apply overrides."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = load_yaml(read_text_file(path, "config file")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {one_line(str(error), 300)}") from None
        except DataError as error:
            raise ConfigError(str(error)) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: a config is a mapping of sections (model:, data:, adapter:, ...), got {short_repr(data)}"
            )
    return from_dict(data, overrides)
