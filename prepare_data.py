"""Turn text into token shards that train.py reads with np.memmap.

    python prepare_data.py tinystories                          # -> data/tinystories/{train,val}.bin + meta.json
    python prepare_data.py tinystories --tokenizer=cl100k_base  # 100k vocabulary: stored as uint32
    python prepare_data.py shakespeare
    python prepare_data.py wikitext103                          # and wikitext2
    python prepare_data.py text --input=input.txt --val_fraction=0.1 --out_dir=data/mytext

A shard is llm.c's format: a header of 256 int32 (magic, version, token count), then the tokens.
"""
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- shard format

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# llm.c's (magic, version) for each token width; the magic alone tells the width
FORMATS = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}
MAX_TOKENS = 2**31 - 1  # the count is an int32


def token_dtype(vocab_size):
    """uint16 when every id fits (< 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _header(dtype, count):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = FORMATS[dtype]
    header[2] = count
    return header.tobytes()


@contextmanager
def shard_writer(path, vocab_size):
    """Write a shard in pieces: `with shard_writer(p, n) as write: write(tokens); ...`.
    The tokens go to p + '.tmp' behind a header whose count is filled in at the end; only a
    complete file is renamed to p, and an error (or Ctrl-C) leaves nothing behind."""
    path, dtype = Path(path), token_dtype(vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    count = 0

    def write(tokens):
        nonlocal count
        tokens = np.asarray(tokens)
        if tokens.size and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab_size:
            raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), got {int(tokens.min())}..{int(tokens.max())}")
        count += tokens.size
        if count > MAX_TOKENS:
            raise ValueError(f"{path}: more than {MAX_TOKENS} tokens do not fit the header's int32 count")
        f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())

    try:
        with open(tmp, "wb") as f:
            f.write(_header(dtype, 0))
            yield write
            f.seek(0)
            f.write(_header(dtype, count))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tokens(path, tokens, vocab_size):
    """Write a whole shard at once."""
    with shard_writer(path, vocab_size) as write:
        write(tokens)


def read_tokens(path):
    """The tokens of a shard as a read-only np.memmap, after checking that the file is one:
    known magic and version, and a length that matches the header's token count exactly."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is too short for the {HEADER_BYTES}-byte header of a token shard")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(x) for x in header[:3])
    dtype = next((d for d, (m, _) in FORMATS.items() if m == magic), None)
    if dtype is None:
        raise ValueError(f"{path}: not a token shard (magic {magic}, expected "
                         f"{' or '.join(str(m) for m, _ in FORMATS.values())})")
    if version != FORMATS[dtype][1]:
        raise ValueError(f"{path}: version {version} does not go with magic {magic} (expected {FORMATS[dtype][1]})")
    expected = HEADER_BYTES + count * dtype.itemsize
    if count < 0 or size != expected:
        fault = "truncated" if size < expected else "longer than its header says (an unfinished write?)"
        raise ValueError(f"{path}: the header promises {count} {dtype.name} tokens ({expected} bytes) but the "
                         f"file has {size} bytes: {fault}")
    if count == 0:
        return np.zeros(0, dtype=dtype.newbyteorder("<"))
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(count,))
