"""Adapter targets, rank allocations and the trainable-parameter budget.

A LoRA adapter of rank r on a d_in x d_out linear has r * (d_in + d_out) parameters, so the budget is counted in
parameters, not ranks: moving one unit of rank from a 576x576 attention projection to a 576x1536 MLP projection is not
free. The budget is the size of uniform LoRA at a rank r0 (what the user would otherwise have trained), or an explicit
parameter count; every allocation HyDRA produces fits in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..models.arch import decoder_layers, linear_targets, tower_linears


@dataclass(frozen=True)
class Target:
    """One adaptable linear: its full module name, layer index within its tower, kind and shape. Language-model
    kinds are short names (q_proj...); other towers' kinds carry the tower (vision.fc1, projector.linear_1), so
    module types never mix across towers."""

    name: str
    layer: int
    kind: str
    d_in: int
    d_out: int
    tower: str = "language"

    @property
    def cost(self) -> int:
        """Parameters per unit of rank."""
        return self.d_in + self.d_out

    @property
    def width(self) -> int:
        """The highest rank that can change the module's update: min(d_in, d_out)."""
        return min(self.d_in, self.d_out)


def discover_targets(
    model: nn.Module, module_names: list[str] | None = None, towers: tuple[str, ...] | list[str] = ("language",)
) -> list[Target]:
    """The language model's decoder-layer linears (optionally only the listed kinds), in layer order, then with
    `towers` naming them every linear of the vision tower's layers and of the projector (off by default: the budget
    is then shared across towers, an extra coarse level of the hierarchy)."""
    targets = []
    if "language" in towers:
        path, _ = decoder_layers(model)
        targets = [
            Target(
                name,
                int(name[len(path) + 1 :].split(".", 1)[0]),
                name.rsplit(".", 1)[1],
                linear.in_features,
                linear.out_features,
            )
            for name, linear in linear_targets(model, module_names)
        ]
    for tower in ("vision", "projector"):
        if tower in towers:
            targets += [
                Target(
                    name, index, f"{tower}.{name.rsplit('.', 1)[1]}", linear.in_features, linear.out_features, tower
                )
                for name, index, linear in tower_linears(model, tower)
            ]
    return targets


def uniform_budget(targets: list[Target], rank: int) -> int:
    """Size of uniform LoRA at `rank` on `targets`: the budget every HyDRA allocation must fit in."""
    return rank * sum(t.cost for t in targets)


@dataclass(frozen=True)
class Budget:
    """A parameter budget with the rank bounds and granularity every module's rank must respect."""

    total: int
    min_rank: int = 1
    max_rank: int = 16
    granularity: int = 1

    def __post_init__(self) -> None:
        if self.min_rank < 0:
            raise ConfigError(f"adapter.min_rank must be at least 0, got {self.min_rank}")
        if self.granularity < 1:
            raise ConfigError(f"adapter.rank_granularity must be at least 1, got {self.granularity}")
        if self.max_rank < self.min_rank:
            raise ConfigError(f"adapter.max_rank ({self.max_rank}) is below adapter.min_rank ({self.min_rank})")

    def ranks(self) -> list[int]:
        """Every allowed rank: min_rank, min_rank + granularity, ... up to max_rank."""
        return list(range(self.min_rank, self.max_rank + 1, self.granularity))

    def check_feasible(self, targets: list[Target]) -> None:
        floor = self.min_rank * sum(t.cost for t in targets)
        if floor > self.total:
            raise ConfigError(
                f"the budget of {self.total:,} parameters is below the {floor:,} that min_rank={self.min_rank} on all "
                f"{len(targets)} target modules needs; raise adapter.rank / adapter.budget_params or lower min_rank"
            )


@dataclass
class Allocation:
    """Rank per target module (full names, in target order), with what produced it."""

    ranks: dict[str, int]
    budget: int
    info: dict = field(default_factory=dict)  # method, layer budgets, calibration time, ... (free-form, JSON-able)

    def params(self, targets: list[Target]) -> int:
        costs = {t.name: t.cost for t in targets}
        return sum(rank * costs[name] for name, rank in self.ranks.items())

    def moved_params(self, previous: Allocation, targets: list[Target]) -> int:
        """Parameters of budget that changed hands since `previous`: the cost of every rank increase (what
        `schedule.max_move_fraction` caps; decreases pay for them)."""
        costs = {t.name: t.cost for t in targets}
        return sum(max(0, rank - previous.ranks[name]) * costs[name] for name, rank in self.ranks.items())

    def check(self, targets: list[Target], budget: Budget | None = None) -> None:
        """Raise if the allocation does not cover exactly `targets`, exceeds its own budget or `budget`'s total, or
        breaks `budget`'s rank bounds."""
        if list(self.ranks) != [t.name for t in targets]:
            raise ValueError("allocation does not cover exactly the target modules, in order")
        limit = self.budget if budget is None else min(self.budget, budget.total)
        if self.params(targets) > limit:
            raise ValueError(f"allocation uses {self.params(targets):,} parameters, over the budget of {limit:,}")
        if budget is not None:
            allowed = set(budget.ranks())
            bad = {name: rank for name, rank in self.ranks.items() if rank not in allowed}
            if bad:
                raise ValueError(
                    f"ranks outside {budget.min_rank}..{budget.max_rank} step {budget.granularity}: {bad}"
                )

    def to_json(self) -> str:
        return json.dumps({"budget": self.budget, "ranks": self.ranks, "info": self.info}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Allocation:
        data = json.loads(text)
        return cls(ranks={k: int(v) for k, v in data["ranks"].items()}, budget=int(data["budget"]), info=data["info"])

    @classmethod
    def load(cls, path: Path) -> Allocation:
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"cannot read allocation {path}: {error}") from None

    @classmethod
    def uniform(cls, targets: list[Target], rank: int) -> Allocation:
        return cls({t.name: rank for t in targets}, uniform_budget(targets, rank), {"method": "uniform"})
