"""The safetensors file format, read and written with torch alone (no pickle: loading runs no code).

Layout: an 8-byte little-endian unsigned header length ``N``; ``N`` bytes of JSON
``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}`` (padded
with spaces to a multiple of 8); then the tensors' raw little-endian bytes, back to back, offsets counted from the
end of the header. The ``safetensors`` package reads what this writes and the other way round (tested).
"""
from __future__ import annotations

import ctypes
import io
import json
import os
import struct
import sys

import torch
from torch import Tensor

from .files import atomic_write

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _check_byte_order() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("oialr's safetensors reader and writer run on little-endian machines only")


def _raw_bytes(tensor: Tensor) -> bytes:
    """The bytes of ``tensor`` in row-major order (copied to a contiguous CPU tensor first)."""
    tensor = tensor.detach().to("cpu").contiguous()
    size = tensor.numel() * tensor.element_size()
    return ctypes.string_at(tensor.data_ptr(), size) if size else b""


def save_file(tensors: dict[str, Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> tensor, any layout and device) to ``path`` atomically; ``metadata`` is a dict of
    strings stored in the header. Each tensor's bytes are written once per name (the caller drops aliases)."""
    _check_byte_order()
    header: dict[str, object] = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ValueError(f"safetensors metadata must map str to str, got {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which this writer does not store; "
                             f"supported: {', '.join(str(d) for d in _NAMES)}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)

    def write(f: io.BufferedWriter) -> None:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for tensor in tensors.values():
            f.write(_raw_bytes(tensor))

    atomic_write(path, write)


def read_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
    """``(entries, metadata, data_start)`` of the file at ``path``: ``entries`` maps each tensor name to its
    ``dtype``, ``shape`` and ``data_offsets``; nothing but the header is read. ``ValueError`` on a malformed file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ValueError(f"{path} is not a safetensors file: header length {length} exceeds the file size {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - length
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}; readable: {', '.join(DTYPES)}")
        shape, (begin, end) = entry["shape"], entry["data_offsets"]
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * DTYPES[dtype].itemsize or not 0 <= begin <= end <= data_size:
            raise ValueError(f"{path}: tensor {name!r} ({dtype}, shape {shape}) has data_offsets {[begin, end]} that "
                             f"do not fit its size or the file")
    return header, metadata, 8 + length


def load_file(path: str) -> dict[str, Tensor]:
    """Every tensor of the file at ``path`` as a CPU tensor, in the file's order."""
    _check_byte_order()
    entries, _, start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, entry in entries.items():
            begin, end = entry["data_offsets"]
            dtype = DTYPES[entry["dtype"]]
            if begin == end:
                tensors[name] = torch.empty(entry["shape"], dtype=dtype)
                continue
            f.seek(start + begin)
            tensors[name] = torch.frombuffer(bytearray(f.read(end - begin)), dtype=dtype).reshape(entry["shape"])
    return tensors
