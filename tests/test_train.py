import copy

import pytest
import torch

from rankwise import geometry
from rankwise.errors import RankwiseError
from rankwise.models.blocks import target_linears
from rankwise.models.layers import LowRankLinear
from rankwise.train import FinetuneConfig, LanguageTask, finetune, svt
from rankwise.train.prox import (budget_threshold, metric_roots, penalty_weights, removed_loss,
                                 thresholded)


def _random_psd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return X @ X.T


def test_prox_is_singular_value_soft_thresholding():
    torch.manual_seed(0)
    W = torch.randn(12, 20, dtype=torch.float64)
    tau = 1.3
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    expected = (U * (S - tau).clamp_min(0)) @ Vh
    X = svt.singular_value_threshold(W, tau)
    torch.testing.assert_close(X, expected)

    def objective(Y):
        return 0.5 * (Y - W).square().sum() + tau * torch.linalg.svdvals(Y).sum()
    for _ in range(20):   # the prox minimises its objective
        assert objective(X) <= objective(X + 1e-3 * torch.randn_like(X)) + 1e-12


def test_prox_in_a_metric_thresholds_the_weighted_singular_values():
    torch.manual_seed(1)
    W = torch.randn(8, 10, dtype=torch.float64)
    L, R = _random_psd(8, 2), _random_psd(10, 3)
    left, right = geometry.psd_root(L, 0.0), geometry.psd_root(R, 0.0)
    tau = 2.0
    X = svt.singular_value_threshold(W, tau, left, right)
    M = left.half @ W @ right.half
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    torch.testing.assert_close(left.half @ X @ right.half, (U * (S - tau).clamp_min(0)) @ Vh)

    def objective(Y):
        D = left.half @ (Y - W) @ right.half
        return 0.5 * D.square().sum() + tau * torch.linalg.svdvals(left.half @ Y @ right.half).sum()
    for _ in range(20):
        assert objective(X) <= objective(X + 1e-4 * torch.randn_like(X)) + 1e-10


def test_budget_threshold_keeps_the_most_parameters_within_the_target():
    torch.manual_seed(2)
    shapes = {"a": (20, 30), "b": (40, 10)}
    spectra = {k: torch.rand(min(s)).sort(descending=True).values for k, s in shapes.items()}
    target = 700

    def kept(tau):
        return sum(max(int((s > tau).sum()), 1) * sum(shapes[k]) if max(int((s > tau).sum()), 1)
                   * sum(shapes[k]) < shapes[k][0] * shapes[k][1] else shapes[k][0] * shapes[k][1]
                   for k, s in spectra.items())
    tau = budget_threshold(spectra, shapes, target)
    assert kept(tau) <= target
    below = torch.cat(list(spectra.values()))
    below = below[below < tau]
    if below.numel():
        assert kept(float(below.max())) > target


@pytest.fixture
def lm_task():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4000,), generator=g)
    return lambda steps: LanguageTask(ids[:3200], ids[3200:].view(-1, 100), 2, 32, steps)


@pytest.mark.parametrize("method", ["factors", "hard", "svt"])
def test_final_model_meets_the_budget_exactly(tiny, lm_task, method):
    config = FinetuneConfig(method=method, ratio=0.4, metric="kfac", steps=8, prox_every=2,
                            recovery_steps=2, lr=1e-3)
    result = finetune(tiny, lm_task(8), config, target_linears(tiny), progress=False)
    budget = (1 - 0.4) * result.dense_params
    widest = max(m + n for m, n in result.shapes.values())
    assert budget - widest < result.final_params <= budget
    layers = target_linears(tiny)
    actual = sum(l.rank * (l.in_features + l.out_features) if isinstance(l, LowRankLinear)
                 else l.weight.numel() for l in layers.values())
    assert actual == result.final_params
    assert any(isinstance(l, LowRankLinear) for l in layers.values())
    assert [r.step for r in result.history] == list(range(8))
    proxes = [r for r in result.history if r.prox_loss is not None]
    assert len(proxes) == (0 if method == "factors" else 3)
    # a truncation only drops directions; a soft threshold also shrinks the kept ones
    assert all((r.shrink_loss == 0) == (method == "hard") for r in proxes)


def test_svt_with_zero_lambda_is_plain_training(tiny, lm_task):
    plain = copy.deepcopy(tiny)
    task = lm_task(6)
    layers = target_linears(plain)
    for p in plain.parameters():
        p.requires_grad_(False)
    params = [p for l in layers.values() for p in l.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    plain.train()
    losses = []
    for step in range(6):
        loss = task.loss(plain, task.batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    config = FinetuneConfig(method="svt", ratio=0.3, metric="svd", steps=6, prox_every=1,
                            recovery_steps=0, lr=1e-3, lam=0.0)
    result = finetune(tiny, task, config, target_linears(tiny), progress=False)
    assert [r.loss for r in result.history] == pytest.approx(losses, rel=1e-5, abs=1e-6)


class _Interrupt(Exception):
    pass


class _StopAt:
    """A task that fails at one step, as a killed run would."""

    def __init__(self, task, step):
        self.task, self.step = task, step

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, step):
        if step == self.step:
            raise _Interrupt
        return self.task.batch(step)


@pytest.mark.parametrize("stop", [5, 7])   # before and after the cut to factors (step 6)
def test_checkpoint_resumes_to_the_same_state(tiny, lm_task, tmp_path, stop):
    config = FinetuneConfig(method="svt", ratio=0.4, metric="kfac", steps=9, prox_every=2,
                            recovery_steps=3, lr=1e-3)
    dense = copy.deepcopy(tiny)
    straight = finetune(tiny, lm_task(9), config, target_linears(tiny), progress=False)

    ckpt = tmp_path / "run.pt"
    interrupted = copy.deepcopy(dense)
    with pytest.raises(_Interrupt):
        finetune(interrupted, _StopAt(lm_task(9), stop), config, target_linears(interrupted),
                 checkpoint=ckpt, checkpoint_every=3, progress=False)
    resumed = copy.deepcopy(dense)
    result = finetune(resumed, lm_task(9), config, target_linears(resumed), checkpoint=ckpt,
                      checkpoint_every=3, resume=True, progress=False)
    assert result.ranks == straight.ranks
    assert [r.loss for r in result.history] == [r.loss for r in straight.history]
    for (name, a), b in zip(tiny.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_checks_its_inputs(tiny, lm_task, tmp_path):
    config = FinetuneConfig(method="hard", steps=4, prox_every=2, recovery_steps=1)
    with pytest.raises(RankwiseError, match="no checkpoint"):
        finetune(tiny, lm_task(4), config, target_linears(tiny), checkpoint=tmp_path / "x.pt",
                 resume=True, progress=False)
    first = copy.deepcopy(tiny)
    finetune(first, lm_task(4), config, target_linears(first), checkpoint=tmp_path / "x.pt",
             progress=False)
    other = FinetuneConfig(method="hard", steps=4, prox_every=2, recovery_steps=1, lr=0.5)
    with pytest.raises(RankwiseError, match="written with other options"):
        finetune(tiny, lm_task(4), other, target_linears(tiny), checkpoint=tmp_path / "x.pt",
                 resume=True, progress=False)


def test_metric_roots_cover_both_sides_of_every_layer(tiny, lm_task):
    layers = target_linears(tiny)
    roots, _ = metric_roots(tiny, layers, lm_task(1), "kfac", 1e-6, progress=False)
    for name, layer in layers.items():
        left, right = roots[name]
        assert left.half.shape == (layer.out_features,) * 2
        assert right.half.shape == (layer.in_features,) * 2


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "prune"}, "unknown method"),
    ({"metric": "pca"}, "unknown metric"),
    ({"ratio": 1.5}, "ratio must be in"),
    ({"steps": 10, "recovery_steps": 10}, "recovery_steps"),
    ({"prox_every": 0}, "prox_every"),
    ({"lr": 0.0}, "learning rate"),
    ({"lam": -1.0}, "lam"),
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"penalty": "l1"}, "unknown penalty"),
])
def test_bad_finetune_options_raise_clear_errors(kwargs, match):
    with pytest.raises(RankwiseError, match=match):
        FinetuneConfig(**kwargs)


def test_shrink_rules_zero_the_same_directions_and_reweighted_keeps_large_ones():
    from rankwise.train.svt import shrink
    s = torch.tensor([10.0, 4.0, 2.0, 1.0, 0.5])
    soft, reweighted = shrink(s, 1.0, "soft"), shrink(s, 1.0, "reweighted")
    torch.testing.assert_close(soft, torch.tensor([9.0, 3.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(reweighted, torch.tensor([9.9, 3.75, 1.5, 0.0, 0.0]))
    assert torch.equal(soft > 0, reweighted > 0)
    torch.testing.assert_close(shrink(s, 0.0, "reweighted"), s)
    s = torch.tensor([10.0, 2.0, 1.5, 1.0, 0.5])
    firm = shrink(s, 1.0, "firm")                # continuous at tau and at 2 tau
    torch.testing.assert_close(firm, torch.tensor([10.0, 2.0, 1.0, 0.0, 0.0]))
    t = torch.linspace(0, 3, 301)                # the prox of the MCP penalty (gamma 2)

    def mcp(x):
        return torch.where(x <= 2, x - x * x / 4, torch.ones_like(x))
    for x in (0.7, 1.2, 1.8, 2.5):
        objective = 0.5 * (t - x) ** 2 + mcp(t)
        assert float(shrink(torch.tensor([x]), 1.0, "firm")) == pytest.approx(
            float(t[objective.argmin()]), abs=0.011)
    with pytest.raises(RankwiseError, match="unknown shrink"):
        FinetuneConfig(shrink="hard")


def test_weighted_penalty_thresholds_each_layer_by_its_parameter_cost():
    g = torch.Generator().manual_seed(3)
    shapes = {"0": (20, 30), "1": (6, 20)}
    spectra = {k: torch.rand(min(s), generator=g, dtype=torch.float64).sort(descending=True).values
               for k, s in shapes.items()}
    weights = penalty_weights(shapes, "weighted")
    assert weights["0"] / weights["1"] == pytest.approx(((30 + 20) / (20 + 6)) ** 0.5)
    assert penalty_weights(shapes, "nuclear") == {"0": 1.0, "1": 1.0}
    tau = 0.2
    new, kept = thresholded(spectra, weights, tau, "soft", min_rank=1)
    shrink_loss = prox_loss = 0.0
    for k, s in spectra.items():
        expected = (s - tau * weights[k]).clamp_min(0)
        torch.testing.assert_close(new[k], expected)
        assert kept[k] == max(int((expected > 0).sum()), 1)
        shrink_loss += 0.5 * (tau * weights[k]) ** 2 * int((expected > 0).sum())
        prox_loss += 0.5 * float((s - expected).square().sum())
    # the prox's predicted loss: kept directions lose tau * weight each, the others vanish
    total, shrinking = removed_loss(spectra, new)
    assert shrinking == pytest.approx(shrink_loss, rel=1e-9)
    assert total == pytest.approx(prox_loss, rel=1e-9) and prox_loss > shrink_loss > 0


def test_fisher_metric_trains_with_its_diagonal_root(tiny, lm_task):
    layers = target_linears(tiny)
    roots, _ = metric_roots(tiny, layers, lm_task(1), "fisher", 1e-6, progress=False)
    for name, layer in layers.items():
        left, right = roots[name]
        assert right is None and left.half.shape == (layer.out_features,)
    config = FinetuneConfig(method="svt", ratio=0.4, metric="fisher", steps=4, prox_every=2,
                            recovery_steps=1, lr=1e-3)
    result = finetune(tiny, lm_task(4), config, target_linears(tiny), progress=False)
    assert result.achieved_ratio >= 0.4


class _Payload:
    """An object a pickle would rebuild by running code."""
    def __reduce__(self):
        return (print, ("code from a checkpoint ran",))


def test_a_checkpoint_never_runs_code_from_the_file(tiny, lm_task, tmp_path, capsys):
    config = FinetuneConfig(method="hard", steps=4, prox_every=2, recovery_steps=1)
    torch.save({"options": {}, "payload": _Payload()}, tmp_path / "x.pt")
    with pytest.raises(RankwiseError, match="not a rankwise checkpoint"):
        finetune(tiny, lm_task(4), config, target_linears(tiny), checkpoint=tmp_path / "x.pt",
                 resume=True, progress=False)
    assert "code from a checkpoint ran" not in capsys.readouterr().out
