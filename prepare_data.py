"""Turn text into token shards that train.py reads with np.memmap.

    python prepare_data.py tinystories                          # -> data/tinystories/{train,val}.bin + meta.json
    python prepare_data.py tinystories --tokenizer=cl100k_base  # 100k vocabulary: stored as uint32
    python prepare_data.py plays                                # shipped with the code: no download
    python prepare_data.py shakespeare
    python prepare_data.py wikitext103                          # and wikitext2
    python prepare_data.py text --input=input.txt --val_fraction=0.1 --out_dir=data/mytext
    python prepare_data.py text --input=stories/ --documents=paragraphs  # *.txt under stories/; EOT per paragraph

A shard is llm.c's format: a header of 256 int32 (magic, version, token count), then the tokens,
uint16 when the vocabulary fits, else uint32. Every document is followed by the EOT token. Text is
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
For text, plays and shakespeare, val is the last --val_fraction of the bytes, starting at the first line
after that point (a document crossing it is cut in two): deterministic, and val is text the model
has not seen any of.
"""
import codecs
import json
import os
import re
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
        for rows, total in datasets.wikitext_rows(path):
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


def tokenize(path, read, enc, workers, desc):
    """Write the shard at path from the segments read(bar) yields; returns (tokens, documents).
    Threads encode batches (tiktoken releases the GIL) while this one reads ahead and writes the
    results in order, so the bytes never depend on the number of workers. At most 2 x workers
    batches are in flight: memory does not grow with the input."""
    tokens = documents = 0
    pending, start = deque(), time.perf_counter()
    with datasets.shard_writer(path, enc.n_vocab) as write, ThreadPoolExecutor(workers) as pool, \
            tqdm(desc=desc, unit="B", unit_scale=True, disable=None) as bar:

        def write_oldest():
            nonlocal tokens
            ids = pending.popleft().result()
            write(ids)
            tokens += len(ids)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start) / 1e6:.2f}M tokens/s", refresh=False)

        for batch in batches(read(bar)):
            pending.append(pool.submit(encode, enc, batch))
            documents += sum(ends for _, ends in batch)
            if len(pending) >= 2 * workers:
                write_oldest()
        while pending:
            write_oldest()
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
    "dataset": "",              # or the first argument: tinystories, plays, shakespeare, wikitext103, wikitext2, text
    "out_dir": "",              # default data/<dataset>
    "tokenizer": "gpt2",        # any tiktoken encoding, e.g. cl100k_base
    "version": 2,               # tinystories: 2 = TinyStoriesV2-GPT4 (GPT-4 stories only), 1 = the original files
    "input": "",                # text: files and folders, comma-separated
    "documents": "files",       # text: "files" (each file one document) or "paragraphs" (split on blank lines)
    "val_fraction": 0.1,        # (0, 1); text, plays, shakespeare: the last this much of the bytes is val
    "url": SHAKESPEARE_URL,     # shakespeare: where input.txt comes from (a mirror, say)
    "errors": "strict",         # undecodable UTF-8: "strict" stops and says where, "replace" substitutes U+FFFD
    "workers": 0,               # >= 0; tokenizing threads, 0 = one per core
    "force": False,             # redo the splits that are already prepared
}

# ----------------------------------------------------------------------------- main

APPLIES_TO = {"version": {"tinystories"}, "input": {"text"}, "documents": {"text"},
              "val_fraction": {"text", "plays", "shakespeare"}, "url": {"shakespeare"},
              "errors": {"tinystories", "text", "plays", "shakespeare"}}
CHOICES = {"version": (1, 2), "documents": ("files", "paragraphs"), "errors": ("strict", "replace")}


def check(cfg):
    """Every mistake in the options, before anything is downloaded or written."""
    name = cfg["dataset"]
    if name not in DATASETS:
        cli.fail(f"{'unknown dataset ' + repr(name) if name else 'no dataset given'}: choose from {', '.join(DATASETS)}")
    for key, names in APPLIES_TO.items():
        if cfg[key] != DEFAULTS[key] and name not in names:
            cli.fail(f"--{key} applies to {' and '.join(sorted(names))}, not {name}")
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            cli.fail(f"--{key}={cfg[key]!r} is not one of {', '.join(map(repr, choices))}")
    if urlsplit(cfg["url"]).scheme not in ("http", "https"):
        cli.fail(f"--url={cfg['url']!r} is not an http(s) URL")
    if name.startswith("wikitext"):
        datasets.require_pyarrow()


def settings(cfg, enc):
    """What the shards depend on: a re-run with the same settings and sources skips the work."""
    used = {key: cfg[key] for key, names in APPLIES_TO.items() if cfg["dataset"] in names and key != "input"}
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
        if {k: v for k, v in record.items() if k != "splits"} == current:
            return record
    return {}


def finished(record, split, sources, out_dir):
    """Is the split's shard there, intact, and made from these sources?"""
    entry = record.get("splits", {}).get(split, {})
    if [{k: v for k, v in s.items() if k != "sha256"} for s in entry.get("sources", [])] != sources:
        return False
    try:
        return len(datasets.read_tokens(out_dir / entry["file"])) == entry["tokens"]
    except (OSError, ValueError, KeyError):
        return False


def write_json(path, obj):
    with files.atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and not argv[0].endswith(".py"):
        argv[0] = f"--dataset={argv[0]}"  # the dataset may come first, bare
    more = [a for a in argv[1:] if a in DATASETS]
    if more:
        cli.fail(f"one dataset at a time: got {argv[0].partition('=')[2]} and {', '.join(more)}; "
                 f"run prepare_data.py once for each")
    cfg = cli.configure(DEFAULTS, argv, doc=__doc__, source=__file__)
    check(cfg)
    try:
        enc = datasets.get_tokenizer(cfg["tokenizer"])
    except (ValueError, downloads.DownloadError) as e:
        cli.fail(str(e))
    plan = DATASETS[cfg["dataset"]](cfg)  # checks --input before any folder is made
    out_dir = Path(os.path.expanduser(cfg["out_dir"]) or Path("data") / cfg["dataset"])
    cli.writable_dir(out_dir)
    current = settings(cfg, enc)
    record = {} if cfg["force"] else load_record(out_dir, current)
    done = {split: record["splits"][split] for split in SPLITS if finished(record, split, plan[split][0], out_dir)}
    if len(done) == len(SPLITS):
        print(f"{out_dir} is already prepared (--force to redo it)")
        return
    (out_dir / "meta.json").unlink(missing_ok=True)  # it would describe shards about to change

    todo = [split for split in SPLITS if split not in done]
    paths = {split: [fetch(source) for source in plan[split][0]] for split in todo}
    digests = {path: files.file_sha256(path) for path in {path for split in todo for path in paths[split]}}
    workers = cfg["workers"] or os.cpu_count()
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
