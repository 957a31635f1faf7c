"""Turn text into token shards that train.py reads with np.memmap.

    python prepare_data.py tinystories                          # -> data/tinystories/{train,val}.bin + meta.json
    python prepare_data.py tinystories --tokenizer=cl100k_base  # 100k vocabulary: stored as uint32
    python prepare_data.py plays                                # shipped with the code: no download
    python prepare_data.py shakespeare
    python prepare_data.py wikitext103                          # and wikitext2
    python prepare_data.py text --input=input.txt --val_fraction=0.1 --out_dir=data/mytext
    python prepare_data.py text --input=stories/ --documents=paragraphs  # *.txt under stories/; EOT per paragraph
    python prepare_data.py fineweb-edu                          # sample/10BT: ~10B tokens in shards of 100M
    python prepare_data.py fineweb-edu --max_tokens=1e9         # val, then the first 1B tokens to train on

A shard is llm.c's format: a header of 256 int32 (magic, version, token count), then the tokens,
uint16 when the vocabulary fits, else uint32. Every document is followed by the EOT token (in
fineweb-edu, preceded by it, as llm.c and build-nanogpt have FineWeb). Text is
read in blocks and tokenized in batches by several threads, so memory stays flat however big the
input, and the output bytes are the same whatever the number of threads.

What counts as a document:
  tinystories   the text between lines holding <|endoftext|>, stripped, empty ones dropped. The
                text before the first and after the last separator of each file is dropped too:
                the files are cut from a longer stream, and those ends can be broken stories.
  wikitext*     one article: the rows from one ` = Title = ` row to the next, joined as the lines
                they were (an empty row is an empty line), stripped.
  text          each file whole (--documents=files, the default), or the paragraphs between blank
                lines (--documents=paragraphs); stripped, empty ones dropped. Folders give every
                *.txt file inside them, sorted by path. A file is one stream of text by default, as
                nanoGPT has input.txt: with paragraphs, a model trained on a play learns to end every
                speech with EOT, and samples stop there. Paragraphs suit a file of short separate
                texts, one per paragraph.
  plays         like text by default, on lib/plays/shakespeare.txt: nine of Shakespeare's plays,
                1.2 MB, shipped with the code (lib/plays/README.md says where from).
  shakespeare   like text by default, on one file: one document per split.
  fineweb-edu   one row of the parquet files of HuggingFaceFW/fineweb-edu's sample/10BT, as it is.
                The files, in order, are one stream of tokens cut into shards of --shard_tokens:
                the first is val.bin, the rest train_000001.bin, train_000002.bin, ... A file is
                downloaded, tokenized and deleted before the next; a stopped run, started again,
                carries on from its last complete shard (see fineweb()).
For text, plays and shakespeare, val is the last --val_fraction of the bytes, starting at the first line
after that point (a document crossing it is cut in two): deterministic, and val is text the model
has not seen any of.
"""
import codecs
import contextlib
import functools
import json
import os
import re
import shutil
import stat
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from tqdm import tqdm

from lib import cli, datasets, downloads, files

# ----------------------------------------------------------------------------- reading text

BLOCK_BYTES = 1 << 22  # read files 4 MB at a time
LONG_DOC = 1 << 22     # characters; a longer document is tokenized in pieces (see safe_cut)
BLANK_LINE = re.compile(r"\n\s*\n")
EOT_TEXT = "<|endoftext|>"


def read_text(path, start, stop, errors, bar):
    """The text of bytes [start, stop) of a file, decoded as UTF-8 block by block. Undecodable bytes
    stop the run with where they are, or become U+FFFD with errors="replace"."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    pos = start
    with open(path, "rb") as f:
        f.seek(start)
        while pos < stop:
            data = f.read(min(BLOCK_BYTES, stop - pos))
            if not data:
                cli.fail(f"{path} shrank while being read")
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = decoder.decode(data, final=pos + len(data) == stop)
            except UnicodeDecodeError as e:
                where = pos - pending + e.start
                cli.fail(f"{path}: invalid UTF-8 at byte {where} (line {line_number(path, where)}); "
                         f"fix the file or pass --errors=replace")
            if pos == 0:
                text = text.removeprefix("\ufeff")  # a byte order mark is not text
            pos += len(data)
            bar.update(len(data))
            yield text


def line_number(path, offset):
    """1 + the line breaks before offset, for error messages."""
    breaks = 0
    with open(path, "rb") as f:
        while offset > 0 and (block := f.read(min(offset, BLOCK_BYTES))):
            breaks += block.count(b"\n")
            offset -= len(block)
    return breaks + 1


def safe_cut(text):
    """Where a long document can be cut without changing its tokens: after a line break that
    follows a non-space and precedes a letter. The pre-tokenizing regexes of gpt2, cl100k_base and
    o200k_base all end a piece there, so tokenizing the two halves gives the same ids as the whole."""
    i = len(text)
    while (i := text.rfind("\n", 0, i)) > 0:
        if not text[i - 1].isspace() and text[i + 1:i + 2].isalpha():
            return i + 1
    return None


def paragraphs(ranges, per_file, errors, bar):
    """(text, ends_document) segments of the documents in byte ranges (path, start, stop) of text
    files: paragraphs between blank lines, or each range whole when per_file. A document longer
    than LONG_DOC goes out in pieces as it is read, so memory does not grow with it."""
    bar.reset(total=sum(stop - start for _, start, stop in ranges))
    for path, start, stop in ranges:
        doc = ""
        for text in read_text(path, start, stop, errors, bar):
            doc += text
            if not per_file:
                *done, doc = BLANK_LINE.split(doc)
                for d in done:
                    if d := d.strip():
                        yield d, True
            while len(doc) > LONG_DOC and (cut := safe_cut(doc)):
                # what is left starts with a letter, so stripping it later only touches its end
                yield doc[:cut].lstrip(), False
                doc = doc[cut:]
        if doc := doc.strip():
            yield doc, True


def stories(path, errors, bar):
    """(story, True) for each TinyStories story in a file; see the module docstring."""
    rest, seen_separator, size = "", False, path.stat().st_size
    bar.reset(total=size)
    for text in read_text(path, 0, size, errors, bar):
        *done, rest = (rest + text).split(EOT_TEXT)
        if done and not seen_separator:
            done, seen_separator = done[1:], True  # the fragment before the first separator
        for story in done:
            if story := story.strip():
                yield story, True
        if len(rest) > LONG_DOC:
            cli.fail(f"{path}: no {EOT_TEXT} in {LONG_DOC:,} characters; is it a TinyStories file?")
    # what follows the last separator may be cut off mid-story: dropped


WIKI_TITLE = re.compile(r" = [^=].* = \n?")


def articles(paths, bar):
    """(article, True) for each article of WikiText parquet files; see the module docstring."""
    lines = []
    bar.reset(total=sum(path.stat().st_size for path in paths))
    for path in paths:
        size = path.stat().st_size
        for rows, total in datasets.parquet_texts(path):
            for row in rows:
                if WIKI_TITLE.fullmatch(row) and (article := "".join(lines).strip()):
                    yield article, True
                    lines = []
                lines.append(row or "\n")
            bar.update(size * len(rows) / total)  # the file's bytes, in proportion
    if article := "".join(lines).strip():
        yield article, True


def split_ranges(paths, val_fraction):
    """{"train": ranges, "val": ranges}: byte ranges (path, start, stop) of the files, val being the
    last val_fraction of all bytes, from the first line that starts at or after that point."""
    sizes = [p.stat().st_size for p in paths]
    at, offset = round(sum(sizes) * (1 - val_fraction)), 0
    ranges = {"train": [], "val": []}
    for path, size in zip(paths, sizes):
        cut = min(max(at - offset, 0), size)
        if 0 < cut < size:  # move the cut to the next line start
            with open(path, "rb") as f:
                f.seek(cut - 1)
                while (block := f.read(1 << 16)) and (nl := block.find(b"\n")) < 0:
                    cut += len(block)
                cut = min(cut + nl if block else size, size)
        if cut:
            ranges["train"].append((path, 0, cut))
        if cut < size:
            ranges["val"].append((path, cut, size))
        offset += size
    if not ranges["train"] or not ranges["val"]:
        cli.fail(f"cannot split the text at {1 - val_fraction:.0%}: no line starts after that point; "
                 f"change --val_fraction or add text")
    return ranges


# ----------------------------------------------------------------------------- tokenizing

BATCH_CHARS = 1 << 20  # text per task handed to a thread


def encode(enc, segments):
    """The ids of (text, ends_document) segments in order, with EOT after each document's end."""
    eot = np.array([enc.eot_token], dtype=np.uint32)
    parts = []
    for text, ends_document in segments:
        # the same ids as encode_ordinary, without building a Python list
        parts.append(enc.encode_to_numpy(text, disallowed_special=()))
        if ends_document:
            parts.append(eot)
    return np.concatenate(parts)


def encode_documents(enc, documents):
    """The ids of whole (text, ...) documents in order, EOT before each (as llm.c's and build-nanogpt's
    FineWeb shards have it), and each document's count of ids, EOT included."""
    eot = np.array([enc.eot_token], dtype=np.uint32)
    parts = [enc.encode_to_numpy(text, disallowed_special=()) for text, *_ in documents]
    return np.concatenate([part for ids in parts for part in (eot, ids)]), np.array([len(ids) + 1 for ids in parts])


def batches(segments):
    batch, chars = [], 0
    for segment in segments:
        batch.append(segment)
        chars += len(segment[0])
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def in_order(work, batches, workers):
    """(batch, work(batch)) for each batch, in order. Threads do the work (tiktoken releases the GIL)
    while this one reads ahead, and the results come out in input order, so what is written never
    depends on the number of workers. At most 2 x workers batches are in flight: memory does not
    grow with the input."""
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for batch in batches:
            pending.append((batch, pool.submit(work, batch)))
            if len(pending) >= 2 * workers:
                batch, done = pending.popleft()
                yield batch, done.result()
        while pending:
            batch, done = pending.popleft()
            yield batch, done.result()


def tokenize(path, read, enc, workers, desc):
    """Write the shard at path from the segments read(bar) yields, tokenized in parallel by
    in_order; returns (tokens, documents)."""
    tokens = documents = 0
    start = time.perf_counter()
    with datasets.shard_writer(path, enc.n_vocab) as write, \
            tqdm(desc=desc, unit="B", unit_scale=True, disable=None) as bar:
        for batch, ids in in_order(functools.partial(encode, enc), batches(read(bar)), workers):
            write(ids)
            tokens += len(ids)
            documents += sum(ends for _, ends in batch)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start) / 1e6:.2f}M tokens/s", refresh=False)
        if tokens == 0:
            cli.fail(f"no text for {path.name}: the input holds no documents")
    return tokens, documents


# ----------------------------------------------------------------------------- datasets

# Each dataset maps its splits to (sources, read): the source files (a hub dataset file, a URL or a
# local path) and read(paths, bar), the (text, ends_document) segments of that split once the
# sources are at paths.
SPLITS = ("train", "val")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
PLAYS = Path(__file__).resolve().parent / "lib" / "plays" / "shakespeare.txt"


def hub(repo, file):
    return {"repo": repo, "file": file}


def tinystories(cfg):
    prefix = {2: "TinyStoriesV2-GPT4", 1: "TinyStories"}[cfg["version"]]
    read = lambda paths, bar: stories(paths[0], cfg["errors"], bar)
    return {"train": ([hub("roneneldan/TinyStories", f"{prefix}-train.txt")], read),
            "val": ([hub("roneneldan/TinyStories", f"{prefix}-valid.txt")], read)}


def wikitext(config, train_shards):
    repo = "Salesforce/wikitext"
    train = [hub(repo, f"{config}/train-{i:05d}-of-{train_shards:05d}.parquet") for i in range(train_shards)]
    return {"train": (train, articles), "val": ([hub(repo, f"{config}/validation-00000-of-00001.parquet")], articles)}


def plain_text(sources, per_file, cfg):
    """Both splits of text files: the same files, cut in two by split_ranges."""
    def reader(split):
        def read(paths, bar):
            return paragraphs(split_ranges(paths, cfg["val_fraction"])[split], per_file, cfg["errors"], bar)
        return read
    return {split: (sources, reader(split)) for split in SPLITS}


def input_stat(path, label):
    """The stat of an --input path (through links), or one line saying why it cannot be read."""
    try:
        return path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            cli.fail(f"{label} is a broken symbolic link to {os.readlink(path)}; fix or remove it")
        cli.fail(f"{label} does not exist")
    except OSError as e:
        cli.fail(f"cannot read {label}: {e.strerror}")


def text_files(cfg):
    """The files named by --input (comma-separated), a folder standing for the *.txt files in it;
    each file once."""
    if not cfg["input"]:
        cli.fail("text needs --input=FILE (several: --input=a.txt,b.txt; or a folder of .txt files)")
    sources, seen = [], {}
    for name in cfg["input"].split(","):
        if not name:
            cli.fail(f"--input={cfg['input']} has an empty item; remove the stray comma")
        path = Path(os.path.expanduser(name))
        found, folder = [path], stat.S_ISDIR(input_stat(path, f"--input {path}").st_mode)
        if folder:
            found = sorted(p for p in path.rglob("*.txt") if not p.is_dir())
            if not found:
                cli.fail(f"--input folder {path} holds no .txt files")
        for file in found:
            label = f"{file} in --input folder {path}" if folder else f"--input {path}"
            info = input_stat(file, label)
            if not stat.S_ISREG(info.st_mode):
                cli.fail(f"{label} is not a regular file; give text files or folders of .txt files")
            key = info.st_dev, info.st_ino  # the same for two spellings, a link, a file inside a listed folder
            if key in seen:
                cli.fail(f"--input names the same file twice: {seen[key]} and {file if folder else name}; "
                         f"list each file once")
            seen[key] = file if folder else name
            try:
                open(file, "rb").close()  # readable at all?
            except OSError as e:
                cli.fail(f"cannot read {label}: {e.strerror}")
            if info.st_size == 0:
                cli.fail(f"{label} is empty")
            sources.append({"path": str(file.resolve()), "bytes": info.st_size, "mtime_ns": info.st_mtime_ns})
    return sources


DATASETS = {
    "tinystories": tinystories,
    "plays": lambda cfg: plain_text([{"path": str(PLAYS)}], True, cfg),
    "shakespeare": lambda cfg: plain_text([{"url": cfg["url"]}], True, cfg),
    "wikitext103": lambda cfg: wikitext("wikitext-103-raw-v1", 2),
    "wikitext2": lambda cfg: wikitext("wikitext-2-raw-v1", 1),
    "text": lambda cfg: plain_text(text_files(cfg), cfg["documents"] == "files", cfg),
}


def fetch(source):
    """The local path of a source, downloaded into the cache first if need be (skipped when there)."""
    try:
        if "repo" in source:
            return downloads.hub_file(source["repo"], source["file"], repo_type="dataset")
        if "url" in source:
            return downloads.web_file(source["url"])
    except downloads.DownloadError as e:
        instead = ("HF_ENDPOINT=<a mirror of the hub>" if "repo" in source else
                   "--url=<another copy>, or a local copy with `python prepare_data.py text --input=input.txt "
                   "--out_dir=data/shakespeare`")
        cli.fail(f"{e}. Without it: {instead}; or any text of your own with `python prepare_data.py text --input=...`")
    return Path(source["path"])


# ----------------------------------------------------------------------------- defaults
# A note like `>= 1` or `[0, 1)` after a setting is its range, which lib/cli.py enforces.
DEFAULTS = {
    "dataset": "",              # or the first argument: tinystories, plays, shakespeare, wikitext103, wikitext2, text, fineweb-edu
    "out_dir": "",              # default data/<dataset>
    "tokenizer": "gpt2",        # any tiktoken encoding, e.g. cl100k_base
    "version": 2,               # tinystories: 2 = TinyStoriesV2-GPT4 (GPT-4 stories only), 1 = the original files
    "input": "",                # text: files and folders, comma-separated
    "documents": "files",       # text: "files" (each file one document) or "paragraphs" (split on blank lines)
    "val_fraction": 0.1,        # (0, 1); text, plays, shakespeare: the last this much of the bytes is val
    "url": SHAKESPEARE_URL,     # shakespeare: where input.txt comes from (a mirror, say)
    "errors": "strict",         # undecodable UTF-8: "strict" stops and says where, "replace" substitutes U+FFFD
    "shard_tokens": 1e8,        # [1, 2147483647]; fineweb-edu: tokens per shard (llm.c's 100M); the first shard is val
    "max_tokens": 0.0,          # >= 0; fineweb-edu: training tokens, the first this many; 0 = all (~10B)
    "keep_downloads": False,    # fineweb-edu: keep each parquet file in the cache once tokenized
    "workers": 0,               # >= 0; tokenizing threads, 0 = one per core
    "force": False,             # redo the splits that are already prepared
}

# ----------------------------------------------------------------------------- main

APPLIES_TO = {"version": {"tinystories"}, "input": {"text"}, "documents": {"text"},
              "val_fraction": {"text", "plays", "shakespeare"}, "url": {"shakespeare"},
              "errors": {"tinystories", "text", "plays", "shakespeare"}, "shard_tokens": {"fineweb-edu"},
              "max_tokens": {"fineweb-edu"}, "keep_downloads": {"fineweb-edu"}}
NAMES = (*DATASETS, "fineweb-edu")  # fineweb-edu is one stream cut into many shards: see fineweb()
CHOICES = {"version": (1, 2), "documents": ("files", "paragraphs"), "errors": ("strict", "replace")}


def check(cfg):
    """Every mistake in the options, before anything is downloaded or written."""
    name = cfg["dataset"]
    if name not in NAMES:
        cli.fail(f"{'unknown dataset ' + repr(name) if name else 'no dataset given'}: choose from {', '.join(NAMES)}")
    for key, names in APPLIES_TO.items():
        if cfg[key] != DEFAULTS[key] and name not in names:
            cli.fail(f"--{key} applies to {' and '.join(sorted(names))}, not {name}")
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            cli.fail(f"--{key}={cfg[key]!r} is not one of {', '.join(map(repr, choices))}")
    if urlsplit(cfg["url"]).scheme not in ("http", "https"):
        cli.fail(f"--url={cfg['url']!r} is not an http(s) URL")
    for key in ("shard_tokens", "max_tokens"):  # floats, so that 1e9 can be written
        if cfg[key] != int(cfg[key]):
            cli.fail(f"--{key}={cfg[key]} is not a whole number of tokens")
        cfg[key] = int(cfg[key])
    if name.startswith("wikitext") or name == "fineweb-edu":
        datasets.require_pyarrow()


def settings(cfg, enc):
    """What the shards depend on: a re-run with the same settings and sources skips the work. (The
    sources say what --input chose; --max_tokens only says how many shards to make.)"""
    used = {key: cfg[key] for key, names in APPLIES_TO.items()
            if cfg["dataset"] in names and key not in ("input", "max_tokens", "keep_downloads")}
    return {"dataset": cfg["dataset"], "tokenizer": enc.name, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token,
            "dtype": datasets.token_dtype(enc.n_vocab).name, "options": used}


def load_record(out_dir, current):
    """The earlier run's meta.json (or, after an interruption, meta.json.partial) if it was made
    with the same settings, else {}."""
    for name in ("meta.json", "meta.json.partial"):
        try:
            record = json.loads((out_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and {k: record.get(k) for k in current} == current:
            return record
    return {}


def intact(shard, out_dir):
    """Is the shard a record describes ({"file", "tokens", ...}) there, whole?"""
    try:
        return len(datasets.read_tokens(out_dir / shard["file"])) == shard["tokens"]
    except (OSError, ValueError, KeyError):
        return False


def finished(record, split, sources, out_dir):
    """Is the split's shard there, intact, and made from these sources?"""
    entry = record.get("splits", {}).get(split, {})
    if [{k: v for k, v in s.items() if k != "sha256"} for s in entry.get("sources", [])] != sources:
        return False
    return intact(entry, out_dir)


def write_json(path, obj):
    with files.atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------- fineweb-edu: one stream, many shards

# The documents of all the files, in order, EOT before each, are one stream of tokens cut into shards
# of --shard_tokens: the first is val.bin, the next train_000001.bin, train_000002.bin, ... (numbered by
# their place in the stream, as llm.c's are). A document may straddle two shards.
FINEWEB_REPO, FINEWEB_FOLDER = "HuggingFaceFW/fineweb-edu", "sample/10BT"
# sample/10BT holds about 10B GPT-2 tokens in 14 parquet files of 28.5 GB: with this ratio, the disk the
# shards need is estimated before any file is read
TOKENS_PER_PARQUET_BYTE = 0.35


def shard_name(k):
    return "val.bin" if k == 0 else f"train_{k:06d}.bin"


def fineweb_sources():
    """The parquet files of sample/10BT as the hub lists them: [{"repo", "file", "bytes", "sha256"}]."""
    try:
        listing = downloads.hub_folder(FINEWEB_REPO, FINEWEB_FOLDER, repo_type="dataset")
    except downloads.DownloadError as e:
        cli.fail(f"{e}. Without it: HF_ENDPOINT=<a mirror of the hub>, or HF_HUB_OFFLINE=1 after a run with "
                 f"--keep_downloads=True")
    sources = [{"repo": FINEWEB_REPO, **f} for f in listing if f["file"].endswith(".parquet")]
    if not sources:
        cli.fail(f"the hub lists no parquet files in {FINEWEB_REPO}/{FINEWEB_FOLDER}")
    return sources


def fineweb_documents(sources, start, keep):
    """(text, file index, row) of each document from start = (file index, row) on. One file is
    downloaded at a time, and deleted once it has been read unless keep."""
    first_file, first_row = start
    for i, source in enumerate(sources[first_file:], start=first_file):
        try:
            path = downloads.hub_file(source["repo"], source["file"], "dataset", source["sha256"], source["bytes"])
        except downloads.DownloadError as e:
            cli.fail(f"{e}. The finished shards are kept: run the same command again to carry on")
        row = first_row if i == first_file else 0
        for texts, _ in datasets.parquet_texts(path, row):
            for text in texts:
                yield text, i, row
                row += 1
        if not keep:
            path.unlink()


def size_text(n):
    """A number of bytes as a person reads it: 28.5 GB, 200.0 MB."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_disk(needs):
    """Refuse with one line, before any work, when a disk has less free space than needs
    ({folder: bytes}) asks of it; folders on one disk add up."""
    disks = {}
    for folder, n in needs.items():
        there = Path(folder).absolute()
        while not there.exists():
            there = there.parent
        disk = disks.setdefault(there.stat().st_dev, {"need": 0, "free": shutil.disk_usage(there).free, "names": []})
        disk["need"] += n
        disk["names"].append(str(folder))
    for disk in disks.values():
        if disk["need"] > disk["free"]:
            cli.fail(f"not enough disk space: {' and '.join(disk['names'])} need {size_text(disk['need'])} and the "
                     f"disk has {size_text(disk['free'])} free; free some space, ask for fewer tokens with --max_tokens, or "
                     f"set --out_dir (the shards) or GPT2REF_CACHE (the downloads) to a bigger disk")


def write_shards(out_dir, meta, sources, start, size, enc, workers, keep, bar):
    """Tokenize the documents from start = [file index, row, ids of that document already written] on,
    and cut them into shards k, k + 1, ... (k = the shards meta holds) of size(k) tokens until size is 0
    or the documents run out. Each complete shard goes into meta["shards"] and meta.json.partial
    with the place where it ends."""
    shards, eot = meta["shards"], enc.eot_token
    file, row, drop = start
    with contextlib.ExitStack() as shard:
        write = None
        for batch, (ids, lengths) in in_order(functools.partial(encode_documents, enc),
                                              batches(fineweb_documents(sources, (file, row), keep)), workers):
            ends = np.cumsum(lengths) - drop  # where each document ends in ids[drop:]
            ids, drop, at = ids[drop:], 0, 0
            while at < len(ids):
                if write is None:
                    k, tokens, docs = len(shards), 0, 0
                    write = shard.enter_context(datasets.shard_writer(out_dir / shard_name(k), enc.n_vocab))
                piece = ids[at:at + size(k) - tokens]
                write(piece)
                at, tokens, docs = at + len(piece), tokens + len(piece), docs + int(np.count_nonzero(piece == eot))
                bar.update(len(piece))
                j = int(np.searchsorted(ends, at))  # the document holding the last token written
                end = [batch[j][1], batch[j][2], int(at - ends[j] + lengths[j])]
                if tokens == size(k):
                    shard.close()  # the shard takes its name, whole
                    shards.append({"file": shard_name(k), "tokens": tokens, "documents": docs, "end": end})
                    write_json(out_dir / "meta.json.partial", meta)
                    write = None
                    if size(k + 1) <= 0:
                        return
        if write is not None and k > 0:  # the stream ended inside a train shard: it is the last one
            shard.close()
            shards.append({"file": shard_name(k), "tokens": tokens, "documents": docs, "end": end})
        if len(shards) < 2:
            cli.fail(f"{FINEWEB_REPO}'s files hold fewer tokens than a val shard of --shard_tokens={size(0)} "
                     f"and some to train on: lower --shard_tokens")


def fineweb(cfg, enc, out_dir, current, workers):
    """prepare_data.py fineweb-edu: carry on from the last complete shard of an earlier run made with the
    same settings from the same files, check the disk, then stream the rest into shards."""
    shard_tokens, max_tokens, keep = cfg["shard_tokens"], cfg["max_tokens"], cfg["keep_downloads"]
    record = {} if cfg["force"] else load_record(out_dir, current)
    if "splits" in record and record["max_tokens"] == max_tokens and all(intact(s, out_dir) for s in record["shards"]):
        print(f"{out_dir} is already prepared (--force to redo it)")
        return
    sources = fineweb_sources()
    if record and record.get("sources") != sources:
        print(f"the hub's files are not those the shards in {out_dir} were made from: starting over")
        record = {}

    def size(k):  # val is a whole shard whatever --max_tokens; train stops at --max_tokens
        return shard_tokens if k == 0 or not max_tokens else min(shard_tokens, max_tokens - (k - 1) * shard_tokens)

    kept = []  # the complete shards of the earlier run that this one wants, from the first on
    for s in record.get("shards", []):
        if s["file"] != shard_name(len(kept)) or not s["tokens"] == size(len(kept)) == shard_tokens \
                or not intact(s, out_dir):
            break
        kept.append(s)
    stale = [p for p in out_dir.iterdir() if re.fullmatch(r"(val|train(_\d+)?)\.bin(\.tmp)?", p.name)  # .tmp: kill -9
             and p.name not in {s["file"] for s in kept}]
    start, more = kept[-1]["end"] if kept else [0, 0, 0], size(len(kept)) > 0

    # the disk: the shards still to write, and one parquet file at a time (all of them with --keep_downloads)
    corpus_bytes = sum(s["bytes"] for s in sources)
    total = shard_tokens + max_tokens if max_tokens else round(TOKENS_PER_PARQUET_BYTE * corpus_bytes)
    shard_bytes = max(total - sum(s["tokens"] for s in kept), 0) * datasets.token_dtype(enc.n_vocab).itemsize
    to_fetch = [s["bytes"] for s in sources[start[0]:] if more and
                not downloads.hub_path(s["repo"], s["file"], "dataset").exists()]
    parquet_bytes = sum(to_fetch) if keep else max(to_fetch, default=0)
    cache = downloads.hub_path(FINEWEB_REPO, FINEWEB_FOLDER, "dataset")
    print(f"fineweb-edu: {len(sources)} files of {FINEWEB_REPO}/{FINEWEB_FOLDER}, {size_text(corpus_bytes)}: "
          f"{'about ' if not max_tokens else ''}{total:,} tokens with val, {len(kept)} shards of them done")
    print(f"the disk needs {size_text(shard_bytes)} for shards in {out_dir} and {size_text(parquet_bytes)} for "
          f"{'the downloads' if keep else 'one download at a time'} in {cache}")
    check_disk({out_dir: shard_bytes - sum(p.stat().st_size for p in stale), cache: parquet_bytes})

    for p in stale:  # shards of an earlier run that this one does not keep: the loader would read them
        p.unlink()
    meta = {**current, "max_tokens": max_tokens, "sources": sources, "shards": kept}
    write_json(out_dir / "meta.json.partial", meta)
    (out_dir / "meta.json").unlink(missing_ok=True)  # it would describe shards about to change
    if more:
        try:
            with tqdm(desc="fineweb-edu", total=total, initial=sum(s["tokens"] for s in kept), unit="tok",
                      unit_scale=True, disable=None) as bar:
                write_shards(out_dir, meta, sources, start, size, enc, workers, keep, bar)
        except OSError as e:  # a full disk
            cli.fail(f"preparing fineweb-edu: {e}. The {len(meta['shards'])} finished shards are kept: "
                     f"run the same command again to carry on")
    if not keep:
        for s in sources:
            downloads.hub_path(s["repo"], s["file"], "dataset").unlink(missing_ok=True)
    shards = meta["shards"]
    meta["splits"] = {split: {"files": [s["file"] for s in part], "tokens": sum(s["tokens"] for s in part),
                              "documents": sum(s["documents"] for s in part)}
                      for split, part in (("val", shards[:1]), ("train", shards[1:]))}
    write_json(out_dir / "meta.json", meta)
    (out_dir / "meta.json.partial").unlink()
    for split, entry in meta["splits"].items():
        names = entry["files"] if len(entry["files"]) < 3 else [entry["files"][0], "...", entry["files"][-1]]
        print(f"{split}: {entry['tokens']:,} tokens of {entry['documents']:,} documents in {', '.join(names)}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and not argv[0].endswith(".py"):
        argv[0] = f"--dataset={argv[0]}"  # the dataset may come first, bare
    more = [a for a in argv[1:] if a in NAMES]
    if more:
        cli.fail(f"one dataset at a time: got {argv[0].partition('=')[2]} and {', '.join(more)}; "
                 f"run prepare_data.py once for each")
    cfg = cli.configure(DEFAULTS, argv, doc=__doc__, source=__file__)
    check(cfg)
    try:
        enc = datasets.get_tokenizer(cfg["tokenizer"])
    except (ValueError, downloads.DownloadError) as e:
        cli.fail(str(e))
    workers = cfg["workers"] or os.cpu_count()
    # each split's sources and reader (fineweb-edu streams instead: see fineweb()); checks --input before any folder is made
    plan = DATASETS[cfg["dataset"]](cfg) if cfg["dataset"] in DATASETS else None
    out_dir = Path(os.path.expanduser(cfg["out_dir"]) or Path("data") / cfg["dataset"])
    cli.writable_dir(out_dir)
    current = settings(cfg, enc)
    if cfg["dataset"] == "fineweb-edu":
        return fineweb(cfg, enc, out_dir, current, workers)
    record = {} if cfg["force"] else load_record(out_dir, current)
    done = {split: record["splits"][split] for split in SPLITS if finished(record, split, plan[split][0], out_dir)}
    if len(done) == len(SPLITS):
        print(f"{out_dir} is already prepared (--force to redo it)")
        return
    (out_dir / "meta.json").unlink(missing_ok=True)  # it would describe shards about to change

    todo = [split for split in SPLITS if split not in done]
    paths = {split: [fetch(source) for source in plan[split][0]] for split in todo}
    digests = {path: files.file_sha256(path) for path in {path for split in todo for path in paths[split]}}
    for split in todo:
        sources, read = plan[split]
        try:
            tokens, documents = tokenize(out_dir / f"{split}.bin", lambda bar: read(paths[split], bar), enc, workers,
                                         desc=f"{cfg['dataset']} {split}")
        except OSError as e:  # a full disk, a file gone missing
            cli.fail(f"preparing {split}: {e}")
        done[split] = {"file": f"{split}.bin", "tokens": tokens, "documents": documents,
                       "sources": [{**s, "sha256": digests[p]} for s, p in zip(sources, paths[split])]}
        write_json(out_dir / "meta.json.partial", {**current, "splits": done})
        print(f"{out_dir / f'{split}.bin'}: {tokens:,} tokens in {documents:,} documents")
    write_json(out_dir / "meta.json", {**current, "splits": {split: done[split] for split in SPLITS}})
    (out_dir / "meta.json.partial").unlink()


if __name__ == "__main__":
    cli.run(main)
