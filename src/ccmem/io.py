"""Checksummed safetensors files with a JSON header, so a truncated or corrupted file is detected, not misread."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CorruptFileError

FORMAT_VERSION = 1


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes: the checksum a checked file stores, and the identity
    of an adapter (e.g. which stage 1 was folded into a model)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def save_checked(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Write ``tensors`` with ``header`` (JSON) and a sha256 of the tensor bytes; atomic via a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"ccmem": json.dumps(header, sort_keys=True), "sha256": digest(tensors)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_header(path: str | os.PathLike) -> tuple[str, dict[str, Any]] | None:
    """The (sha256 of the tensors, ccmem header) a file written by :func:`save_checked` records, without reading its
    tensors or checking them; None where the file is missing, damaged or has no ccmem header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta["sha256"], json.loads(meta["ccmem"])
    except Exception:  # noqa: BLE001  (load_checked gives the error that names the problem)
        return None


def load_checked(path: str | os.PathLike, kind: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_checked`; raise :class:`CorruptFileError` if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise CorruptFileError(
            f"{kind} {path} is truncated or not a safetensors file ({e}); re-create it or restore it from a copy"
        ) from e
    if "ccmem" not in meta or "sha256" not in meta:
        raise CorruptFileError(f"{kind} {path} has no ccmem header; it was not written by ccmem")
    if digest(tensors) != meta["sha256"]:
        raise CorruptFileError(
            f"{kind} {path} is corrupted: its tensors do not match the stored checksum; re-create it or restore it"
        )
    try:
        header = json.loads(meta["ccmem"])
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{kind} {path} has an unreadable header ({e})") from e
    return tensors, header
