"""What each form (rankwise.forms.registry) would cost a layer, priced in one metric: the
K-FAC second-order KL, tr(G E C E^T) for an error E of the weight (G, C the unnormalised
gradient and input covariances), the units the spectrum allocation already spends.

Prices are read on calibration windows the forms were not fitted on. A truncation priced
by its own spectrum is priced on the tokens that chose which directions to drop (those
they hardly use), and so is a rounding compensated in their covariance: on one block of
the embedded model with 8 calibration windows, each layer cut alone to a third of its
rank cost 16 to 68 times its in-sample price in KL on other text, rounded to nearest at 4
or 3 bits 2 to 4 times, which sends the budget to whichever form overfits most
(docs/design.md). So the walk holds every other calibration window out
(rankwise.pipeline.walk's Wants.held_out): each form is fitted (decomposed, rounded) in
the statistics of the rest and priced in those of the held-out windows (`HeldOut`, scaled
to every window's token count); the cut then fits the chosen forms on every window. With
a single window nothing is held out and prices are read in-sample.

`price` measures a layer once for every kind a recipe offers (each kind says what it
needs: rankwise.forms.kinds), sharing what several need (the layer's K-FAC
decomposition, its weight rounded at each width the way the cut will round it: GPTQ in the
token-weighted input covariance H, or round-to-nearest), into a `Menu`; the allocation
reads every menu's options, their stored bits and prices (rankwise.forms.allocate).

A layer the model already holds as factors (a rankwise output quantized further) can only
stay factored: its menu offers the kinds that take factors, up to its rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .. import geometry
from ..models.layers import max_useful_rank
from .grids import Grid
from .kinds import DENSE
from .registry import KINDS, Form, Storage
from .rounding import InverseFactor, round_to_nearest, round_weight


@dataclass(frozen=True)
class Pricing:
    """What is priced and how the cut will round: the widths offered to each kind (a kind
    not offered has none), the group size, the floats' width and the rounding
    (rankwise.forms.rounding's) the output is stored and made with, the dtype of the
    scales, the damping of the metric's roots, and the serving engine whose kernels must
    run every rounded matrix as stored (rankwise.serving.engines; None: any)."""
    widths: tuple[tuple[str, tuple[int, ...]], ...]     # (kind, widths) in registry order
    group_size: int
    rounding: str
    scale_dtype: torch.dtype
    damping: float
    engine: object = None

    @classmethod
    def of(cls, forms: list[str], weight_bits: list[int], group_size: int, rounding: str,
           scale_dtype: torch.dtype, damping: float, engine=None) -> "Pricing":
        """The pricing of a recipe's --forms, --weight-bits and --serve."""
        widths = tuple((name, kind.widths(tuple(weight_bits))) for name, kind in KINDS.items()
                       if name in forms)
        return cls(widths, group_size, rounding, scale_dtype, damping, engine)

    def runs(self, form: Form, shape: tuple[int, int]) -> bool:
        """Whether the engine runs every matrix the form stores on its grid, as stored."""
        return self.engine is None or all(
            self.engine.offers(form.grid(self.group_size), matrix)
            for matrix in form.of.gridded(form, shape))

    @property
    def storage(self) -> Storage:
        return Storage(self.group_size, torch.finfo(self.scale_dtype).bits)

    def offered(self, factored_rank: int | None) -> dict[str, tuple[int, ...]]:
        """{kind: widths} a layer is priced at: those that take factors when it is factors."""
        return {name: widths for name, widths in self.widths
                if factored_rank is None or KINDS[name].for_factors}

    def covers(self, other: "Pricing") -> bool:
        """Whether everything `other` offers was priced here, the same way."""
        mine = dict(self.widths)
        return all(set(w) <= set(mine.get(name, ())) for name, w in other.widths) and \
            (self.group_size, self.rounding, self.scale_dtype) == \
            (other.group_size, other.rounding, other.scale_dtype)


@dataclass
class HeldOut:
    """The statistics of the held-out windows a layer's forms are priced in, and what their
    prices are multiplied by to read in every window's units ((all tokens / held-out
    tokens)^2: both sides are sums over tokens)."""
    G: torch.Tensor
    C: torch.Tensor
    scale: float


class Layer:
    """One layer's weight and the statistics its forms are fitted in (G, C, H), with those
    they are priced in (`held`; None: the same), as the kinds measure them, with what
    several kinds share computed once."""

    def __init__(self, W: torch.Tensor, G: torch.Tensor, C: torch.Tensor,
                 H: torch.Tensor | None, pricing: Pricing, factored_rank: int | None,
                 held: HeldOut | None = None):
        self.W, self.G, self.C, self.H = W.to(torch.float64), G, C, H
        self.held = held or HeldOut(G, C, 1.0)
        self.pricing, self.damping = pricing, pricing.damping
        self.shape = tuple(W.shape)
        self.cap = factored_rank if factored_rank is not None else max_useful_rank(*self.shape)
        offered = pricing.offered(factored_rank)
        # the widths a weight is rounded at: GPTQ's gain is known only there
        self.weight_widths = {b for name, widths in offered.items()
                              if KINDS[name].rounds_weight for b in widths}
        self._rounded: dict[int, torch.Tensor] = {}

    @cached_property
    def decomposition(self) -> geometry.Decomposition:
        return geometry.decompose(self.W, left=self.G, right=self.C, damping=self.damping)

    @cached_property
    def _inverse(self) -> InverseFactor | None:
        return InverseFactor.of(self.H) if self.weight_widths and \
            self.pricing.rounding == "gptq" else None

    def nearest(self, bits: int) -> torch.Tensor:
        grid = Grid.for_bits(bits, self.pricing.group_size)
        return round_to_nearest(self.W, grid, self.pricing.scale_dtype).weight.to(self.W)

    def rounded(self, bits: int) -> torch.Tensor:
        """The weight rounded at `bits` the way the cut will round it."""
        if bits not in self._rounded:
            grid = Grid.for_bits(bits, self.pricing.group_size)
            self._rounded[bits] = self.nearest(bits) if self._inverse is None else \
                round_weight(self.W, self.H, grid, self.pricing.scale_dtype,
                             self.pricing.rounding, self._inverse).weight.to(self.W)
        return self._rounded[bits]

    def error_price(self, approx: torch.Tensor) -> float:
        """tr(G E C E^T) of the error E = W - approx in the held-out statistics, undamped
        and unscaled (what ratios of errors read)."""
        return geometry.metric_error(self.W, approx, self.held.G, self.held.C)

    def error_prices(self, approximations: list[torch.Tensor]) -> list[float]:
        """The price of each error W - approx in the held-out metric as the decompositions
        take theirs (their damping too), so a full-rank error and a truncation are priced
        alike."""
        held = self.held
        return [held.scale * p for p in geometry.metric_totals(
            [(self.W - a, dict(left=held.G, right=held.C)) for a in approximations],
            self.damping)]

    def truncation_costs(self, decomposition: geometry.Decomposition) -> torch.Tensor:
        """What each further direction kept saves, in the held-out metric: cost[i] = the
        price of truncating at rank i less that at i + 1, so the tail sum from r is the
        price of rank r (a decomposition's spectrum, read in-sample; out of sample a
        direction may even cost: a negative entry)."""
        held = self.held
        prices = geometry.truncation_prices(decomposition, held.G, held.C, self.damping)
        return (held.scale * (prices[:-1] - prices[1:])).cpu()

    def rounding_gain(self, bits: int) -> float:
        """What the cut's rounding leaves of round-to-nearest's error at `bits` (1 where
        the weight is not rounded at that width)."""
        if bits not in self.weight_widths:
            return 1.0
        nearest = self.error_price(self.nearest(bits))
        return self.error_price(self.rounded(bits)) / nearest if nearest > 0 else 1.0


@dataclass
class Menu:
    """A layer's measurements per priced kind, at the widths it was priced at (tensors on
    the CPU, float64)."""
    shape: tuple[int, int]
    widths: dict[str, tuple[int, ...]]
    measured: dict[str, list[torch.Tensor]]
    factored_rank: int | None = None              # the layer is factors of this rank
    bias: bool = False

    def tensors(self) -> list[torch.Tensor]:
        """Every number, in `layout`'s order: what a broadcast moves."""
        return [t for part in self.measured.values() for t in part]

    @staticmethod
    def layout(shape: tuple[int, int], pricing: Pricing, factored_rank: int | None
               ) -> list[tuple[int, ...]]:
        return [s for name, widths in pricing.offered(factored_rank).items()
                for s in KINDS[name].layout(shape, widths)]

    @classmethod
    def from_tensors(cls, shape, pricing: Pricing, factored_rank, tensors, bias=False) -> "Menu":
        tensors, measured = [t.to("cpu", torch.float64) for t in tensors], {}
        widths = pricing.offered(factored_rank)
        for name, w in widths.items():
            count = len(KINDS[name].layout(shape, w))
            measured[name], tensors = tensors[:count], tensors[count:]
        return cls(tuple(shape), widths, measured, factored_rank, bias)

    def options(self, pricing: Pricing, rank_step: int, min_rank: int
                ) -> tuple[list[Form], torch.Tensor, torch.Tensor]:
        """Every form `pricing` offers this layer (dense always, unless it is factors), its
        stored bits and its price (a menu priced at more widths offers only those asked)."""
        cap = self.factored_rank if self.factored_rank is not None else max_useful_rank(*self.shape)
        chosen = [] if self.factored_rank is not None else \
            DENSE.options([], self.shape, (), pricing.group_size, rank_step, min_rank, cap)
        for name, asked in pricing.offered(self.factored_rank).items():
            chosen += [(form, price) for form, price in KINDS[name].options(
                self.measured[name], self.shape, self.widths[name], pricing.group_size,
                rank_step, min_rank, cap) if form.bits in asked and pricing.runs(form, self.shape)]
        forms = [form for form, _ in chosen]
        storage = pricing.storage
        costs = torch.tensor([float(f.stored_bits(self.shape, storage, self.bias)) for f in forms],
                             dtype=torch.float64)
        return forms, costs, torch.tensor([p for _, p in chosen], dtype=torch.float64)

    def price(self, form: Form) -> float:
        """The predicted loss of one form (dense: 0)."""
        if form.kind not in self.measured:
            return 0.0
        return form.of.price(self.measured[form.kind], self.widths[form.kind], form)


def unmeasured(shape: tuple[int, int], pricing: Pricing, factored_rank: int | None = None,
               bias: bool = False) -> Menu:
    """A layer's menu before anything is measured (every price zero): its options and their
    stored bits, known from its shape alone."""
    widths = pricing.offered(factored_rank)
    return Menu(tuple(shape), widths,
                {name: [torch.zeros(s, dtype=torch.float64) for s in KINDS[name].layout(shape, w)]
                 for name, w in widths.items()}, factored_rank, bias)


def price(W: torch.Tensor, G: torch.Tensor, C: torch.Tensor, H: torch.Tensor | None,
          held: HeldOut | None, pricing: Pricing, factored_rank: int | None = None,
          bias: bool = False) -> Menu:
    """A layer's menu from its weight (B A for factors), G (m x m), C (n x n) and H (n x n;
    unused for factors) of the windows its forms are fitted on, and the held-out windows'
    statistics they are priced in (None: priced in G, C), all on one device."""
    layer = Layer(W, G, C, H, pricing, factored_rank, held)
    widths = pricing.offered(factored_rank)
    measured = {name: KINDS[name].measure(layer, w) for name, w in widths.items()}
    return Menu(layer.shape, widths, measured, factored_rank, bias)
