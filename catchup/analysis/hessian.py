"""Top Hessian eigenvalues and eigenvectors of the training loss, PyHessian style (Yao et al. 2020).

Hessian-vector products come from double backward (Pearlmutter's trick: H v = d(g . v)/d theta with
g = dL/d theta built with ``create_graph=True``), and the top-k eigenpairs from power iteration with
deflation: each new vector is kept orthogonal to the ones already found. Written here because the
``pyhessian`` package relies on removed torch APIs; this follows its algorithm.

The model is analysed in eval mode (BatchNorm uses its running statistics, dropout is off), so the loss is
a deterministic function of the weights; the mode is restored afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from catchup.errors import CatchupError

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]      # (model output, targets) -> scalar batch-mean loss
Vector = list[Tensor]                            # one tensor per trainable parameter


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CatchupError("the model has no trainable parameters to analyse")
    return params


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode for the block, each module's own flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def as_batches(batches: Batch | Sequence[Batch]) -> list[Batch]:
    """A single (inputs, targets) pair or a list of them -> a non-empty list of pairs."""
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor):
        return [batches]
    out = list(batches)
    if not out:
        raise CatchupError("no batch given: the Hessian and the loss need at least one (inputs, targets) batch")
    return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Batch | Sequence[Batch]) -> float:
    """The sample-weighted mean loss over the batches (no gradient), in the model's current mode."""
    device, total, count = _device(model), 0.0, 0
    with torch.no_grad():
        for x, y in as_batches(batches):
            n = x.shape[0]
            total += float(loss_fn(model(x.to(device)), y.to(device))) * n
            count += n
    return total / count


def dot(a: Vector, b: Vector) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def normalize(v: Vector) -> Vector:
    norm = dot(v, v) ** 0.5
    if norm == 0.0:
        raise CatchupError("power iteration met a zero vector: the Hessian is zero on the found subspace")
    return [x / norm for x in v]


def orthogonalize(v: Vector, basis: Sequence[Vector]) -> Vector:
    """v minus its projections on the (orthonormal) basis vectors: Gram-Schmidt deflation."""
    for u in basis:
        c = dot(v, u)
        v = [x - c * y for x, y in zip(v, u)]
    return v


class HessianOperator:
    """v -> H v for the loss averaged over fixed batches (each batch weighted by its size).

    With one batch the gradient graph is built once and reused for every product; with several it is
    rebuilt per batch and product, which keeps memory at one batch's graph.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Batch | Sequence[Batch]):
        self.model, self.loss_fn = model, loss_fn
        self.params = trainable_params(model)
        device = _device(model)
        self.batches = [(x.to(device), y.to(device)) for x, y in as_batches(batches)]
        self.total = sum(x.shape[0] for x, _ in self.batches)
        self._cached: Vector | None = None

    def _grads(self, batch: Batch) -> Vector:
        x, y = batch
        loss = self.loss_fn(self.model(x), y)
        return list(torch.autograd.grad(loss, self.params, create_graph=True))

    def __call__(self, v: Vector) -> Vector:
        if len(self.batches) == 1:
            if self._cached is None:
                self._cached = self._grads(self.batches[0])
            return self._product(self._cached, v, retain=True)
        out = [torch.zeros_like(p) for p in self.params]
        for batch in self.batches:
            weight = batch[0].shape[0] / self.total
            hv = self._product(self._grads(batch), v, retain=False)
            out = [o + weight * h for o, h in zip(out, hv)]
        return out

    def _product(self, grads: Vector, v: Vector, retain: bool) -> Vector:
        hv = torch.autograd.grad(grads, self.params, grad_outputs=v, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, self.params)]


def random_vector(params: Sequence[Tensor], seed: int) -> Vector:
    """A Gaussian vector shaped like the parameters, drawn on the CPU so every device gets the same one."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype) for p in params]


def top_eigen(model: nn.Module, loss_fn: LossFn, batch: Batch | Sequence[Batch], k: int = 2, iters: int = 100,
              tol: float = 1e-3, seed: int = 0) -> tuple[list[float], list[Vector]]:
    """The k Hessian eigenvalues of largest magnitude (descending order of discovery) and their unit eigenvectors.

    Power iteration stops for each eigenpair when the Rayleigh quotient changes by less than ``tol``
    (relative) or after ``iters`` products. Eigenvectors are lists of tensors shaped like the trainable
    parameters, jointly of unit norm.
    """
    if k < 1:
        raise CatchupError(f"k must be >= 1, got {k}")
    if iters < 1:
        raise CatchupError(f"iters must be >= 1, got {iters}")
    with eval_mode(model):
        op = HessianOperator(model, loss_fn, batch)
        values: list[float] = []
        vectors: list[Vector] = []
        for i in range(k):
            v = normalize(random_vector(op.params, seed + i))
            value: float | None = None
            for _ in range(iters):
                v = normalize(orthogonalize(v, vectors))
                hv = op(v)
                estimate = dot(hv, v)
                v = normalize(orthogonalize(hv, vectors))
                converged = value is not None and abs(estimate - value) <= tol * (abs(value) + 1e-6)
                value = estimate
                if converged:
                    break
            values.append(float(value))
            vectors.append(v)
    return values, vectors
