"""prepare_data.py against tiktoken: every dataset from generated files (the hub ones through a
loopback mirror in the real layout), the shard format, re-runs, and every bad input."""
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import prepare_data
from conftest import ROOT, cl100k_or_skip
from hub_mirror import HubMirror
from lib import datasets
from prepare_data import main

GPT2 = tiktoken.get_encoding("gpt2")
WORDS = ("Once upon a time there was a little girl named Lily . She loved to play , and her dog Max "
         "said : \"Hello!\" café naïve déjà vu 日本語 тест 🙂 3.14 1999 it's don't we'll").split()


def sentence(rng, n=12):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))


def paragraph(rng):
    return "\n".join(sentence(rng) for _ in range(rng.randint(1, 4)))


def reference(docs, enc=GPT2):
    """tiktoken's encoding of each document followed by EOT, built independently of prepare_data."""
    ids = []
    for doc in docs:
        ids += enc.encode_ordinary(doc) + [enc.eot_token]
    return ids


def tokens(path):
    return datasets.read_tokens(path).tolist()


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny read blocks and batches so that small test files cross many block and batch boundaries."""
    monkeypatch.setattr(prepare_data, "BLOCK_BYTES", 997)
    monkeypatch.setattr(prepare_data, "BATCH_CHARS", 3000)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(prepare_data.downloads.time, "sleep", lambda s: None)  # retry backoff without waiting
    with HubMirror() as mirror:
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        yield mirror


def expect_fail(capsys, argv, *fragments):
    """main(argv) stops with exit status 2 and one line on stderr holding every fragment."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ----------------------------------------------------------------------------- shard format

def test_the_largest_id_is_recorded_in_the_header_or_read_from_the_tokens(tmp_path):
    """train.py checks a shard's ids against the vocabulary before it starts; prepare_data.py's shards
    say their largest id in the header, llm.c's leave it 0 and are read."""
    tokens = np.random.default_rng(1).integers(0, 40000, 2**24 + 5)
    tokens[-1] = 45000
    datasets.write_tokens(tmp_path / "a.bin", tokens, 50257)
    assert datasets.id_bound(tmp_path / "a.bin") == 45001
    with open(tmp_path / "a.bin", "r+b") as f:  # as llm.c writes it
        f.seek(4 * datasets.ID_BOUND)
        f.write(bytes(4))
    assert datasets.id_bound(tmp_path / "a.bin") == 45001 == int(tokens.max()) + 1


def test_shards_round_trip_in_the_right_width(tmp_path):
    assert datasets.token_dtype(50257) == np.uint16 and datasets.token_dtype(65536) == np.uint16 and datasets.token_dtype(65537) == np.uint32
    datasets.write_tokens(tmp_path / "a.bin", [0, 1, 50256], 50257)
    datasets.write_tokens(tmp_path / "b.bin", np.array([0, 65536, 100276]), 100277)
    a, b = datasets.read_tokens(tmp_path / "a.bin"), datasets.read_tokens(tmp_path / "b.bin")
    assert a.dtype == np.uint16 and a.tolist() == [0, 1, 50256]
    assert b.dtype == np.uint32 and b.tolist() == [0, 65536, 100276]
    header = np.fromfile(tmp_path / "b.bin", dtype="<i4", count=256)
    assert header[:4].tolist() == [20240801, 7, 3, 100277] and not header[4:].any()  # [3]: the largest id + 1
    assert np.fromfile(tmp_path / "a.bin", dtype="<i4", count=3).tolist() == [20240520, 1, 3]
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 3 * 2
    with pytest.raises(ValueError, match="70000"):  # never wrapped into uint16
        datasets.write_tokens(tmp_path / "c.bin", [70000], 50257)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_read_tokens_rejects_truncated_overlong_and_foreign_files(tmp_path):
    datasets.write_tokens(tmp_path / "good.bin", np.arange(100), 50257)
    good = (tmp_path / "good.bin").read_bytes()
    header = np.frombuffer(good[:1024], dtype="<i4").copy()
    header[1] = 7
    cases = {"truncated.bin": (good[:-2], "truncated"),
             "overlong.bin": (good + b"\0\0", "longer than its header"),
             "foreign.bin": (b"PK\3\4" + bytes(2000), "not a token shard"),
             "short.bin": (good[:100], "too short"),
             "version.bin": (header.tobytes() + good[1024:], "version 7")}
    for name, (data, fault) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=fault) as e:
            datasets.read_tokens(tmp_path / name)
        assert name in str(e.value)


# ----------------------------------------------------------------------------- local text

def split_reference(data, val_fraction=0.1):
    """The documented split of a file's bytes: val starts at the first line start at or after the
    last val_fraction."""
    at = round(len(data) * (1 - val_fraction))
    cut = data.index(b"\n", at - 1) + 1
    return data[:cut].decode().removeprefix("\ufeff"), data[cut:].decode()


def test_text_paragraphs_match_tiktoken(tmp_path, small_blocks):
    rng = random.Random(0)
    paras = [paragraph(rng) for _ in range(300)]
    paras[5] += " a literal <|endoftext|> stays text"
    text = "\ufeff\n\n" + "".join(p + rng.choice(["\n\n", "\n \n\t\n", "\n\n\n"]) for p in paras)
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    main(["text", f"--input={tmp_path / 'in.txt'}", "--documents=paragraphs", f"--out_dir={tmp_path / 'out'}"])

    train, val = split_reference(text.encode())
    for split, part in (("train", train), ("val", val)):
        docs = [d.strip() for d in re.split(r"\n\s*\n", part) if d.strip()]
        assert tokens(tmp_path / "out" / f"{split}.bin") == reference(docs), split
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot_token"] == 50256
    assert meta["dtype"] == "uint16"
    assert meta["splits"]["val"]["tokens"] == len(datasets.read_tokens(tmp_path / "out" / "val.bin"))
    assert meta["splits"]["train"]["sources"][0]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_text_folder_one_document_per_file(tmp_path, small_blocks):
    rng = random.Random(1)
    files = {"b.txt": paragraph(rng) * 20, "a.txt": "\n  " + paragraph(rng) * 30 + "\n\n",
             "sub/c.txt": "\n\n".join(paragraph(rng) for _ in range(80)), "notes.md": "not text input"}
    for name, text in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    main(["text", f"--input={tmp_path / 'in'}", "--documents=files", "--val_fraction=0.3",
          f"--out_dir={tmp_path / 'out'}"])

    ordered = [files[n].encode() for n in ("a.txt", "b.txt", "sub/c.txt")]
    train, val = split_reference(b"".join(ordered), 0.3)
    sizes = np.cumsum([len(d) for d in ordered])
    assert len(train.encode()) > sizes[1]  # the split falls inside the last file, cutting it in two
    docs = [d.decode() for d in ordered[:2]] + [train.encode()[sizes[1]:].decode()]
    assert tokens(tmp_path / "out" / "train.bin") == reference(d.strip() for d in docs)
    assert tokens(tmp_path / "out" / "val.bin") == reference([val.strip()])


def test_text_is_one_stream_per_file_by_default(tmp_path):
    """A play is one document, not one per speech: EOT only at the end of each split, so a model
    trained on it does not learn to stop after every speech."""
    rng = random.Random(10)
    text = "".join(f"{rng.choice(['ROMEO', 'JULIET'])}:\n{paragraph(rng)}\n\n" for _ in range(200))
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    main(["text", f"--input={tmp_path / 'play.txt'}", f"--out_dir={tmp_path / 'out'}"])
    train, val = split_reference(text.encode())
    assert tokens(tmp_path / "out" / "train.bin") == reference([train.strip()])
    assert tokens(tmp_path / "out" / "val.bin") == reference([val.strip()])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["options"]["documents"] == "files"
    assert [meta["splits"][s]["documents"] for s in ("train", "val")] == [1, 1]


def test_home_folder_in_paths_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    text = "\n".join(sentence(random.Random(i)) for i in range(100))
    (tmp_path / "home" / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "home" / "b.txt").write_text(text[::-1], encoding="utf-8")
    main(["text", "--input=~/a.txt,~/b.txt", "--out_dir=~/data/x"])
    out = tmp_path / "home" / "data" / "x"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert list((tmp_path / "cwd").iterdir()) == []  # no folder named ~
    sources = json.loads((out / "meta.json").read_text())["splits"]["train"]["sources"]
    assert [s["path"] for s in sources] == [str(tmp_path / "home" / n) for n in ("a.txt", "b.txt")]


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_long_document_is_tokenized_in_pieces_with_the_same_ids(name, tmp_path, monkeypatch, small_blocks):
    enc = cl100k_or_skip() if name == "cl100k_base" else GPT2
    monkeypatch.setattr(prepare_data, "LONG_DOC", 1500)
    rng = random.Random(2)
    # one document per file, with blank lines in it: cutting after just any line break would change
    # the ids ("\n\n" is one token in both vocabularies)
    text = "  " + "".join(sentence(rng, 30) + rng.choice(["", ".", " ", "\r", " 12", "'"]) +
                          rng.choice(["\n", "\n", "\n\n", "\n \n", "\n\n\n"]) for _ in range(800))
    (tmp_path / "long.txt").write_text(text + "\n\n" + text, encoding="utf-8")
    main(["text", f"--input={tmp_path / 'long.txt'}", "--documents=files", f"--tokenizer={name}",
          "--val_fraction=0.5", f"--out_dir={tmp_path / 'out'}"])
    assert tokens(tmp_path / "out" / "train.bin") == reference([text.strip()], enc)
    assert tokens(tmp_path / "out" / "val.bin") == reference([text.strip()], enc)


def test_cl100k_base_is_stored_as_uint32(tmp_path):
    enc = cl100k_or_skip()
    paras = ["The quick brown fox jumps over the lazy dog " + str(i) + " 日本語の文章" for i in range(50)]
    (tmp_path / "in.txt").write_text("\n\n".join(paras), encoding="utf-8")
    main(["text", f"--input={tmp_path / 'in.txt'}", "--tokenizer=cl100k_base", "--val_fraction=0.2",
          "--documents=paragraphs", f"--out_dir={tmp_path / 'out'}"])
    train, val = datasets.read_tokens(tmp_path / "out" / "train.bin"), datasets.read_tokens(tmp_path / "out" / "val.bin")
    assert train.dtype == np.uint32 and train.max() > 65535
    assert train.tolist() + val.tolist() == reference(paras, enc)  # the split falls between paragraphs here
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["dtype"], meta["vocab_size"], meta["eot_token"]) == ("uint32", 100277, 100257)


def test_output_bytes_do_not_depend_on_workers(tmp_path, monkeypatch, small_blocks):
    monkeypatch.setattr(prepare_data, "BATCH_CHARS", 500)
    rng = random.Random(3)
    (tmp_path / "in.txt").write_text("\n\n".join(paragraph(rng) for _ in range(2000)), encoding="utf-8")
    assert (tmp_path / "in.txt").stat().st_size > 100 * prepare_data.BATCH_CHARS  # many batches
    shards = []
    for workers in (1, 4, 4):
        out = tmp_path / f"out{len(shards)}"
        main(["text", f"--input={tmp_path / 'in.txt'}", "--documents=paragraphs", f"--workers={workers}",
              f"--out_dir={out}"])
        shards.append([(out / f"{split}.bin").read_bytes() for split in ("train", "val")])
    assert shards[0] == shards[1] == shards[2]


# ----------------------------------------------------------------------------- datasets through the mirror

TS = "datasets/roneneldan/TinyStories/resolve/main/"


def tinystories_file(rng, n):
    """Stories between <|endoftext|> lines, with stray spaces, and broken fragments at both ends.
    Returns the file's text and the stories prepare_data must keep."""
    stories = [" ".join(sentence(rng) + "." for _ in range(rng.randint(1, 6))) for _ in range(n)]
    body = "".join(f"{rng.choice(['', ' ', '  '])}{s}{rng.choice(['', ' '])}\n<|endoftext|>\n" for s in stories)
    text = ("Spot. Spot saw the broken start.\n<|endoftext|>\n" + body +
            "\n<|endoftext|>\n  a story cut short\n<|endoftext|>\nand the broken end")
    return text, stories + ["a story cut short"]


@pytest.mark.parametrize("version,prefix", [(2, "TinyStoriesV2-GPT4"), (1, "TinyStories")])
def test_tinystories_from_the_hub(tmp_path, hub, small_blocks, version, prefix):
    rng = random.Random(version)
    files = {}
    for split, name in (("train", "train"), ("val", "valid")):
        files[split] = text, stories = tinystories_file(rng, 150)
        hub.add(f"{TS}{prefix}-{name}.txt", text.encode())
    main(["tinystories", f"--version={version}", f"--out_dir={tmp_path / 'out'}"])

    for split, (text, stories) in files.items():
        assert tokens(tmp_path / "out" / f"{split}.bin") == reference(stories), split
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["options"] == {"version": version, "errors": "strict"}
    source = meta["splits"]["val"]["sources"][0]
    assert source == {"repo": "roneneldan/TinyStories", "file": f"{prefix}-valid.txt",
                      "sha256": hashlib.sha256(files["val"][0].encode()).hexdigest()}
    assert meta["splits"]["train"]["documents"] == len(files["train"][1])


def test_rerun_skips_and_force_redoes(tmp_path, hub):
    rng = random.Random(5)
    for name in ("train", "valid"):
        hub.add(f"{TS}TinyStoriesV2-GPT4-{name}.txt", tinystories_file(rng, 50)[0].encode())
    out = tmp_path / "out"
    main(["tinystories", f"--out_dir={out}"])
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    hub.requests.clear()

    main(["tinystories", f"--out_dir={out}"])
    assert hub.requests == []
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before

    (out / "val.bin").write_bytes((out / "val.bin").read_bytes()[:-2])  # a damaged split is redone, alone
    main(["tinystories", f"--out_dir={out}"])
    assert (out / "train.bin").stat().st_ino == before["train.bin"][0]
    assert len(datasets.read_tokens(out / "val.bin")) == json.loads((out / "meta.json").read_text())["splits"]["val"]["tokens"]

    main(["tinystories", f"--out_dir={out}", "--force"])
    assert hub.requests == []  # the verified downloads are reused
    assert all((out / n).stat().st_ino != before[n][0] for n in before)
    assert [p.name for p in sorted(out.iterdir())] == ["meta.json", "train.bin", "val.bin"]


def test_interrupted_download_resumes(tmp_path, hub):
    rng = random.Random(6)
    texts = {name: tinystories_file(rng, n)[0].encode() for name, n in (("train", 10000), ("valid", 50))}
    assert len(texts["train"]) > 1_300_000  # more than the downloader's 1 MiB chunk reaches the disk
    for name, data in texts.items():
        hub.add(f"{TS}TinyStoriesV2-GPT4-{name}.txt", data)
    hub.cut_after[f"{TS}TinyStoriesV2-GPT4-train.txt"] = 1_200_000
    main(["tinystories", f"--out_dir={tmp_path / 'out'}"])
    cdn = [r for r in hub.requests if r[:3] == ("cdn", "GET", hashlib.sha256(texts["train"]).hexdigest())]
    assert len(cdn) == 2 and cdn[0][3] is None and 0 < int(cdn[1][3].strip("bytes=-")) <= 1_200_000
    cached = tmp_path / "cache" / "datasets" / "roneneldan" / "TinyStories" / "TinyStoriesV2-GPT4-train.txt"
    assert cached.read_bytes() == texts["train"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]["train"]["documents"] == 10001


def test_interrupted_run_keeps_the_finished_split_only(tmp_path, hub, monkeypatch):
    rng = random.Random(7)
    for name in ("train", "valid"):
        hub.add(f"{TS}TinyStoriesV2-GPT4-{name}.txt", tinystories_file(rng, 50)[0].encode())
    stories = prepare_data.stories

    def interrupted(path, errors, bar):
        for i, story in enumerate(stories(path, errors, bar)):
            if i == 20 and "valid" in path.name:
                raise KeyboardInterrupt
            yield story

    monkeypatch.setattr(prepare_data, "stories", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["tinystories", f"--out_dir={out}", "--workers=1"])
    assert sorted(p.name for p in out.iterdir()) == ["meta.json.partial", "train.bin"]
    train = (out / "train.bin").stat().st_ino

    monkeypatch.setattr(prepare_data, "stories", stories)
    main(["tinystories", f"--out_dir={out}"])
    assert (out / "train.bin").stat().st_ino == train  # the finished split was kept
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    meta = json.loads((out / "meta.json").read_text())
    assert [meta["splits"][s]["tokens"] for s in ("train", "val")] == [len(datasets.read_tokens(out / f"{s}.bin"))
                                                                       for s in ("train", "val")]


def test_bad_utf8_stops_with_its_place_and_keeps_the_finished_split(tmp_path, capsys, small_blocks):
    rng = random.Random(7)
    good = "\n\n".join(paragraph(rng) for _ in range(200)).encode()
    (tmp_path / "in.txt").write_bytes(good + b"\n\nbad \xff byte\n")
    out, line = tmp_path / "out", good.count(b"\n") + 3
    expect_fail(capsys, ["text", f"--input={tmp_path / 'in.txt'}", "--val_fraction=0.05", f"--out_dir={out}"],
                f"invalid UTF-8 at byte {len(good) + 6} (line {line})", "--errors=replace")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json.partial", "train.bin"]
    train = (out / "train.bin").stat().st_ino

    main(["text", f"--input={tmp_path / 'in.txt'}", "--val_fraction=0.05", f"--out_dir={out}", "--errors=replace"])
    assert (out / "train.bin").stat().st_ino != train  # --errors is a setting: everything is redone
    assert GPT2.decode(tokens(out / "val.bin")).endswith("bad \ufffd byte<|endoftext|>")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def wikitext_parquet(rng, n_articles):
    """Rows as in Salesforce/wikitext's raw configs: one line each, '' for an empty line."""
    rows, articles = [], []
    for a in range(n_articles):
        title = " ".join(rng.choice(WORDS).capitalize() for _ in range(2))
        lines = ["", f" = {title} {a} = \n", ""]
        for s in range(rng.randint(1, 3)):
            lines += [f" {sentence(rng, 40)} \n", ""]
            lines += [f" = = {title} section {s} = = \n", "", f" {sentence(rng, 40)} = x = y \n", ""]
        rows += lines
        articles.append("".join(line or "\n" for line in lines).strip())
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": rows}), buffer, row_group_size=100)
    return buffer.getvalue(), articles


def test_wikitext_from_the_hub(tmp_path, hub):
    rng = random.Random(8)
    expected = {"train": [], "val": []}
    base = "datasets/Salesforce/wikitext/resolve/main/wikitext-103-raw-v1/"
    for name, split in (("train-00000-of-00002", "train"), ("train-00001-of-00002", "train"),
                        ("validation-00000-of-00001", "val")):
        data, articles = wikitext_parquet(rng, 40)
        hub.add(f"{base}{name}.parquet", data)
        expected[split] += articles
    main(["wikitext103", f"--out_dir={tmp_path / 'out'}"])
    for split in ("train", "val"):
        assert tokens(tmp_path / "out" / f"{split}.bin") == reference(expected[split]), split
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert [s["file"] for s in meta["splits"]["train"]["sources"]] == [
        "wikitext-103-raw-v1/train-00000-of-00002.parquet", "wikitext-103-raw-v1/train-00001-of-00002.parquet"]


def test_shakespeare_first_90_percent_train(tmp_path, hub):
    rng = random.Random(9)
    text = "".join(f"{rng.choice(['FIRST CITIZEN', 'ALL'])}:\n{paragraph(rng)}\n\n" for _ in range(300))
    path = "karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    hub.add(path, text.encode(), lfs=False)
    main(["shakespeare", f"--url={hub.url}/{path}", f"--out_dir={tmp_path / 'out'}"])
    train, val = split_reference(text.encode())
    assert abs(len(val) / len(text) - 0.1) < 0.01
    assert tokens(tmp_path / "out" / "train.bin") == reference([train.strip()])
    assert tokens(tmp_path / "out" / "val.bin") == reference([val.strip()])


def test_plays_ship_with_the_code_and_need_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shipped = ROOT / "lib" / "plays" / "shakespeare.txt"
    digest = hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert digest in (ROOT / "lib" / "plays" / "README.md").read_text()  # the file its README describes
    main(["plays", f"--out_dir={tmp_path / 'out'}"])
    train, val = split_reference(shipped.read_bytes())
    assert "\nPROSPERO:\n" in val and "\nPROSPERO:\n" not in train  # The Tempest is held out
    assert tokens(tmp_path / "out" / "train.bin") == reference([train.strip()])
    assert tokens(tmp_path / "out" / "val.bin") == reference([val.strip()])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["val"]["sources"] == [{"path": str(shipped), "sha256": digest}]


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, hub, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"ok \xe9t\xe9\n" * 100)
    (tmp_path / "one_line.txt").write_text("no line break to split at")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    ok = str(tmp_path / "one_line.txt")
    out = f"--out_dir={tmp_path / 'out'}"
    not_wikitext = io.BytesIO()
    pq.write_table(pa.table({"line": ["a", "b"]}), not_wikitext)
    for name in ("train-00000-of-00001", "validation-00000-of-00001"):
        hub.add(f"datasets/Salesforce/wikitext/resolve/main/wikitext-2-raw-v1/{name}.parquet", not_wikitext.getvalue())
    cases = [
        (["nosuch", out], "unknown dataset 'nosuch': choose from tinystories, plays, shakespeare, wikitext103"),
        ([out], "no dataset given"),
        (["text", out], "text needs --input"),
        (["text", "--input=/no/such.txt", out], "/no/such.txt does not exist"),
        (["text", f"--input={tmp_path / 'empty.txt'}", out], "is empty"),
        (["text", f"--input={tmp_path / 'folder'}", out], "holds no .txt files"),
        (["text", f"--input={ok}", out], "cannot split the text at 90%: no line starts after that point"),
        (["text", f"--input={ok}", "--tokenizer=nosuch", out], "unknown tokenizer 'nosuch': choose one of"),
        (["text", f"--input={tmp_path / 'bad.txt'}", out], "bad.txt: invalid UTF-8 at byte 3 (line 1)"),
        (["text", f"--input={ok}", f"--out_dir={tmp_path / 'a_file' / 'sub'}"], "cannot write to --out_dir"),
        (["text", f"--input={ok}", "--val_fraction=1.5", out], "--val_fraction=1.5"),
        (["text", f"--input={ok}", "--documents=lines", out], "--documents='lines' is not one of"),
        (["text", f"--input={ok}", "--version=1", out], "--version applies to tinystories, not text"),
        (["text", f"--input={ok}", "--nosuch=1", out], "unknown option --nosuch"),
        (["shakespeare", "--url=ftp://x/y", out], "not an http(s) URL"),
        (["tinystories", out], "404"),
        (["tinystories", out], "Without it: HF_ENDPOINT=<a mirror of the hub>; or any text of your own with "
                               "`python prepare_data.py text --input=...`"),
        (["shakespeare", f"--url={hub.url}/no/input.txt", out], "Without it: --url=<another copy>, or a local copy "
         "with `python prepare_data.py text --input=input.txt"),
        (["wikitext2", out], "train-00000-of-00001.parquet: no 'text' column (it has line)"),
    ]
    for argv, message in cases:
        expect_fail(capsys, argv, message)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), argv
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    expect_fail(capsys, ["wikitext2", out], "pip install pyarrow")


def test_input_mistakes_name_the_item_at_fault(tmp_path, capsys, monkeypatch):
    """Each --input is read once and is a regular file: a duplicate could put val text in train, and a
    stray comma or a broken link must not change what is read without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "books" / "sub").mkdir(parents=True)
    for name in ("a.txt", "books/b.txt", "books/sub/c.txt"):
        (tmp_path / name).write_text("one line\n" * 50)
    (tmp_path / "books" / "link.txt").symlink_to(tmp_path / "a.txt")
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "ok.txt").write_text("one line\n" * 50)
    (tmp_path / "dangling" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    (tmp_path / "broken.txt").symlink_to("nowhere.txt")
    (tmp_path / "loop.txt").symlink_to("loop.txt")
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "pipes").mkdir()
    os.mkfifo(tmp_path / "pipes" / "p.txt")
    cases = [
        ("a.txt,a.txt", "--input names the same file twice: a.txt and a.txt; list each file once"),
        ("a.txt,./a.txt", "--input names the same file twice: a.txt and ./a.txt"),
        (f"a.txt,{tmp_path}/books/../a.txt", f"twice: a.txt and {tmp_path}/books/../a.txt"),
        ("books/b.txt,books", "--input names the same file twice: books/b.txt and books/b.txt"),
        ("books,books/sub", "--input names the same file twice: books/sub/c.txt and books/sub/c.txt"),
        ("a.txt,books", "--input names the same file twice: a.txt and books/link.txt"),  # a link to a.txt
        ("a.txt,", "--input=a.txt, has an empty item; remove the stray comma"),
        (",a.txt", "--input=,a.txt has an empty item"),
        ("a.txt,,books", "--input=a.txt,,books has an empty item"),
        ("dangling", "dangling/gone.txt in --input folder dangling is a broken symbolic link to "
                     f"{tmp_path / 'nowhere.txt'}; fix or remove it"),
        ("broken.txt", "--input broken.txt is a broken symbolic link to nowhere.txt; fix or remove it"),
        ("loop.txt", "cannot read --input loop.txt: Too many levels of symbolic links"),
        ("/dev/null", "--input /dev/null is not a regular file; give text files or folders of .txt files"),
        ("fifo.txt", "--input fifo.txt is not a regular file"),
        ("pipes", "pipes/p.txt in --input folder pipes is not a regular file"),
    ]
    for value, message in cases:
        expect_fail(capsys, ["text", f"--input={value}", "--out_dir=out"], message)
        assert not (tmp_path / "out").exists(), value  # nothing made before --input is checked


@pytest.mark.slow
@pytest.mark.parametrize("argv,data,message", [
    (["nosuch"], None, "unknown dataset 'nosuch'"),
    (["text", "--input=in.txt"], b"fine\n\xc3\x28 broken\n" + b"more\n" * 9, "invalid UTF-8 at byte 5 (line 2"),
    (["text", "--input=in.txt,./in.txt"], b"text\n" * 10, "--input names the same file twice: in.txt and ./in.txt"),
    (["text", "--input=in.txt,"], b"text\n" * 10, "--input=in.txt, has an empty item"),
    (["text", "--input=/dev/null"], None, "--input /dev/null is not a regular file"),
])
def test_script_exits_2_without_traceback(tmp_path, argv, data, message):
    if data is not None:
        (tmp_path / "in.txt").write_bytes(data)
    r = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *argv], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "data" / "text").exists() or not any((tmp_path / "data" / "text").iterdir())


def test_the_named_datasets_are_the_ones_prepare_data_knows():
    """train.py's hint for a missing dataset (data.read_meta) names prepare_data.py's datasets."""
    from lib import datasets
    assert set(prepare_data.NAMES) == {*datasets.NAMED_DATASETS, "text"}
