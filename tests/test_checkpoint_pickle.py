"""Checkpoints load with torch.load(weights_only=True): a file whose pickle would run code is
rejected with CheckpointError and the code never runs, whether the malicious object is in the
outer envelope or in a payload whose SHA-256 checksum is correct."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import torch

from empf_triton.train.checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint


class _Evil:
    """Unpickling this calls os.mkdir(marker): proof that pickled code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_the_payload_is_really_malicious(tmp_path):
    """Guard for the tests below: a plain (unsafe) torch.load of the same bytes runs the code."""
    marker = tmp_path / "ran"
    data = _evil_bytes({"model": _Evil(str(marker))})
    torch.load(io.BytesIO(data), weights_only=False)
    assert marker.is_dir()


def test_malicious_envelope_is_rejected_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(_evil_bytes({"format": FORMAT, "version": VERSION, "x": _Evil(str(marker))}))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists(), "pickled code ran while loading a checkpoint"


def test_malicious_payload_with_valid_checksum_is_rejected_without_running(tmp_path):
    marker = tmp_path / "ran"
    payload = _evil_bytes(
        {
            "model_name": "x",
            "model_config": {},
            "model": {"w": _Evil(str(marker))},
            "epoch": 1,
        }
    )
    envelope = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    path = tmp_path / "evil_payload.pt"
    torch.save(envelope, path)
    with pytest.raises(CheckpointError, match="evil_payload.pt"):
        load_checkpoint(path)
    assert not marker.exists(), "pickled code ran while loading a checkpoint payload"
