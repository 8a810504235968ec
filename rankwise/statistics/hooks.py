"""Calibration statistics fed by hooks: covariances of inputs, outputs and gradients.

Statistics are unnormalised sums over the calibration tokens (float32 on a GPU, float64 on
the CPU, where the activations are: Sums), so every layer is measured in the same units: that is what lets one
global budget compare layers. Output gradients come from labels *sampled from the model's
own predictive distribution*, so they estimate the true Fisher (the Hessian of the KL at
the dense model), not the empirical one.

Only the smaller side of each layer (min(m, n) wide) is ever accumulated, which is all the
projection needs (see geometry.decompose):
  m <= n (q, k, v, o, down):  G = sum g g^T, and W C W^T = sum (Wx)(Wx)^T from the outputs
                              unless the input covariance C is at hand anyway;
  m >  n (gate, up):          C = sum x x^T, and W^T G W = sum (W^T g)(W^T g)^T, read from
                              the input gradient autograd computes anyway.
Layers reading the very same input tensor (q/k/v, gate/up) share one C, accumulated once.
Nothing here knows about SVD. `collect` measures any model in one pass per batch; causal
LMs are measured block by block by rankwise.pipeline.walk with the same Accumulator.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RankwiseError
from ..models.blocks import shared_inputs
from ..models.layers import linear_shape

GRADIENT_MODES = (None, "diag", "full")
INPUT_SIDE = ("input_cov", "output_cov")                        # from the forward pass
GRADIENT_SIDE = ("grad_cov", "input_grad_cov", "grad_diag")     # from the backward pass
KINDS = INPUT_SIDE + GRADIENT_SIDE


@dataclass
class LayerStats:
    tokens: int
    input_cov: torch.Tensor | None = None       # n x n, C (one object shared by a group)
    output_cov: torch.Tensor | None = None      # m x m, W C W^T
    grad_cov: torch.Tensor | None = None        # m x m, G
    input_grad_cov: torch.Tensor | None = None  # n x n, W^T G W
    grad_diag: torch.Tensor | None = None       # m, diag(G)
    weighted_cov: torch.Tensor | None = None    # n x n, H = sum |g|^2 x x^T (rounding)
    token_weights: list[torch.Tensor] | None = None   # |g_t|^2 per token, one per batch
    held_out: "LayerStats | None" = None        # the same sums over the held-out windows alone

    def matrices(self, kinds: tuple[str, ...] = KINDS) -> dict[str, torch.Tensor | None]:
        return {k: getattr(self, k) for k in kinds}


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits for a batch of token windows (no KV cache)."""
    return model(input_ids=ids.to(model.device), use_cache=False).logits


def _exact_tf32(x: torch.Tensor):
    """TF32 matmuls for 16-bit activations on a GPU: their values are exact in TF32 (at
    most 10 mantissa bits), products accumulate in float32, at tensor-core speed."""
    return tf32_matmuls(x.is_cuda and x.dtype in (torch.bfloat16, torch.float16))


@contextlib.contextmanager
def tf32_matmuls(enabled: bool, backend=None):
    """CUDA float32 matmuls in TF32 while inside, through the precision API torch has
    (`fp32_precision`, which torch refuses to mix with the legacy `allow_tf32` flag, or
    that flag on older releases); the setting restored after. `backend`: the object
    holding the setting (torch.backends.cuda.matmul; a test passes its own)."""
    if not enabled:
        yield
        return
    backend = torch.backends.cuda.matmul if backend is None else backend
    name, value = ("fp32_precision", "tf32") if hasattr(backend, "fp32_precision") else \
        ("allow_tf32", True)
    before = getattr(backend, name)
    setattr(backend, name, value)
    try:
        yield
    finally:
        setattr(backend, name, before)




class Sums:
    """Named sums of x^T y over tokens, where the activations are, so that they do not
    depend on the order the batches are added in (one process or several) beyond
    round-off. `totals` is what a walk all-reduces across processes.

    The totals' dtype is chosen once, from the first tensor's device unless given:
    float64 on the CPU; float32 on an accelerator (TF32 products for 16-bit activations),
    where float64 runs at a fraction of the speed, each product added into the total by
    one addmm_. A test passes float32 to take the accelerator's route on the CPU."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype
        self.totals: dict = {}
        self._scratch: dict[tuple, torch.Tensor] = {}

    def _dtype_for(self, x: torch.Tensor) -> torch.dtype:
        if self.dtype is None:
            self.dtype = torch.float64 if x.device.type == "cpu" else torch.float32
        return self.dtype

    def gram(self, key, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add x^T y (x^T x without y) over every token of x, y (..., features)."""
        x = x.detach().reshape(-1, x.shape[-1])
        y = x if y is None else y.detach().reshape(-1, y.shape[-1])
        total = self.totals.get(key)
        with _exact_tf32(x):
            x, y = x.float(), y.float()
            if self._dtype_for(x) == torch.float32 and total is not None:
                total.addmm_(x.T, y)
                return
            # buffers reused across calls: a fresh large tensor each time costs more in
            # page faults than the product itself on a CPU
            product = self._buffer("product", (x.shape[-1], y.shape[-1]), x.dtype, x.device)
            self.add(key, torch.mm(x.T, y, out=product))

    def _buffer(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device
                ) -> torch.Tensor:
        buffer = self._scratch.get((role, shape))
        if buffer is None or buffer.device != device:
            buffer = self._scratch[role, shape] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def add(self, key, value: torch.Tensor) -> None:
        total = self.totals.get(key)
        if total is None:
            self.totals[key] = value.to(self._dtype_for(value), copy=True)
        elif value.dtype == total.dtype or value.dim() == 1:
            total += value
        else:       # widened in a reused buffer (an in-place mixed-dtype add allocates)
            total += self._buffer("widened", tuple(value.shape), total.dtype,
                                  value.device).copy_(value)

    def pop(self) -> dict:
        """The totals; the sums let go of them and of their buffers."""
        totals, self.totals, self._scratch = self.totals, {}, {}
        return totals


class Accumulator:
    """Sums of one set of layers' statistics, fed by hooks, where the activations are.
    `leader` maps each layer to the first layer reading its input (shared_inputs).

    Besides the metric's sides, the rounding of a layer (rankwise.forms.rounding) reads two
    things the backward pass gives: `weighted`, the sum H = sum_t |g_t|^2 x_t x_t^T of the
    layer's inputs weighted by the squared gradient at its output, and `token_weights`,
    those |g_t|^2 themselves, per batch (a number a token), for weighing the inputs of a
    later forward-only walk the same way.

    While `held` is set (a mask over the windows of the batch being run), what the hooks
    see of the held-out windows goes into sums of its own, and the result gives the totals
    over every window with the held-out sums beside them (LayerStats.held_out), so what is
    fitted on the rest can be priced on windows it never saw (rankwise.forms.pricing)."""

    def __init__(self, layers: dict[str, nn.Module], leader: dict[str, str], inputs: bool,
                 gradients: str | None, both_sides: bool = False, weighted: bool = False,
                 token_weights: bool = False):
        if gradients not in GRADIENT_MODES:
            raise RankwiseError(f"gradients must be one of {GRADIENT_MODES}, got {gradients!r}")
        self.layers, self.leader, self.inputs, self.gradients = layers, leader, inputs, gradients
        self.both_sides, self.weighted = both_sides, weighted
        self.weights: dict[str, list[torch.Tensor]] | None = {} if token_weights else None
        self.sums = Sums()
        self.input_cov = {n: self._uses_input_cov(n) for n in layers}
        self.held: torch.Tensor | None = None

    def _parts(self, x: torch.Tensor, held: torch.Tensor | None):
        """(whether held out, x's rows of that side) for each side with rows: windows along
        x's first dimension, or their tokens where a block has flattened them (OPT's
        feed-forward reads (windows x tokens, features))."""
        if held is None:
            yield False, x
            return
        if x.shape[0] != held.numel():
            held = held.repeat_interleave(x.shape[0] // held.numel())
        held = held.to(x.device)
        for side, rows in ((False, ~held), (True, held)):
            if bool(rows.any()):
                yield side, x[rows]

    @staticmethod
    def _key(kind: str, name: str, held: bool) -> tuple:
        return (kind, name, "held") if held else (kind, name)

    def _wide(self, name: str) -> bool:
        m, n = linear_shape(self.layers[name])
        return m > n and not self.both_sides

    def _uses_input_cov(self, name: str) -> bool:
        """Accumulate the shared input covariance for this layer's group, or output
        covariances per layer, whichever is smaller (a wide layer always needs C)."""
        group = [k for k, v in self.leader.items() if v == self.leader[name]]
        n = linear_shape(self.layers[name])[1]
        return self.both_sides or any(self._wide(k) for k in group) or \
            n * n <= sum(linear_shape(self.layers[k])[0] ** 2 for k in group)

    def gram(self, kind: str, name: str, x: torch.Tensor, held: torch.Tensor | None = None
             ) -> None:
        """Add x^T x over every token of x (windows, ..., features) to the (kind, name) sum,
        the windows `held` marks to the held-out one."""
        for side, part in self._parts(x, held):
            self.sums.gram(self._key(kind, name, side), part)

    def _pre_hook(self, name: str):
        leader, input_cov, wide = self.leader[name], self.input_cov[name], self._wide(name)

        def hook(module, args):
            x = args[0]
            if self.inputs and input_cov and leader == name:
                self.gram("input_cov", name, x, self.held)
            if self.gradients == "full" and wide and x.requires_grad:
                # a private view, so its gradient is this layer's W^T g alone
                x = x.view_as(x)
                held = self.held
                x.register_hook(lambda g: self.gram("input_grad_cov", name, g, held))
                return (x, *args[1:])
        return hook

    def _forward_hook(self, name: str):
        wide, input_cov = self._wide(name), self.input_cov[name]
        per_token = self.weighted or self.weights is not None

        def hook(module, args, out):
            if self.inputs and not input_cov:
                self.gram("output_cov", name, out if module.bias is None else out - module.bias,
                          self.held)
            if (self.gradients or per_token) and out.requires_grad:
                x, held = args[0].detach() if self.weighted else None, self.held
                out.register_hook(lambda g: self._output_grad(name, wide, g, x, held))
        return hook

    def _output_grad(self, name: str, wide: bool, g: torch.Tensor, x: torch.Tensor | None,
                     held: torch.Tensor | None) -> None:
        g = g.detach()
        if self.gradients:
            for side, part in self._parts(g, held):
                self.sums.add(self._key("grad_diag", name, side),
                              part.float().square().reshape(-1, g.shape[-1]).sum(0))
        if self.gradients == "full" and not wide:
            self.gram("grad_cov", name, g, held)
        if self.weighted or self.weights is not None:
            w = g.float().square().sum(-1)
            if self.weights is not None:
                self.weights.setdefault(name, []).append(w.reshape(-1))
            if self.weighted:
                self.gram("weighted_cov", name, x.float() * w.sqrt()[..., None], held)

    @contextlib.contextmanager
    def attached(self):
        handles = []
        for name, layer in self.layers.items():
            handles.append(layer.register_forward_pre_hook(self._pre_hook(name)))
            handles.append(layer.register_forward_hook(self._forward_hook(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def pair_up(self) -> None:
        """Give every sum its held-out twin and every held-out sum its twin over the rest
        (zeros where this process saw no such batch), so that processes whose batches fell
        on one side only still hold the same sums to add up."""
        totals = self.sums.totals
        for key in list(totals):
            twin = key[:2] if key[2:] == ("held",) else (*key, "held")
            if twin not in totals:
                totals[twin] = torch.zeros_like(totals[key])

    def result(self, tokens: int, held_tokens: int = 0) -> dict[str, LayerStats]:
        """Per-layer statistics over every batch (`tokens`), with those of the held-out
        batches (`held_tokens`) beside them when any were; the accumulator lets go of
        them. A statistic shared by a group of layers stays one object."""
        out, sums = {}, self.sums.pop()
        held = {key[:2]: value for key, value in sums.items() if key[2:] == ("held",)}
        every = {key: value for key, value in sums.items() if key[2:] != ("held",)}
        for key, value in held.items():
            every[key] = every[key] + value if key in every else value
        for name in self.layers:
            s = self._stats(every, name, tokens)
            if held:
                s.held_out = self._stats(held, name, held_tokens)
            if self.weights is not None:
                s.token_weights = self.weights.pop(name, [])
            out[name] = s
        return out

    def _stats(self, sums: dict, name: str, tokens: int) -> LayerStats:
        s = LayerStats(tokens=tokens)
        s.input_cov = sums.get(("input_cov", self.leader[name]))
        for kind in ("output_cov", *GRADIENT_SIDE, "weighted_cov"):
            setattr(s, kind, sums.get((kind, name)))
        return s


def sample_logit_gradient(logits: torch.Tensor, generator: torch.Generator,
                          chunk: int = 256, block: int = 256) -> torch.Tensor:
    """d/dlogits of the summed cross-entropy against labels drawn from softmax(logits).

    softmax - onehot(sample), the sample by the inverse CDF in two levels: the vocabulary
    in blocks of `block` tokens, a block drawn from the blocks' total probabilities, then
    a token within it. A full cumulative sum over a 49k vocabulary (one sequential pass
    per row) costs more than the softmax itself; this costs a sum. Rows go `chunk` at a
    time, so no copy of the logits' size exists besides the result; the uniform draws are
    made up front, so the labels do not depend on the chunk size.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    rows, vocab = flat.shape
    u = torch.rand(rows, 1, generator=generator, dtype=torch.float32).to(flat.device)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    blocks = -(-vocab // block)
    pad = blocks * block - vocab
    for start in range(0, rows, chunk):
        p = out[start:start + chunk]
        torch.softmax(flat[start:start + chunk].float(), dim=-1, out=p)
        mass = torch.nn.functional.pad(p, (0, pad)).view(-1, blocks, block) if pad else \
            p.view(-1, blocks, block)
        cum = mass.sum(-1).cumsum(-1)
        target = u[start:start + chunk] * cum[:, -1:]
        b = torch.searchsorted(cum, target).clamp_max(blocks - 1)
        before = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0)), 0.0)
        inner = mass.gather(1, b[..., None].expand(-1, 1, block)).squeeze(1).cumsum(-1)
        t = torch.searchsorted(inner, target - before).clamp_max(block - 1)
        labels = (b * block + t).clamp_max(vocab - 1)
        p.scatter_add_(1, labels, torch.full_like(labels, -1, dtype=p.dtype))
    return out.view_as(logits).to(logits.dtype)


@contextlib.contextmanager
def activation_gradients_only(model: nn.Module):
    """Backward computes gradients w.r.t. activations but never w.r.t. weights (half the
    cost). The flags are kept by parameter name, so a layer replaced meanwhile is not kept
    alive by them."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])


@contextlib.contextmanager
def gradients_reach_the_layers(model: nn.Module):
    """With every weight frozen, the first activations must ask for a gradient for
    backward to reach the hooked layers."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    handle = emb.register_forward_hook(lambda m, i, out: out.requires_grad_(True)) \
        if emb is not None else model.register_forward_pre_hook(
            lambda m, args: (args[0].detach().requires_grad_(True), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def collect(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[torch.Tensor],
            inputs: bool = True, gradients: str | None = None, seed: int = 0,
            progress: bool = True, both_sides: bool = False,
            forward=lm_logits) -> dict[str, LayerStats]:
    """Run the calibration batches through `model`, one forward (and backward) pass per
    batch, and return per-layer statistics.

    inputs: accumulate input-side covariances (C or W C W^T). gradients: None, "diag"
    (diagonal Fisher) or "full" (K-FAC gradient covariances; one backward pass per batch).
    both_sides: accumulate C (and G, with full gradients) for every layer, whichever side
    is smaller, as a weight that changes during training needs. forward(model, batch)
    returns the logits (default: a causal LM on token windows); the loss is summed over
    every position's sampled label. Memory holds one batch's activations through the
    whole model and every layer's sums: fine-tuning and the lab's small networks use it;
    compression walks a causal LM block by block instead (rankwise.pipeline.walk).
    """
    batches = list(batches)
    if not batches:
        raise RankwiseError("no calibration batches to measure")
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        probe = batches[0][:1] if torch.is_tensor(batches[0]) else batches[0]
        leader = shared_inputs(model, layers, lambda: forward(model, probe))
        acc = Accumulator(layers, leader, inputs, gradients, both_sides)
        grad_ctx = contextlib.ExitStack()
        if gradients:
            grad_ctx.enter_context(activation_gradients_only(model))
            grad_ctx.enter_context(gradients_reach_the_layers(model))
        else:
            grad_ctx.enter_context(torch.no_grad())
        with grad_ctx, acc.attached():
            for ids in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                logits = forward(model, ids)
                tokens += logits[..., 0].numel()
                if gradients:
                    logits.backward(sample_logit_gradient(logits, generator))
                del logits
    finally:
        model.train(was_training)
    return acc.result(tokens)
