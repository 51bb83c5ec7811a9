"""The deployment file: one `.safetensors` file, no pickle anywhere.

Tensors: each node's tensors under `"{node_index}.{name}"` (packed int32 weight words, fp32
per-channel scales/biases, neuron parameters, the full-precision stem and classifier weights).
Metadata (safetensors' string map): one entry `"empf_triton"` holding JSON:

```
{"format": "empf_triton.deploy", "version": 1,
 "sha256": hex digest of this document without "sha256" (canonical JSON) and the tensor
           payload (names, dtypes, shapes and bytes, sorted by name),
 "model": {"T": int, "in_shape": [...], "num_classes": int},
 "graph": {"nodes": [{"op", "in", "out", "attrs"}, ...], "output": name},
 "meta": {"model_name", "model_options", "spike_bits", "spike_step", "dataset", "is_event",
          "library_version", ... whatever the exporter was given}}
```

`load` parses the header itself, checks the format marker and version, loads the tensors with
safetensors (which never executes code), recomputes the SHA-256 and builds a `DeployedModel` from
the graph. Every way a file can be unusable becomes one `DeployFormatError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._files import write_file_atomic
from ..ops._common import check_bool
from .errors import DeployError, DeployFormatError
from .runtime import _DTYPES, DeployedModel

__all__ = ["FORMAT", "META_KEY", "VERSION", "export", "load", "payload_sha256", "read_header"]

FORMAT = "empf_triton.deploy"
VERSION = 1
META_KEY = "empf_triton"
#: Header bytes a safetensors file may declare before we call it corrupt (100 MiB, as safetensors).
_MAX_HEADER = 100 * 2**20


def payload_sha256(tensors: Mapping[str, torch.Tensor], doc: Mapping | None = None) -> str:
    """SHA-256 over the metadata document (without its "sha256" entry, canonical JSON) and the
    tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    if doc is not None:
        rest = {k: v for k, v in doc.items() if k != "sha256"}
        h.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where} must hold plain JSON data, got {type(value).__name__}")


def _write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    if path.is_dir():
        raise DeployError(f"{path} is a folder, not a file path")
    if path.exists() and not overwrite:
        raise DeployError(f"{path} already exists; pass overwrite=True (CLI: --overwrite)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DeployError(f"cannot write {path}: a part of its folder path is a file") from None
    try:
        write_file_atomic(path, data, overwrite=overwrite)
    except FileExistsError:  # appeared while this export was folded and written
        raise DeployError(
            f"{path} already exists; pass overwrite=True (CLI: --overwrite)"
        ) from None


def export(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a trained model (folded here) or a `DeployedModel` as one `.safetensors` file.

    Args:
        model: a registered EM-PF model (folded with `fold`) or a `DeployedModel`.
        path: the file to write (atomically: temp file + rename; mode as the umask allows).
        meta: plain JSON data stored with the architecture, e.g. {"model_name": "mnist1d_cnn",
            "model_options": {...}, "dataset": "mnist1d", "is_event": False}. The library version
            is added. Keys T, in_shape and num_classes come from the model.
        overwrite: replace an existing file (otherwise that is a `DeployError`).

    Returns:
        The path written.

    Raises:
        DeployError: an unknown model or layer, an existing file, or meta that is not plain data.
    """
    from .. import __version__
    from .fold import fold

    check_bool("overwrite", overwrite)  # "False" is truthy: it would replace the file
    if meta is not None and not isinstance(meta, Mapping):
        raise DeployError(
            f"meta must be a dict of plain JSON data or None, got {type(meta).__name__}"
        )
    deployed = model if isinstance(model, DeployedModel) else fold(model)
    try:
        user = _plain(dict(meta or {}), "meta")
    except TypeError as e:
        raise DeployError(str(e)) from e
    info = {k: deployed.info[k] for k in ("T", "in_shape", "num_classes")}
    info["in_shape"] = list(info["in_shape"])
    stored = {k: v for k, v in deployed.info.items() if k not in info}
    stored.update(user)
    stored["library_version"] = __version__
    tensors = deployed.file_tensors()
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "model": info,
        "graph": deployed.graph,
        "meta": stored,
    }
    doc["sha256"] = payload_sha256(tensors, doc)
    from safetensors.torch import save

    data = save(tensors, metadata={META_KEY: json.dumps(doc, separators=(",", ":"))})
    path = Path(path)
    _write_atomic(path, data, overwrite)
    return path


def _bad(path: Path, why: str) -> DeployFormatError:
    return DeployFormatError(f"{path}: {why}")


def read_header(path: str | os.PathLike, data: bytes | None = None) -> dict:
    """The export's JSON document (format, version, sha256, model, graph, meta), tensors unread.

    Raises:
        DeployFormatError: missing, not a file, truncated, not safetensors, not an export, or
            another format version.
    """
    path = Path(path)
    if data is None:
        if not path.exists():
            raise _bad(path, "no such file")
        if not path.is_file():
            raise _bad(path, "not a file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise _bad(path, f"cannot be read ({e.strerror or e})") from e
    if len(data) < 8:
        raise _bad(path, f"is truncated or not a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER):
        raise _bad(path, "is truncated or not a safetensors file (header length out of range)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, too deep, huge integers
        raise _bad(path, f"is corrupt or not a safetensors file (bad header: {e})") from e
    if not isinstance(meta, dict) or META_KEY not in meta:
        raise _bad(path, "is not an empf_triton deployment export (no 'empf_triton' metadata)")
    try:
        doc = json.loads(meta[META_KEY])
    except (TypeError, ValueError, RecursionError) as e:
        raise _bad(path, f"has corrupt empf_triton metadata ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(path, f"is not an empf_triton deployment export (format {doc.get('format')!r})"
                   if isinstance(doc, dict) else "has malformed empf_triton metadata")  # fmt: skip
    if doc.get("version") != VERSION:
        raise _bad(
            path,
            f"has deployment format version {doc.get('version')!r}; this build reads version "
            f"{VERSION} (re-export it with this version of empf_triton)",
        )
    for k in ("sha256", "model", "graph", "meta"):
        if k not in doc:
            raise _bad(path, f"lacks the metadata entry {k!r}; it is damaged")
    return doc


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> DeployedModel:
    """Load an export as a `DeployedModel` (inference only) on `device`.

    Needs neither the training code nor the latent weights, and runs no pickled code: the tensors
    come from safetensors and the architecture from the JSON graph description.

    Args:
        path: a file written by `export`.
        device: where to put the model.
        dtype: compute dtype, fp32 (as stored, the default), fp16 or bf16.
        impl: "auto" | "triton" | "reference" for the ops (auto: Triton on CUDA).

    Raises:
        DeployFormatError: the file is missing, truncated, corrupt (SHA-256 mismatch), of another
            format version, or not an export; one message naming the file and the reason.
        ValueError: an unknown `impl` or `device`, or a CUDA device where there is none.
    """
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a name like 'cpu', 'cuda:0'; got "
                         f"{device!r}") from e  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available here")
    path = Path(path)
    if not path.is_file():
        raise _bad(path, "no such file" if not path.exists() else "not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror or e})") from e
    doc = read_header(path, data)
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type on damaged files
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise _bad(path, f"is truncated or corrupt ({detail})") from e
    if payload_sha256(tensors, doc) != doc["sha256"]:
        raise _bad(
            path, "is corrupt: its tensors or metadata do not match the stored SHA-256 checksum"
        )
    model_info = doc["model"]
    if not isinstance(model_info, dict) or not isinstance(doc["meta"], dict):
        raise _bad(path, "has malformed metadata")
    info = {**doc["meta"], **model_info}
    try:
        model = DeployedModel(doc["graph"], tensors, info, impl=impl)
    except DeployFormatError as e:
        raise _bad(path, str(e)) from e
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise _bad(path, f"has an inconsistent graph ({type(e).__name__}: {e})") from e
    if dtype is not None:
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
        model = model.to(dtype)
    return model.to(device)
