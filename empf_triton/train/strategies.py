"""Online training strategies (docs/model.md §6) and evaluation with anytime accuracy.

- `online`: for t in 0..T-1: forward step t, loss_t, backward, optimizer step.
- `random_step`: draw t* uniformly in 0..T-1; steps t < t* run forward without a graph; step t*
  runs forward, one backward and one optimizer step.
- `accumulate` (SLTT-style): for each t: forward, backward of loss_t / T; one optimizer step
  after the T steps.
- `bptt` (the STBP baseline): all T steps in one multi-step forward with the temporal graph, loss
  on the mean logits, one backward and one optimizer step.

Every batch starts from reset neurons (`empf_triton.reset_net`). The three online strategies keep no
graph across steps (the neurons run with grad_mode "online", so the carried membrane is detached),
so their training memory does not grow with T. Static inputs x [N, *in_shape] are fed unchanged at
every step; event inputs arrive as [N, T, *in_shape] and step t gets x[:, t].

Under DDP (model wrapped in `DistributedDataParallel`), each backward all-reduces the gradients;
`accumulate` defers that to the last step with `no_sync()`. `random_step` draws t* from a generator
that every rank seeds identically and advances identically, so t* agrees across ranks; pass
`check_tstar=True` to `train_epoch` to verify that with one all-gather per batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.binary import frozen_weights
from ..nn.neuron import (
    STEP_MODES,
    check_module,
    reset_net,
    set_grad_mode,
    set_step_mode,
    unwrap_model,
)
from .precision import autocast, check_precision

__all__ = [
    "STRATEGIES",
    "BatchResult",
    "EpochResult",
    "evaluate",
    "iterate_batches",
    "set_grad_mode",
    "set_step_mode",
    "step_inputs",
    "train_batch",
    "train_epoch",
]

STRATEGIES = ("online", "random_step", "accumulate", "bptt")


def _check_strategy(strategy: object) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return strategy


def _check_T(T: object) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    return T


def step_inputs(x: torch.Tensor, t: int, is_event: bool) -> torch.Tensor:
    """Input of step t: x itself for static data, x[:, t] for event data [N, T, *]."""
    return x[:, t] if is_event else x


def seq_inputs(x: torch.Tensor, T: int, is_event: bool) -> torch.Tensor:
    """All steps [T, N, *]: static x repeated (a view, no copy), event x [N, T, *] transposed."""
    if is_event:
        return x.transpose(0, 1)
    return x.unsqueeze(0).expand(T, *x.shape)


@dataclass
class BatchResult:
    """Outcome of one training batch.

    Attributes:
        loss_value: the loss below as a detached 0-d float64 tensor on the model's device.
            Training a batch reads nothing back from the device; reading `loss` does (one sync
            on a GPU), so a loop that only sums losses keeps them here and reads once.
        logits: detached logits of the last step run, summed over the steps run, [N, C].
        steps: forward steps run (t* + 1 for `random_step`, else T).
        t_star: the drawn step (`random_step`), else None.
    """

    loss_value: torch.Tensor
    logits: torch.Tensor
    steps: int
    t_star: int | None = None

    @property
    def loss(self) -> float:
        """Mean of the per-step losses that were back-propagated (for `random_step` the loss at
        t*, for `bptt` the loss on the mean logits), as a Python float."""
        return float(self.loss_value)


def draw_t_star(T: int, generator: torch.Generator | None) -> int:
    """t* uniform in 0..T-1 from `generator` (a CPU generator seeded alike on every rank), or
    from torch's global RNG if None."""
    return int(torch.randint(0, T, (1,), generator=generator).item())


def train_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    strategy: str,
    T: int,
    *,
    is_event: bool = False,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    grad_clip: float | None = None,
    t_star: int | None = None,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> BatchResult:
    """Train on one batch with `strategy` (see the module docstring).

    Args:
        model: the model (or its DDP wrapper) in train mode. Its neurons are reset here and its
            step/grad modes set for the strategy ("s"/"online", or "m"/"bptt" for `bptt`).
        x: [N, *in_shape] static or [N, T, *in_shape] event inputs, on the model's device.
        y: [N] int64 labels.
        optimizer: stepped T times (`online`) or once (the others).
        strategy: "online" | "random_step" | "accumulate" | "bptt".
        T: time steps.
        is_event: x carries one frame per step.
        generator: draws t* for `random_step`. None: torch's global RNG (each call draws anew;
            `torch.manual_seed` repeats the draws). Under DDP pass a generator seeded alike on
            every rank (as `train_epoch` does), so that the ranks draw the same t*.
        loss_fn: per-step loss on [N, C] logits.
        grad_clip: clip the gradient norm to this before each optimizer step (None: no clip).
        t_star: force t* for `random_step` (tests; normally drawn).
        precision: "fp32" | "bf16" | "fp16": autocast for the forward passes (see precision.py).
        scaler: a `torch.amp.GradScaler` (for fp16): losses are scaled before backward and the
            optimizer is stepped through it.
    """
    check_module(model, "train_batch")
    _check_strategy(strategy)
    _check_T(T)
    check_precision(precision)
    base = unwrap_model(model)
    reset_net(base)
    device = x.device

    def fwd(inp: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model(inp)

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def opt_step() -> None:
        if scaler is not None:
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(base.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            return
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(base.parameters(), grad_clip)
        optimizer.step()

    if strategy == "bptt":
        set_step_mode(base, "m")
        set_grad_mode(base, "bptt")
        optimizer.zero_grad(set_to_none=True)
        out = fwd(seq_inputs(x, T, is_event)).float()  # [T, N, C]
        loss = loss_fn(out.mean(0), y)
        backward(loss)
        opt_step()
        reset_net(base)  # drop the temporal graph held by the kept membranes
        return BatchResult(loss.detach().double(), out.detach().sum(0), T)

    set_step_mode(base, "s")
    set_grad_mode(base, "online")
    total = None
    if strategy == "random_step":
        if t_star is None:
            t_star = draw_t_star(T, generator)
        if not 0 <= t_star < T:
            raise ValueError(f"t_star must be in 0..{T - 1}, got {t_star}")
        with torch.no_grad():
            for t in range(t_star):
                o = fwd(step_inputs(x, t, is_event)).float()
                total = o if total is None else total + o
        optimizer.zero_grad(set_to_none=True)
        out = fwd(step_inputs(x, t_star, is_event)).float()
        loss = loss_fn(out, y)
        backward(loss)
        opt_step()
        total = out.detach() if total is None else total + out.detach()
        return BatchResult(loss.detach().double(), total, t_star + 1, t_star)

    step_losses = []  # on the device: no host sync in a batch
    if strategy == "accumulate":
        optimizer.zero_grad(set_to_none=True)
    for t in range(T):
        if strategy == "online":
            optimizer.zero_grad(set_to_none=True)
        sync = strategy == "online" or t == T - 1
        ctx = contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()
        with ctx:
            out = fwd(step_inputs(x, t, is_event)).float()
            loss = loss_fn(out, y)
            backward(loss if strategy == "online" else loss / T)
        if strategy == "online":
            opt_step()
        step_losses.append(loss.detach())
        total = out.detach() if total is None else total + out.detach()
    if strategy == "accumulate":
        opt_step()
    # fp64: T fp32 losses of like magnitude sum exactly, so the order of the sum does not matter
    return BatchResult(torch.stack(step_losses).double().sum() / T, total, T)


def iterate_batches(
    dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches of `dataset` for this rank.

    In-memory data sets (with tensors `.x` and `.y`) are sliced directly (fast); others go through
    a `torch.utils.data.DataLoader`. With `world_size > 1` every rank draws the same permutation
    (same `generator` state) and takes the samples `rank::world_size` of it, so the ranks' batches
    together are the joint batch of one process with `batch_size * world_size`.

    Args:
        batch_size: per-rank batch size.
        shuffle: permute with `generator` (advanced once per call).
        drop_last: drop the last batch if it is short (else it is kept).

    Raises:
        ValueError: `batch_size` or `world_size` is not an int >= 1, or `rank` is not in
            0..world_size-1 (checked at the call, before any batch).
    """
    _check_batching(batch_size, rank, world_size)
    return _iterate_batches(
        dataset, batch_size, shuffle, generator, drop_last, rank, world_size, device, num_workers
    )


def _check_batching(batch_size, rank: int = 0, world_size: int = 1) -> None:
    for name, v in (("batch_size", batch_size), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")


def _iterate_batches(
    dataset, batch_size, shuffle, generator, drop_last, rank, world_size, device, num_workers
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        # Equal shards: the tail that does not divide evenly is dropped (as DistributedSampler
        # with drop_last), so every rank runs the same number of batches.
        order = order[: n - n % world_size][rank::world_size]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        for i in range(0, stop, batch_size):
            idx = order[i : i + batch_size]
            x, y = dataset.x[idx], dataset.y[idx]
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x, y
        return
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(
        Subset(dataset, order[:stop].tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device is not None and torch.device(device).type == "cuda",
    )
    for x, y in loader:
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.long)
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Batches per epoch that `iterate_batches` yields on each rank."""
    _check_batching(batch_size, 0, world_size)
    per_rank = (n - n % world_size) // world_size if world_size > 1 else n
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


@dataclass
class EpochResult:
    """Metrics of one training epoch (this rank's batches unless reduced by the caller).

    loss: mean loss per sample (each batch's mean loss weighted by its size, so a short last
    batch counts for its samples only); accuracy: of the logits summed over the steps each
    batch ran;
    samples, batches, seconds; t_star_counts: how often each t* was drawn (random_step).
    """

    loss: float
    accuracy: float
    samples: int
    batches: int
    seconds: float
    t_star_counts: list[int] = field(default_factory=list)


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    strategy: str,
    T: int,
    *,
    is_event: bool = False,
    generator: torch.Generator | None = None,
    scheduler=None,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    transform_generator: torch.Generator | None = None,
    loss_fn: Callable = F.cross_entropy,
    grad_clip: float | None = None,
    progress: Callable[[int, float, float], None] | None = None,
    check_tstar: bool = False,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> EpochResult:
    """One pass over `batches` with `strategy`; `scheduler.step()` after every batch if given.

    Args:
        batches: iterable of (x, y) on the model's device (see `iterate_batches`).
        generator: the t* generator for `random_step` (seed it identically on every DDP rank).
            Pass the same generator to every epoch, as `run_training` does: None makes a new one
            seeded 0 per call, so each epoch would draw the same t* sequence again.
        transform: training augmentation `f(x, transform_generator) -> x` per batch.
        progress: called after each batch as `progress(batch_index, loss, accuracy_so_far)`.
            Each call reads the loss and the accuracy back from the device (a GPU sync per
            batch); a `progress` object with a `due(batch_index) -> bool` method is called only
            for the batches where it returns True. Without `progress` an epoch reads the device
            once, at its end.
        check_tstar: under torch.distributed, all-gather t* each batch and raise if ranks differ.
        precision, scaler: as `train_batch`.
    """
    check_module(model, "train_epoch")
    _check_strategy(strategy)
    _check_T(T)
    if strategy == "random_step" and generator is None:
        generator = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    # The loss sum (fp64, each batch's mean loss times its size, added in order) and the
    # correct count stay on the
    # device: the GPU is never waited for inside the epoch unless `progress` asks for numbers.
    loss_sum = correct = 0
    seen, nb = 0, 0
    due = getattr(progress, "due", None)
    counts = [0] * T
    for x, y in batches:
        if transform is not None:
            x = transform(x, transform_generator)
        t_star = None
        if strategy == "random_step":
            t_star = draw_t_star(T, generator)
            if check_tstar:
                _assert_same_on_ranks(t_star)
            counts[t_star] += 1
        r = train_batch(
            model,
            x,
            y,
            optimizer,
            strategy,
            T,
            is_event=is_event,
            loss_fn=loss_fn,
            grad_clip=grad_clip,
            t_star=t_star,
            precision=precision,
            scaler=scaler,
        )
        if scheduler is not None:
            scheduler.step()
        loss_sum = loss_sum + r.loss_value * y.shape[0]
        correct = correct + (r.logits.argmax(1) == y).sum()
        seen += y.shape[0]
        nb += 1
        if progress is not None and (due is None or due(nb)):
            progress(nb, r.loss, int(correct) / max(seen, 1))
    reset_net(unwrap_model(model))
    return EpochResult(
        float(loss_sum) / max(seen, 1),
        int(correct) / max(seen, 1),
        seen,
        nb,
        time.perf_counter() - start,
        counts if strategy == "random_step" else [],
    )


def _assert_same_on_ranks(value: int) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    vals = [None] * dist.get_world_size()
    dist.all_gather_object(vals, value)
    if len(set(vals)) != 1:
        raise RuntimeError(f"random_step drew different t* on the ranks: {vals}")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    T: int,
    *,
    is_event: bool = False,
    loss_fn: Callable = F.cross_entropy,
    step_mode: str = "m",
    precision: str = "fp32",
) -> dict:
    """Accuracy of the logits summed over T, and the anytime accuracy after each step.

    Args:
        batches: (x, y) batches on the model's device.
        step_mode: "m" runs all T steps in one call (fast); "s" steps one at a time. Both give
            the same logits in eval mode.
        precision: "fp32" | "bf16" | "fp16": autocast for the forward passes.

    A `torch.compile`d model is called as it is (so the compiled code runs); a DDP wrapper is
    bypassed (each rank evaluates its own shard without gradient synchronisation).

    Returns:
        {"loss": cross-entropy of the mean logits, "accuracy": final accuracy,
         "anytime": [accuracy using the logits summed over steps 0..t, for t in 0..T-1],
         "samples": n, "correct": the count behind "accuracy", "anytime_correct": counts}.
    """
    check_module(model, "evaluate")
    _check_T(T)
    check_precision(precision)
    if step_mode not in STEP_MODES:
        raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
    base = unwrap_model(model)
    fwd = model if hasattr(model, "_orig_mod") else base
    was_training = base.training
    # each module's step and grad mode, given back at the end (a caller's bptt setup stays)
    modes = [
        (m, getattr(m, "step_mode", None), getattr(m, "grad_mode", None))
        for m in base.modules()
        if hasattr(m, "step_mode") or hasattr(m, "grad_mode")
    ]
    base.eval()
    set_grad_mode(base, "online")
    # Counts and the loss sum stay on the device (fp64, exact for the fp32 batch sums in order):
    # one host sync at the end, not two per batch.
    correct_t = loss_sum = 0
    n = 0
    try:
        with frozen_weights(base):  # binary layers quantise their weights once per pass
            for x, y in batches:
                reset_net(base)
                with autocast(x.device, precision):
                    if step_mode == "m":
                        set_step_mode(base, "m")
                        out = fwd(seq_inputs(x, T, is_event))  # [T, N, C]
                    else:
                        set_step_mode(base, "s")
                        out = torch.stack([fwd(step_inputs(x, t, is_event)) for t in range(T)])
                cum = out.float().cumsum(0)  # [T, N, C]
                correct_t = correct_t + (cum.argmax(-1) == y.unsqueeze(0)).sum(1)
                loss_sum = loss_sum + loss_fn(cum[-1] / T, y, reduction="sum").detach().double()
                n += y.shape[0]
    finally:
        reset_net(base)
        for m, step, grad in modes:
            if step is not None:
                m.step_mode = step
            if grad is not None:
                m.grad_mode = grad
        base.train(was_training)
    counts = correct_t.tolist() if isinstance(correct_t, torch.Tensor) else [0] * T
    loss_sum = float(loss_sum)
    anytime = [c / max(n, 1) for c in counts]
    return {
        "loss": loss_sum / max(n, 1),
        "accuracy": anytime[-1],
        "anytime": anytime,
        "samples": n,
        "correct": counts[-1],
        "anytime_correct": counts,
    }
