"""Gradient-spectrum signals: the streaming sketch against exact SVDs, and the hooks on a real (tiny) model."""

import gc

import numpy as np
import pytest
import torch

from hydra_rank.data import ChatEncoder, collate
from hydra_rank.data.records import load_json_samples
from hydra_rank.loss import answer_loss
from hydra_rank.rank.budget import discover_targets
from hydra_rank.rank.signals import ModuleSpectrum, SketchHooks, StackedGradientSketch, gradient_spectra

from .conftest import make_tiny_llava


def low_rank_batches(rng, batches=5, tokens=40, d_in=30, d_out=20, rank=3, noise=0.01):
    """(inputs, output grads) whose gradients Gᵀ = dᵀx share a rank-3 output subspace, plus a little noise."""
    basis = rng.standard_normal((d_out, rank))
    for _ in range(batches):
        x = rng.standard_normal((tokens, d_in))
        d = rng.standard_normal((tokens, rank)) @ basis.T + noise * rng.standard_normal((tokens, d_out))
        yield torch.tensor(x), torch.tensor(d)


def test_sketch_matches_the_exact_stacked_spectrum():
    rng = np.random.default_rng(0)
    pairs = list(low_rank_batches(rng))
    sketch = StackedGradientSketch(d_in=30, rank=8, seed=0)
    for x, d in pairs:
        sketch.update(x, d)
    stacked = np.concatenate([(d.T @ x).numpy() for x, d in pairs], axis=1)  # [G_1 | G_2 | ...], d_out x (n·d_in)
    exact = np.linalg.svd(stacked, compute_uv=False)
    result = sketch.result()
    np.testing.assert_allclose(result.sigma[:3], exact[:3], rtol=1e-4)  # only the noise tail is lost
    assert result.sigma[3] < 0.05 * result.sigma[0]  # the noise floor stays small
    exact_energy = float((exact**2).sum())
    assert abs(result.total_energy - exact_energy) / exact_energy < 0.5  # unbiased estimate from 8 probes


def test_coherent_spectrum_is_the_cross_batch_estimate():
    """(S Sᵀ − Σ_b G_b G_bᵀ) / (B(B−1)), S = Σ_b G_b: exact when the sketch is as wide as the module."""
    rng = np.random.default_rng(0)
    pairs = [tuple(torch.tensor(rng.standard_normal((40, n))) for n in (30, 20)) for _ in range(4)]
    sketch = StackedGradientSketch(d_in=30, rank=20, seed=0, coherent=True)
    for x, d in pairs:
        sketch.update(x, d)
    grads = [(d.T @ x).numpy() for x, d in pairs]
    total = sum(grads)
    cross = total @ total.T - sum(g @ g.T for g in grads)
    expected = np.clip(np.linalg.eigvalsh(cross)[::-1], 0, None) / (4 * 3)
    np.testing.assert_allclose(sketch.result().sigma ** 2, expected, rtol=1e-4, atol=1e-3)


def test_coherent_spectrum_discounts_what_the_batches_do_not_share():
    """A module whose batches pull in unrelated directions has the larger stacked energy, but the smaller coherent
    one, against a module whose batches agree: the noise is not something rank can buy."""
    rng = np.random.default_rng(1)
    shared = rng.standard_normal((30, 20)) / 10
    spectra = {}
    for kind in ("stacked", "coherent"):
        noisy, steady = (StackedGradientSketch(30, 8, 0, coherent=kind == "coherent") for _ in range(2))
        for _ in range(4):
            x = torch.tensor(rng.standard_normal((40, 30)))
            noisy.update(x, torch.tensor(1.2 * rng.standard_normal((40, 20))))
            steady.update(x, x @ torch.tensor(shared) + 0.01 * torch.tensor(rng.standard_normal((40, 20))))
        spectra[kind] = [sketch.result().utility(4)[4] for sketch in (noisy, steady)]
    assert spectra["stacked"][0] > 1.2 * spectra["stacked"][1]
    assert spectra["coherent"][1] > 1.8 * spectra["coherent"][0]


def test_a_coherent_spectrum_needs_two_batches():
    sketch = StackedGradientSketch(d_in=3, rank=2, seed=0, coherent=True)
    sketch.update(torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(RuntimeError, match="at least two batches"):
        sketch.result()


def test_utility_is_cumulative_energy_and_flat_beyond_the_sketch():
    spectrum = ModuleSpectrum(sigma=np.array([3.0, 2.0, 1.0]), total_energy=20.0)
    np.testing.assert_allclose(spectrum.utility(5), [0, 9, 13, 14, 14, 14])


def test_gradient_spectra_on_a_model_leave_parameters_alone(tokenizer, colour_dataset):
    model, processor = make_tiny_llava(tokenizer)
    targets = discover_targets(model)
    encoder = ChatEncoder(processor)
    samples = load_json_samples(colour_dataset[0])
    batches = [collate([encoder.encode(s) for s in samples[i : i + 4]], encoder.pad_token_id) for i in (0, 4)]
    spectra, seconds = gradient_spectra(model, targets, batches, rank=6, show_progress=False)
    assert set(spectra) == {t.name for t in targets} and seconds > 0
    for target in targets:
        sigma = spectra[target.name].sigma
        assert len(sigma) == 6 and np.all(np.diff(sigma) <= 1e-9) and sigma[0] > 0
    assert all(p.grad is None for p in model.parameters())
    hooks = sum(len(m._forward_hooks) for m in model.modules())  # transformers adds its own on first use
    again, _ = gradient_spectra(model, targets, batches, rank=6, show_progress=False)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # ours were removed
    np.testing.assert_array_equal(again[targets[0].name].sigma, spectra[targets[0].name].sigma)  # deterministic


def test_spectra_match_autograd_weight_gradients(tokenizer, colour_dataset):
    """The hooked (inputs, output-grad) factorisation gives the same gradient spectrum as autograd's dL/dW."""
    model, processor = make_tiny_llava(tokenizer)
    target = discover_targets(model)[2]  # a v_proj
    encoder = ChatEncoder(processor)
    samples = load_json_samples(colour_dataset[0])
    batches = [collate([encoder.encode(s) for s in samples[i : i + 3]], encoder.pad_token_id) for i in (0, 3)]
    spectra, _ = gradient_spectra(model, [target], batches, rank=16, show_progress=False)
    weight = model.get_submodule(target.name).weight
    weight.requires_grad_(True)
    grads = []
    for batch in batches:
        loss, _ = answer_loss(model, batch)
        (grad,) = torch.autograd.grad(loss, weight)
        grads.append(grad.double().numpy())
    exact = np.linalg.svd(np.concatenate(grads, axis=1), compute_uv=False)[:16]
    np.testing.assert_allclose(spectra[target.name].sigma, exact, rtol=1e-4, atol=1e-10 * exact[0])


def test_spectra_follow_the_given_loss(tokenizer, colour_dataset):
    """`loss_fn` decides whose gradients are sketched: three times the loss gives three times every singular value."""
    model, processor = make_tiny_llava(tokenizer)
    targets = discover_targets(model)[:3]
    encoder = ChatEncoder(processor)
    samples = load_json_samples(colour_dataset[0])
    batches = [collate([encoder.encode(s) for s in samples[:4]], encoder.pad_token_id)]

    def tripled(model, batch):
        loss, tokens = answer_loss(model, batch)
        return 3 * loss, tokens

    plain, _ = gradient_spectra(model, targets, batches, rank=6, show_progress=False)
    scaled, _ = gradient_spectra(model, targets, batches, rank=6, show_progress=False, loss_fn=tripled)
    for target in targets:
        np.testing.assert_allclose(scaled[target.name].sigma, 3 * plain[target.name].sigma, rtol=1e-4)


def test_sketch_without_batches_is_an_error():
    with pytest.raises(RuntimeError, match="no calibration batch"):
        StackedGradientSketch(4, 2, 0).result()


def test_hooks_let_go_of_the_inputs_once_sketched(tokenizer, colour_dataset):
    """While the loss (and so the autograd graph with its hooks) is still held, as the training loop holds it until
    the next step, no target's input stays alive: a hook that kept them held one batch's inputs to every target into
    the next forward (~400 MB at the scenes benchmark's size)."""
    model, processor = make_tiny_llava(tokenizer)
    targets = discover_targets(model)
    encoder = ChatEncoder(processor)
    batch = collate([encoder.encode(s) for s in load_json_samples(colour_dataset[0])[:4]], encoder.pad_token_id)
    inputs: set[int] = set()
    recorders = [
        model.get_submodule(t.name).register_forward_pre_hook(lambda m, args: inputs.add(args[0].data_ptr()))
        for t in targets
    ]
    hooks = SketchHooks(model, targets, rank=4)
    loss, _ = answer_loss(model, batch)
    loss.backward()
    gc.collect()
    alive = {o.data_ptr() for o in gc.get_objects() if isinstance(o, torch.Tensor)} & inputs
    assert len(inputs) == 4 * len({t.layer for t in targets})  # per layer: q/k/v's, o's, gate/up's and down's
    assert not alive
    assert all(len(sketch.output_parts) == 1 for sketch in hooks.sketches.values())  # every target was sketched
    for handle in recorders:
        handle.remove()
    hooks.remove()
    assert loss.grad_fn is not None  # the graph was held throughout


def _synchronized_spectrum(rank: int, init_file: str, results: str) -> None:
    """One of two processes: half the batches each, then `synchronize`; writes its spectrum."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pairs = list(low_rank_batches(np.random.default_rng(3), batches=4, noise=0.5))
        sketch = StackedGradientSketch(d_in=30, rank=20, seed=rank, coherent=True)
        for x, d in pairs[rank::2]:
            sketch.update(x, d)
        sketch.synchronize()
        np.save(f"{results}-{rank}.npy", sketch.result().sigma)
    finally:
        torch.distributed.destroy_process_group()


def test_coherent_spectrum_is_the_same_across_processes_as_in_one(tmp_path):
    """Two processes that each saw half of the batches end with the coherent spectrum of all of them."""
    torch.multiprocessing.spawn(
        _synchronized_spectrum, args=(str(tmp_path / "init"), str(tmp_path / "sigma")), nprocs=2, join=True
    )
    alone = StackedGradientSketch(d_in=30, rank=20, seed=0, coherent=True)
    for x, d in list(low_rank_batches(np.random.default_rng(3), batches=4, noise=0.5)):
        alone.update(x, d)
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"sigma-{rank}.npy"), alone.result().sigma, rtol=1e-3, atol=1e-3)
