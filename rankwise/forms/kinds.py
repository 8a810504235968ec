"""The forms a layer can take (rankwise.forms.registry says what a kind knows):

  dense       the weight as it is, in floats
  lowrank     B A of rank r, both factors in floats (bits 16) or on a grid (8, 4)
  rounded     the weight on a grid of 8, 4, 3 or 2 bits
  corrected   the weight on a grid plus a float low-rank correction B A of its error
              (EoRA's form; stored like a LoRA adapter over the rounded weight)

Prices are predicted losses in the K-FAC metric, read on held-out calibration windows
(rankwise.forms.pricing): a truncation costs the error of the directions it drops, a
rounding error E costs tr(G E C E^T), a rounded weight plus a rank-r correction the error
of E's directions beyond r. The factor errors of a low-rank
layer are an estimate: the rank-one terms of the balanced factors at the largest rank,
each rounded to nearest, cost (B_i^T G B_i)(e_i^T C e_i) for A's row error e_i and
(f_i^T G f_i)(A_i^T C A_i) for B's column error f_i (cross terms dropped), scaled by what
the cut's rounding (GPTQ) saved against round-to-nearest on the layer's own weight at the
same width.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import geometry
from ..models.layers import CompositeLinear, LowRankLinear, is_conv1d, linear_shape
from .grids import FACTOR_BITS, FLOAT_BITS, Grid, matrix_bits
from .registry import Form, Kind, Storage, register
from .rounding import round_to_nearest

CORRECTED_BITS = (4, 3, 2)      # a correction pays only on a weight rounded coarsely


def _tails(costs: torch.Tensor) -> torch.Tensor:
    """tail[r] = the sum of costs[r:], for r = 0 .. k: the price of rank r (costs: each
    direction's, rankwise.forms.pricing.Layer.truncation_costs)."""
    s = costs.to(torch.float64)
    return torch.cat([s.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])


def _floats(rows: int, columns: int, grid: Grid | None, storage: Storage) -> int:
    """Stored bits of a matrix on `grid`, or as floats of the storage's width."""
    if grid is None:
        return rows * columns * storage.float_bits
    return matrix_bits(rows, columns, grid, storage.float_bits)


def _grid_of(module: nn.Module) -> Grid | None:
    return getattr(module, "rankwise_grid", None)


class Dense(Kind):
    name = "dense"

    def stored_bits(self, form, shape, storage):
        return shape[0] * shape[1] * storage.float_bits

    def recognise(self, module):
        plain = type(module) is nn.Linear or is_conv1d(module)
        return Form(self.name) if plain and _grid_of(module) is None else None

    def options(self, measured, shape, widths, group_size, rank_step, min_rank, cap):
        return [(Form(self.name), 0.0)]


class LowRank(Kind):
    name = "lowrank"
    help = "factors in 16, 8 or 4 bits"
    ranked = factored = for_factors = decomposed = True
    module = LowRankLinear

    def stored_bits(self, form, shape, storage):
        (m, n), r, grid = shape, form.rank, form.grid(storage.group_size)
        return _floats(r, n, grid, storage) + _floats(m, r, grid, storage)

    def params(self, form, shape):
        return form.rank * sum(shape)

    def gridded(self, form, shape):
        return [] if form.bits >= FLOAT_BITS else [(form.rank, shape[1]), (shape[0], form.rank)]

    def label(self, form):
        return f"rank {form.rank}" + (f", int{form.bits} factors" if form.bits < FLOAT_BITS else "")

    def recognise(self, module):
        if type(module) is not LowRankLinear:
            return None
        grid = _grid_of(module.A)
        return Form(self.name, module.rank, grid.bits if grid else FLOAT_BITS)

    def skeleton(self, linear, rank):
        return _empty(LowRankLinear, linear, rank)

    def needs_fit(self, form, layer):
        return not (isinstance(layer, LowRankLinear) and form.rank >= layer.rank)

    def widths(self, weight_bits):
        return FACTOR_BITS

    def measure(self, layer, widths):
        rounded = tuple(b for b in widths if b < FLOAT_BITS)
        k = min(layer.shape)
        errors = _factor_errors(layer, rounded, min(layer.cap, k))
        return [layer.truncation_costs(layer.decomposition),
                *(torch.cat([errors[b], torch.zeros(k - errors[b].numel(), dtype=torch.float64)])
                  for b in rounded)]

    def layout(self, shape, widths):
        return [(min(shape),)] * (1 + sum(b < FLOAT_BITS for b in widths))

    def _extras(self, measured, widths):
        rounded = [b for b in widths if b < FLOAT_BITS]
        return dict(zip(rounded, measured[1:]))

    def options(self, measured, shape, widths, group_size, rank_step, min_rank, cap):
        tail, extras, out = _tails(measured[0]), self._extras(measured, widths), []
        for bits in widths:
            step = rank_step if bits >= 8 else rank_step * group_size // math.gcd(rank_step, group_size)
            extra = extras.get(bits)
            extra = torch.zeros(min(shape) + 1, dtype=torch.float64) if extra is None else \
                torch.cat([torch.zeros(1, dtype=torch.float64), extra.cumsum(0)])
            for r in range(-(-max(min_rank, 1) // step) * step, cap + 1, step):
                out.append((Form(self.name, r, bits), float(tail[r] + extra[r])))
        return out

    def price(self, measured, widths, form):
        extra = self._extras(measured, widths).get(form.bits)
        return float(measured[0][form.rank:].sum()) + \
            (float(extra[:form.rank].sum()) if extra is not None else 0.0)

    def problem(self, fit, name, form):
        return fit.anchored_problem(name)

    def make(self, fit, name, form, solved):
        spectrum, _, B, A = solved
        fit.put_factors(name, form, B, A, spectrum)


class Rounded(Kind):
    name = "rounded"
    help = "its weight at one of --weight-bits"
    rounds_weight = True

    def stored_bits(self, form, shape, storage):
        return _floats(*shape, form.grid(storage.group_size), storage)

    def label(self, form):
        return f"int{form.bits}"

    def gridded(self, form, shape):
        return [tuple(shape)]

    def recognise(self, module):
        plain = type(module) is nn.Linear or is_conv1d(module)
        grid = _grid_of(module)
        return Form(self.name, None, grid.bits) if plain and grid is not None else None

    def needs_fit(self, form, layer):
        return True

    def widths(self, weight_bits):
        return tuple(weight_bits)

    def measure(self, layer, widths):
        return [torch.tensor(layer.error_prices([layer.rounded(b) for b in widths]),
                             dtype=torch.float64)]

    def layout(self, shape, widths):
        return [(len(widths),)]

    def options(self, measured, shape, widths, group_size, rank_step, min_rank, cap):
        return [(Form(self.name, None, b), float(p)) for b, p in zip(widths, measured[0])]

    def price(self, measured, widths, form):
        return float(measured[0][widths.index(form.bits)])

    def make(self, fit, name, form, solved):
        fit.put_rounded(name, form)


class CorrectedLinear(CompositeLinear):
    """A linear map stored as a weight on an integer grid plus a low-rank correction of
    its rounding error: y = base(x) + B (A x), `base` a plain nn.Linear (the rounded weight
    and the bias), `A` (in -> rank) and `B` (rank -> out) plain nn.Linear factors without
    bias. The shape a LoRA adapter has over a quantized base, which is how it can also be
    written (rankwise.formats.exports' lora format)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, rank, device, dtype)
        self.base = self.part(in_features, out_features, bias)
        self.A = self.part(in_features, rank, False)
        self.B = self.part(rank, out_features, False)

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.B(self.A(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense map base + B @ A (for inspection and merging, never used by forward)."""
        return self.base.weight + self.B.weight @ self.A.weight

    def extra_repr(self) -> str:
        return f"correction rank={self.rank}"


class Corrected(Kind):
    name = "corrected"
    help = "rounded at 4, 3 or 2 bits plus a low-rank correction"
    ranked = rounds_weight = decomposed = True
    module = CorrectedLinear

    def stored_bits(self, form, shape, storage):
        m, n = shape
        return _floats(m, n, form.grid(storage.group_size), storage) + \
            storage.float_bits * form.rank * (m + n)

    def params(self, form, shape):
        return shape[0] * shape[1] + form.rank * sum(shape)

    def label(self, form):
        return f"int{form.bits} + rank {form.rank} correction"

    def gridded(self, form, shape):
        return [tuple(shape)]

    def recognise(self, module):
        if type(module) is not CorrectedLinear:
            return None
        return Form(self.name, module.rank, _grid_of(module.base).bits)

    def skeleton(self, linear, rank):
        return _empty(CorrectedLinear, linear, rank)

    def adapter(self, module):
        return module.base, module.A.weight, module.B.weight

    def needs_fit(self, form, layer):
        return True

    def widths(self, weight_bits):
        return tuple(b for b in weight_bits if b in CORRECTED_BITS)

    def measure(self, layer, widths):
        errors = [layer.W - layer.rounded(b) for b in widths]
        return [layer.truncation_costs(d) for d in geometry.decompose_many(
            [(E, dict(left=layer.G, right=layer.C)) for E in errors], layer.damping)]

    def layout(self, shape, widths):
        return [(min(shape),)] * len(widths)

    def options(self, measured, shape, widths, group_size, rank_step, min_rank, cap):
        out = []
        for bits, residual in zip(widths, measured):
            left = _tails(residual)
            out += [(Form(self.name, r, bits), float(left[r]))
                    for r in range(rank_step, cap + 1, rank_step)]
        return out

    def price(self, measured, widths, form):
        return float(measured[widths.index(form.bits)][form.rank:].sum())

    def problem(self, fit, name, form):
        return fit.residual_problem(name, fit.anchored_target(name) - fit.rounded(name, form).weight)

    def make(self, fit, name, form, solved):
        spectrum, _, B, A = solved
        rounded, r = fit.rounded(name, form), form.rank
        layer = fit.layer(name)
        new = CorrectedLinear.from_parts(layer, base=rounded.weight, A=A[:r], B=B[:, :r])
        fit.store(new.base, rounded)
        fit.install(name, new, form, float(spectrum[r:].sum()))


def _empty(kind: type[CompositeLinear], linear: nn.Module, rank: int) -> CompositeLinear:
    m, n = linear_shape(linear)
    like = linear.weight
    return kind(n, m, rank, linear.bias is not None, device=like.device, dtype=like.dtype)


def _factor_errors(layer, widths: tuple[int, ...], cap: int) -> dict[int, torch.Tensor]:
    """Per direction, the estimated loss of rounding the balanced factors at each width
    (module docstring), in the held-out statistics."""
    if not widths or cap < 1:
        return {b: torch.zeros(0, dtype=torch.float64) for b in widths}
    B, A = layer.decomposition.factors(cap)
    G, C = layer.held.G.to(torch.float64), layer.held.C.to(torch.float64)
    b_metric = ((G @ B) * B).sum(0)                      # B_i^T G B_i
    a_metric = ((A @ C) * A).sum(1)                      # A_i^T C A_i
    group, dtype, out = layer.pricing.group_size, layer.pricing.scale_dtype, {}
    for bits in widths:
        grid = Grid.for_bits(bits, group)
        E_A = A - round_to_nearest(A, grid, dtype).weight.to(A)
        width = -(-cap // group) * group                 # B's groups: rank prefixes
        padded = torch.nn.functional.pad(B, (0, width - cap))
        E_B = (padded - round_to_nearest(padded, grid, dtype).weight.to(B))[:, :cap]
        from_A = ((E_A @ C) * E_A).sum(1) * b_metric
        from_B = ((G @ E_B) * E_B).sum(0) * a_metric
        out[bits] = layer.held.scale * layer.rounding_gain(bits) * (from_A + from_B)
    return out


DENSE, LOW_RANK, ROUNDED, CORRECTED = (register(k()) for k in (Dense, LowRank, Rounded, Corrected))
