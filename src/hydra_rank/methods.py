"""The fine-tuning methods, each declared once.

Every other module asks this registry what a method does; none compares method names. An entry says

- what it trains (`Trainable`): LoRA adapters of allocated ranks (PEFT LoRA with per-module rank/alpha patterns),
  PEFT AdaLoRA, or the language model's own weights;
- where a LoRA method's ranks start (`Start`), which mode of the allocation solver it uses (`rank/allocate.py`:
  hierarchical, coarse or fine), and whether it moves rank while training (`dynamic`).

What follows from those (does it calibrate, do the parameter budget and rank bounds apply, can the HF Trainer run
it) are properties, so they cannot disagree with each other. Adding a method is one entry here plus its own code
where its `Start` (`rank/plan.py`) or `Trainable` (`adapter.py`) is implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .errors import ConfigError


class Trainable(Enum):
    """What a method trains."""

    LORA = "LoRA adapters of allocated ranks"
    ADALORA = "PEFT AdaLoRA"
    FULL = "the language model's weights"


class Start(Enum):
    """Where a LoRA method's ranks come from before the first optimizer step."""

    UNIFORM = "uniform rank r0"
    WARMUP = "uniform r0 until the first decision (schedule.init calibrated: the calibrated allocation)"
    CALIBRATED = "calibration-gradient spectra, then the allocation solver"
    SHUFFLED = "calibrated, then the ranks shuffled among modules of equal cost"
    PRIOR = "a fixed type prior (attention low, MLP high), no measurement"
    EVA = "PEFT EVA: SVD of calibration activations (ranks by explained variance, count r0 per module on average)"


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for --help, errors and docs
    trainable: Trainable = Trainable.LORA
    start: Start | None = Start.UNIFORM  # None: not an allocation of LoRA ranks (AdaLoRA, full fine-tuning)
    mode: str = "hierarchical"  # allocation solver mode for a calibrated start and for decisions
    dynamic: bool = False  # the HyDRA scheduler re-allocates ranks during training
    rslora: bool = False  # scale updates by alpha/sqrt(r) (PEFT use_rslora) instead of alpha/r0
    lr_scale: float = 1.0  # `bench --lrs` sweeps this multiple of the grid (full fine-tuning needs far smaller rates)
    output: str = "adapter"  # folder of the run directory the trained weights are saved to
    resume_blocker: str | None = None  # why `train --resume` cannot work for this method, if it cannot

    @property
    def allocates(self) -> bool:
        """Ranks come from an allocator, so `adapter.budget_params`, `adapter.allocation_path` and the rank bounds
        apply. Otherwise the budget is uniform LoRA's size at r0, pinned to rank r0 (EVA redistributes ranks by its
        own rule, counted in ranks, so its parameter count can differ from the budget: benchmarks report it)."""
        return self.start not in (None, Start.UNIFORM, Start.EVA)

    @property
    def in_trainer(self) -> bool:
        """`HydraTrainer` runs it (AdaLoRA and full fine-tuning are PEFT / plain Trainer features already)."""
        return self.trainable is Trainable.LORA

    def calibrates(self, schedule_init: str, allocation_path: str | None) -> bool:
        """Whether the run starts with calibration batches (a saved allocation replaces them)."""
        if allocation_path:
            return False
        return self.start in (Start.CALIBRATED, Start.SHUFFLED, Start.EVA) or (
            self.start is Start.WARMUP and schedule_init == "calibrated"
        )


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "hydra",
            "HyDRA: coarse + fine allocation, re-allocated during training by the performance model",
            start=Start.WARMUP,
            dynamic=True,
        ),
        Method("lora", "uniform LoRA at rank r0: the baseline whose size is the budget"),
        Method(
            "rslora", "uniform rsLoRA at rank r0: LoRA with PEFT's rank-stabilised scale alpha/sqrt(r0)", rslora=True
        ),
        Method(
            "eva",
            "PEFT EVA: LoRA initialised from activation SVDs, ranks redistributed by explained variance (rho 2)",
            start=Start.EVA,
        ),
        Method("hydra-static", "coarse + fine allocation from calibration, fixed", start=Start.CALIBRATED),
        Method(
            "hydra-coarse",
            "ablation: layer budgets from calibration, one rank for a layer's modules",
            start=Start.CALIBRATED,
            mode="coarse",
        ),
        Method(
            "hydra-fine",
            "ablation: every layer keeps uniform LoRA's share, split among its modules by calibration",
            start=Start.CALIBRATED,
            mode="fine",
        ),
        Method(
            "adalora",
            "PEFT AdaLoRA at the same final rank budget",
            trainable=Trainable.ADALORA,
            start=None,
            resume_blocker="PEFT keeps its importance scores internally",
        ),
        Method(
            "full",
            "full fine-tuning of the language model (vision tower and projector frozen)",
            trainable=Trainable.FULL,
            start=None,
            output="model",
            lr_scale=0.01,
        ),
        Method(
            "control-shuffled", "control: hydra-static's ranks shuffled among equal-cost modules", start=Start.SHUFFLED
        ),
        Method("control-prior", "control: a fixed type prior (attention low, MLP high)", start=Start.PRIOR),
    )
}
DEFAULT_METHOD = "hydra"
REFERENCE_METHOD = "lora"  # what benchmarks and the demo compare against
DEMO_METHODS = (REFERENCE_METHOD, DEFAULT_METHOD)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def describe_methods() -> str:
    """One line per method, for --help texts."""
    return "\n".join(f"{method.name}: {method.summary}" for method in METHODS.values())
