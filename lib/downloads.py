"""Downloads over HTTP into a cache: resumed, retried, checked against the size and sha256 announced."""
import json
import os
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import requests
from tqdm import tqdm

from lib.files import atomic_write, file_sha256


class DownloadError(RuntimeError):
    pass


class _RetryableStatus(Exception):
    pass


def cache_dir():
    """Where downloads are kept: $GPT2REF_CACHE, else $XDG_CACHE_HOME/gpt2ref, else
    ~/.cache/gpt2ref (read at call time)."""
    return Path(os.environ.get("GPT2REF_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2ref")


def hub_endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_path(repo, filename, repo_type="model"):
    """Where the cache keeps a file of a hub repo."""
    return cache_dir() / f"{repo_type}s" / repo / filename


def hub_file(repo, filename, repo_type="model", sha256=None, size=None):
    """Path of a file from a Hugging Face hub repo, downloaded once into the cache."""
    prefix = "datasets/" if repo_type == "dataset" else ""
    url = f"{hub_endpoint()}/{prefix}{repo}/resolve/main/{filename}"
    return download(url, hub_path(repo, filename, repo_type), sha256, size)


def hub_folder(repo, folder, repo_type="model"):
    """The files in a folder of a hub repo, sorted by path, as [{"file": path in the repo, "bytes": size,
    "sha256": of an LFS file, else None}]. Asked of the hub's tree API (page after page, as it splits
    long listings) and kept in the cache, which is all that HF_HUB_OFFLINE reads."""
    cached = cache_dir() / "listings" / f"{repo_type}s" / repo / f"{folder}.json"
    if offline():
        if not cached.exists():
            raise DownloadError(f"the list of files in {repo}/{folder} is not cached and HF_HUB_OFFLINE "
                                f"forbids asking the hub")
        try:
            return json.loads(cached.read_text())
        except ValueError:
            raise DownloadError(f"{cached} is damaged: delete it, and list the files again with a network") from None
    url = f"{hub_endpoint()}/api/{repo_type}s/{repo}/tree/main/{quote(folder, safe='')}"
    listing = []
    while url:
        try:
            r = requests.get(url, timeout=(10, 60))
            page = r.json() if r.status_code == 200 else None
        except (requests.RequestException, ValueError) as e:
            raise DownloadError(f"listing {repo}/{folder} failed: {e}") from None
        if r.status_code != 200:
            raise DownloadError(f"{url}: {r.status_code} {r.reason}")
        try:  # {"type": "file", "path": ..., "size": ..., "lfs": {"oid": sha256, ...}}, or a "directory"
            listing += [{"file": str(x["path"]), "bytes": int(x["size"]),
                         "sha256": x["lfs"]["oid"] if x.get("lfs") else None} for x in page if x["type"] == "file"]
        except (TypeError, KeyError, ValueError):
            raise DownloadError(f"{url}: not the hub's list of files") from None
        url = r.links.get("next", {}).get("url")
    listing.sort(key=lambda f: f["file"])
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(cached) as f:
        f.write(json.dumps(listing, indent=1).encode())
    return listing


def web_path(url):
    """Where the cache keeps the file at an http(s) URL: under its host and path (another URL is
    another file)."""
    parts = urlsplit(url)
    return cache_dir() / "web" / parts.netloc.replace(":", "_") / parts.path.lstrip("/")


def web_file(url):
    """Path of the file at an http(s) URL, downloaded once into the cache."""
    return download(url, web_path(url))


_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def download(url, path, sha256=None, size=None, retries=5):
    """Fetch url to path, unless path exists. Streams into path + '.part', resumes it with a Range
    request after a failure, retries with backoff, checks size and sha256 (given, or announced by
    the hub as X-Linked-Size / X-Linked-Etag), and only then renames: a file at path is complete."""
    path = Path(path)
    if path.exists():
        return path
    if offline():
        raise DownloadError(f"{path} is not cached and HF_HUB_OFFLINE forbids downloading {url}")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    for attempt in range(retries):
        try:
            sha256, size = _fetch(url, part, sha256, size)
            break
        except (*_TRANSIENT, _RetryableStatus) as e:
            if attempt == retries - 1:
                raise DownloadError(f"downloading {url} failed after {retries} tries: {e}") from None
            time.sleep(0.5 * 2 ** attempt)
    got_size, got_sha = part.stat().st_size, file_sha256(part)
    if (size is not None and got_size != size) or (sha256 is not None and got_sha != sha256):
        part.unlink()
        raise DownloadError(f"{url}: got {got_size} bytes with sha256 {got_sha}, "
                            f"expected {size} bytes with sha256 {sha256}; nothing was kept")
    os.replace(part, path)
    return path


def _fetch(url, part, sha256, size):
    """One attempt: append to part from where it stops. Returns the expected (sha256, size)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=(10, 60)) as r:
        for hop in (*r.history, r):  # the hub's 302 to its CDN names the LFS file's sha256 and size
            sha256 = sha256 or hop.headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"') or None
            if size is None and hop.headers.get("X-Linked-Size"):
                size = int(hop.headers["X-Linked-Size"])
        if r.status_code == 416 and have:  # the partial file is already whole (or bad): start over
            part.unlink()
            raise _RetryableStatus("416 Range Not Satisfiable")
        if r.status_code in (429, 500, 502, 503, 504):
            raise _RetryableStatus(f"{r.status_code} {r.reason}")
        if r.status_code not in (200, 206):
            raise DownloadError(f"{url}: {r.status_code} {r.reason}")
        if r.status_code == 200:  # the server ignored our Range: start from zero
            have = 0
        elif not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            part.unlink()  # a 206 for some other range than ours: nothing to append to safely
            raise _RetryableStatus(f"206 with Content-Range {r.headers.get('Content-Range')!r}, asked for bytes {have}-")
        total = size or (int(r.headers["Content-Length"]) + have if "Content-Length" in r.headers else None)
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], disable=None) as bar:
            for chunk in r.iter_content(chunk_size=1 << 16):  # a cut loses at most this much
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    return sha256, size
