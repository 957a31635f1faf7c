"""A loopback stand-in for the Hugging Face hub and its CDN, for download tests.

    with HubMirror() as hub:
        hub.add("openai-community/gpt2/resolve/main/model.safetensors", data)       # an LFS file
        hub.add("openai-community/gpt2/resolve/main/config.json", cfg, lfs=False)   # a plain file
        monkeypatch.setenv("HF_ENDPOINT", hub.url)

An LFS file answers like the real hub: a 302 to cdn_url/<sha256> carrying X-Linked-Etag (the quoted
sha256) and X-Linked-Size; the CDN then serves the bytes. Both servers honour Range (206). Faults
are switched on per path (the path given to add(), which also covers its CDN response):
cut_after, ignore_range, range_from_zero, wrong_sha, fail_status. Every request is logged in `requests` as
(server, method, path, range) with server "hub" or "cdn" and path without the leading slash
(for the CDN, the sha256).

The tree API lists a folder of the files added, as the hub does: GET
api/datasets/<repo>/tree/main/<folder, quoted> answers a JSON list of {"type": "file", "oid", "size",
"path", "lfs": {"oid": sha256, "size", "pointerSize"}} (no "lfs" for a plain file) and {"type":
"directory", ...} entries, page_size at a time, a Link header naming the next page.
"""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class HubMirror:
    def __init__(self):
        self.files = {}         # hub path -> (data, lfs)
        self.blobs = {}         # sha256 -> hub path, for the CDN
        self.requests = []      # (server, method, path, Range header or None)
        self.cut_after = {}     # path -> n: next body stops after n bytes and the connection closes
        self.ignore_range = set()
        self.range_from_zero = set()  # paths answered 206 with bytes from 0, whatever range was asked
        self.wrong_sha = set()
        self.fail_status = {}   # path -> status codes answered first, e.g. [503, 503]
        self.page_size = 1000   # entries per page of the tree API (the hub's)
        self.lock = threading.Lock()

    def add(self, path, data, lfs=True):
        path = path.lstrip("/")
        self.files[path] = (bytes(data), lfs)
        if lfs:
            self.blobs[hashlib.sha256(data).hexdigest()] = path

    def __enter__(self):
        self.servers = [self._serve("hub"), self._serve("cdn")]
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        return self

    def __exit__(self, *exc):
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def _serve(self, name):
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                mirror._handle(self, name, body=True)

            def do_HEAD(self):
                mirror._handle(self, name, body=False)

            def log_message(self, *args):  # quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # a short poll interval makes shutdown() quick: it waits for the loop to notice
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        return server

    def _handle(self, h, server, body):
        path = h.path.split("?")[0].lstrip("/")
        with self.lock:
            self.requests.append((server, h.command, path, h.headers.get("Range")))
            file_path = self.blobs.get(path) if server == "cdn" else path
            failures = self.fail_status.get(file_path) if server == "hub" else None
            status = failures.pop(0) if failures else None
        if status is not None:
            return self._reply(h, status, b"", body)
        if server == "hub" and path.startswith("api/"):
            return self._tree(h, path, body)
        if file_path not in self.files:
            return self._reply(h, 404, b"not found", body)
        data, lfs = self.files[file_path]
        if server == "hub" and lfs:
            sha = hashlib.sha256(data).hexdigest()
            advertised = hashlib.sha256(b"wrong" + data).hexdigest() if file_path in self.wrong_sha else sha
            return self._reply(h, 302, b"", body, {"Location": f"{self.cdn_url}/{sha}",
                                                   "X-Linked-Etag": f'"{advertised}"',
                                                   "X-Linked-Size": str(len(data))})
        with self.lock:  # this response carries the bytes: the one a cut applies to
            cut = self.cut_after.pop(file_path, None) if body else None
        byte_range = h.headers.get("Range")
        if byte_range is None or file_path in self.ignore_range:
            return self._reply(h, 200, data, body, cut=cut)
        first, _, last = byte_range.removeprefix("bytes=").partition("-")
        start, stop = int(first), min(int(last) + 1 if last else len(data), len(data))
        if file_path in self.range_from_zero:
            start = 0
        if start >= len(data):
            return self._reply(h, 416, b"", body, {"Content-Range": f"bytes */{len(data)}"})
        return self._reply(h, 206, data[start:stop], body,
                           {"Content-Range": f"bytes {start}-{stop - 1}/{len(data)}"}, cut)

    def _tree(self, h, path, body):
        kind, _, rest = path.removeprefix("api/").partition("/")
        repo, _, folder = rest.partition("/tree/main/")
        folder = unquote(folder)
        prefix = f"{'' if kind == 'models' else kind + '/'}{repo}/resolve/main/{folder}/"
        entries = {}
        for file_path, (data, lfs) in self.files.items():
            name = file_path.removeprefix(prefix)
            if name == file_path:
                continue
            if "/" in name:
                sub = f"{folder}/{name.split('/')[0]}"
                entries[sub] = {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest(), "size": 0,
                                "path": sub}
                continue
            entry = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                     "size": len(data), "path": f"{folder}/{name}"}
            if lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries[entry["path"]] = entry
        if not entries:
            return self._reply(h, 404, json.dumps({"error": f"{folder} does not exist"}).encode(), body)
        listing = [entries[p] for p in sorted(entries)]
        start = int(parse_qs(urlsplit(h.path).query).get("cursor", ["0"])[0])
        headers = {"Content-Type": "application/json"}
        if start + self.page_size < len(listing):
            headers["Link"] = f'<{self.url}/{path}?cursor={start + self.page_size}>; rel="next"'
        return self._reply(h, 200, json.dumps(listing[start:start + self.page_size]).encode(), body, headers)

    @staticmethod
    def _reply(h, status, data, body, headers=None, cut=None):
        h.send_response(status)
        for key, value in {"Content-Length": str(len(data)), "Accept-Ranges": "bytes", **(headers or {})}.items():
            h.send_header(key, value)
        h.end_headers()
        if body:
            h.wfile.write(data if cut is None else data[:cut])
        if cut is not None:
            h.wfile.flush()
            h.close_connection = True
