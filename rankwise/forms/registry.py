"""What a compression makes of one targeted layer, as one registry: a `Form` (a kind, its
rank, its bits) and the `Kind` that knows everything particular to it. The kinds
themselves (dense, low rank, rounded, rounded plus a correction) are in
rankwise.forms.kinds; a new one is a subclass registered there (`register`), and nothing
outside this package, the standalone modeling file and the serving plugin names one.

A kind knows:
  what it stores      its parameters, its stored bits (`Storage`: the floats' width, the
                      group size, the bias), its grid, how it reads in a summary;
  its module          the nn.Module it becomes (None: the nn.Linear itself, its weight on a
                      grid or not), how to recognise one, an empty one to load into, and
                      the part of it an adapter export writes;
  how it is priced    what it measures of a layer (rankwise.forms.pricing hands it the
                      layer's weight and statistics), its options and their prices;
  how the cut makes it  the decomposition problem it poses on the compressed stream and
                      what it puts in place of the layer (rankwise.cut.streamed).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import RankwiseError
from .grids import FLOAT_BITS, Grid


@dataclass(frozen=True)
class Storage:
    """How a layer is stored: floats (factors, corrections, scales, biases) in
    `float_bits`, weights below 8 bits in groups of `group_size` inputs."""
    group_size: int
    float_bits: int = FLOAT_BITS


@dataclass(frozen=True)
class Form:
    """One layer's form: `kind` (a registered Kind's name), its rank (factors' or a
    correction's; None for kinds without one) and `bits` (of its factors or of its rounded
    weight; 16 for floats)."""
    kind: str
    rank: int | None = None
    bits: int = FLOAT_BITS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RankwiseError(f"unknown form {self.kind!r}; one of {', '.join(KINDS)}")
        if (self.rank is not None) != self.of.ranked:
            raise RankwiseError(f"a {self.kind} form {'needs' if self.rank is None else 'has no'} rank")

    @property
    def of(self) -> "Kind":
        """This form's kind."""
        return KINDS[self.kind]

    @property
    def factored(self) -> bool:
        """Whether the whole layer becomes factors, whose rank the allocation and the
        search choose."""
        return self.of.factored

    @property
    def rounds_weight(self) -> bool:
        """Whether the dense weight itself goes onto a grid."""
        return self.of.rounds_weight

    @property
    def rounds_factors(self) -> bool:
        return self.of.factored and self.bits < FLOAT_BITS

    def grid(self, group_size: int) -> Grid | None:
        """The grid of its rounded weight or factors; None for floats."""
        return self.of.grid(self, group_size)

    def stored_bits(self, shape: tuple[int, int], storage: Storage, bias: bool = False) -> int:
        """Bits the layer takes as stored: weights, factors, scales and (`bias`) its bias."""
        m = shape[0]
        return self.of.stored_bits(self, shape, storage) + (m * storage.float_bits if bias else 0)

    def params(self, shape: tuple[int, int]) -> int:
        """Parameters the form keeps (a rounded weight keeps all of them)."""
        return self.of.params(self, shape)

    def __str__(self) -> str:
        return self.of.label(self)

    def record(self) -> dict:
        return {"form": self.kind, **({"rank": self.rank} if self.rank is not None else {}),
                "bits": self.bits}


class Kind:
    """The behaviour of one form (module docstring). Subclasses set the class attributes
    and override what applies to them."""
    name: str
    help: str = ""              # what --forms says of it; "" for a kind not offered there
    ranked = False              # carries a rank
    factored = False            # the layer becomes factors (allocation and search cut them)
    rounds_weight = False       # the dense weight goes onto a grid when its inputs arrive
    decomposed = False          # the cut solves a decomposition (`problem`) to make it
    for_factors = False         # offered to a layer that is factors already
    module: type[nn.Module] | None = None

    # ------------------------------------------------------------ what it stores
    def grid(self, form: Form, group_size: int) -> Grid | None:
        return None if form.bits >= FLOAT_BITS else Grid.for_bits(form.bits, group_size)

    def stored_bits(self, form: Form, shape: tuple[int, int], storage: Storage) -> int:
        raise NotImplementedError

    def params(self, form: Form, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1]

    def gridded(self, form: Form, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """The shapes (rows, columns) of the matrices it stores on its grid."""
        return []

    def label(self, form: Form) -> str:
        return self.name

    # ------------------------------------------------------------ its module
    def recognise(self, module: nn.Module) -> Form | None:
        """The form of `module` when it is of this kind."""
        return None

    def skeleton(self, linear: nn.Module, rank: int | None) -> nn.Module:
        """An empty module of this kind in place of `linear` (its shape, bias, dtype),
        filled from a state dict afterwards."""
        return linear

    def adapter(self, module: nn.Module):
        """(base, A, B) when the module is a base plus a low-rank adapter B A (what an
        adapter export writes); None otherwise."""
        return None

    def needs_fit(self, form: Form, layer: nn.Module) -> bool:
        """Whether the cut must make this form from `layer` as it is."""
        return False

    # ------------------------------------------------------------ how it is priced
    def widths(self, weight_bits: tuple[int, ...]) -> tuple[int, ...]:
        """The widths this kind is priced at when --forms offers it."""
        return ()

    def measure(self, layer, widths: tuple[int, ...]) -> list:
        """What this kind's prices need of a layer (pricing's Layer), as float64 tensors
        on the CPU in `layout`'s shapes."""
        return []

    def layout(self, shape: tuple[int, int], widths: tuple[int, ...]) -> list[tuple[int, ...]]:
        return []

    def options(self, measured: list, shape: tuple[int, int], widths: tuple[int, ...],
                group_size: int, rank_step: int, min_rank: int, cap: int
                ) -> list[tuple[Form, float]]:
        """Every form of this kind a layer may take, with its price."""
        return []

    def price(self, measured: list, widths: tuple[int, ...], form: Form) -> float:
        return 0.0

    # ------------------------------------------------------------ how the cut makes it
    def problem(self, fit, name: str, form: Form):
        """The decomposition a `decomposed` form needs on the compressed stream: (W,
        decompose's keyword arguments) of which the form keeps `form.rank` directions."""
        raise NotImplementedError

    def make(self, fit, name: str, form: Form, solved) -> None:
        """Put the form in place of layer `name` (`solved`: the decomposition of
        `problem`, or None)."""


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add a kind to the registry (its name must be new)."""
    if kind.name in KINDS:
        raise ValueError(f"a form named {kind.name!r} is registered already")
    KINDS[kind.name] = kind
    return kind


def offered() -> dict[str, str]:
    """The kinds --forms may offer, with their help."""
    return {name: k.help for name, k in KINDS.items() if k.help}


def form_of(module: nn.Module) -> Form:
    """The form a layer is in (what a cut that did not touch it leaves)."""
    for kind in reversed(KINDS.values()):        # the most particular kinds first
        form = kind.recognise(module)
        if form is not None:
            return form
    raise RankwiseError(f"{type(module).__name__} is no form rankwise knows")


def structure(model: nn.Module) -> dict[str, dict]:
    """{module name: {"form", "rank"}} of every layer whose kind has a module of its own:
    what a loader must build before the weights are read."""
    out = {}
    for name, module in model.named_modules():
        for kind in KINDS.values():
            if kind.module is not None and type(module) is kind.module:
                out[name] = {"form": kind.name, "rank": int(module.rank)}
    return out


def skeleton(linear: nn.Module, record: dict) -> nn.Module:
    """The empty module a `structure` record names, in place of `linear`."""
    kind = KINDS.get(record.get("form"))
    if kind is None or kind.module is None:
        raise RankwiseError(f"unknown layer structure {record!r}")
    return kind.skeleton(linear, int(record["rank"]))
