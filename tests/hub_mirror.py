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
"""
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
        if file_path not in self.files:
            return self._reply(h, 404, b"not found", body)
        if status is not None:
            return self._reply(h, status, b"", body)
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
