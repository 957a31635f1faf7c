"""Weight files by hand: the safetensors format, every header field checked, and a hub model's files.

The format: 8 bytes little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw little-endian tensor bytes,
offsets counted from the end of the header. Nothing in it is executable, unlike a pickle.
"""
import json
import os
import struct
from pathlib import Path

import torch

from lib.downloads import DownloadError, hub_file
from lib.files import atomic_write, read_json, short

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100_000_000  # the reference implementation's limit; larger means a corrupt file


def is_size(x):
    """A JSON integer >= 0. bool is an int in Python, but true is no size."""
    return type(x) is int and x >= 0


def _numel(shape):
    """Elements in a tensor of this shape, or None when torch cannot hold it: its sizes and strides
    are int64, and the strides multiply the dimensions with zeros counted as ones."""
    n = 1
    for d in shape:
        n *= max(d, 1)
        if n >= 2**63:  # stop here: a long list of huge dimensions would multiply out to a giant int
            return None
    return 0 if 0 in shape else n


def read_safetensors_header(path):
    """Parse and validate the header before any tensor is allocated. Returns (entries, data_start)
    with entries sorted by offset; raises ValueError naming the file and the fault."""
    size = os.path.getsize(path)

    def bad(why):
        return ValueError(f"{path}: not a valid safetensors file: {why}")

    with open(path, "rb") as f:
        if size < 8:
            raise bad(f"only {size} bytes")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise bad(f"header length {n} is over the {MAX_HEADER} byte limit")
        if 8 + n > size:
            raise bad(f"header length {n} runs past the end of the {size}-byte file")
        header = read_json(f.read(n), lambda why: bad(f"header is {why}"))
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad(f"__metadata__ {short(metadata)} is not an object of strings")
    entries = [_header_entry(name, info, bad) for name, info in header.items()]
    entries.sort()
    end = 0
    for begin, stop, name, _, _ in entries:  # the tensors must tile the data: no gap, no overlap
        if begin != end:
            raise bad(f"tensor {short(name)} starts at {begin}, expected {end} (overlap or gap)")
        end = stop
    if 8 + n + end != size:
        raise bad(f"8 + header {n} + data {end} bytes != file size {size} (truncated or trailing bytes)")
    return entries, 8 + n


def _header_entry(name, info, bad):
    """(begin, end, name, dtype, shape) for one tensor's header entry, once every field is checked."""
    if not isinstance(info, dict):
        raise bad(f"tensor {short(name)} is {short(info)}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"tensor {short(name)} has unknown dtype {short(dtype)}")
    numel = _numel(shape) if isinstance(shape, list) and all(is_size(d) for d in shape) else None
    if numel is None:
        raise bad(f"tensor {short(name)} has shape {short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_size(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"tensor {short(name)} has data_offsets {short(offsets)}")
    nbytes = numel * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"tensor {short(name)} of shape {short(shape)} {dtype} needs {nbytes} bytes, "
                  f"its offsets {offsets} hold {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1], name, SAFETENSORS_DTYPES[dtype], shape


def iter_safetensors(path):
    """Yield (name, tensor) one at a time, so a 6 GB file never needs 6 GB of extra memory."""
    entries, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        for begin, end, name, dtype, shape in entries:
            raw = torch.empty(end - begin, dtype=torch.uint8)  # fresh, aligned memory
            f.seek(data_start + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise ValueError(f"{path}: file ended inside tensor {short(name)}")
            yield name, raw.view(dtype).reshape(shape)


def read_safetensors(path):
    return dict(iter_safetensors(path))


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} (contiguous, on CPU) as safetensors, atomically."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors here")
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset += t.numel() * t.element_size()
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad with spaces so the data starts 8-byte aligned
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def from_hub(repo, names):
    """The paths of the named files of a hub model repo, downloaded once into the cache."""
    try:
        return tuple(hub_file(repo, name) for name in names)
    except DownloadError as e:
        raise DownloadError(f"{e}. Without the hub: HF_ENDPOINT=<a mirror of it>, or a local directory holding "
                            f"{' and '.join(names)} in place of the name") from None


def read_json_file(path):
    """A JSON object from a file (config.json, adapter.json), read strictly; a fault is a
    ValueError naming the file."""
    return read_json(Path(path).read_bytes(), lambda why: ValueError(f"{path}: {why}"))


def write_json(path, obj):
    """obj as indented JSON, written atomically."""
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())
