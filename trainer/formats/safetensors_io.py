"""safetensors, the one container every file of the product uses: headers read and checked (pickles refused,
truncation and damage found before anything is loaded), streamed writing (one tensor in memory at a time, unchanged
bytes copied as they are), atomic saves, and a file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch
from torch import Tensor

from ..errors import ConfigError, public_name
from ..outputs import atomic_write

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PICKLE_MAGIC = (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save zip, raw pickle
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@public_name
class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used, with what to do instead."""


# --- reading headers ------------------------------------------------------------------------------------------
def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header, byte offset of the data) of a safetensors file, checked against the file's size."""
    refuse_pickle(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
        try:
            if length > min(size - 8, 100_000_000):
                raise ValueError("header length beyond the file")
            header = json.loads(handle.read(length))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError, RecursionError):
            if prefix[:2] in PICKLE_MAGIC:
                raise CheckpointError(f"{path!r} holds a pickle (a .ckpt/.pt file renamed?); only safetensors are "
                                      "read, because loading a pickle can run code. Convert it to "
                                      ".safetensors") from None
            raise CheckpointError(f"{path!r} is not a safetensors file (or its header is damaged)") from None
    data_start = 8 + length
    problem = header_problem(header)
    if problem:
        raise CheckpointError(f"{path!r} has a damaged safetensors header ({problem}); download or copy it again")
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{path!r} is truncated: the header describes {data_start + end} bytes but the file "
                              f"has {size}; download or copy it again")
    return header, data_start


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def header_problem(header: dict) -> str | None:
    """What is wrong with a parsed safetensors header (entries, dtypes, shapes, offsets, metadata), or None."""
    metadata = header.get("__metadata__")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        return "__metadata__ is not a table of strings"
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            return f"{name}: no known dtype"
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return f"{name}: shape {shape!r}"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"{name}: data_offsets {offsets!r}"
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * DTYPE_BYTES[entry["dtype"]]:
            return f"{name}: {offsets[1] - offsets[0]} bytes for a {entry['dtype']} tensor of shape {shape}"
    return None


def refuse_pickle(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path!r} is a pickled checkpoint; loading one can run arbitrary code, so only "
                              ".safetensors files are read. Convert it to .safetensors (or download that version)")


def tensor_shapes(header: dict) -> dict[str, tuple]:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


# --- writing --------------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_safetensors_stream(path: str, entries: list[tuple[str, str, list[int], object]], metadata: dict[str, str]):
    """Write safetensors from (name, dtype name, shape, source) entries, one tensor in memory at a time.

    source: bytes; (file, offset, length) to copy unchanged bytes in chunks (byte-identical); or
    (make, length), a zero-argument callable that returns the tensor when its turn comes.
    """
    header, offset = {}, 0
    for name, dtype, shape, source in entries:
        length = len(source) if isinstance(source, bytes) else source[-1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + length]}
        offset += length
    if metadata:
        header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, dtype, _, source in entries:
            if isinstance(source, bytes):
                out.write(source)
            elif len(source) == 2:
                data = _tensor_bytes(source[0]().to(SAFETENSORS_DTYPES[dtype]))
                if len(data) != source[1]:
                    raise CheckpointError(f"{name}: produced {len(data)} bytes, expected {source[1]}")
                out.write(data)
            else:
                _copy_range(source, out)


def _copy_range(source: tuple[str, int, int], out) -> None:
    file, start, length = source
    with open(file, "rb") as handle:
        handle.seek(start)
        while length:
            chunk = handle.read(min(length, 64 << 20))
            if not chunk:
                raise CheckpointError(f"{file!r} ended early while copying; is it being modified?")
            out.write(chunk)
            length -= len(chunk)


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str, metadata: dict[str, str] | None = None,
                            overwrite: bool = True) -> str:
    """Save tensors with `atomic_write`; returns the path written."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda staging: save_file(tensors, staging, metadata=metadata), overwrite=overwrite)


# --- identity -----------------------------------------------------------------------------------------------
_HASHES: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file (cached per path, size and mtime: a base checkpoint is hashed once per process)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(16 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
