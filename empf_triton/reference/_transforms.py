"""Whether a torch.func transform or forward-mode AD is running (shared by the reference and the
ops, which resolve `impl` by it).

The reference's straight-through and surrogate `autograd.Function`s come in two classes: the
plain one, which torch.compile traces, and a subclass that adds `jvp` (forward mode), which
Dynamo does not trace; a transform or a forward-mode AD level picks the subclass.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad


def transform_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, jvp, vmap, ...) or a forward-mode AD
    level (`torch.autograd.forward_ad.dual_level`) is active."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
