"""Per-module gradient spectra from a few calibration batches: what extra rank would buy each module.

For a linear y = W x the full-weight gradient of a batch is G_b = Δ_bᵀ X_b (Δ: output gradients, X: inputs, one row
per token). A rank-r adapter can follow the gradient only inside an r-dimensional subspace, so the gradient energy that
the best r directions capture is a first-order estimate of what rank r buys. Over many steps the adapter has to follow
many batches' gradients with the *same* subspace, so we measure the spectrum of all calibration batches' gradients
together: σ_i² are the eigenvalues of Σ_b G_b G_bᵀ (output side), u(r) = Σ_{i≤r} σ_i².

Memory stays bounded for billion-parameter models: G_b is never formed. Each batch's gradient is factored with a
randomized range finder straight from Δ and X (cost O(tokens · d · k)), and the running output-side factor is kept
at k columns by an SVD after every batch (a frequent-directions style merge). Per module that is O(d_out · k) memory,
and the inputs held for the backward pass are the activations autograd keeps anyway. Total energy Σ_b ‖G_b‖²_F is
estimated without forming G_b from the same random projection (E‖GΩ‖² = k‖G‖² for Gaussian Ω).

Stacked energy counts every batch's gradient noise as something rank can buy: a module whose batches' gradients point
in unrelated directions has a large Σ_b G_b G_bᵀ, although the adapter, following all of them with one subspace,
learns only what they share. The `coherent` spectrum keeps what the batches agree on: with S = Σ_b G_b over B
batches, S Sᵀ − Σ_b G_b G_bᵀ = Σ_{b≠c} G_b G_cᵀ holds only cross-batch products, so its eigenvalues divided by
B(B−1) estimate the spectrum of the expected gradient E[G] E[G]ᵀ without the per-batch noise (an unbiased estimate
of the matrix; its eigenvalues are clipped at 0). S is kept as a two-sided rank-k factor, O(k·(d_in + d_out)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..loss import answer_loss
from ..utils import progress_bar

if TYPE_CHECKING:
    from ..loss import LossFn
    from .budget import Target

SKETCH_OVERSAMPLING = 8  # sketch columns beyond max_rank: keeps the top max_rank singular values accurate


@dataclass
class ModuleSpectrum:
    """Top-k singular values of a module's stacked gradients and their total energy."""

    sigma: np.ndarray  # descending, length k (output side: eigenvalues of Σ_b G_b G_bᵀ are σ²)
    total_energy: float  # Σ_b ‖G_b‖²_F (estimated), ≥ Σ σ_i²

    def utility(self, max_rank: int) -> np.ndarray:
        """u[r] = energy captured by the best r output directions, r = 0..max_rank (flat beyond the sketch)."""
        captured = np.concatenate([[0.0], np.cumsum(self.sigma.astype(np.float64) ** 2)])
        if len(captured) <= max_rank:
            captured = np.concatenate([captured, np.full(max_rank + 1 - len(captured), captured[-1])])
        return captured[: max_rank + 1]


def _top_factor(stacked: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` factor F of a tall matrix M (F Fᵀ ≈ M Mᵀ): thin QR, then the SVD of the small R only."""
    basis, triangle = torch.linalg.qr(stacked)
    left, values, _ = torch.linalg.svd(triangle)
    return (basis @ left[:, :rank]) * values[:rank]


def _top_two_sided(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (L, R) of the product left @ right, R with orthonormal rows (so (LR)(LR)ᵀ = L Lᵀ)."""
    left_basis, left_triangle = torch.linalg.qr(left)
    right_basis, right_triangle = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(left_triangle @ right_triangle.T)
    return (left_basis @ u[:, :rank]) * s[:rank], vh[:rank] @ right_basis.T


def _coherent_eigenvalues(sum_left: torch.Tensor, stacked: torch.Tensor, batches: int) -> torch.Tensor:
    """Eigenvalues (descending, ≥ 0) of (S Sᵀ − C Cᵀ) / (B(B−1)) with S Sᵀ = L Lᵀ and C Cᵀ ≈ Σ_b G_b G_bᵀ, computed in
    the span of [L | C]: one QR and a small symmetric eigenproblem."""
    width = sum_left.shape[1]
    _, triangle = torch.linalg.qr(torch.cat([sum_left, stacked], dim=1))
    ours, theirs = triangle[:, :width], triangle[:, width:]
    values = torch.linalg.eigvalsh(ours @ ours.T - theirs @ theirs.T).flip(0)
    return values.clamp(min=0.0)[: stacked.shape[1]] / (batches * (batches - 1))


class StackedGradientSketch:
    """A streaming rank-k factor of a module's gradients G_b = Δ_bᵀ X_b, fed with (inputs, output grads) per batch:
    an output-side factor C (d_out x k) with C Cᵀ ≈ Σ_b G_b G_bᵀ. Neither G_b nor any d_out x d_in matrix is ever
    formed.

    Each batch contributes a k-column factor, compressed with the running one back to k columns (a frequent-directions
    style merge) as soon as it arrives, so a sketch holds one k-column factor between batches and two during a merge:
    O(k·d_out), whatever `signal_steps` is, which matters for a large model
    (docs/scale.md). Merging every batch rather than every few costs a QR and a small SVD per batch and module, and
    each merge truncates to k = max_rank + oversampling columns, so it moves the top max_rank values only slightly
    against a deferred merge (on scenes: the same ranks at six of seven decisions, four one-rank near-ties differing
    at the last).
    """

    MERGE_EVERY = 2  # factors held before a merge: the running one and the new batch's

    def __init__(self, d_in: int, rank: int, seed: int, coherent: bool = False) -> None:
        self.rank = rank
        self.d_in = d_in
        self.generator = torch.Generator().manual_seed(seed)
        self.output_parts: list[torch.Tensor] = []
        self.total_energy = 0.0
        self.seconds = 0.0
        self.coherent = coherent
        self.batches = 0
        self.sum_factors: tuple[torch.Tensor, torch.Tensor] | None = None  # S = Σ_b G_b ≈ L @ R (coherent only)

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, grads: torch.Tensor) -> None:
        """Add one batch: `inputs` (tokens x d_in) and `grads` (tokens x d_out) give G = gradsᵀ inputs."""
        started = time.perf_counter()
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        d = grads.reshape(-1, grads.shape[-1]).float()
        omega = torch.randn(self.d_in, self.rank, generator=self.generator).to(x.device)
        sample = d.T @ (x @ omega)  # G Ω, d_out x k
        self.total_energy += float(sample.square().sum()) / self.rank
        basis, _ = torch.linalg.qr(sample)
        small = (basis.T @ d.T) @ x  # Qᵀ G, k x d_in
        triangle = torch.linalg.qr(small.T, mode="r")[1]  # small = triangleᵀ rightᵀ, `right` orthonormal (unneeded)
        u, s, _ = torch.linalg.svd(triangle.T)  # G ≈ Q·small = (Q u) diag(s) (right vhᵀ)ᵀ
        self.output_parts.append((basis @ u) * s)
        if len(self.output_parts) >= self.MERGE_EVERY:
            self._compress()
        if self.coherent:
            self._add_to_sum([basis], [small])
        self.batches += 1
        self.seconds += time.perf_counter() - started

    def _add_to_sum(self, lefts: list[torch.Tensor], rights: list[torch.Tensor]) -> None:
        """S += Σ_i lefts[i] @ rights[i], truncated back to `rank` columns."""
        if self.sum_factors is not None:
            lefts, rights = [self.sum_factors[0], *lefts], [self.sum_factors[1], *rights]
        self.sum_factors = _top_two_sided(torch.cat(lefts, dim=1), torch.cat(rights, dim=0), self.rank)

    def synchronize(self) -> None:
        """Across processes (each saw its own batches): merge everyone's factors, sum the energies. Every process
        ends with the same sketch of all the data. A no-op without torch.distributed."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        self._compress()
        mine = self.output_parts[0].contiguous()
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        self.output_parts = [_top_factor(torch.cat(everyone, dim=1), self.rank)]
        totals = torch.tensor([self.total_energy, self.batches], dtype=torch.float64)
        dist.all_reduce(totals)
        self.total_energy, self.batches = float(totals[0]), int(totals[1])
        if self.coherent:
            left, right = (part.contiguous() for part in self.sum_factors)
            lefts = [torch.empty_like(left) for _ in everyone]
            rights = [torch.empty_like(right) for _ in everyone]
            dist.all_gather(lefts, left)
            dist.all_gather(rights, right)
            self.sum_factors = None
            self._add_to_sum(lefts, rights)

    def state_dict(self) -> dict:
        return {
            "output_parts": list(self.output_parts),
            "total_energy": self.total_energy,
            "seconds": self.seconds,
            "generator": self.generator.get_state(),
            "batches": self.batches,
            "sum_factors": self.sum_factors,
        }

    def load_state_dict(self, state: dict) -> None:
        self.output_parts = list(state["output_parts"])
        self.total_energy, self.seconds = state["total_energy"], state["seconds"]
        self.generator.set_state(state["generator"])
        self.batches, self.sum_factors = state.get("batches", 0), state.get("sum_factors")

    def _compress(self) -> None:
        self.output_parts = [_top_factor(torch.cat(self.output_parts, dim=1), self.rank)]

    def result(self) -> ModuleSpectrum:
        if not self.output_parts:
            raise RuntimeError("no calibration batch reached this module")
        self._compress()
        if self.coherent:
            if self.batches < 2:
                raise RuntimeError("a coherent spectrum needs the gradients of at least two batches")
            values = _coherent_eigenvalues(self.sum_factors[0].double(), self.output_parts[0].double(), self.batches)
            return ModuleSpectrum(values.sqrt().cpu().numpy(), float(values.sum()))
        sigma = torch.linalg.svdvals(self.output_parts[0].double()).cpu().numpy()
        return ModuleSpectrum(sigma, max(self.total_energy, float((sigma**2).sum())))


class SketchHooks:
    """Forward hooks that feed every target's (input, output-gradient) pair into its sketch on each backward pass.

    Usable during training (the output of an adapted layer requires grad) or, with `track_embeddings`, on a frozen
    model where the input embeddings are made the only leaf that requires grad.
    """

    def __init__(
        self, model: nn.Module, targets: list[Target], rank: int, seed: int = 0, spectrum: str = "stacked"
    ) -> None:
        # never more columns than the module has directions: its spectrum has at most min(d_in, d_out) values
        coherent = spectrum == "coherent"
        self.sketches = {
            t.name: StackedGradientSketch(t.d_in, min(rank, t.width), seed + i, coherent)
            for i, t in enumerate(targets)
        }
        self.handles = [model.get_submodule(t.name).register_forward_hook(self._hook(t.name)) for t in targets]

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                # The gradient hook lives on the autograd graph, which outlives the backward pass for as long as
                # anyone holds the loss (the loop does, until the next step's loss replaces it). Handing the inputs
                # over through a list it empties lets them go with autograd's own saved copy; captured in a closure
                # they stayed alive into the next forward: one batch's inputs to every target, ~400 MB on scenes.
                pending = [args[0].detach()]
                output.register_hook(lambda grad: self.sketches[name].update(pending.pop(), grad))

        return forward_hook

    def state_dict(self) -> dict:
        return {name: sketch.state_dict() for name, sketch in self.sketches.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, sketch in self.sketches.items():
            sketch.load_state_dict(state[name])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def results(self) -> dict[str, ModuleSpectrum]:
        """Every module's spectrum, over the batches of all processes."""
        for sketch in self.sketches.values():
            sketch.synchronize()
        return {name: sketch.result() for name, sketch in self.sketches.items()}

    @property
    def seconds(self) -> float:
        return sum(sketch.seconds for sketch in self.sketches.values())


def gradient_spectra(
    model: nn.Module,
    targets: list[Target],
    batches: list[dict[str, torch.Tensor]],
    rank: int,
    seed: int = 0,
    show_progress: bool = True,
    loss_fn: LossFn = answer_loss,
    spectrum: str = "stacked",
) -> tuple[dict[str, ModuleSpectrum], float]:
    """Spectra of every target's calibration gradients (top `rank` values), and the seconds it took. The gradients
    are those of `loss_fn` (training's loss by default; `benchmarks/signal_weighting.py` compares another weighting).

    Gradients flow to the input embeddings only (`backward(inputs=...)`): no weight gradient is allocated and any
    trainable parameter's `.grad` is left untouched. Hooks are removed afterwards, also on error.
    """
    started = time.perf_counter()
    embedded: list[torch.Tensor] = []

    def track_embeddings(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.detach().requires_grad_(True)
        embedded.append(output)
        return output

    hooks = SketchHooks(model, targets, rank, seed, spectrum)
    embedding_hook = model.get_input_embeddings().register_forward_hook(track_embeddings)
    was_training = model.training
    model.eval()  # no dropout: measure the model as it is
    try:
        with progress_bar("calibration", total=len(batches), enabled=show_progress) as advance:
            for batch in batches:
                embedded.clear()
                loss, _ = loss_fn(model, batch)
                torch.autograd.backward(loss, inputs=embedded)
                advance(loss=loss.item())
    finally:
        hooks.remove()
        embedding_hook.remove()
        model.train(was_training)
    return hooks.results(), time.perf_counter() - started
