"""The collate_fn form of a mixer: timm's ``(input, target)`` pairs, with the batch's plan riding on the input.

``mixer.collate`` mixes in the DataLoader (in worker processes too) and returns ``(x, soft_target)``, where x is
a ``PlannedBatch``: a torch.Tensor subclass carrying the batch's MixPlan through what a training loop does to
its input on the way to the model (``.to(device)``, ``.float()``, timm's PrefetchLoader normalisation
``sub_``/``div_``, ``contiguous``, ``pin_memory``, ...). A forward pre-hook on the model (``PlanHandover``)
takes the plan off the input, arms the stage hooks when the model is training, and hands the model a plain
tensor, so no module, and no ``torch.compile`` graph, ever sees the subclass.

From DataLoader worker processes the batch pickles as any tensor subclass: its storage goes through torch's
shared-memory reduction, the plan (a small dataclass) with it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch
from timm.data import FastCollateMixup
from torch import nn
from torch.utils.data import default_collate

from catchup.errors import CatchupError
from catchup.stages import unwrap_model

if TYPE_CHECKING:
    from catchup.mix.plan import MixPlan

__all__ = ["PlannedBatch", "MixCollate", "PlanHandover", "PlanSource", "with_plan"]


class PlanSource(Protocol):
    """What the collate_fn asks of a mixer (``catchup.mix.Mixer`` is one): the data-side half of a step, a
    model-free copy for worker processes, the number of the batch it last prepared, and timm's off switch."""
    mixup_enabled: bool
    batch_number: int

    def prepare(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MixPlan | None]:
        ...

    def for_worker(self) -> PlanSource:
        ...


def _order_keeping_ops() -> frozenset:
    """The operations whose result holds the same samples in the same order: moves between devices, dtypes and
    memory formats, copies, and elementwise arithmetic (a normalisation). Any other result drops the plan, so
    ``x.flip(0)``, ``x[perm]`` or ``torch.cat`` can never carry partner indices that point at other samples."""
    names = ["to", "cuda", "cpu", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous",
             "pin_memory", "clone", "detach", "requires_grad_", "clamp", "clamp_", "clip", "clip_",
             "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "neg_", "round", "round_",
             "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
             "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__neg__"]
    return frozenset(getattr(torch.Tensor, n) for n in names) | {torch.add, torch.sub, torch.mul, torch.div,
                                                                 torch.clamp, torch.clone}


_KEEPS_ORDER = _order_keeping_ops()


class PlannedBatch(torch.Tensor):
    """A batch tensor carrying its MixPlan (``mix_plan``). Only operations that keep the samples in order (see
    ``_order_keeping_ops``) carry the plan on, and only to a result of the same batch size."""
    mix_plan: MixPlan | None = None
    batch_number: int = -1       # the mixer's number for this batch (its random stream)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.as_subclass or not isinstance(out, torch.Tensor) or isinstance(out, PlannedBatch):
            return out      # as_subclass is how the plan is dropped; in-place results are the batch itself
        source = args[0] if args and isinstance(args[0], PlannedBatch) else None
        if source is None or func not in _KEEPS_ORDER or out.dim() == 0 or out.shape[0] != source.shape[0]:
            return out
        return with_plan(out, source.mix_plan, source.batch_number)


def with_plan(x: torch.Tensor, plan: MixPlan | None, batch_number: int) -> PlannedBatch:
    """x (no copy) as a PlannedBatch carrying ``plan``."""
    out = x.as_subclass(PlannedBatch)
    out.mix_plan, out.batch_number = plan, batch_number
    return out


class MixCollate(FastCollateMixup):
    """``mixer.collate``. A FastCollateMixup to timm, so timm's ``PrefetchLoader.mixup_enabled`` (its
    mixup-off-epoch switch) reaches the mixer; all settings and state live in the mixer.

    Worker processes hold copies of the mixer: the off switch reaches them when the workers start again
    (timm's ``persistent_workers=True`` keeps them for the whole run; rebuild the loader to switch off).
    """

    def __init__(self, mixer: PlanSource):   # FastCollateMixup.__init__ is not called: the mixer holds the settings
        self.mixer = mixer

    def __getstate__(self) -> dict:
        """What a worker started by spawn or forkserver (macOS's default, and Linux's from Python 3.14) receives:
        the mixer's settings and stream, not the model and its hooks (local functions cannot be pickled, and
        the plan's hooks fire in the main process). Forked workers copy the process instead."""
        return {"mixer": self.mixer.for_worker()}

    @property
    def mixup_enabled(self) -> bool:
        return self.mixer.mixup_enabled

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        self.mixer.mixup_enabled = bool(value)

    def __call__(self, batch: list, _=None) -> tuple[PlannedBatch, torch.Tensor]:
        images = [sample[0] for sample in batch]
        # timm's prefetcher transforms yield uint8 numpy arrays; default_collate would turn those into tensors too,
        # but one stack is what fast_collate does
        x = torch.from_numpy(np.stack(images)) if isinstance(images[0], np.ndarray) else default_collate(images)
        target = default_collate([sample[1] for sample in batch])
        if target.dim() == 1:
            target = target.long()
        x, soft, plan = self.mixer.prepare(x, target)
        return with_plan(x, plan, self.mixer.batch_number), soft


class PlanHandover:
    """A forward pre-hook on the model's root module: takes the plan off a PlannedBatch input, hands it to
    ``take`` in a training forward of this very model (not in eval, not on an EMA deepcopy), and passes the
    model a plain tensor. A training forward whose input lost its plan on the way from the collate_fn (its
    features would go unmixed while its targets are mixed) is refused, unless ``armed_directly()`` says the
    training loop armed this forward itself (the mixup_fn form, ``mixer(x, target)``)."""

    def __init__(self, model: nn.Module, take: Callable[[MixPlan | None, int, tuple], None],
                 armed_directly: Callable[[], bool]):
        root = unwrap_model(model)

        # Runs eagerly under torch.compile, which traces module hooks but cannot trace this tensor subclass;
        # the compiled graph starts after it, from the plain tensor.
        @torch._dynamo.disable
        def hook(module: nn.Module, args: tuple):
            if not args or not isinstance(args[0], PlannedBatch):
                if module is root and module.training and args and not armed_directly():
                    raise CatchupError(
                        "the model's training input carries no mix plan, though the batches come from the "
                        "mixer's collate_fn: an operation between loader and model (indexing, flip, cat, ...) "
                        "dropped it; keep the batch's samples in order (moves, casts and normalisation keep it)")
                return None
            x = args[0]
            if module is root and module.training:
                take(x.mix_plan, x.batch_number, tuple(x.shape[1:]))
            return (x.as_subclass(torch.Tensor), *args[1:])

        self._handle = root.register_forward_pre_hook(hook)

    def remove(self) -> None:
        self._handle.remove()
