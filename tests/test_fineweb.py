"""prepare_data.py fineweb-edu against tiktoken, through the loopback hub mirror serving generated
parquet files in sample/10BT's layout; and the loader that reads a split of many shards."""
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import namedtuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import prepare_data
from conftest import ROOT
from lib import datasets
from test_prepare_data import GPT2, WORDS, expect_fail, hub, main, sentence, tokens  # noqa: F401 (hub: a fixture)

REPO = "HuggingFaceFW/fineweb-edu"
BASE = f"datasets/{REPO}/resolve/main/"
NAMES = ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet", "sample/10BT/002_00000.parquet"]
S = 1000  # --shard_tokens in these tests


def document(rng):
    """A web page's text: lines of words, some unicode, sometimes a literal <|endoftext|>."""
    text = "\n".join(sentence(rng, 25) for _ in range(rng.randint(1, 10)))
    return text + " the <|endoftext|> string is text here" if rng.random() < 0.05 else text


def fineweb_parquet(texts, rng):
    """A file with sample/10BT's columns, in row groups of 7 rows."""
    n = len(texts)
    table = pa.table({
        "text": texts, "id": [f"<urn:uuid:{rng.getrandbits(64):016x}>" for _ in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.com/{i}" for i in range(n)],
        "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n, "language": ["en"] * n,
        "language_score": [0.9] * n, "token_count": [len(GPT2.encode_ordinary(t)) for t in texts],
        "score": [3.1] * n, "int_score": [3] * n})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=7)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus():
    """{name: (parquet bytes, texts)} for the three files, and the token stream they make: EOT, then
    the document, for each document of each file in order (recomputed with tiktoken alone)."""
    rng = random.Random(28)
    files = {}
    for name, n in zip(NAMES, (80, 40, 60)):
        texts = [document(rng) for _ in range(n)]
        texts[3] = ""  # an empty page is a lone EOT
        files[name] = fineweb_parquet(texts, rng), texts
    stream = [i for _, texts in files.values() for text in texts for i in [GPT2.eot_token, *GPT2.encode_ordinary(text)]]
    return files, np.array(stream)


def serve(hub, corpus):
    for name, (data, _) in corpus[0].items():
        hub.add(BASE + name, data)
    hub.add(BASE + "sample/100BT/000_00000.parquet", b"not this folder")
    hub.add(BASE + "data/CC-MAIN-2024-10/train-00000-of-00020.parquet", b"nor this one")
    hub.add(BASE + "README.md", b"# FineWeb-Edu", lfs=False)


@pytest.fixture
def served(hub, corpus, monkeypatch):
    serve(hub, corpus)
    monkeypatch.setattr(prepare_data, "BATCH_CHARS", 2000)  # many batches, cut anywhere by the shards
    return hub


def run(out, *args):
    main(["fineweb-edu", f"--out_dir={out}", f"--shard_tokens={S}", *args])


def shards(out):
    """{name: tokens} of the shards in a folder."""
    return {p.name: tokens(p) for p in sorted(out.glob("*.bin"))}


def cdn_gets(hub):
    return [r[2] for r in hub.requests if r[:2] == ("cdn", "GET")]


def stamp(path):
    """The file's identity and age: a rewritten file differs (even if the inode is reused)."""
    return path.stat().st_ino, path.stat().st_mtime_ns


def sha(data):
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- the shards

def test_shards_are_tiktokens_stream_with_eot_before_each_document(tmp_path, served, corpus):
    files, stream = corpus
    run(tmp_path / "out", "--workers=3")
    got = shards(tmp_path / "out")
    n = -(-len(stream) // S)  # shards: val, then train
    assert list(got) == ["train_%06d.bin" % k for k in range(1, n)] + ["val.bin"]
    assert got["val.bin"] == stream[:S].tolist()
    assert [len(got["train_%06d.bin" % k]) for k in range(1, n)] == [S] * (n - 2) + [len(stream) - (n - 1) * S]
    assert sum((got["train_%06d.bin" % k] for k in range(1, n)), []) == stream[S:].tolist()

    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["sources"] == [{"repo": REPO, "file": name, "bytes": len(data), "sha256": sha(data)}
                               for name, (data, _) in files.items()]
    assert meta["splits"]["val"] == {"files": ["val.bin"], "tokens": S,
                                     "documents": int(np.count_nonzero(stream[:S] == GPT2.eot_token))}
    assert meta["splits"]["train"]["tokens"] == len(stream) - S
    documents = sum(len(texts) for _, texts in files.values())
    assert meta["splits"]["val"]["documents"] + meta["splits"]["train"]["documents"] == documents
    assert (meta["options"], meta["max_tokens"], meta["dtype"]) == ({"shard_tokens": S}, 0, "uint16")
    assert not (tmp_path / "out" / "meta.json.partial").exists()

    # each file fetched once, then deleted: the cache keeps the hub's list of files only
    assert sorted(cdn_gets(served)) == sorted(sha(data) for data, _ in files.values())
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == ["10BT.json"]

    served.requests.clear()
    run(tmp_path / "out")
    assert served.requests == []  # already prepared: no network at all


def test_every_stream_position_is_recorded_where_a_shard_ends(tmp_path, served, corpus):
    """A shard's "end" is (file, row, ids of that row's document already written): where a resumed run
    starts. Recomputed here from the documents' lengths."""
    files, _ = corpus
    run(tmp_path / "out")
    lengths = [(f, r, 1 + len(GPT2.encode_ordinary(t))) for f, (_, texts) in enumerate(files.values())
               for r, t in enumerate(texts)]
    ends = np.cumsum([n for _, _, n in lengths])
    written = 0
    for shard in json.loads((tmp_path / "out" / "meta.json").read_text())["shards"]:
        written += shard["tokens"]
        j = int(np.searchsorted(ends, written))
        assert shard["end"] == [lengths[j][0], lengths[j][1], written - int(ends[j]) + lengths[j][2]], shard


def test_max_tokens_bounds_train_and_leaves_val_alone(tmp_path, served, corpus):
    files, stream = corpus
    run(tmp_path / "out", "--max_tokens=2500", "--workers=1")  # one worker: little read ahead
    got = shards(tmp_path / "out")
    assert got == {"val.bin": stream[:S].tolist(), "train_000001.bin": stream[S:2 * S].tolist(),
                   "train_000002.bin": stream[2 * S:3 * S].tolist(), "train_000003.bin": stream[3 * S:3500].tolist()}
    first = files[NAMES[0]][0]
    assert len(stream[:3500]) < sum(1 + len(GPT2.encode_ordinary(t)) for t in files[NAMES[0]][1])
    assert cdn_gets(served) == [sha(first)]  # the other files are not needed: never downloaded
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["max_tokens"], meta["splits"]["train"]["tokens"]) == (2500, 2500)

    # all of it: the full shards are kept, the short last one is redone, and the result is a fresh run's
    inodes = {name: stamp(tmp_path / "out" / name) for name in got}
    run(tmp_path / "out")
    run(tmp_path / "fresh")
    assert shards(tmp_path / "out") == shards(tmp_path / "fresh")
    for name in ("val.bin", "train_000001.bin", "train_000002.bin"):
        assert stamp(tmp_path / "out" / name) == inodes[name]

    # fewer again: the shards past --max_tokens go (train.py would read them), nothing is fetched
    served.requests.clear()
    run(tmp_path / "out", "--max_tokens=1000")
    assert sorted(shards(tmp_path / "out")) == ["train_000001.bin", "val.bin"]
    assert cdn_gets(served) == []


def test_stopped_run_carries_on_from_its_last_shard_byte_identical(tmp_path, served, corpus, monkeypatch):
    files, stream = corpus
    reader = prepare_data.fineweb_documents

    def stopped(*args):  # Ctrl-C in the middle of the second file
        for i, doc in enumerate(reader(*args)):
            if i == 60:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(prepare_data, "fineweb_documents", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out", "--workers=1")  # little read ahead: shards are written before the stop
    out = tmp_path / "out"
    partial = json.loads((out / "meta.json.partial").read_text())
    done = [s["file"] for s in partial["shards"]]
    assert len(done) >= 3 and sorted(p.name for p in out.iterdir()) == sorted(done + ["meta.json.partial"])
    before = {name: stamp(out / name) for name in done}

    encoded = []
    encode = prepare_data.encode_documents
    monkeypatch.setattr(prepare_data, "fineweb_documents", reader)
    monkeypatch.setattr(prepare_data, "encode_documents", lambda enc, docs: encoded.extend(docs) or encode(enc, docs))
    run(tmp_path / "out")
    run(tmp_path / "fresh")
    assert shards(out) == shards(tmp_path / "fresh")
    assert all(stamp(out / name) == ino for name, ino in before.items())  # finished shards untouched
    # the resumed run tokenized from the document its last shard ended in (and then the fresh run all)
    file, row, _ = partial["shards"][-1]["end"]
    first = sum(len(texts) for _, texts in list(files.values())[:file]) + row
    total = sum(len(texts) for _, texts in files.values())
    assert len(encoded) == (total - first) + total


def test_dropped_connection_stops_with_one_line_and_the_rerun_carries_on(tmp_path, served, corpus, capsys):
    served.fail_status[BASE + NAMES[1]] = [503] * 5  # the downloader's five tries all fail
    expect_fail(capsys, ["fineweb-edu", f"--out_dir={tmp_path / 'out'}", f"--shard_tokens={S}", "--workers=1"],
                "failed after 5 tries", "The finished shards are kept: run the same command again to carry on")
    partial = json.loads((tmp_path / "out" / "meta.json.partial").read_text())
    assert partial["shards"] and all(s["end"][0] == 0 for s in partial["shards"])
    run(tmp_path / "out")
    run(tmp_path / "fresh")
    assert shards(tmp_path / "out") == shards(tmp_path / "fresh")


@pytest.mark.slow
def test_killed_process_carries_on_byte_identical(tmp_path, served, corpus):
    """kill -9 while the run waits to retry the third file: the rerun, a new process, finishes the
    job and its shards equal an uninterrupted run's."""
    served.fail_status[BASE + NAMES[2]] = [503] * 3
    env = {**os.environ, "HF_ENDPOINT": served.url, "GPT2REF_CACHE": str(tmp_path / "cache")}
    driver = "import sys, prepare_data; prepare_data.BATCH_CHARS = 2000; prepare_data.main(sys.argv[1:])"
    argv = [sys.executable, "-c", driver, "fineweb-edu", f"--out_dir={tmp_path / 'out'}", f"--shard_tokens={S}",
            "--workers=1"]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    third = BASE + NAMES[2]
    deadline = time.monotonic() + 120
    while not any(r[2] == third for r in served.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads((tmp_path / "out" / "meta.json.partial").read_text())
    done = [s["file"] for s in partial["shards"]]
    assert len(done) >= 5 and set(shards(tmp_path / "out")) == set(done)  # whole shards, all recorded
    served.fail_status.clear()
    assert subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    run(tmp_path / "fresh")
    assert shards(tmp_path / "out") == shards(tmp_path / "fresh")
    assert not list((tmp_path / "out").glob("*.tmp"))  # what the kill left half-written is gone


# ----------------------------------------------------------------------------- the hub and the disk

def test_listing_pages_keep_downloads_and_offline_rerun(tmp_path, served, corpus, monkeypatch):
    files, _ = corpus
    served.page_size = 1  # the hub splits long listings into pages linked by a Link header
    run(tmp_path / "out", "--keep_downloads=True")
    assert len([r for r in served.requests if r[2].startswith("api/")]) == len(NAMES)
    cached = tmp_path / "cache" / "datasets" / REPO
    assert sorted(str(p.relative_to(cached)) for p in cached.rglob("*.parquet")) == NAMES
    served.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run(tmp_path / "again")  # the listing and the files from the cache
    assert served.requests == [] and shards(tmp_path / "again") == shards(tmp_path / "out")


def test_disk_space_is_checked_before_any_download(tmp_path, served, corpus, monkeypatch, capsys):
    """With --max_tokens the need is exact: 2 bytes per token of val and train, and the largest
    parquet file, when the shards and the cache share a disk."""
    files, _ = corpus
    need = (S + 2500) * 2 + max(len(data) for data, _ in files.values())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(prepare_data.shutil, "disk_usage", lambda path: usage(10**12, 0, need - 1))
    err = expect_fail(capsys, ["fineweb-edu", f"--out_dir={tmp_path / 'out'}", f"--shard_tokens={S}",
                               "--max_tokens=2500"], "not enough disk space", "--max_tokens", "GPT2REF_CACHE")
    assert f"need {prepare_data.size_text(need)} and the disk has {prepare_data.size_text(need - 1)} free" in err
    assert cdn_gets(served) == [] and not list((tmp_path / "out").iterdir())
    monkeypatch.setattr(prepare_data.shutil, "disk_usage", lambda path: usage(10**12, 0, need))
    run(tmp_path / "out", "--max_tokens=2500")
    assert "the disk needs 7.0 kB for shards" in capsys.readouterr().out  # (1000 + 2500) x 2 bytes


# ----------------------------------------------------------------------------- mistakes

def test_fineweb_mistakes_are_one_line(tmp_path, hub, corpus, capsys, monkeypatch):
    out = f"--out_dir={tmp_path / 'out'}"
    cases = [
        (["fineweb-edu", out, "--max_tokens=1.5"], "--max_tokens=1.5 is not a whole number of tokens"),
        (["fineweb-edu", out, "--shard_tokens=0"], "--shard_tokens=0.0 is out of range: it must be [1, 2147483647]"),
        (["fineweb-edu", out, "--shard_tokens=3e9"], "is out of range"),
        (["fineweb-edu", out, "--max_tokens=-1"], "--max_tokens=-1.0 is out of range: it must be >= 0"),
        (["text", out, "--input=x.txt", "--keep_downloads=True"], "--keep_downloads applies to fineweb-edu, not text"),
        (["tinystories", out, "--max_tokens=5"], "--max_tokens applies to fineweb-edu, not tinystories"),
        (["fineweb-edu", out], f"api/datasets/{REPO}/tree/main/sample%2F10BT: 404"),  # nothing served yet
        (["fineweb-edu", out], "Without it: HF_ENDPOINT=<a mirror of the hub>"),
    ]
    for argv, message in cases:
        expect_fail(capsys, argv, message)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), argv
    serve(hub, corpus)
    expect_fail(capsys, ["fineweb-edu", out, "--shard_tokens=1e6"], "fewer tokens than a val shard of "
                "--shard_tokens=1000000 and some to train on")
    hub.add(BASE + NAMES[0], pq_bytes({"content": ["no text column"]}))
    expect_fail(capsys, ["fineweb-edu", out], "000_00000.parquet: no 'text' column (it has content)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2REF_CACHE", str(tmp_path / "empty"))
    expect_fail(capsys, ["fineweb-edu", out], "is not cached and HF_HUB_OFFLINE forbids asking the hub")
    asked = len(hub.requests)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    expect_fail(capsys, ["fineweb-edu", out], "pip install pyarrow")
    assert len(hub.requests) == asked  # checked before the hub is asked anything


def pq_bytes(columns):
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- reading a split of many shards

def write_split(folder, sizes, block):
    """Shards val.bin and train_000001.bin, ...: shard k holds k * 10000 + 0, 1, 2, ... so that a
    window says where it came from."""
    folder.mkdir(exist_ok=True)
    datasets.write_tokens(folder / "val.bin", np.arange(block * 3), 50257)
    for k, n in enumerate(sizes, start=1):
        datasets.write_tokens(folder / f"train_{k:06d}.bin", k * 10000 + np.arange(n), 50257)
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}))


def test_batches_draw_every_window_of_every_shard_alike(tmp_path):
    block, sizes = 8, [40, 9, 25, 5]  # the last shard is shorter than a window: never drawn
    write_split(tmp_path / "d", sizes, block)
    datasets.read_meta(str(tmp_path / "d"), block)
    get_batch = datasets.batch_loader(str(tmp_path / "d"), 64, block, "cpu", seed=3)
    windows = [(k, s) for k, n in enumerate(sizes, start=1) for s in range(n - block)]  # 32 + 1 + 17
    seen = []
    for it in range(40):
        x, y = get_batch("train", it, 0)
        assert torch.equal(x[:, 1:], y[:, :-1]) and ((y - x) == 1).all()  # one shard's consecutive tokens
        seen += [(int(row[0]) // 10000, int(row[0]) % 10000) for row in x]
        offsets = torch.randint(len(windows), (64,), generator=torch.Generator().manual_seed(
            datasets.seed_for(3, "train", it, 0)))
        assert seen[-64:] == [windows[i] for i in offsets.tolist()]  # the draw, recomputed
    assert set(seen) == set(windows)


def test_one_shard_split_draws_as_before(tmp_path):
    """train.bin alone: the same windows as the one-file loader drew, so earlier runs resume exactly."""
    (tmp_path / "d").mkdir()
    tokens_ = np.random.default_rng(0).integers(0, 50000, 3000)
    for split in ("train", "val"):
        datasets.write_tokens(tmp_path / "d" / f"{split}.bin", tokens_, 50257)
    x, _ = datasets.batch_loader(str(tmp_path / "d"), 4, 16, "cpu", seed=5)("train", 2, 1)
    gen = torch.Generator().manual_seed(datasets.seed_for(5, "train", 2, 1))
    starts = torch.randint(3000 - 16, (4,), generator=gen)
    assert x.tolist() == [tokens_[s:s + 16].tolist() for s in starts.tolist()]


def test_a_split_is_one_file_or_numbered_shards_not_both(tmp_path, capsys):
    write_split(tmp_path / "d", [30, 30], 8)
    datasets.write_tokens(tmp_path / "d" / "train.bin", np.arange(30), 50257)
    with pytest.raises(SystemExit):
        datasets.read_meta(str(tmp_path / "d"), 8)
    assert "holds both train.bin and train_*.bin shards" in capsys.readouterr().err
    (tmp_path / "d" / "train.bin").unlink()
    with pytest.raises(SystemExit):
        datasets.read_meta(str(tmp_path / "d"), 30)
    assert "has 30 tokens in its longest shard: too few for --block_size=30" in capsys.readouterr().err


@pytest.mark.slow
def test_train_py_reads_a_prepared_fineweb_folder(tmp_path, served):
    import train
    run(tmp_path / "data" / "fw")
    train.main([f"--data_dir={tmp_path / 'data'}", "--dataset=fw", f"--out_dir={tmp_path / 'run'}", "--n_layer=1",
                "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=2", "--eval_iters=1",
                "--eval_interval=2", "--device=cpu", "--dtype=float32", "--sample_tokens=0", "--peak_flops=1e12"])
    assert (tmp_path / "run" / "ckpt.pt").exists()
