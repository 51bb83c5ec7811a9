"""Training checkpoints: atomic saves, safe loads, exact resume.

A checkpoint is a `torch.save` file holding plain containers and tensors only, so it loads with
`torch.load(weights_only=True)`, which never executes pickled code. The file is an envelope
`{"format": "empf_triton.checkpoint", "version": 1, "sha256": hex, "payload": uint8 tensor}` whose
payload is itself a `torch.save` of

```
{"model_name": str, "model_config": {"in_shape": [...], "num_classes": int, "T": int, **options},
 "model": state_dict, "optimizer": state_dict | None, "scheduler": state_dict | None,
 "epoch": epochs completed, "rng": {...}, "history": [per-epoch metrics], "extra": {...}}
```

The SHA-256 catches damage that torch's zip reader does not (it does not verify CRCs, so a flipped
byte inside tensor data would otherwise load silently as a wrong weight).

`save_checkpoint` writes to a temporary file in the same folder, flushes it to disk, then renames
it over the target (`os.replace`, atomic on POSIX and Windows), so an interrupted save leaves the
previous checkpoint untouched. `load_checkpoint` turns every way a file can be unusable (missing,
truncated, corrupt, not a checkpoint, another model) into a `CheckpointError` with a clear message.

Exact resume: the file carries the RNG states of torch (CPU and CUDA), numpy, Python's `random` and
any named `torch.Generator`s of the training loop (data order, t*, augmentation). Restoring all of
them and the optimizer and scheduler states makes "train N epochs" and "train k, save, resume,
train N - k" give bit-identical weights on CPU.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._files import write_file_atomic
from ..nn.neuron import check_module, unwrap_model

__all__ = [
    "FORMAT",
    "CheckpointError",
    "capture_rng",
    "check_compatible",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = "empf_triton.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, corrupt, truncated, or for a different model."""


def _plain(value: Any) -> Any:
    """Config values as containers `weights_only` loading accepts (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint config values must be plain data, got {type(value).__name__}")


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """The global RNG states (torch CPU/CUDA, numpy, random) and those of `generators`."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _plain(random.getstate()),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: Mapping, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what `capture_rng` captured (missing generator entries are left as they are)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    model_name: str,
    model_config: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    epoch: int = 0,
    generators: Mapping[str, torch.Generator] | None = None,
    history: list | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file in the same folder + `os.replace`).

    Args:
        path: target file; its folder is created if needed.
        model: the model (torch.compile, DDP and DataParallel wrappers are unwrapped, so the
            saved keys are those of the plain model).
        model_name, model_config: what rebuilds the model (`build_model(name, **config)`);
            checked on load so a checkpoint of another model is refused.
        optimizer, scheduler: saved with their state_dicts when given.
        epoch: epochs completed.
        generators: named torch.Generators of the training loop, saved for exact resume.
        history: per-epoch metric dicts (plain data).
        extra: any other plain data (e.g. the command-line arguments).

    Returns:
        The path written.
    """
    path = Path(path)
    check_module(model, "save_checkpoint")
    model = unwrap_model(model)
    payload = {
        "model_name": str(model_name),
        "model_config": _plain(model_config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "rng": capture_rng(generators),
        "history": _plain(history or []),
        "extra": _plain(extra or {}),
    }
    # Serialise fully in memory first: a failure while pickling never touches the disk.
    inner = io.BytesIO()
    torch.save(payload, inner)
    data = inner.getvalue()
    buf = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "sha256": hashlib.sha256(data).hexdigest(),
            "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
        },
        buf,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, buf.getbuffer())
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint written by `save_checkpoint`.

    Uses `torch.load(weights_only=True)`: no pickled code runs, whatever the file contains.

    Raises:
        CheckpointError: the file is missing, a folder, empty, truncated or corrupt, or not an
            empf_triton checkpoint (the message names the path and the reason).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        hint = [str(path / n) for n in ("best.pt", "last.pt") if (path / n).is_file()]
        hint = f"; give a checkpoint file in it, e.g. {' or '.join(hint)}" if hint else ""
        raise CheckpointError(f"checkpoint path is not a file: {path} is a folder{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    outer = _safe_load(path, path.read_bytes(), "cpu")
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an empf_triton checkpoint (no '{FORMAT}' format marker); "
            "it may be a plain state_dict or a file of another tool"
        )
    if outer.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {outer.get('version')!r}; this build reads "
            f"version {VERSION}"
        )
    blob = outer.get("payload")
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or "sha256" not in outer:
        raise CheckpointError(f"checkpoint {path} lacks its payload or checksum; it is damaged")
    data = blob.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != outer["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the stored SHA-256 checksum"
        )
    ckpt = _safe_load(path, data, map_location)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} has a malformed payload")
    for key in ("model_name", "model_config", "model", "epoch"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks the entry {key!r}; it is incomplete")
    return ckpt


def _first_sentence(text: str, limit: int = 240) -> str:
    """The first sentence of `text`'s first line, cut at a word end if still over `limit`."""
    line = text.strip().splitlines()[0].strip()
    end = line.find(". ")
    if end >= 0:
        line = line[: end + 1]
    if len(line) <= limit:
        return line
    return line[: line[:limit].rfind(" ")].rstrip(" ,;:") + " ..."


def _safe_load(path: Path, data: bytes, map_location) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        detail = _first_sentence(str(e)) if str(e) else "no detail"
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be read "
            f"({type(e).__name__}: {detail})"
        ) from e
    except Exception as e:  # the unpickler raises assorted errors on garbage input
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely ({type(e).__name__}); it is corrupt, "
            "truncated, or not an empf_triton checkpoint"
        ) from e


def check_compatible(
    ckpt: Mapping,
    model_name: str,
    model_config: Mapping[str, Any] | None = None,
    *,
    path: str | os.PathLike = "checkpoint",
    exact: bool = False,
) -> None:
    """Raise `CheckpointError` unless `ckpt` was saved for this model name and configuration.

    Every entry of `model_config` must equal the saved one (an entry the checkpoint lacks counts
    as a difference); saved entries not in `model_config` are not checked, so a partial
    expectation such as {"T": 4} works. With `exact` they are (a whole configuration, as a
    resumed run gives: an option left out would build another model).
    """
    if ckpt["model_name"] != model_name:
        raise CheckpointError(
            f"{path} is a checkpoint of model {ckpt['model_name']!r}, not {model_name!r}"
        )
    if model_config:
        saved = ckpt["model_config"]
        want = _plain(model_config)
        missing = object()
        diff = {
            k: (saved.get(k, missing), v) for k, v in want.items() if saved.get(k, missing) != v
        }
        if exact:
            diff.update((k, (v, missing)) for k, v in saved.items() if k not in want)
        if diff:
            desc = ", ".join(
                f"{k}: saved {'(not set)' if a is missing else repr(a)} vs requested "
                f"{'(not set)' if b is missing else repr(b)}"
                for k, (a, b) in diff.items()
            )
            raise CheckpointError(
                f"{path} was saved for a different {model_name!r} configuration ({desc})"
            )


def load_model_state(model: nn.Module, ckpt: Mapping, *, path: str | os.PathLike = "") -> None:
    """`model.load_state_dict(ckpt["model"])` (strict), mapping a mismatch to `CheckpointError`;
    the model is unwrapped as `save_checkpoint` unwraps it (torch.compile, DDP, DataParallel)."""
    model = unwrap_model(model)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: "
            f"{' '.join(s.strip() for s in first[:3])[:400]}"
        ) from e
