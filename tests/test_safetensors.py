"""The hand-written safetensors reader and writer: malformed files fail clearly, and both directions
agree with the reference implementation (the `safetensors` package, a test-only dependency)."""
import json
import re
import struct

import pytest
import torch

from lib import weightfiles

safetensors_torch = pytest.importorskip("safetensors.torch")
safe_open = pytest.importorskip("safetensors").safe_open


def raw_file(path, header, data=b"", length=None):
    """A file in safetensors form with any header (a dict, or raw bytes) and a chosen length field."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def f32(begin, end, shape=None):
    return {"dtype": "F32", "shape": shape or [(end - begin) // 4], "data_offsets": [begin, end]}


def valid_file(path):
    weightfiles.write_safetensors(path, {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)})
    return path


MALFORMED = {
    "shorter than 8 bytes": (lambda p: p.write_bytes(b"\x10\x00\x00"), "only 3 bytes"),
    "truncated": (lambda p: p.write_bytes(valid_file(p).read_bytes()[:-5]), "truncated"),
    "trailing bytes": (lambda p: p.write_bytes(valid_file(p).read_bytes() + b"\0" * 4), "file size"),
    "header length beyond the file": (lambda p: raw_file(p, {"a": f32(0, 8)}, bytes(8), length=500), "runs past"),
    "absurd header size": (lambda p: raw_file(p, {}, length=2 ** 62), "limit"),
    "header just over the limit": (lambda p: raw_file(p, {}, length=weightfiles.MAX_HEADER + 1), "limit"),
    "not JSON": (lambda p: raw_file(p, b"{not json"), "not JSON"),
    "not UTF-8": (lambda p: raw_file(p, b"\xff\xfe{}"), "not JSON"),
    "not an object": (lambda p: raw_file(p, b"[1, 2]"), "not a JSON object"),
    "overlapping offsets": (lambda p: raw_file(p, {"a": f32(0, 8), "b": f32(4, 12)}, bytes(12)), "overlap"),
    "gap": (lambda p: raw_file(p, {"a": f32(0, 8), "b": f32(12, 20)}, bytes(20)), "gap"),
    "offsets past the data": (lambda p: raw_file(p, {"a": f32(0, 8), "b": f32(8, 16)}, bytes(8)), "truncated"),
    "negative offset": (lambda p: raw_file(p, {"a": f32(-4, 4, [2])}, bytes(8)), "data_offsets"),
    "reversed offsets": (lambda p: raw_file(p, {"a": f32(8, 0, [2])}, bytes(8)), "data_offsets"),
    "unknown dtype": (lambda p: raw_file(p, {"a": {"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 2]}},
                                         bytes(2)), "unknown dtype"),
    "shape/offset mismatch": (lambda p: raw_file(p, {"a": f32(0, 8, [3])}, bytes(8)), "needs 12 bytes"),
    "bad shape": (lambda p: raw_file(p, {"a": f32(0, 8, [-2])}, bytes(8)), "shape"),
    "entry not an object": (lambda p: raw_file(p, {"a": "F32"}, b""), "not an object"),
    # what fuzzing (test_fuzz.py) turned up: other exceptions, an unnamed ValueError, silent loads
    "dtype a list": (lambda p: raw_file(p, {"a": {**f32(0, 0), "dtype": ["F32"]}}), "unknown dtype"),
    "dtype an object": (lambda p: raw_file(p, {"a": {**f32(0, 0), "dtype": {}}}), "unknown dtype"),
    "dimension 2**63 next to a zero": (lambda p: raw_file(p, {"a": f32(0, 0, [2 ** 63, 0])}), "shape"),
    "dimensions past int64 together": (lambda p: raw_file(p, {"a": f32(0, 0, [2 ** 62, 4, 0])}), "shape"),
    "bool dimension": (lambda p: raw_file(p, {"a": f32(0, 0, [True, 0])}), "shape"),
    "float dimension": (lambda p: raw_file(p, {"a": f32(0, 8, [2.0])}, bytes(8)), "shape"),
    "bool offsets": (lambda p: raw_file(p, {"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}},
                                        bytes(1)), "data_offsets"),
    "nested 50,000 deep": (lambda p: raw_file(p, b"[" * 50_000 + b"]" * 50_000), "nested too deeply"),
    "nested 100,000 deep": (lambda p: raw_file(p, b'{"a":' * 100_000 + b"1" + b"}" * 100_000), "nested too deeply"),
    "a 5000-digit number": (lambda p: raw_file(p, b'{"a": ' + b"1" * 5000 + b"}"), "not JSON"),
    "duplicate tensor name": (lambda p: raw_file(p, b'{"a": %s, "a": %s}' % ((json.dumps(f32(0, 4)).encode(),) * 2),
                                                 bytes(4)), "key 'a' given twice"),
    "metadata not strings": (lambda p: raw_file(p, {"__metadata__": {"step": 3}}), "__metadata__"),
    "header in UTF-16": (lambda p: raw_file(p, json.dumps({}).encode("utf-16")), "not JSON"),
}


@pytest.mark.parametrize("make, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_raises_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as e:
        weightfiles.read_safetensors(path)
    assert message in str(e.value)


def test_valid_file_reads(tmp_path):
    tensors = weightfiles.read_safetensors(valid_file(tmp_path / "ok.safetensors"))
    assert torch.equal(tensors["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert torch.equal(tensors["b"], torch.ones(4))


def test_edge_shapes_read(tmp_path):
    """Empty tensors may have any dimension torch can hold (below 2**63), and a scalar has no shape."""
    scalar = {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}
    path = raw_file(tmp_path / "x.safetensors", {"e": f32(0, 0, [2 ** 63 - 1, 0]), "s": scalar}, bytes(4))
    tensors = weightfiles.read_safetensors(path)
    assert tensors["e"].shape == (2 ** 63 - 1, 0) and tensors["s"].shape == ()


def example_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 3, generator=g).bfloat16(),
        "i64": torch.randint(-2 ** 40, 2 ** 40, (4, 2), generator=g),
        "i32": torch.randint(-1000, 1000, (5,), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous: written in logical order
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_ours_written_reference_read(tmp_path):
    tensors = example_tensors()
    weightfiles.write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt", "step": 3})
    assert_same(safetensors_torch.load_file(tmp_path / "x.safetensors"), tensors)
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}
    (n,) = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])
    assert n % 8 == 0  # data starts 8-byte aligned
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left


def test_reference_written_ours_read(tmp_path):
    tensors = {k: v.contiguous() for k, v in example_tensors().items()}
    safetensors_torch.save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    assert_same(weightfiles.read_safetensors(tmp_path / "x.safetensors"), tensors)


def test_read_tensors_are_independent_and_writable(tmp_path):
    weightfiles.write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(3), "b": torch.zeros(3)})
    t = weightfiles.read_safetensors(tmp_path / "x.safetensors")
    t["a"] += 1
    assert torch.equal(t["b"], torch.zeros(3))


def test_write_refuses_unsupported_dtype_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="complex"):
        weightfiles.write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2), "c": torch.zeros(2, dtype=torch.complex64)})
    assert not list(tmp_path.iterdir())


def test_write_replaces_atomically(tmp_path):
    path = tmp_path / "x.safetensors"
    weightfiles.write_safetensors(path, {"a": torch.zeros(2)})
    weightfiles.write_safetensors(path, {"b": torch.ones(5)})
    assert_same(weightfiles.read_safetensors(path), {"b": torch.ones(5)})
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
