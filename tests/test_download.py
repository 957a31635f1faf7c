"""Hub downloads against a loopback mirror of the hub and its CDN (tests/hub_mirror.py), never the internet."""
import hashlib
import os
import socket

import pytest
import torch

import gpt
from lib import downloads
from gpt import GPT
from hub_mirror import HubMirror
from test_model import batch, hf_gpt2, write_hub_layout

GPT2 = "openai-community/gpt2/resolve/main/"
BLOB = "someone/big/resolve/main/blob.bin"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    sleeps = []
    monkeypatch.setattr(downloads.time, "sleep", sleeps.append)  # backoff without waiting
    with HubMirror() as mirror:
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        mirror.sleeps = sleeps
        mirror.cache = tmp_path / "cache"
        yield mirror


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT-2 in the real hub layout (no "transformer." prefix, attn.bias buffers, unaligned header)."""
    return write_hub_layout(hf_gpt2(seed=30), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def blob():
    return os.urandom(2_500_000)  # over one 1 MB read, so that a cut can land after a whole read


def serve_gpt2(hub, checkpoint, repo="openai-community/gpt2"):
    hub.add(f"{repo}/resolve/main/config.json", (checkpoint / "config.json").read_bytes(), lfs=False)
    hub.add(f"{repo}/resolve/main/model.safetensors", (checkpoint / "model.safetensors").read_bytes())


def cached_files(hub):
    return sorted(p.relative_to(hub.cache).as_posix() for p in hub.cache.rglob("*") if p.is_file())


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_from_pretrained_downloads_via_cdn_and_caches(hub, checkpoint):
    serve_gpt2(hub, checkpoint)
    weights = (checkpoint / "model.safetensors").read_bytes()
    model = GPT.from_pretrained("gpt2")
    assert hub.requests == [("hub", "GET", GPT2 + "config.json", None),
                            ("hub", "GET", GPT2 + "model.safetensors", None),  # answered by a 302 to the CDN
                            ("cdn", "GET", sha(weights), None)]
    assert cached_files(hub) == ["models/openai-community/gpt2/config.json",
                                 "models/openai-community/gpt2/model.safetensors"]
    assert (hub.cache / "models/openai-community/gpt2/model.safetensors").read_bytes() == weights
    local = GPT.from_pretrained(checkpoint)
    idx = batch()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], local(idx)[0])
    hub.requests.clear()
    GPT.from_pretrained("gpt2")
    assert hub.requests == []  # cached: no network at all


def test_every_size_uses_its_repo(hub, checkpoint):
    serve_gpt2(hub, checkpoint, "openai-community/gpt2-medium")
    GPT.from_pretrained("gpt2-medium")
    assert {path for _, _, path, _ in hub.requests if "/" in path} == {
        "openai-community/gpt2-medium/resolve/main/config.json",
        "openai-community/gpt2-medium/resolve/main/model.safetensors"}


def test_wrong_linked_sha256_keeps_nothing(hub, checkpoint):
    serve_gpt2(hub, checkpoint)
    hub.wrong_sha.add(GPT2 + "model.safetensors")
    with pytest.raises(downloads.DownloadError, match="sha256"):
        GPT.from_pretrained("gpt2")
    assert cached_files(hub) == ["models/openai-community/gpt2/config.json"]  # no weights, no .part
    hub.wrong_sha.clear()
    GPT.from_pretrained("gpt2")  # and a later attempt starts clean


@pytest.mark.parametrize("given", [dict(sha256="0" * 64), dict(size=2_500_001), dict(size=2_499_999)])
def test_given_size_and_sha256_are_checked(hub, blob, given):
    hub.add("plain.bin", blob, lfs=False)
    with pytest.raises(downloads.DownloadError, match="nothing was kept"):
        downloads.download(f"{hub.url}/plain.bin", hub.cache / "plain.bin", **given)
    assert cached_files(hub) == []


def test_correct_size_and_sha256_pass(hub, blob):
    hub.add("plain.bin", blob, lfs=False)
    path = downloads.download(f"{hub.url}/plain.bin", hub.cache / "plain.bin", sha256=sha(blob), size=len(blob))
    assert path.read_bytes() == blob


def test_cut_transfer_resumes_with_range(hub, blob):
    hub.add(BLOB, blob)
    hub.cut_after[BLOB] = 1_500_000
    path = downloads.hub_file("someone/big", "blob.bin")
    assert path.read_bytes() == blob
    cdn = [r for r in hub.requests if r[0] == "cdn"]
    assert len(cdn) == 2 and cdn[0][3] is None
    resumed_at = int(cdn[1][3].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 1_500_000
    assert cached_files(hub) == ["models/someone/big/blob.bin"]
    assert len(hub.sleeps) == 1


def test_partial_file_from_an_earlier_run_is_resumed(hub, blob):
    hub.add(BLOB, blob)
    part = hub.cache / "models/someone/big/blob.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(blob[:1000])
    assert downloads.hub_file("someone/big", "blob.bin").read_bytes() == blob
    assert [r[3] for r in hub.requests] == ["bytes=1000-", "bytes=1000-"]  # the hub, then the CDN


def test_server_ignoring_range_still_gives_the_right_file(hub, blob):
    hub.add(BLOB, blob)
    hub.ignore_range.add(BLOB)
    hub.cut_after[BLOB] = 1_500_000
    assert downloads.hub_file("someone/big", "blob.bin").read_bytes() == blob
    assert [r[3] is not None for r in hub.requests if r[0] == "cdn"] == [False, True]  # asked, got 200


def test_server_ignoring_range_does_not_append_to_stale_part(hub, blob):
    hub.add("plain.bin", blob, lfs=False)
    hub.ignore_range.add("plain.bin")
    part = hub.cache / "plain.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # not even a prefix of the file: must be thrown away
    assert downloads.download(f"{hub.url}/plain.bin", hub.cache / "plain.bin").read_bytes() == blob
    assert hub.requests[0][3] == "bytes=1000-"


def test_206_for_another_range_is_not_appended(hub, blob):
    hub.add("plain.bin", blob, lfs=False)
    hub.range_from_zero.add("plain.bin")
    part = hub.cache / "plain.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(blob[:1000])
    path = downloads.download(f"{hub.url}/plain.bin", hub.cache / "plain.bin")
    assert path.read_bytes() == blob  # the part was dropped and the file fetched again from zero
    assert [r[3] for r in hub.requests] == ["bytes=1000-", None]


def test_complete_part_answered_416_starts_over(hub, blob):
    hub.add(BLOB, blob)
    part = hub.cache / "models/someone/big/blob.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(blob)
    assert downloads.hub_file("someone/big", "blob.bin").read_bytes() == blob
    assert cached_files(hub) == ["models/someone/big/blob.bin"]


def test_transient_errors_are_retried_with_backoff(hub, checkpoint):
    serve_gpt2(hub, checkpoint)
    hub.fail_status[GPT2 + "config.json"] = [503, 502]
    hub.fail_status[GPT2 + "model.safetensors"] = [429]
    GPT.from_pretrained("gpt2")
    assert [path for _, _, path, _ in hub.requests].count(GPT2 + "config.json") == 3
    assert len(hub.sleeps) == 3 and hub.sleeps[1] > hub.sleeps[0]


def test_persistent_errors_give_up(hub, checkpoint):
    serve_gpt2(hub, checkpoint)
    hub.fail_status[GPT2 + "config.json"] = [503] * 100
    with pytest.raises(downloads.DownloadError, match="503"):
        GPT.from_pretrained("gpt2")
    assert cached_files(hub) == []
    assert 2 <= len(hub.sleeps) < 10


def test_unreachable_server_gives_download_error(hub, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(downloads.DownloadError, match=f"127.0.0.1:{port}"):
        GPT.from_pretrained("gpt2")
    assert cached_files(hub) == []


def test_404_is_a_clear_error_and_caches_nothing(hub):
    with pytest.raises(downloads.DownloadError, match="404") as e:
        GPT.from_pretrained("gpt2")
    assert f"{hub.url}/{GPT2}config.json" in str(e.value)
    assert "Without the hub: HF_ENDPOINT=<a mirror of it>, or a local directory holding config.json" in str(e.value)
    assert cached_files(hub) == []


def test_missing_weights_leave_no_weights(hub, checkpoint):
    hub.add(GPT2 + "config.json", (checkpoint / "config.json").read_bytes(), lfs=False)
    with pytest.raises(downloads.DownloadError, match="model.safetensors"):
        GPT.from_pretrained("gpt2")
    assert cached_files(hub) == ["models/openai-community/gpt2/config.json"]


@pytest.mark.parametrize("offline", ["1", "true", "ON"])
def test_offline_uses_the_cache_only(hub, checkpoint, monkeypatch, offline):
    serve_gpt2(hub, checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(downloads.DownloadError, match="HF_HUB_OFFLINE"):
        GPT.from_pretrained("gpt2")
    assert hub.requests == [] and cached_files(hub) == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    GPT.from_pretrained("gpt2")
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    GPT.from_pretrained("gpt2")
    assert hub.requests == []


def test_dataset_and_raw_files(hub):
    hub.add("datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt", b"Once upon a time")
    path = downloads.hub_file("roneneldan/TinyStories", "TinyStoriesV2-GPT4-valid.txt", repo_type="dataset")
    assert path == hub.cache / "datasets/roneneldan/TinyStories/TinyStoriesV2-GPT4-valid.txt"
    assert path.read_bytes() == b"Once upon a time"
    hub.add("karpathy/char-rnn/master/data/tinyshakespeare/input.txt", b"First Citizen:", lfs=False)
    path = downloads.download(f"{hub.url}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt", hub.cache / "input.txt")
    assert path.read_bytes() == b"First Citizen:"


def test_cache_dir_location(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2REF_CACHE", str(tmp_path / "mine"))
    assert downloads.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GPT2REF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert downloads.cache_dir() == tmp_path / "xdg" / "gpt2ref"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert downloads.cache_dir() == tmp_path / ".cache" / "gpt2ref"
