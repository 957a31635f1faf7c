"""The data formats the scripts share: the tokenizer, token shards and batches, meta.json, the Alpaca prompt.

prepare_data.py writes shards, train.py reads them; finetune_alpaca.py trains on the Alpaca prompt
and sample.py --instruction builds the same one.

A shard is llm.c's format: a header of 256 int32 (magic, version, token count), then the tokens,
uint16 when the vocabulary fits, else uint32, little-endian.
"""
import functools
import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import torch

from lib.cli import fail
from lib.downloads import DownloadError
from lib.files import atomic_write

# ----------------------------------------------------------------------------- shard format

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# llm.c's (magic, version) for each token width; the magic alone tells the width
FORMATS = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}
MAX_TOKENS = 2**31 - 1  # the count is an int32
ID_BOUND = 3  # the header's int32 that holds one more than the largest id (0: not recorded; llm.c leaves it 0)


def token_dtype(vocab_size):
    """uint16 when every id fits (< 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _header(dtype, count, id_bound=0):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = FORMATS[dtype]
    header[2], header[ID_BOUND] = count, id_bound
    return header.tobytes()


@contextmanager
def shard_writer(path, vocab_size):
    """Write a shard in pieces: `with shard_writer(p, n) as write: write(tokens); ...`.
    The tokens go behind a header whose count is filled in at the end, through atomic_write:
    only a complete file takes the name p, and an error (or Ctrl-C) leaves nothing behind."""
    path, dtype = Path(path), token_dtype(vocab_size)
    count = id_bound = 0

    def write(tokens):
        nonlocal count, id_bound
        tokens = np.asarray(tokens)
        if tokens.size and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab_size:
            raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), "
                             f"got {int(tokens.min())}..{int(tokens.max())}")
        id_bound = max(id_bound, int(tokens.max()) + 1 if tokens.size else 0)
        count += tokens.size
        if count > MAX_TOKENS:
            raise ValueError(f"{path}: more than {MAX_TOKENS} tokens do not fit the header's int32 count")
        f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())

    with atomic_write(path) as f:
        f.write(_header(dtype, 0))
        yield write
        f.seek(0)
        f.write(_header(dtype, count, id_bound))


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


def id_bound(path):
    """One more than the largest token id in a shard: from its header where prepare_data.py recorded
    it, else read from the tokens, 16M at a time."""
    recorded = int(np.fromfile(path, dtype="<i4", count=HEADER_INTS)[ID_BOUND])
    if recorded:
        return recorded
    tokens = read_tokens(path)
    return max((int(tokens[i:i + 2**24].max()) + 1 for i in range(0, len(tokens), 2**24)), default=0)


# ----------------------------------------------------------------------------- the tokenizer

GPT2_BPE = Path(__file__).with_name("gpt2_bpe")  # GPT-2's vocab.bpe and encoder.json, as OpenAI released them


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer():
    """tiktoken's gpt2 encoding, built as tiktoken builds it, from the files in lib/gpt2_bpe/ rather
    than downloaded ones (tiktoken checks their sha256 against the ones it expects)."""
    from tiktoken_ext import openai_public
    cache = os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # "": read the files, cache nothing
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            str(GPT2_BPE / "vocab.bpe"), str(GPT2_BPE / "encoder.json"),
            vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
    finally:
        os.environ.pop("TIKTOKEN_CACHE_DIR")
        if cache is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return tiktoken.Encoding(name="gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def get_tokenizer(name="gpt2"):
    """A tiktoken encoding: gpt2 (GPT-2's BPE, 50257 ids, from the files shipped in lib/gpt2_bpe/)
    or e.g. cl100k_base (100k ids), whose file tiktoken fetches on first use; an unknown name is a
    ValueError, a failed fetch a DownloadError."""
    if name == "gpt2":
        return gpt2_tokenizer()
    try:
        return tiktoken.get_encoding(name)
    except ValueError:
        raise ValueError(f"unknown tokenizer {name!r}: choose one of {', '.join(tiktoken.list_encoding_names())}") from None
    except OSError as e:  # requests' errors are OSErrors too
        raise DownloadError(f"tiktoken could not fetch the {name} BPE file ({type(e).__name__}); without a network, "
                            "set TIKTOKEN_CACHE_DIR to a folder that holds it") from None


# ----------------------------------------------------------------------------- batches

# the datasets prepare_data.py knows by name (besides `text`, any local files)
NAMED_DATASETS = ("tinystories", "plays", "shakespeare", "wikitext103", "wikitext2", "fineweb-edu")


def split_shards(folder, split):
    """The shards of a split: <split>.bin, or else <split>_000001.bin, <split>_000002.bin, ... in name
    order, for a split too big for one file (as prepare_data.py fineweb-edu writes train)."""
    numbered = sorted(name for name in os.listdir(folder) if re.fullmatch(rf"{split}_\d+\.bin", name))
    single = os.path.join(folder, f"{split}.bin")
    if numbered and os.path.exists(single):
        fail(f"{folder} holds both {split}.bin and {split}_*.bin shards: remove the ones that are not this dataset's")
    return [os.path.join(folder, name) for name in numbered] or [single]


def seed_for(*key):
    """A 63-bit seed from any key like (seed, "train", iteration, index); the same in every process
    and every Python (unlike hash(), which is salted for strings)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_loader(folder, batch_size, block_size, device, seed):
    """get_batch(split, key, index) -> (x, y), each (batch_size, block_size): windows of the split's
    tokens at offsets drawn from a generator seeded by (seed, split, key, index). key is the
    iteration for training batches and "eval" for the fixed evaluation batches. A split of several
    shards is one pool of windows, none crossing from one shard to the next."""
    shards = {split: split_shards(folder, split) for split in ("train", "val")}
    # the windows up to the end of each shard: an offset below the last picks a shard and a place in it
    ends = {split: np.cumsum([max(len(read_tokens(path)) - block_size, 0) for path in paths])
            for split, paths in shards.items()}

    def get_batch(split, key, index):
        gen = torch.Generator().manual_seed(seed_for(seed, split, key, index))
        offsets = torch.randint(int(ends[split][-1]), (batch_size,), generator=gen).numpy()
        which = np.searchsorted(ends[split], offsets, side="right")
        starts = offsets - np.concatenate([[0], ends[split]])[which]
        # opened per batch, as nanoGPT does: a long-lived memmap lets touched pages pile up in RSS
        tokens = {k: read_tokens(shards[split][k]) for k in set(which.tolist())}
        rows = np.stack([tokens[k][s:s + block_size + 1] for k, s in zip(which, starts)])
        rows = torch.from_numpy(rows.astype(np.int64))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if device.startswith("cuda"):  # page-locked memory lets the copy overlap with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
    return get_batch


def read_meta(folder, block_size):
    """meta.json of a prepared dataset, after checking it and that both shards are there and long enough."""
    path = os.path.join(folder, "meta.json")
    name = os.path.basename(folder)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        how = (f"python prepare_data.py {name}" if name in NAMED_DATASETS else
               f"python prepare_data.py text --input=your.txt --out_dir={folder}")
        fail(f"no dataset in {folder} (meta.json is missing): prepare one with `{how}` or point "
             f"--data_dir/--dataset at it")
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {e}; prepare the dataset again with prepare_data.py")
    vocab_size = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), str):
        fail(f"{path} names no tokenizer: prepare the dataset again with prepare_data.py")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        fail(f"{path}: vocab_size must be a positive int, got {vocab_size!r}; prepare the dataset again")
    for split in ("train", "val"):
        shards = split_shards(folder, split)
        try:
            count = max(len(read_tokens(path)) for path in shards)
        except (OSError, ValueError) as e:
            fail(f"{split} split of {folder}: {e}")
        if count <= block_size:
            longest = " in its longest shard" if len(shards) > 1 else ""
            fail(f"the {split} split of {folder} has {count} tokens{longest}: too few for --block_size={block_size}")
        bound = max(id_bound(path) for path in shards)
        if bound > vocab_size:
            fail(f"the {split} split of {folder} holds token id {bound - 1}, beyond meta.json's vocab_size={vocab_size}: "
                 f"the shards and meta.json disagree; prepare the dataset again")
    return meta


# ----------------------------------------------------------------------------- parquet files

def require_pyarrow():
    """Check, before anything is downloaded, that parquet files (WikiText's, FineWeb-Edu's) can be read."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        fail("the dataset comes as parquet files, which need pyarrow: pip install pyarrow")


def parquet_texts(path, first_row=0):
    """The 'text' column of a parquet file from row first_row on, in lists of up to 1024 strings, with
    the file's total row count: yields (texts, total). Memory does not grow with the file nor with its
    row groups: they are read through a 4 MB buffer, not whole."""
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        fail(f"{path}: not a parquet file ({e})")
    if "text" not in parquet.schema_arrow.names:
        fail(f"{path}: no 'text' column (it has {', '.join(parquet.schema_arrow.names)})")
    meta, group, skip = parquet.metadata, 0, first_row
    while group < meta.num_row_groups and skip >= meta.row_group(group).num_rows:
        skip -= meta.row_group(group).num_rows
        group += 1
    if group == meta.num_row_groups:
        return
    for batch in parquet.iter_batches(batch_size=1024, columns=["text"], row_groups=range(group, meta.num_row_groups)):
        texts = batch.column(0).slice(min(skip, len(batch)))
        skip = max(skip - len(batch), 0)
        if texts.null_count:
            fail(f"{path}: a row has no text (null); is the file damaged?")
        yield texts.to_pylist(), meta.num_rows


# ----------------------------------------------------------------------------- the Alpaca prompt

# Stanford Alpaca's templates (github.com/tatsu-lab/stanford_alpaca, train.py's PROMPT_DICT), verbatim
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
RESPONSE_SEPARATOR = "\n"  # between "### Response:" and the response; part of the prompt


def alpaca_prompt(instruction, input=""):
    """Everything the model reads before the response, in training and at inference."""
    template = PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input) + RESPONSE_SEPARATOR
