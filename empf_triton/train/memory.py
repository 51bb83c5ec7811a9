"""Measure the memory a training step keeps for backward, on any device.

`SavedTensorMeter` counts, through `torch.autograd.graph.saved_tensors_hooks`, the bytes of every
tensor autograd saves for backward while it is alive: a saved tensor counts from the moment it is
saved until its graph is freed (after `backward()` or when the graph is dropped). `peak` is the
most ever alive at once, i.e. the training memory of the autograd graph, the part that grows with
T in BPTT and must not in online training. Bytes shared by several saved tensors (a parameter
saved by T steps, several saves of one tensor) are counted once. A saved view counts the
elements it holds, not its whole storage: one step's slice `x[:, t]` of an event batch
`[N, T, *]` is one step's bytes (the batch itself is the data loader's, whatever the strategy).
Views of a storage count at most the storage once, and nothing more while the whole storage is
saved; partial views that overlap each other are each counted (an upper bound).
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
        # storage key -> [its bytes, live saves of the whole storage, {view key: [bytes, saves]}]
        self._live: dict[tuple, list] = {}
        self._hooks = None

    @staticmethod
    def _view(t: torch.Tensor) -> tuple[tuple, int, tuple | None, int]:
        """(storage key, storage bytes, view key or None for the whole storage, view bytes)."""
        st = t.untyped_storage()
        key = (t.device.type, t.device.index, st.data_ptr())
        held = t.element_size()
        for n, stride in zip(t.shape, t.stride()):
            held *= n if stride != 0 else min(n, 1)  # an expanded dim holds one element
        if held >= st.nbytes():
            return key, st.nbytes(), None, st.nbytes()
        return key, st.nbytes(), (t.storage_offset(), tuple(t.shape), t.stride()), held

    @staticmethod
    def _bytes(entry: list) -> int:
        nbytes, whole, views = entry
        return nbytes if whole else min(nbytes, sum(b for b, _ in views.values()))

    def _change(self, t_key: tuple, delta: int) -> int:
        """Add (delta 1) or remove (-1) a live save; returns the change of `current`."""
        key, nbytes, view, _ = t_key
        entry = self._live.setdefault(key, [nbytes, 0, {}])
        before = self._bytes(entry)
        if view is None:
            entry[1] += delta
        else:
            slot = entry[2].setdefault(view, [t_key[3], 0])
            slot[1] += delta
            if slot[1] <= 0:
                del entry[2][view]
        after = self._bytes(entry)
        if entry[1] <= 0 and not entry[2]:
            del self._live[key]
        self.current += after - before
        return after - before

    def _release(self, t_key: tuple) -> None:
        self._change(t_key, -1)

    def _pack(self, t: torch.Tensor):
        t_key = self._view(t)
        grown = self._change(t_key, 1)
        self.total += max(grown, 0)
        self.peak = max(self.peak, self.current)
        h = _Handle(t)
        weakref.finalize(h, self._release, t_key)
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
