"""Errors of the deployment layer."""

from __future__ import annotations

__all__ = ["DeployError", "DeployFormatError"]


class DeployError(ValueError):
    """A model cannot be deployed (a layer the exporter does not know, an existing output file,
    an input of the wrong shape at inference, ...). The message names what is wrong."""


class DeployFormatError(DeployError):
    """A file is not a usable deployed model: missing, truncated, corrupt (its SHA-256 does not
    match), of another format version, or not an `empf_triton` export at all."""
