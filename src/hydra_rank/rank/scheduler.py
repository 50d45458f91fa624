"""Dynamic rank scheduling: the HyDRA scheduler, a hook the training loop calls at every step boundary.

Timeline (fractions of the run, `schedule.*` in the config):

    step 1 ........ warm-up ........ d1 ... d2 ... d3 ... dk (freeze) ........ last step
                                     └ a decision every interval ┘

Before each decision the gradients of the last `signal_steps` steps are sketched (`signals.py`, no extra forward or
backward pass), and between decisions every module's realised contribution to the loss decrease is accumulated
from its own parameter updates (optimizer hooks); `schedule.curves: held_out` and `schedule.attribution: probe` take
either from a fresh probe batch at the decision instead (`probe.py`, ablations). At a decision the scheduler

1. scores the previous decision's predictions against what was realised (Spearman across modules) and refits the
   performance model on it (`perf_model.py`); with `schedule.curves: worth` (`pooled_worth`) the model is each module's
   held-out worth on a probe batch, scaled to other ranks by the response measured on randomised ranks (`probe.py`);
2. predicts every module's gain at every rank and solves the hierarchical allocation (coarse: layer budgets, fine:
   module ranks; `allocate.py`) under the same parameter budget;
3. moves from the current ranks towards that allocation, at most `max_move_fraction` of the budget, and only where
   the receiving module's predicted gain per parameter beats what the giving module loses by the factor 1 + `margin`
   (the first decision after a uniform warm-up moves freely: it *is* the initial hierarchical allocation, made by a
   model already fitted on what every module realised during the warm-up);
   (with `schedule.explore`, a measurement: then exchanges a further share at random between equal-cost modules,
   `explore.py`);
4. resizes the affected adapters in place (`resize.py`) and tells the loop to re-bind the optimizer;
5. appends the decision to `allocation_history.jsonl`.

After the last decision the ranks are frozen and the adapter trains on at its final, physically compact shape.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from peft import PeftModel

from ..config import WORTH_CURVES
from ..errors import ConfigError, InvariantError
from ..utils import JsonlWriter, unwrap_optimizer
from .allocate import allocate, move_towards
from .budget import Allocation, Budget, Target
from .explore import explore
from .lora import ADAPTER, lora_layers
from .perf_model import PerfModel, spearman
from .probe import RANK_ELASTICITY, IntervalProbe, direction_values, update_inner, value_curves, worth_curves
from .resize import apply_allocation
from .signals import SKETCH_OVERSAMPLING, ModuleSpectrum, SketchHooks

if TYPE_CHECKING:
    from ..config import ScheduleConfig
    from ..loss import LossFn
    from .probe import ProbeSource


def _agree(allocation: Allocation) -> Allocation:
    """With several processes: the main process's decision, broadcast to all (every process computed the same one
    from the same synchronized statistics; this makes sure they resize identically even if floating point ever
    differed). A no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return allocation
    shared = [allocation.ranks]
    dist.broadcast_object_list(shared, src=0)
    return Allocation(shared[0], allocation.budget, allocation.info)


def decision_steps(total_steps: int, config: ScheduleConfig) -> list[int]:
    """The steps at which the scheduler re-allocates (never the last step: a change there would not be trained)."""
    first = max(1, round(config.warmup_fraction * total_steps))
    interval = max(1, round(config.interval_fraction * total_steps))
    last = min(total_steps - 1, round(config.freeze_fraction * total_steps))
    return list(range(first, last + 1, interval))


class HydraScheduler:
    """Loop hook (`loop.StepHooks`) that owns the allocation of a PEFT LoRA model during training."""

    def __init__(
        self,
        model: PeftModel,
        targets: list[Target],
        budget: Budget,
        allocation: Allocation,
        config: ScheduleConfig,
        total_steps: int,
        *,
        mode: str = "hierarchical",
        spectrum: str = "stacked",
        seed: int = 0,
        history_path: Path | None = None,
        initial_spectra: dict[str, ModuleSpectrum] | None = None,
        debug_checks: bool = False,
        probe: tuple[ProbeSource, LossFn] | None = None,
    ) -> None:
        self.model, self.targets, self.budget, self.config = model, targets, budget, config
        self.allocation = allocation
        self.mode, self.spectrum, self.seed, self.debug_checks = mode, spectrum, seed, debug_checks
        self.decisions = decision_steps(total_steps, config)
        # a decision's sketch sees at most signal_steps steps, and no more than lie since the previous decision
        if spectrum == "coherent" and min([config.signal_steps, *np.diff([0, *self.decisions])]) < 2:
            raise ConfigError(
                f"adapter.spectrum coherent compares the sketched steps' gradients with each other, but with "
                f"{total_steps} training steps a decision (at steps {self.decisions}) sees only one: raise "
                "train.max_steps or schedule.warmup_fraction / interval_fraction, or use adapter.spectrum stacked"
            )
        self.perf_model = PerfModel(targets)
        self.layers = lora_layers(model)
        self.names = [t.name for t in targets]
        self.realised = np.zeros(len(targets))
        self.rank_steps = np.zeros(len(targets))  # Σ over the steps trained so far of each module's rank
        self.ranked_until = 0  # the step up to which rank_steps counts
        self.sketches: SketchHooks | None = None
        self.pending: tuple[np.ndarray, np.ndarray] | None = None  # features and predictions of the last decision
        if initial_spectra is not None:
            self.pending = self._predict(self._curves(initial_spectra), allocation)
        self.generator = torch.Generator().manual_seed(seed)
        self.seconds = {"sketch": 0.0, "perf_model": 0.0, "allocate": 0.0, "resize": 0.0, "attribution": 0.0}
        self.history = JsonlWriter(history_path) if history_path else None
        self.decisions_made = 0
        self.spearmans: list[float] = []
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        if config.needs_probe and probe is None:
            raise ConfigError(
                "schedule.attribution probe and schedule.curves held_out measure on probe batches: pass `probe` to "
                "the scheduler"
            )
        self.probe_source = probe if config.needs_probe else None
        self.probe = IntervalProbe(self.layers, self.names) if config.attribution == "probe" else None

    # ---- attribution: what each module's updates removed from the loss -------------------------------------
    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Measure every optimizer step's first-order loss change per module, −⟨grad, Δθ⟩ over its A and B (with
        `schedule.attribution: probe`, open the first interval instead: the probe measures it at its end)."""
        self.optimizer = optimizer
        if self.config.curves in WORTH_CURVES:  # they replace the performance model: nothing to attribute
            return
        if self.probe is not None:
            if not self.probe.start_factors:  # a resumed run's interval start comes from its checkpoint
                self.probe.start()
            return
        base = unwrap_optimizer(optimizer)
        base.register_step_pre_hook(self._before_step)
        base.register_step_post_hook(self._after_step)

    def _factors(self, name: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        layer = self.layers[name]
        return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before = {name: tuple(p.detach().clone() for p in self._factors(name)) for name in self.names}

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        started = time.perf_counter()
        for index, name in enumerate(self.names):
            for parameter, old in zip(self._factors(name), self._before[name], strict=True):
                if parameter.grad is not None:
                    self.realised[index] -= float((parameter.grad * (parameter.detach() - old)).sum())
        self._before = {}
        self.seconds["attribution"] += time.perf_counter() - started

    # ---- loop hooks ---------------------------------------------------------------------------------------
    def step_begin(self, step: int) -> None:
        if self.config.curves != "gradient":  # held-out curves come from the probe: nothing to sketch
            return
        upcoming = [d for d in self.decisions if d >= step]
        if upcoming and upcoming[0] - self.config.signal_steps < step and self.sketches is None:
            rank = self.budget.max_rank + SKETCH_OVERSAMPLING
            self.sketches = SketchHooks(
                self.model.base_model.model, self.targets, rank, seed=self.seed + step, spectrum=self.spectrum
            )

    def step_end(self, step: int, record: dict[str, Any]) -> bool:
        changed = step in self.decisions and self._decide(step, record)
        if self.debug_checks:
            self.check()
        return changed

    def check(self) -> None:
        """The budget invariant: adapters are physically their allocated size, and that size fits the budget."""
        sizes = {name: self.layers[name].r[ADAPTER] for name in self.names}
        if sizes != self.allocation.ranks:
            raise InvariantError("the adapters' sizes differ from the allocation")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        used = self.allocation.params(self.targets)
        if not trainable == used <= self.budget.total:
            raise InvariantError(f"parameter budget broken: {trainable=} {used=} budget={self.budget.total}")

    # ---- decisions ----------------------------------------------------------------------------------------
    def _curves(self, spectra: dict[str, ModuleSpectrum]) -> np.ndarray:
        return np.stack([spectra[name].utility(self.budget.max_rank) for name in self.names])

    def _predict(self, curves: np.ndarray, allocation: Allocation) -> tuple[np.ndarray, np.ndarray]:
        """Features of every module at its rank in `allocation`, and its predicted gain: 0 at rank 0 (no adapter),
        which is also how `_decide` tells later which modules could realise anything."""
        ranks = np.array([allocation.ranks[name] for name in self.names], dtype=np.float64)
        x = self.perf_model.features(curves[np.arange(len(ranks)), ranks.astype(int)], ranks)
        return x, np.where(ranks > 0, self.perf_model.predict(x), 0.0)

    def _sketched_curves(self, step: int) -> np.ndarray:
        """Every module's utility at every rank from the gradients sketched before the decision at `step`."""
        if self.sketches is None:
            raise InvariantError(f"no gradient sketch was taken before the decision at step {step}")
        spectra = self.sketches.results()
        self.seconds["sketch"] += self.sketches.seconds
        self.sketches.remove()
        self.sketches = None
        return self._curves(spectra)

    def _on_probe(self, measure: Callable[..., Any], batch: dict[str, torch.Tensor]) -> Any:
        """`measure(model, layers, batch, loss_fn)` of every module (in target order) on the probe batch, its time
        counted as attribution: `probe.direction_values` (held_out curves) or `probe.update_inner` (worth)."""
        tick = time.perf_counter()
        result = measure(self.model, [self.layers[name] for name in self.names], batch, self.probe_source[1])
        self.seconds["attribution"] += time.perf_counter() - tick
        return result

    def _accrue_ranks(self, step: int) -> None:
        """Count the steps since the last decision at the ranks they trained with."""
        ranks = np.array([self.allocation.ranks[name] for name in self.names], dtype=np.float64)
        self.rank_steps += ranks * (step - self.ranked_until)
        self.ranked_until = step

    def _worth_utilities(self, batch: dict[str, torch.Tensor], entry: dict[str, Any]) -> dict[str, np.ndarray]:
        """`schedule.curves: worth` / `pooled_worth`: every module's worth at every rank, from what its update takes
        off the base model's loss on the probe batch and the rank it has held on average (`probe.worth_curves`)."""
        worth = -self._on_probe(functools.partial(update_inner, at=0.0), batch)
        mean_ranks = self.rank_steps / max(self.ranked_until, 1)
        entry["worth"] = dict(zip(self.names, worth.tolist(), strict=True))
        entry["mean_ranks"] = dict(zip(self.names, mean_ranks.tolist(), strict=True))
        entry["elasticity"] = RANK_ELASTICITY
        pool = self.targets if self.config.curves == "pooled_worth" else None
        curves = worth_curves(worth, mean_ranks, self.budget.max_rank, pool)
        return dict(zip(self.names, curves, strict=True))

    def _model_utilities(
        self, curves: np.ndarray, batch: dict[str, torch.Tensor] | None, entry: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """Score the last decision's predictions, refit the performance model on what the interval realised, and
        predict every module's gain at every rank from `curves`."""
        if self.probe is not None:
            tick = time.perf_counter()
            self.realised = self.probe.gains(self.model, batch, self.probe_source[1])
            self.seconds["attribution"] += time.perf_counter() - tick

        tick = time.perf_counter()
        if self.pending is not None:
            features, predicted = self.pending
            entry["spearman"] = spearman(predicted, self.realised)
            entry["predicted_gain_previous"] = float(predicted.sum())
            entry["realised_gain"] = float(self.realised.sum())
            entry["per_module"] = {"predicted": predicted.tolist(), "realised": self.realised.tolist()}
            self.spearmans.append(entry["spearman"])
            self.perf_model.fit(features, self.realised.copy(), active=predicted > 0)
        elif self.realised.any():
            # After a uniform warm-up there is no prediction to score, but what each module removed from the loss at
            # rank r0 is already measured: the first allocation comes from a model fitted on it (in loss units),
            # not from the energy prior alone, so later decisions need not undo it.
            features, predicted = self._predict(curves, self.allocation)
            self.perf_model.fit(features, self.realised.copy(), active=predicted > 0)
            entry["fitted_on_warmup"] = True
            entry["realised_gain"] = float(self.realised.sum())
            entry["warmup_realised"] = self.realised.tolist()  # per module: the interval before the first decision
        self.realised[:] = 0.0
        entry["perf_model"] = self.perf_model.describe()
        utilities = dict(zip(self.names, self.perf_model.utilities(curves), strict=True))
        self.seconds["perf_model"] += time.perf_counter() - tick
        return utilities

    def _planned(
        self, curves: np.ndarray | None, utilities: dict[str, np.ndarray], allocation: Allocation
    ) -> dict[str, float]:
        """Every module's predicted gain at its rank in `allocation` (worth curves: its predicted worth)."""
        if curves is None:
            return {name: float(utilities[name][allocation.ranks[name]]) for name in self.names}
        return dict(zip(self.names, self._predict(curves, allocation)[1].tolist(), strict=True))

    def _decide(self, step: int, record: dict[str, Any]) -> bool:
        started = time.perf_counter()
        probe_batch = self.probe_source[0](step) if self.probe_source else None  # drawn once, for both signals
        entry: dict[str, Any] = {"step": step, "train_loss": record["loss"]}
        self._accrue_ranks(step)
        if self.config.curves in WORTH_CURVES:  # no curves for the performance model: the worth curves replace it
            curves, utilities = None, self._worth_utilities(probe_batch, entry)
        else:
            if self.config.curves == "held_out":
                curves = value_curves(self._on_probe(direction_values, probe_batch), self.budget.max_rank)
            else:
                curves = self._sketched_curves(step)
            utilities = self._model_utilities(curves, probe_batch, entry)

        tick = time.perf_counter()
        target = allocate(self.targets, utilities, self.budget, self.mode)
        uniform_start = self.decisions_made == 0 and self.config.init == "warmup"
        if uniform_start:
            new = target
        else:
            new = move_towards(
                self.allocation,
                target,
                self.targets,
                utilities,
                self.budget,
                self.config.max_move_fraction * self.budget.total,
                self.config.margin,
            )
        if self.config.explore and step != self.decisions[-1]:  # the last decision's ranks are never measured
            planned = self._planned(curves, utilities, new)
            new, pairs = explore(new, self.targets, self.budget, self.config.explore, self.generator)
            entry["explored"] = pairs  # [giver, receiver, δ]: exchanges on top of the planned ranks
            entry["explored_planned_prediction"] = {name: planned[name] for pair in pairs for name in pair[:2]}
        self.seconds["allocate"] += time.perf_counter() - tick

        new = _agree(new)
        tick = time.perf_counter()
        resized = apply_allocation(self.model, new, self.generator, self.optimizer)
        self.seconds["resize"] += time.perf_counter() - tick
        if self.probe is not None:
            self.probe.start()

        moved = new.moved_params(self.allocation, self.targets)
        self.allocation = new
        self.pending = None if curves is None else self._predict(curves, new)
        self.decisions_made += 1
        entry.update(
            ranks=new.ranks,
            predicted_gain=sum(self._planned(curves, utilities, new).values()),
            used_params=new.params(self.targets),
            budget_params=self.budget.total,
            moved_params=moved,
            resized_modules=len(resized),
            dropped_energy=float(sum(r.dropped_energy for r in resized)),
            seconds=time.perf_counter() - started,
        )
        if self.history is not None:
            self.history.write(entry)
        record["hydra_decision_s"] = entry["seconds"]
        return bool(resized)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to make the same decisions (tensors and plain containers only)."""
        as_tensor = functools.partial(torch.tensor, dtype=torch.float64)
        return {
            "ranks": dict(self.allocation.ranks),
            "allocation_info": json.dumps(self.allocation.info),
            "perf_model": self.perf_model.state_dict(),
            "realised": as_tensor(self.realised),
            "rank_steps": as_tensor(self.rank_steps),
            "ranked_until": self.ranked_until,
            "pending": None if self.pending is None else tuple(as_tensor(a) for a in self.pending),
            "decisions_made": self.decisions_made,
            "spearmans": list(self.spearmans),
            "seconds": dict(self.seconds),
            "generator": self.generator.get_state(),
            "sketches": None if self.sketches is None else self.sketches.state_dict(),
            "probe_start": None if self.probe is None else self.probe.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output; the model must already have the saved ranks (see `train.py`)."""
        self.allocation = Allocation(dict(state["ranks"]), self.budget.total, json.loads(state["allocation_info"]))
        self.perf_model.load_state_dict(state["perf_model"])
        self.realised = state["realised"].numpy().copy()
        if "rank_steps" in state:  # checkpoints written before schedule.curves worth existed have none (unused there)
            self.rank_steps, self.ranked_until = state["rank_steps"].numpy().copy(), int(state["ranked_until"])
        self.pending = None if state["pending"] is None else tuple(a.numpy() for a in state["pending"])
        self.decisions_made = int(state["decisions_made"])
        self.spearmans = list(state["spearmans"])
        self.seconds = dict(state["seconds"])
        self.generator.set_state(state["generator"])
        if self.probe is not None:
            self.probe.load_state_dict(state["probe_start"])
        if state["sketches"] is not None:
            rank = self.budget.max_rank + SKETCH_OVERSAMPLING
            self.sketches = SketchHooks(self.model.base_model.model, self.targets, rank, spectrum=self.spectrum)
            self.sketches.load_state_dict(state["sketches"])

    def summary(self) -> dict[str, Any]:
        finite = [s for s in self.spearmans if np.isfinite(s)]
        return {
            "decisions": self.decisions_made,
            "mean_spearman": float(np.mean(finite)) if finite else None,
            "scheduler_time_s": round(sum(self.seconds.values()), 3),
            **{f"{key}_time_s": round(value, 3) for key, value in self.seconds.items()},
        }

    def close(self) -> None:
        if self.sketches is not None:
            self.sketches.remove()
        if self.history is not None:
            self.history.close()
