"""What each form (rankwise.forms) would cost a layer, priced in one metric: the K-FAC
second-order KL, tr(G E C E^T) for an error E of the weight (G, C the unnormalised
gradient and input covariances), the units the spectrum allocation already spends.

For a layer W (m x n) with statistics G, C and the token-weighted input covariance H that
rounding reads (rankwise.rounding), a `Menu` holds:
  spectrum        the K-FAC spectrum of W: truncating to rank r costs its tail beyond r;
  rounded[b]      tr(G E C E^T) for E = W - Q_b, Q_b the weight rounded at b bits the way
                  the cut will round it (GPTQ in H, or round-to-nearest);
  residual[b]     the K-FAC spectrum of that E: a rounded weight plus a rank-r correction
                  (the correction is E's best rank-r approximation in the metric) costs
                  its tail beyond r;
  factor_error[f] per direction i, what rounding the factors of the cut at f bits adds:
                  the rank-r factors cost the spectrum's tail plus the first r entries.
The factor errors are an estimate: the rank-one terms of the balanced factors at the
largest rank, each rounded to nearest, cost (B_i^T G B_i)(e_i^T C e_i) for A's row error
e_i and (f_i^T G f_i)(A_i^T C A_i) for B's column error f_i (cross terms dropped); the
rounding the cut will use is GPTQ, which leaves less error than round-to-nearest, so the
estimate is scaled by what GPTQ saved on the layer's own weight at the same bits.

A layer the model already holds as factors (a rankwise output quantized further) can only
stay factored: its menu has the spectrum and factor errors of B A up to its rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import geometry
from .forms import Form
from .grids import FACTOR_BITS, FLOAT_BITS, Grid
from .layers import max_useful_rank
from .rounding import InverseFactor, round_to_nearest, round_weight

CORRECTED_BITS = (4, 3, 2)      # a correction pays only on a weight rounded coarsely


@dataclass(frozen=True)
class Pricing:
    """What is priced and how the cut will round: the widths offered to each form (empty:
    the form is not offered), the group size and the rounding (rankwise.rounding's), the
    dtype of the scales, the damping of the metric's roots."""
    rounded_bits: tuple[int, ...]       # a weight rounded
    corrected_bits: tuple[int, ...]     # a weight rounded under a correction
    factor_bits: tuple[int, ...]        # factors (16: floats)
    group_size: int
    rounding: str
    scale_dtype: torch.dtype
    damping: float

    @classmethod
    def of(cls, forms: list[str], weight_bits: list[int], group_size: int, rounding: str,
           scale_dtype: torch.dtype, damping: float) -> "Pricing":
        """The pricing of a recipe's --forms and --weight-bits."""
        return cls(tuple(weight_bits) if "rounded" in forms else (),
                   tuple(b for b in weight_bits if b in CORRECTED_BITS)
                   if "corrected" in forms else (),
                   FACTOR_BITS if "lowrank" in forms else (), group_size, rounding,
                   scale_dtype, damping)

    @property
    def rounded_factor_bits(self) -> tuple[int, ...]:
        return tuple(b for b in self.factor_bits if b < FLOAT_BITS)


@dataclass
class Menu:
    """A layer's prices (module docstring); tensors on the CPU, float64."""
    shape: tuple[int, int]
    spectrum: torch.Tensor                       # k = min(m, n), descending
    factor_error: dict[int, torch.Tensor]        # bits -> k
    rounded: dict[int, float]                    # bits -> price
    residual: dict[int, torch.Tensor]            # bits -> k, descending
    factored_rank: int | None = None             # the layer is factors of this rank

    def tensors(self) -> list[torch.Tensor]:
        """Every number, in an order `layout` knows: what a broadcast moves."""
        return [self.spectrum, *self.factor_error.values(),
                torch.tensor(list(self.rounded.values()), dtype=torch.float64),
                *self.residual.values()]

    @staticmethod
    def layout(shape: tuple[int, int], pricing: Pricing, factored_rank: int | None
               ) -> list[tuple[int, ...]]:
        k = min(shape)
        offered = _offered(pricing, factored_rank)
        return [(k,)] * (1 + len(pricing.rounded_factor_bits)) + \
            [(len(offered.rounded_bits),)] + [(k,)] * len(offered.corrected_bits)

    @classmethod
    def from_tensors(cls, shape, pricing: Pricing, factored_rank, tensors) -> "Menu":
        offered = _offered(pricing, factored_rank)
        spectrum, *rest = [t.to("cpu", torch.float64) for t in tensors]
        fb = pricing.rounded_factor_bits
        factor_error = dict(zip(fb, rest[:len(fb)]))
        rounded = dict(zip(offered.rounded_bits, rest[len(fb)].tolist()))
        residual = dict(zip(offered.corrected_bits, rest[len(fb) + 1:]))
        return cls(tuple(shape), spectrum, factor_error, rounded, residual, factored_rank)

    def options(self, pricing: Pricing, rank_step: int, min_rank: int
                ) -> tuple[list[Form], torch.Tensor, torch.Tensor]:
        """Every form this layer may take, its stored bits and its price."""
        forms: list[Form] = []
        m, n = self.shape
        tail = _tails(self.spectrum)
        cap = self.factored_rank if self.factored_rank is not None else max_useful_rank(m, n)
        prices: list[float] = []
        if self.factored_rank is None:
            forms.append(Form.dense())
            prices.append(0.0)
        for bits in pricing.factor_bits:            # empty when low rank is not offered
            step = rank_step if bits >= 8 else _lcm(rank_step, pricing.group_size)
            extra = _prefix(self.factor_error.get(bits), min(m, n))
            for r in range(-(-max(min_rank, 1) // step) * step, cap + 1, step):
                forms.append(Form.low_rank(r, bits))
                prices.append(float(tail[r] + extra[r]))
        offered = _offered(pricing, self.factored_rank)     # a measurement priced more
        for bits in offered.rounded_bits:
            forms.append(Form.rounded(bits))
            prices.append(self.rounded[bits])
        for bits in offered.corrected_bits:
            left = _tails(self.residual[bits])
            for r in range(rank_step, cap + 1, rank_step):
                forms.append(Form.corrected(bits, r))
                prices.append(float(left[r]))
        costs = torch.tensor([float(f.stored_bits(self.shape, pricing.group_size)) for f in forms],
                             dtype=torch.float64)
        return forms, costs, torch.tensor(prices, dtype=torch.float64)

    def price(self, form: Form) -> float:
        """The predicted loss of one form (dense: 0)."""
        tail = lambda s, r: float(s[r:].sum())                          # noqa: E731
        if form.kind == "lowrank":
            extra = self.factor_error.get(form.bits)
            return tail(self.spectrum, form.rank) + (
                float(extra[:form.rank].sum()) if extra is not None else 0.0)
        if form.kind == "rounded":
            return self.rounded[form.bits]
        if form.kind == "corrected":
            return tail(self.residual[form.bits], form.rank)
        return 0.0


@dataclass(frozen=True)
class _Offered:
    rounded_bits: tuple[int, ...]
    corrected_bits: tuple[int, ...]


def _offered(pricing: Pricing, factored_rank: int | None) -> _Offered:
    """The rounded forms a layer is offered: none when it is factors already."""
    if factored_rank is not None:
        return _Offered((), ())
    return _Offered(pricing.rounded_bits, pricing.corrected_bits)


def _tails(spectrum: torch.Tensor) -> torch.Tensor:
    """tail[r] = the sum of spectrum[r:], for r = 0 .. k."""
    s = spectrum.to(torch.float64).clamp_min(0)
    return torch.cat([s.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])


def _prefix(values: torch.Tensor | None, k: int) -> torch.Tensor:
    """prefix[r] = the sum of values[:r], r = 0 .. k (zeros without values)."""
    if values is None:
        return torch.zeros(k + 1, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), values.to(torch.float64).cumsum(0)])


def _lcm(a: int, b: int) -> int:
    import math
    return a * b // math.gcd(a, b)


def price(W: torch.Tensor, G: torch.Tensor, C: torch.Tensor, H: torch.Tensor | None,
          pricing: Pricing, factored_rank: int | None = None) -> Menu:
    """A layer's menu from its weight (B A for factors), G (m x m), C (n x n) and H (n x n;
    unused for factors), all on one device."""
    m, n = W.shape
    W = W.to(torch.float64)
    decomposition = geometry.decompose(W, left=G, right=C, damping=pricing.damping)
    offered = _offered(pricing, factored_rank)
    weight_widths = {*offered.rounded_bits, *offered.corrected_bits}
    factor = InverseFactor.of(H) if weight_widths and pricing.rounding == "gptq" else None
    rounded, errors, nearest_price = {}, {}, {}
    for bits in sorted(weight_widths | set(pricing.rounded_factor_bits)):
        grid = Grid.for_bits(bits, pricing.group_size)
        nearest = round_to_nearest(W, grid, pricing.scale_dtype).weight.to(W)
        if bits in pricing.rounded_factor_bits:      # what GPTQ saves: scales the factors'
            nearest_price[bits] = geometry.metric_error(W, nearest, G, C)
        if bits not in weight_widths:
            continue
        Q = nearest if factor is None else \
            round_weight(W, H, grid, pricing.scale_dtype, pricing.rounding, factor).weight.to(W)
        if bits in offered.corrected_bits:
            errors[bits] = W - Q
        rounded[bits] = geometry.metric_error(W, Q, G, C)
    spectra = geometry.spectra_many([(E, dict(left=G, right=C)) for E in errors.values()],
                                    pricing.damping)
    residual = {b: s.values.cpu() for b, s in zip(errors, spectra)}
    gain = {b: (rounded[b] / nearest_price[b] if b in rounded and nearest_price[b] > 0 else 1.0)
            for b in nearest_price}
    cap = factored_rank if factored_rank is not None else max_useful_rank(m, n)
    k = min(m, n)
    factor_error = {b: _padded(e, k) for b, e in
                    _factor_errors(decomposition, min(cap, k), G, C, pricing, gain).items()}
    return Menu((m, n), decomposition.spectrum.cpu(), factor_error,      # in `layout`'s order
                {b: rounded[b] for b in offered.rounded_bits},
                {b: residual[b] for b in offered.corrected_bits}, factored_rank)


def _padded(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([values.cpu(), torch.zeros(k - values.numel(), dtype=torch.float64)])


def _factor_errors(decomposition: geometry.Decomposition, cap: int, G, C, pricing: Pricing,
                   gain: dict[int, float]) -> dict[int, torch.Tensor]:
    """Per direction, the estimated loss of rounding the balanced factors at each width
    (module docstring)."""
    if not pricing.rounded_factor_bits or cap < 1:
        return {b: torch.zeros(0, dtype=torch.float64) for b in pricing.rounded_factor_bits}
    B, A = decomposition.factors(cap)
    G, C = G.to(torch.float64), C.to(torch.float64)
    b_metric = ((G @ B) * B).sum(0)                      # B_i^T G B_i
    a_metric = ((A @ C) * A).sum(1)                      # A_i^T C A_i
    out = {}
    for bits in pricing.rounded_factor_bits:
        grid = Grid.for_bits(bits, pricing.group_size)
        E_A = A - round_to_nearest(A, grid, pricing.scale_dtype).weight.to(A)
        width = -(-cap // pricing.group_size) * pricing.group_size   # B's groups: rank prefixes
        padded = torch.nn.functional.pad(B, (0, width - cap))
        E_B = (padded - round_to_nearest(padded, grid, pricing.scale_dtype).weight.to(B))[:, :cap]
        from_A = ((E_A @ C) * E_A).sum(1) * b_metric
        from_B = ((G @ E_B) * E_B).sum(0) * a_metric
        out[bits] = gain[bits] * (from_A + from_B)
    return out
