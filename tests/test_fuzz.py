"""The readers of files from elsewhere, fuzzed: read_safetensors, GPT.from_pretrained and read_tokens.
Each gets a small valid file and a thousand or more seeded mutations of it (bit flips, overwritten bytes,
truncations, and edits aimed at every field of the format). A mutated file must either load, and
then hold exactly what its header says, or raise ValueError naming the file; never another
exception, a hang or a runaway allocation. Each reader's cases run in one subprocess with a memory
limit and a timeout, so that such a failure fails the test instead of the machine:

    PYTHONPATH=. python tests/test_fuzz.py safetensors /tmp/somewhere    # one family by hand: its report
"""
import json
import os
import random
import re
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt
from conftest import ROOT
from lib import datasets, weightfiles

MEMORY = 2 << 30  # bytes of address space for a worker; importing torch takes about 0.7 GB of it
TIMEOUT = 60      # seconds for a whole family; a few are needed
FAMILIES = {  # the least number of cases each runs, and some of those that must load
    "safetensors": (2000, ["unchanged", "data in reverse order", "header indented", "header padded",
                           "F32 read as I32", "F32 flattened", "empty header and no data"]),
    "pretrained": (1200, ["unchanged", "model.safetensors: names without transformer.",
                          "model.safetensors: transformer.wte.weight again as h.0.attn.bias"]),
    "tokens": (900, ["vocab 50257: unchanged", "vocab 100277: unchanged",
                     "vocab 50257: relabelled as the other width"]),
}


# ----------------------------------------------------------------------------- the test

@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Every family's report, the workers run side by side."""
    runs = {}
    for family in FAMILIES:
        where = tmp_path_factory.mktemp(family)
        with open(where / "report.json", "w") as out, open(where / "log.txt", "w") as log:
            worker = [sys.executable, __file__, family, str(where)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            runs[family] = where, subprocess.Popen(worker, stdout=out, stderr=log, env=env)
    reports, deadline = {}, time.monotonic() + TIMEOUT
    for family, (where, proc) in runs.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log = (where / "log.txt").read_text()[-3000:]  # its last line names the case it was on
        reports[family] = proc.returncode, (where / "report.json").read_text(), log
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_mutated_files_load_or_raise_value_error(reports, family):
    returncode, report, log = reports[family]
    assert returncode == 0, f"the worker died or hung (exit code {returncode}); the end of its log:\n{log}"
    report = json.loads(report)
    assert report["failures"] == []
    cases, must_load = FAMILIES[family]
    assert report["cases"] >= cases and report["rejected"]
    assert set(must_load) <= set(report["loaded"])


# ----------------------------------------------------------------------------- mutations

# any JSON value, for the fields that expect one kind
JSON_VALUES = [None, True, False, 0, 1, -1, 7, 2**63, 2**64, 10**30, 1.5, -0.0, 1e308, float("nan"),
               float("inf"), "", "F32", "x" * 300, [], [0], [1, 2], ["F32"], [[]], {}, {"a": 1}]
DIMS = [0, 1, 2, -1, 2**31, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, 1.0, 0.5, True, False, "2", None, [2]]
NESTING = (50_000, 100_000)


def byte_edits(data, rng, count, hot):
    """count seeded random edits: bit flips, overwritten, inserted and deleted bytes; every other one
    lands in data[:hot] (the header, where one byte changes the meaning)."""
    specials = b'\x00\xff"{}[],:-.09eE \x80\xc3'
    for i in range(count):
        b = bytearray(data)
        pos = rng.randrange(hot if i % 2 else len(b))
        op = rng.choice(("flip", "flip", "byte", "special", "insert", "delete"))
        if op == "flip":
            for _ in range(rng.randint(1, 3)):
                b[pos] ^= 1 << rng.randrange(8)
                pos = min(pos + rng.randrange(3), len(b) - 1)
        elif op == "byte":
            b[pos] = rng.randrange(256)
        elif op == "special":
            b[pos] = rng.choice(specials)
        elif op == "insert":
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del b[pos:pos + rng.randint(1, 8)]
        yield f"{op} at {pos} (seed case {i})", bytes(b)


def truncations(data, points):
    for n in points:
        yield f"truncated to {n} bytes", data[:n]


def appended(data):
    for tail in (b"\0", b" ", b"\0" * 8, b"garbage", bytes(4096)):
        yield f"{len(tail)} bytes appended", data + tail


def safetensors_bytes(header, data, length=None):
    """A file in safetensors form from a header (a dict, or raw bytes) and a chosen length field."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def split_safetensors(file):
    (n,) = struct.unpack("<Q", file[:8])
    return json.loads(file[8:8 + n]), file[8 + n:]


def deep(depth, kind):
    return ("[" * depth + "]" * depth) if kind == "array" else ('{"a":' * depth + "1" + "}" * depth)


def field_edits(header, data):
    """Every field of every tensor's entry set to wrong (or, now and then, right) values."""
    names = [k for k in header if k != "__metadata__"]
    for i, name in enumerate(names):
        entry = header[name]
        begin, end = entry["data_offsets"]

        def edit(desc, **change):
            return f"{name}: {desc}", safetensors_bytes({**header, name: {**entry, **change}}, data)

        values = JSON_VALUES[i % 3::3]  # every value for some tensor, a third for each
        for v in values + ["f32", "F32 ", "F8_E4M3", *weightfiles.SAFETENSORS_DTYPES]:
            yield edit(f"dtype={v!r}", dtype=v)
        for v in values:
            yield edit(f"shape={v!r}", shape=v)
            yield edit(f"data_offsets={v!r}", data_offsets=v)
            yield f"{name}: entry {v!r}", safetensors_bytes({**header, name: v}, data)
        for d in DIMS[i % 2::2]:
            for shape in ([d], [d, 0], [0, d], [2, d, 0], entry["shape"] + [d]):
                yield edit(f"shape={shape!r}", shape=shape)
            yield edit(f"data_offsets=[{d!r}, end]", data_offsets=[d, end])
            yield edit(f"data_offsets=[begin, {d!r}]", data_offsets=[begin, d])
        for shape in ([2**62, 4, 0], [2**32, 2**32, 0], [10**30] * 3 + [0], [1] * 1000 + entry["shape"],
                      entry["shape"][::-1], []):
            yield edit(f"shape of {len(shape)} dims {shape[:4]!r}", shape=shape)
        total = len(data)
        for offsets in ([begin, end, end], [begin], [end, begin], [begin - 4, end - 4], [begin + 4, end + 4],
                        [begin, end + 4], [0, end - begin], [total, total + end - begin], [-end, -begin],
                        [begin + 2**64, end + 2**64], [float(begin), float(end)]):
            yield edit(f"data_offsets={offsets!r}", data_offsets=offsets)
        for key in entry:
            without = {k: v for k, v in entry.items() if k != key}
            yield f"{name}: no {key}", safetensors_bytes({**header, name: without}, data)
        yield edit("an extra field", extra=[1, 2])
        yield edit("a field nested 500 deep", extra=json.loads(deep(500, "array")))


def header_edits(header, data):
    """The header as a whole: metadata, names, encodings, nesting, duplicate keys, stray bytes."""
    text = json.dumps(header)
    for v in JSON_VALUES:
        yield f"__metadata__={v!r}", safetensors_bytes({**header, "__metadata__": v}, data)
        yield f"__metadata__ value {v!r}", safetensors_bytes({**header, "__metadata__": {"k": v}}, data)
        yield f"header {v!r}", safetensors_bytes(json.dumps(v).encode(), data)
    yield "no __metadata__", safetensors_bytes({k: v for k, v in header.items() if k != "__metadata__"}, data)
    yield "empty header and no data", safetensors_bytes({}, b"")
    first = next(k for k in header if k != "__metadata__")
    rest = {k: v for k, v in header.items() if k != first}
    for name in ("", "__metadata__", "n" * 10_000, "日本語", "\ud800"):
        yield f"tensor renamed {name[:20]!r}", safetensors_bytes({**rest, name: header[first]}, data)
    spots = {"the header": lambda v: v,
             "a shape": lambda v: text.replace('"shape": [', f'"shape": [{v}, ', 1),
             "an extra field": lambda v: text.replace('"dtype": ', f'"extra": {v}, "dtype": ', 1),
             "__metadata__": lambda v: text.replace('"__metadata__": {', f'"__metadata__": {{"deep": {v}, ', 1)}
    for spot, nest in spots.items():
        for depth in NESTING:
            for kind in ("array", "object"):
                blob = nest(deep(depth, kind)).encode()
                yield f"{kind} nested {depth} deep in {spot}", safetensors_bytes(blob, data)
    entry = json.dumps(header[first])
    for dup in (f'"{first}": {entry}, ', '"__metadata__": {}, '):
        yield f"duplicate key {dup[:20]!r}", safetensors_bytes(("{" + dup + text[1:]).encode(), data)
    twice = text.replace('"dtype": ', '"dtype": "I8", "dtype": ', 1)
    yield "duplicate dtype", safetensors_bytes(twice.encode(), data)
    raw, name = text.encode(), f'"{first}"'.encode()
    for bad in (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80"):
        yield f"non-UTF-8 {bad!r} in a name", safetensors_bytes(raw.replace(name, name[:-1] + bad + b'"', 1), data)
    for codec in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):
        yield f"header in {codec}", safetensors_bytes(text.encode(codec), data)
    for stray in (b"x", b"}", b"{}", b"\x00", b"\n", b" " * 7):
        yield f"{stray!r} after the JSON", safetensors_bytes(raw + stray, data)
        yield f"{stray!r} before the JSON", safetensors_bytes(stray + raw, data)
    for literal in ("NaN", "Infinity", "-Infinity", "1" * 5000, "1e400", "-0", "1E2"):
        odd = re.sub(r'"shape": \[\d+', f'"shape": [{literal}', text, count=1)
        yield f"dimension {literal[:12]}", safetensors_bytes(odd.encode(), data)
    for length in (0, 1, 2, len(raw) - 1, len(raw) + 1, len(raw) + 8, weightfiles.MAX_HEADER, weightfiles.MAX_HEADER + 1,
                   2**32, 2**63, 2**64 - 1):
        yield f"header length {length}", safetensors_bytes(raw, data, length)


def rewrites(header, data):
    """Valid files unlike the writer's: the data in another order, the header indented or padded,
    another dtype or shape for the same bytes. These must load."""
    names = [k for k in header if k != "__metadata__"]
    order, offset, blob = {}, 0, b""
    for name in reversed(names):
        begin, end = header[name]["data_offsets"]
        order[name] = {**header[name], "data_offsets": [offset, offset + end - begin]}
        blob, offset = blob + data[begin:end], offset + end - begin
    yield "data in reverse order", safetensors_bytes(order, blob)
    yield "header indented", safetensors_bytes(json.dumps(header, indent=4).encode(), data)
    yield "header padded", safetensors_bytes(json.dumps(header).encode() + b" " * 13, data)
    f32 = next(k for k in names if header[k]["dtype"] == "F32")
    yield "F32 read as I32", safetensors_bytes({**header, f32: {**header[f32], "dtype": "I32"}}, data)
    flat = [int(np.prod(header[f32]["shape"]))]
    yield "F32 flattened", safetensors_bytes({**header, f32: {**header[f32], "shape": flat}}, data)


def header_end(file):
    return 8 + struct.unpack("<Q", file[:8])[0]


def safetensors_cases(file, rng):
    hot = header_end(file)
    header, data = split_safetensors(file)
    yield "unchanged", file
    yield from byte_edits(file, rng, 400, hot)
    yield from truncations(file, [*range(hot + 2), *range(hot + 2, len(file), 5)])
    yield from appended(file)
    yield from field_edits(header, data)
    yield from header_edits(header, data)
    yield from rewrites(header, data)


# ----------------------------------------------------------------------------- the files and their checks

def example_tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).half(),
            "b": torch.randn(2, 1, 3, generator=g).bfloat16(), "i": torch.arange(-3, 3),
            "mask": torch.tensor([True, False, True]), "u": torch.arange(7, dtype=torch.uint8),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}


def check_safetensors(path, tensors):
    """What loaded is what the header says: its names, dtypes, shapes, and the bytes at its offsets."""
    file = path.read_bytes()
    header, data = split_safetensors(file)
    header.pop("__metadata__", None)
    assert tensors.keys() == header.keys()
    for name, t in tensors.items():
        info = header[name]
        assert t.dtype == weightfiles.SAFETENSORS_DTYPES[info["dtype"]] and list(t.shape) == info["shape"], name
        begin, end = info["data_offsets"]
        assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == data[begin:end], name


def tiny_pretrained(where):
    model = gpt.GPT(gpt.GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=2, n_embd=8))
    model.save_pretrained(where)
    return (where / "config.json").read_bytes(), (where / "model.safetensors").read_bytes()


def config_cases(config, rng):
    hf = json.loads(config)
    for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd", "n_inner", "activation_function",
                "layer_norm_epsilon", "tie_word_embeddings"):
        for v in [*JSON_VALUES, 2, 4, 16, 10**6, 10**12, 2**62, "8", 8.0, True]:
            yield f"{key}={v!r}", json.dumps({**hf, key: v}).encode()
        yield f"no {key}", json.dumps({k: v for k, v in hf.items() if k != key}).encode()
    for v in JSON_VALUES:
        yield f"config {v!r}", json.dumps(v).encode()
    for depth in NESTING:
        yield f"config nested {depth} deep", deep(depth, "object").encode()
    yield "duplicate n_embd", b'{"n_embd": 4096, ' + config[1:]
    yield "non-UTF-8", config.replace(b"gelu_new", b"gelu\xff", 1)
    yield from byte_edits(config, rng, 100, len(config))
    yield from truncations(config, range(0, len(config), 3))


def weights_cases(weights, rng):
    header, data = split_safetensors(weights)
    yield from byte_edits(weights, rng, 100, header_end(weights))
    yield from truncations(weights, range(0, len(weights), 23))
    names = [k for k in header if k != "__metadata__"]
    hub = {k.removeprefix("transformer."): v for k, v in header.items()}
    yield "names without transformer.", safetensors_bytes(hub, data)
    for name in names:
        entry = header[name]
        rest = {k: v for k, v in header.items() if k != name}
        begin, end = entry["data_offsets"]
        again = {**entry, "data_offsets": [len(data), len(data) + end - begin]}
        yield f"{name} renamed", safetensors_bytes({**rest, name + "x": entry}, data)
        more, short = data + data[begin:end], name.removeprefix("transformer.")
        yield f"{name} twice, under both names", safetensors_bytes({**header, short: again}, more)
        yield f"{name} again as h.0.attn.bias", safetensors_bytes({**header, "h.0.attn.bias": again}, more)
        reshaped = {**entry, "shape": entry["shape"][::-1] + [1]}
        yield f"{name} reshaped", safetensors_bytes({**header, name: reshaped}, data)
        yield f"{name} as I32", safetensors_bytes({**header, name: {**entry, "dtype": "I32"}}, data)


def pretrained_cases(where, rng):
    config, weights = tiny_pretrained(where)
    yield "unchanged", {"config.json": config, "model.safetensors": weights}
    for desc, c in config_cases(config, rng):
        yield f"config.json: {desc}", {"config.json": c, "model.safetensors": weights}
    for desc, w in weights_cases(weights, rng):
        yield f"model.safetensors: {desc}", {"config.json": config, "model.safetensors": w}


def check_pretrained(where, model):
    """The model is config.json's, holding model.safetensors' tensors."""
    hf = json.loads((where / "config.json").read_text())
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == tuple(
        hf[k] for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"))
    ours = model.state_dict()
    for name, t in weightfiles.read_safetensors(where / "model.safetensors").items():
        if name.endswith(".attn.bias"):
            continue
        key = name if name.startswith("transformer.") else "transformer." + name
        t = t.t() if key.endswith(gpt.CONV1D) else t
        assert torch.allclose(ours[key], t.to(ours[key].dtype), rtol=0, atol=0, equal_nan=True), name


def token_cases(where, rng):
    for vocab in (50257, 100277):
        path = where / f"vocab{vocab}.bin"
        datasets.write_tokens(path, np.arange(300) * 37 % vocab, vocab)
        shard = path.read_bytes()
        header = np.frombuffer(shard[:datasets.HEADER_BYTES], dtype="<i4")
        yield f"vocab {vocab}: unchanged", shard
        for i in (0, 1, 2, 3, 255):
            for v in (0, 1, -1, 7, 2**31 - 1, -2**31, 20240520, 20240801, 299, 301, 600, 150):
                h = header.copy()
                h[i] = v
                yield f"vocab {vocab}: header int {i} = {v}", h.tobytes() + shard[datasets.HEADER_BYTES:]
        other = 20240801 if vocab == 50257 else 20240520
        h = header.copy()
        h[0], h[1], h[2] = other, 7 if other == 20240801 else 1, 150 if other == 20240801 else 600
        yield f"vocab {vocab}: relabelled as the other width", h.tobytes() + shard[datasets.HEADER_BYTES:]
        yield from byte_edits(shard, rng, 150, 12)
        yield from truncations(shard, [*range(0, datasets.HEADER_BYTES + 16, 7), *range(1024, len(shard), 9)])
        yield from appended(shard)


def check_tokens(path, tokens):
    """As many tokens as the header counts, each the file's bytes in the width its magic names."""
    file = path.read_bytes()
    magic, _, count = np.frombuffer(file[:12], dtype="<i4")
    width = next(d for d, (m, _) in datasets.FORMATS.items() if m == magic)
    assert len(tokens) == count
    assert np.array_equal(tokens, np.frombuffer(file[datasets.HEADER_BYTES:], dtype=width.newbyteorder("<")))


# ----------------------------------------------------------------------------- the worker

def run(cases, load, check, where):
    """Write each case's files into where, load them and judge the outcome; returns the report."""
    report = {"cases": 0, "rejected": 0, "loaded": [], "failures": []}
    for desc, files in cases:
        for name, data in files.items():
            (where / name).unlink(missing_ok=True)  # a new file: the last case's memmap still maps the old
            (where / name).write_bytes(data)
        print(desc[:200], file=sys.stderr, flush=True)  # the last line names the case if the worker dies
        report["cases"] += 1
        try:
            result = load(where)
        except ValueError as e:
            report["rejected"] += 1
            if not any(str(where / name) in str(e) for name in files) or len(str(e)) > 1000:
                report["failures"].append(f"{desc}: the message does not name the file briefly: {str(e)[:300]}")
            continue
        except Exception as e:
            report["failures"].append(f"{desc}: {type(e).__name__}: {str(e)[:300]}")
            continue
        report["loaded"].append(desc)
        try:
            check(where, result)
        except AssertionError as e:
            report["failures"].append(f"{desc}: loaded, but wrong: {e}")
    return report


def fuzz_safetensors(where, rng):
    file = where / "weights.safetensors"
    weightfiles.write_safetensors(file, example_tensors(), metadata={"format": "pt"})
    cases = ((desc, {file.name: f}) for desc, f in safetensors_cases(file.read_bytes(), rng))
    return run(cases, lambda w: weightfiles.read_safetensors(file), lambda w, t: check_safetensors(file, t), where)


def fuzz_pretrained(where, rng):
    source = where / "source"
    source.mkdir()
    return run(pretrained_cases(source, rng), gpt.GPT.from_pretrained, check_pretrained, where)


def fuzz_tokens(where, rng):
    file = where / "shard.bin"
    cases = ((desc, {file.name: f}) for desc, f in token_cases(where, rng))
    return run(cases, lambda w: datasets.read_tokens(file), lambda w, t: check_tokens(file, t), where)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))  # torch is mapped already; the readers are not
    torch.set_num_threads(1)  # the families run side by side
    family, where = sys.argv[1], Path(sys.argv[2])
    fuzz = {"safetensors": fuzz_safetensors, "pretrained": fuzz_pretrained, "tokens": fuzz_tokens}[family]
    print(json.dumps(fuzz(where, random.Random(family))))
