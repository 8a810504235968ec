import dataclasses

import pytest
import torch

from rankwise import geometry
from rankwise.statistics.metrics import METRICS


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


# products of roots from float32 eigendecompositions agree to about the check's tolerance
EIGH_ACCURACY = 2 * geometry.EIGH_RTOL


def _streams(m, n, tokens=60, seed=7):
    """Dense-stream inputs, compressed-stream inputs (the dense ones perturbed), an output
    gradient covariance and a weight, all float64."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, n, dtype=torch.float64)
    Xd = torch.randn(n, tokens, generator=g, dtype=torch.float64) * scales[:, None]
    Xc = Xd + 0.3 * torch.randn(n, tokens, generator=g, dtype=torch.float64) * scales[:, None]
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W, Xd, Xc, spd(m, seed + 1)


def _anchored_factors(W, Xd, Xc, G, rank, mix=1.0, damping=0.0, root=geometry.cholesky_root):
    C = Xc @ Xc.T
    left_image = W.T @ G @ W
    W_star, kw = geometry.anchored(W, C, Xc @ Xd.T, root(C, damping), left=G,
                                   left_image=left_image, mix=mix)
    if W.shape[0] > W.shape[1]:
        kw.pop("left", None)
    d = geometry.decompose(W_star, damping=damping, **kw)
    B, A = d.factors(rank)
    return B @ A, d.spectrum


def _anchored_error(W_r, W, Xd, Xc, G):
    """sum_t e^T G e with e = W_r x_c - W x_d: what the anchored projection minimises."""
    E = W_r @ Xc - W @ Xd
    return float((E * (G @ E)).sum())


def _alternating_least_squares(W, Xd, Xc, G, rank, iterations=3000):
    """min over rank-`rank` B A of sum_t e^T G e by alternating exact least squares from a
    random start: an independent brute-force optimum (reduced-rank regression has no
    spurious local minima)."""
    g = torch.Generator().manual_seed(11)
    Y, A = W @ Xd, torch.randn(rank, W.shape[1], generator=g, dtype=torch.float64)
    XXt = Xc @ Xc.T
    for _ in range(iterations):
        P = A @ Xc
        B = torch.linalg.solve(P @ P.T, P @ Y.T).T
        A = torch.linalg.solve(B.T @ G @ B, B.T @ G @ Y @ Xc.T) @ torch.linalg.inv(XXt)
    return B @ A


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_anchored_projection_is_the_brute_force_least_squares_optimum(shape):
    W, Xd, Xc, G = _streams(*shape)
    rank = 3
    W_r, spectrum = _anchored_factors(W, Xd, Xc, G, rank)
    brute = _alternating_least_squares(W, Xd, Xc, G, rank)
    ours, best = _anchored_error(W_r, W, Xd, Xc, G), _anchored_error(brute, W, Xd, Xc, G)
    assert ours <= best * (1 + 1e-7) and ours == pytest.approx(best, rel=1e-6)
    # at full rank: the unconstrained least-squares map of x_c to the dense outputs (to
    # the accuracy of the float32 eigendecompositions the float64 check accepts)
    full, _ = _anchored_factors(W, Xd, Xc, G, min(shape))
    lstsq = torch.linalg.lstsq(Xc.T, (W @ Xd).T).solution.T
    torch.testing.assert_close(full, lstsq, rtol=EIGH_ACCURACY, atol=EIGH_ACCURACY)
    # the dropped spectrum is what the cut costs beyond the best full-rank fit
    excess = ours - _anchored_error(full, W, Xd, Xc, G)
    assert excess == pytest.approx(float(spectrum[rank:].sum()), rel=1e-4)


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_anchored_fit_is_the_same_with_a_triangular_or_a_symmetric_input_root(shape):
    """The anchored fit takes Cholesky roots (no eigendecomposition); any square root of
    the input covariance must give the same factors and spectrum as the symmetric one."""
    W, Xd, Xc, G = _streams(*shape)
    cholesky = _anchored_factors(W, Xd, Xc, G, 3, damping=1e-6)
    symmetric = _anchored_factors(W, Xd, Xc, G, 3, damping=1e-6, root=geometry.psd_root)
    for ours, theirs in zip(cholesky, symmetric):
        torch.testing.assert_close(ours, theirs, rtol=EIGH_ACCURACY, atol=EIGH_ACCURACY)


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_anchored_projection_with_equal_streams_is_the_kfac_projection(shape):
    W, Xd, _, G = _streams(*shape)
    C = Xd @ Xd.T
    anchored, _ = _anchored_factors(W, Xd, Xd, G, 3)
    plain = geometry.project(W, 3, damping=0.0, **metric_stats("kfac", G, C))
    torch.testing.assert_close(anchored, plain.B @ plain.A, rtol=EIGH_ACCURACY,
                               atol=EIGH_ACCURACY)


def test_anchored_mix_zero_fits_the_compressed_streams_own_outputs(shape=(8, 12)):
    """mix 0 is the sequential fit: the K-FAC projection of W itself in the compressed
    stream's covariance, whatever the dense stream was."""
    W, Xd, Xc, G = _streams(*shape)
    sequential, _ = _anchored_factors(W, Xd, Xc, G, 3, mix=0.0)
    plain = geometry.project(W, 3, damping=0.0, **metric_stats("kfac", G, Xc @ Xc.T))
    torch.testing.assert_close(sequential, plain.B @ plain.A, rtol=EIGH_ACCURACY,
                               atol=EIGH_ACCURACY)


def _spd(n, count=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(count, 3 * n, n, generator=g, dtype=torch.float64)
    return X.mT @ X / (3 * n)


def test_a_float32_solver_that_raises_is_redone_in_float64_and_counted(monkeypatch):
    """cuSOLVER raises on some ill-conditioned float32 inputs; the float64 redo is the
    answer, counted as a redo, never a crash."""
    real = torch.linalg.eigh

    def cusolver_like(S, *args, **kw):
        if S.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return real(S, *args, **kw)

    S = _spd(12, count=3)
    expected = geometry.eigh(S, float32=False)
    before = dataclasses.replace(geometry.EIGH_COUNT)
    monkeypatch.setattr(torch.linalg, "eigh", cusolver_like)
    lam, Q = geometry.eigh(S)
    done = geometry.EIGH_COUNT.since(before)
    assert torch.allclose(lam, expected[0]) and torch.allclose(Q.abs(), expected[1].abs())
    assert (done.decompositions, done.float64_redos) == (3, 3) and done.seconds > 0


def test_a_refused_float32_decomposition_is_counted_as_a_redo():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))[0]
    S = (Q * torch.logspace(0, -12, 40, dtype=torch.float64)) @ Q.T    # condition 1e12
    before = dataclasses.replace(geometry.EIGH_COUNT)
    geometry.eigh(S[None], floor=1e-12)
    assert geometry.EIGH_COUNT.since(before).float64_redos == 1
    geometry.eigh(_spd(40), floor=1e-3)                     # well conditioned: kept
    assert geometry.EIGH_COUNT.since(before).float64_redos == 1


def test_decompositions_of_one_size_go_in_bounded_batches(monkeypatch):
    """However many layers share a width, at most EIGH_BATCH of their matrices are
    stacked for one call (the bound on a block's decomposition memory)."""
    batches = []
    real = geometry.eigh

    def recording(K, *args, **kw):
        batches.append(K.shape[0])
        return real(K, *args, **kw)

    monkeypatch.setattr(geometry.solvers, "eigh", recording)
    g = torch.Generator().manual_seed(0)
    problems = [(torch.randn(6, 10, generator=g, dtype=torch.float64), {}) for _ in range(11)]
    out = geometry.decompose_many(problems)
    assert len(out) == 11 and max(batches) == geometry.EIGH_BATCH
    assert sum(batches) == 11


@pytest.mark.parametrize("metric", ["svd", "whiten", "fisher", "kfac"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_spectra_alone_are_the_decompositions_spectra(metric, shape):
    """What the allocation reads from eigenvalues alone is the spectrum of the full
    decomposition (to float32's accuracy relative to the layer's whole loss)."""
    m, n = shape
    g = torch.Generator().manual_seed(3)
    problems = [(torch.randn(m, n, generator=g, dtype=torch.float64),
                 metric_stats(metric, spd(m, seed), spd(n, seed + 1))) for seed in range(3)]
    before = dataclasses.replace(geometry.EIGH_COUNT)
    spectra = [s.values for s in geometry.spectra_many(problems)]
    assert geometry.EIGH_COUNT.since(before).values_only == 3
    for spectrum, d in zip(spectra, geometry.decompose_many(problems)):
        assert spectrum.shape == d.spectrum.shape and (spectrum[:-1] >= spectrum[1:]).all()
        tails = lambda s: s.flip(0).cumsum(0)                       # noqa: E731
        assert (tails(spectrum) - tails(d.spectrum)).abs().max() <= 1e-5 * d.spectrum.sum()


def test_eigenvalues_a_float32_solver_got_wrong_or_raised_on_are_redone_in_float64(monkeypatch):
    S = _spd(12, count=3)
    expected = torch.linalg.eigvalsh(S)
    real = torch.linalg.eigvalsh

    def wrong_for_the_second(K, *args, **kw):
        lam = real(K, *args, **kw)
        if K.dtype == torch.float32:
            lam[1, -1] *= 1.1               # a solver that failed on one matrix
        return lam

    def raising(K, *args, **kw):
        if K.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigvalsh: the algorithm failed to converge")
        return real(K, *args, **kw)

    for solver, redone in ((wrong_for_the_second, 1), (raising, 3)):
        monkeypatch.setattr(torch.linalg, "eigvalsh", solver)
        before = dataclasses.replace(geometry.EIGH_COUNT)
        lam = geometry.eigvalsh(S)
        done = geometry.EIGH_COUNT.since(before)
        torch.testing.assert_close(lam, expected, rtol=1e-5, atol=1e-6)
        assert (done.decompositions, done.values_only, done.float64_redos) == (3, 3, redone)


def _with_smallest(n, smallest, seed=0):
    """A symmetric matrix of mean eigenvalue 1 whose smallest eigenvalue is `smallest`."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    lam = torch.linspace(0, 2, n, dtype=torch.float64)
    lam[0] = smallest
    lam = lam * (n / lam.sum())
    return (Q * lam) @ Q.T, float(lam[0])


def test_cholesky_roots_absorb_round_off_below_the_damping_without_an_eigendecomposition(
        monkeypatch):
    """Statistics summed from float32 products have eigenvalues a little below zero where
    they are rank-deficient (the TinyLlama width's inputs at 1024 tokens: down to -4e-6
    of the mean). The root takes the first tenfold damping that absorbs them; only a matrix
    that is not PSD beyond round-off falls back to the symmetric root."""
    S, smallest = _with_smallest(40, -3e-6)
    def no_eigh(*args, **kw):
        raise AssertionError("an eigendecomposition was paid for")
    with monkeypatch.context() as patched:
        patched.setattr(geometry.solvers, "eigh", no_eigh)
        root = geometry.cholesky_root(S, 1e-6)
    mean = float(S.diagonal().mean())
    assert smallest < -1e-6 * mean
    torch.testing.assert_close(root.half.T @ root.half, S + 1e-5 * mean * torch.eye(40,
                               dtype=torch.float64))
    torch.testing.assert_close(root.half @ root.inv_half, torch.eye(40, dtype=torch.float64))
    far, _ = _with_smallest(40, -0.5)                        # not round-off: clipped instead
    symmetric = geometry.psd_root(far, 1e-6)
    torch.testing.assert_close(geometry.cholesky_root(far, 1e-6).half, symmetric.half)


def _rank_deficient(n=64, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank, n, generator=g, dtype=torch.float64)
    return x.T @ x


def test_a_zero_damping_on_a_singular_statistic_finishes_with_finite_roots():
    """Damping 0 is accepted; a rank-deficient statistic then has no Cholesky factor at
    that damping, and the tries from zero must still end (they once multiplied zero by
    ten forever) in a finite root that says which damping it took."""
    import threading
    S = _rank_deficient()
    result = {}
    worker = threading.Thread(target=lambda: result.update(root=geometry.cholesky_root(S, 0.0)),
                              daemon=True)
    worker.start()
    worker.join(30)
    assert "root" in result, "cholesky_root with damping 0 did not return"
    root = result["root"]
    assert torch.isfinite(root.half).all() and torch.isfinite(root.inv_half).all()
    assert 0 < root.damping <= geometry.ROUNDOFF_DAMPING
    assert geometry.raised(root, 0.0) == root.damping
    symmetric = geometry.psd_root(S, 0.0)
    assert torch.isfinite(symmetric.inv_half).all()
    assert len(geometry.damping_tries(0.0)) <= 12 and len(geometry.damping_tries(1e-300)) <= 12


def test_a_float32_eigendecomposition_that_returns_nan_is_redone_in_float64(monkeypatch):
    S = _spd(12, count=3)
    expected = geometry.eigh(S, float32=False)
    real = torch.linalg.eigh

    def nan_for_the_second(K, *args, **kw):
        lam, Q = real(K, *args, **kw)
        if K.dtype == torch.float32:
            Q = Q.clone()
            Q[1, 0, 0] = float("nan")
        return lam, Q

    monkeypatch.setattr(torch.linalg, "eigh", nan_for_the_second)
    for floor in (None, 1e-6):
        before = geometry.EIGH_COUNT.snapshot()
        lam, Q = geometry.eigh(S, floor=floor)
        assert geometry.EIGH_COUNT.since(before).float64_redos == 1
        assert torch.isfinite(Q).all()
        torch.testing.assert_close(lam, expected[0])


@pytest.mark.parametrize("solver", ["eigh", "eigvalsh"])
def test_out_of_memory_in_a_float32_solve_is_raised_not_retried_in_float64(monkeypatch, solver):
    calls = []

    def out_of_memory(K, *args, **kw):
        calls.append(K.dtype)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.linalg, solver, out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        getattr(geometry, solver)(_spd(12, count=2))
    assert calls == [torch.float32]


def test_the_damping_a_root_took_is_what_it_says():
    S, _ = _with_smallest(40, -3e-6)
    root = geometry.cholesky_root(S, 1e-6)
    assert root.damping == pytest.approx(1e-5)
    assert geometry.raised(root, 1e-6) == pytest.approx(1e-5)
    assert geometry.raised(geometry.cholesky_root(_spd(40)[0], 1e-6), 1e-6) is None


def test_a_full_rank_error_is_priced_in_the_metric_a_truncation_is():
    """metric_totals damps as the decomposition does (raised damping included), so the
    price of an error equals the price of truncating that error to rank 0, whatever
    damping its statistics needed."""
    torch.manual_seed(0)
    W = torch.randn(24, 40, dtype=torch.float64)
    X = torch.randn(40, 3, dtype=torch.float64)
    C = X @ X.T                                   # rank 3 of 40: damping is raised
    g = torch.randn(24, 2, dtype=torch.float64)
    G = g @ g.T
    for kw in (dict(left=G, right=C), dict(left=C[:24, :24], right=C)):
        total = geometry.metric_totals([(W, kw)], 1e-6)[0]
        assert total == pytest.approx(float(geometry.decompose(W, damping=1e-6, **kw)
                                            .spectrum.sum()), rel=1e-9)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)], ids=["left form", "right form"])
def test_truncation_prices_are_the_spectrum_tails_in_sample_and_the_errors_price_out_of_it(shape):
    """In the statistics it was decomposed in, the price of every rank is its spectrum's
    tail; in other statistics, the damped price of the explicit error at that rank."""
    g = torch.Generator().manual_seed(0)
    m, n = shape
    W = torch.randn(m, n, generator=g, dtype=torch.float64)

    def sides():
        X = torch.randn(40, n, generator=g, dtype=torch.float64)
        Y = torch.randn(40, m, generator=g, dtype=torch.float64)
        return Y.T @ Y, X.T @ X

    G, C = sides()
    d = geometry.decompose(W, left=G, right=C, damping=1e-6)
    tails = d.spectrum.flip(0).cumsum(0).flip(0)
    prices = geometry.truncation_prices(d, G, C, 1e-6)
    assert prices.shape == (min(shape) + 1,) and prices[-1] == 0
    torch.testing.assert_close(prices[:-1], tails, rtol=1e-9, atol=1e-9 * float(tails[0]))
    G2, C2 = sides()
    prices = geometry.truncation_prices(d, G2, C2, 1e-6)
    for r in (1, 5, min(shape) - 1):
        B, A = d.factors(r)
        error = geometry.metric_totals([(W - B @ A, dict(left=G2, right=C2))], 1e-6)[0]
        assert float(prices[r]) == pytest.approx(error, rel=1e-9)
