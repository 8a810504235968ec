import math

import pytest
import torch

from rankwise.errors import RankwiseError
from rankwise.lab import dln


@pytest.mark.parametrize("d,depth,width", [(20, 3, 4), (50, 4, 10), (7, 2, 3)])
def test_parameter_counts_match_the_formulas(d, depth, width):
    wide = dln.orthogonal_init(d, depth, 1e-3)
    problem = dln.make_problem("full", d, 2)
    compressed = dln.spectral_init(problem.surrogate, depth, width, 1e-3)
    assert sum(F.numel() for F in wide) == dln.dln_params(d, depth) == depth * d * d
    assert sum(F.numel() for F in compressed) == dln.cdln_params(d, depth, width) \
        == 2 * d * width + (depth - 2) * width ** 2
    assert dln.end_to_end(compressed).shape == (d, d)


@pytest.mark.parametrize("name", dln.PROBLEMS)
def test_spectral_init_spans_the_surrogates_top_subspaces(name):
    problem = dln.make_problem(name, 30, 3, noise=0.1, seed=3)
    eps, width, depth = 1e-2, 6, 3
    W0 = dln.end_to_end(dln.spectral_init(problem.surrogate, depth, width, eps))
    U, _, Vh = torch.linalg.svd(problem.surrogate)
    # exactly eps^L times the orthogonal projector pair of the top-r_hat singular vectors
    torch.testing.assert_close(W0, eps ** depth * U[:, :width] @ Vh[:width], rtol=0, atol=1e-12)
    assert dln.largest_principal_angle(W0, U[:, :width]) < 1e-4
    assert dln.largest_principal_angle(W0.T, Vh[:width].T) < 1e-4


def test_surrogates_are_unbiased_views_of_the_target():
    full = dln.make_problem("full", 40, 2)
    torch.testing.assert_close(full.surrogate, full.target)
    completion = dln.make_problem("completion", 40, 2, observed_fraction=0.5)
    observed = completion.mask.bool()
    torch.testing.assert_close(completion.surrogate[observed], 2 * completion.target[observed])
    assert completion.surrogate[~observed].abs().max() == 0
    sensing = dln.make_problem("sensing", 10, 2, measurements=4000)
    # A^T A -> I as measurements grow: the surrogate approaches the target
    assert dln.largest_principal_angle(torch.linalg.svd(sensing.surrogate)[0][:, :2],
                                       torch.linalg.svd(sensing.target)[0][:, :2]) < 20


@pytest.mark.parametrize("name", dln.PROBLEMS)
def test_gradient_matches_autograd(name):
    problem = dln.make_problem(name, 12, 2, measurements=200, seed=1)
    factors = dln.orthogonal_init(12, 3, 0.5, seed=2)
    W = dln.end_to_end(factors).requires_grad_(True)
    loss = _autograd_loss(problem, W)
    (grad,) = torch.autograd.grad(loss, W)
    torch.testing.assert_close(problem.gradient(W.detach()), grad)
    assert problem.loss(W.detach()) == pytest.approx(float(loss.detach()))


def _autograd_loss(problem, W):
    if problem.name == "sensing":
        return 0.5 * (problem.operator @ W.reshape(-1) - problem.observed).square().sum()
    R = W - problem.observed
    if problem.name == "completion":
        return 0.5 * (problem.mask * R).square().sum() / problem.fraction
    return 0.5 * R.square().sum()


def test_factor_updates_are_gradient_descent_on_the_product():
    problem = dln.make_problem("completion", 10, 2, seed=4)
    factors = dln.orthogonal_init(10, 3, 0.7, seed=5)
    params = [F.clone().requires_grad_(True) for F in factors]
    loss = 0.5 * (problem.mask * (dln.end_to_end(params) - problem.observed)).square().sum() \
        / problem.fraction
    grads = torch.autograd.grad(loss, params)
    dln.train(problem, factors, lr=0.1, alpha=3.0, iterations=1, every=100, stop_at_tol=False)
    expected = [P.detach() - rate * g for P, g, rate in zip(params, grads, (0.3, 0.1, 0.3))]
    for F, E in zip(factors, expected):
        torch.testing.assert_close(F, E)


@pytest.mark.parametrize("name", dln.PROBLEMS)
def test_both_networks_recover_a_tiny_noiseless_target(name):
    problem = dln.make_problem(name, 16, 2, measurements=200, observed_fraction=0.6, seed=0)
    wide, compressed = dln.run_pair(problem, depth=3, width=4, eps=1e-2, lr=0.2, alpha=4.0,
                                    iterations=8000, tol=1e-3)
    for trace in (wide, compressed):
        assert trace.reached is not None and trace.final_error <= 1e-3, trace.network
    assert compressed.params < wide.params
    assert compressed.reached < wide.reached


def test_runs_are_reproducible_from_the_seed():
    runs = []
    for _ in range(2):
        problem = dln.make_problem("sensing", 12, 2, measurements=150, noise=0.05, seed=7)
        runs.append(dln.run_pair(problem, width=4, eps=1e-2, iterations=300, seed=7,
                                 stop_at_tol=False))
    for a, b in zip(*runs):
        assert a.errors == b.errors
    other = dln.make_problem("sensing", 12, 2, measurements=150, noise=0.05, seed=8)
    assert not torch.equal(other.target, dln.make_problem("sensing", 12, 2, seed=7).target)


def test_wide_updates_live_in_a_low_dimensional_subspace():
    problem = dln.make_problem("full", 40, 2, seed=0)
    trace, record = dln.track_subspace(problem, depth=3, eps=1e-2, lr=0.2, iterations=4000,
                                       every=200)
    assert trace.final_error < 1e-3
    for rank in record.effective_rank(1e-3)[-1]:
        assert rank <= 2 * problem.rank
    assert record.angle_right[-1] < 1 and record.angle_left[-1] < 1


def test_a_diverging_run_says_so():
    problem = dln.make_problem("full", 10, 2)
    with pytest.raises(RankwiseError, match="diverged"):
        dln.run_pair(problem, eps=0.5, lr=50.0, iterations=200)


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "denoise"}, "unknown problem"),
    ({"name": "full", "rank": 0}, "rank must be"),
    ({"name": "completion", "observed_fraction": 1.5}, "observed fraction"),
    ({"name": "full", "noise": -1.0}, "noise"),
])
def test_bad_problem_options_raise_clear_errors(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(RankwiseError, match=match):
        dln.make_problem(name, 10, **{"rank": 2, **kwargs})


def test_bad_network_options_raise_clear_errors():
    problem = dln.make_problem("full", 10, 2)
    with pytest.raises(RankwiseError, match="at least 2 layers"):
        dln.orthogonal_init(10, 1, 1e-3)
    with pytest.raises(RankwiseError, match="width"):
        dln.spectral_init(problem.surrogate, 3, 11, 1e-3)
    with pytest.raises(RankwiseError, match="learning rate"):
        dln.train(problem, dln.orthogonal_init(10, 3, 1e-3), lr=-1)
    assert math.isclose(dln.largest_principal_angle(torch.eye(3)[:, :1], torch.eye(3)[:, 1:2]), 90)
