"""Measure the memory a training step keeps for backward, on any device.

`SavedTensorMeter` counts, through `torch.autograd.graph.saved_tensors_hooks`, the bytes of every
tensor autograd saves for backward while it is alive: a saved tensor counts from the moment it is
saved until its graph is freed (after `backward()` or when the graph is dropped). `peak` is the
most ever alive at once, i.e. the training memory of the autograd graph, the part that grows with
T in BPTT and must not in online training. Storages shared by several saved tensors (a parameter
saved by T steps, views of one buffer) are counted once.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["SavedTensorMeter"]


class _Handle:
    """What the pack hook stores instead of the tensor; its death frees the count."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """Context manager: `with SavedTensorMeter() as m: ...; m.peak, m.current, m.total`.

    Attributes:
        current: bytes of saved tensors alive now (distinct storages).
        peak: the maximum of `current` inside the context.
        total: bytes saved over the whole context (each save counted once, freed or not).
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.total = 0
        self._refs: dict[tuple, int] = {}  # storage key -> live saved tensors using it
        self._hooks = None

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        st = t.untyped_storage()
        return (t.device.type, t.device.index, st.data_ptr(), st.nbytes())

    def _release(self, key: tuple) -> None:
        n = self._refs.get(key, 0) - 1
        if n <= 0:
            self._refs.pop(key, None)
            self.current -= key[3]
        else:
            self._refs[key] = n

    def _pack(self, t: torch.Tensor):
        key = self._key(t)
        if key not in self._refs:
            self._refs[key] = 0
            self.current += key[3]
            self.total += key[3]
            self.peak = max(self.peak, self.current)
        self._refs[key] += 1
        h = _Handle(t)
        weakref.finalize(h, self._release, key)
        return h

    @staticmethod
    def _unpack(h: _Handle) -> torch.Tensor:
        return h.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
