import pytest
import torch

from rankwise import geometry
from rankwise.metrics import METRICS


def spd(n, seed, decay=3.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.logspace(0, -decay, n, dtype=torch.float64)) @ Q.T


def metric_pair(metric, G, C):
    """(left, right) weights of the metric, for measuring errors in it."""
    return {"svd": (None, None), "whiten": (None, C), "fisher": (G.diagonal(), None),
            "kfac": (G, C)}[metric]


def metric_stats(metric, G, C):
    return METRICS[metric].statistics((G.shape[0], C.shape[0]), input_cov=C, grad_cov=G)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_each_metric_is_optimal_in_its_own_metric(shape):
    m, n = shape
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    G, C = spd(m, 1), spd(n, 2)
    rank = 4
    approx = {metric: geometry.project(W, rank, damping=0.0, **metric_stats(metric, G, C))
              for metric in METRICS}
    for metric in METRICS:
        left, right = metric_pair(metric, G, C)
        errors = {other: geometry.metric_error(W, f.B @ f.A, left, right)
                  for other, f in approx.items()}
        own = errors[metric]
        # the error of the projection equals the sum of the dropped squared singular values
        # (to the accuracy of a float32 eigendecomposition the float64 check accepts)
        assert own == pytest.approx(float(approx[metric].spectrum[rank:].sum()), rel=1e-6)
        for other, err in errors.items():
            if other != metric:
                assert own <= err * (1 + 1e-9), (metric, other, own, err)


def test_kfac_beats_svd_in_its_own_metric_by_a_margin():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(30, 40, generator=g, dtype=torch.float64)
    G, C = spd(30, 4, decay=4), spd(40, 5, decay=4)
    kfac = geometry.project(W, 5, G, C)
    svd = geometry.project(W, 5)
    assert geometry.metric_error(W, kfac.B @ kfac.A, G, C) < \
        0.5 * geometry.metric_error(W, svd.B @ svd.A, G, C)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_full_rank_reproduces_the_weight(metric, shape):
    W = torch.randn(*shape, dtype=torch.float64)
    G, C = spd(shape[0], 1), spd(shape[1], 2)
    f = geometry.project(W, min(shape), **metric_stats(metric, G, C))
    torch.testing.assert_close(f.B @ f.A, W, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("metric", ["whiten", "kfac", "fisher"])
@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_singular_statistics_give_finite_factors(metric, shape):
    m, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, n, generator=g, dtype=torch.float64)   # fewer tokens than features
    x[:, 3] = 0                                                 # and a dead feature
    gr = torch.randn(4, m, generator=g, dtype=torch.float64)
    C, G = x.T @ x, gr.T @ gr
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    f = geometry.project(W, 8, **METRICS[metric].statistics((m, n), input_cov=C, grad_cov=G))
    left, right = metric_pair(metric, G, C)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    if right is not None:   # C has rank <= 5, so rank 8 loses (almost) nothing in the metric
        assert geometry.metric_error(W, f.B @ f.A, left, right) <= \
            1e-6 * geometry.metric_error(W, torch.zeros_like(W), left, right)


@pytest.mark.parametrize("metric", ["whiten", "kfac"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_smaller_side_statistics_give_the_same_projection(metric, shape):
    m, n = shape
    W = torch.randn(m, n, dtype=torch.float64)
    G, C = spd(m, 1), spd(n, 2)
    full = geometry.project(W, 5, **metric_stats(metric, G, C))
    small = {"output_cov": W @ C @ W.T, "input_grad_cov": W.T @ G @ W}
    small["grad_cov" if m <= n else "input_cov"] = G if m <= n else C
    if metric == "whiten":
        small.pop("grad_cov", None)
    f = geometry.project(W, 5, **METRICS[metric].statistics(shape, **small))
    torch.testing.assert_close(f.B @ f.A, full.B @ full.A, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(f.spectrum, full.spectrum, rtol=1e-7, atol=1e-9)


def test_all_zero_statistics_fall_back_to_identity():
    root = geometry.psd_root(torch.zeros(6, 6))
    torch.testing.assert_close(root.half, torch.eye(6, dtype=torch.float64))


def test_nonfinite_statistics_are_rejected():
    S = torch.eye(4, dtype=torch.float64)
    S[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        geometry.psd_root(S)


def test_factors_are_balanced_and_rank_is_validated():
    W = torch.randn(10, 8, dtype=torch.float64)
    f = geometry.project(W, 3)
    torch.testing.assert_close(f.B.norm(dim=0), f.A.norm(dim=1))
    with pytest.raises(ValueError, match="rank must be"):
        geometry.project(W, 9)
