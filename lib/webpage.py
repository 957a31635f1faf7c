"""sample.py --serve: a web page to try a model on, and its server, from the standard library.

One generation at a time, streamed to the page as server-sent events.
"""
import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from lib import cli, text

MAX_NEW_TOKENS = 1024  # per request: one generation holds the server, so none may run on for long
SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")  # what a request sets besides its text


def listen(cfg):
    """--serve's server, bound before the model loads, so that a port in use is an error at once."""
    try:
        return ThreadingHTTPServer((cfg["host"], cfg["port"]), BaseHTTPRequestHandler)
    except OSError as e:  # in use, or an address this machine does not have
        cli.fail(f"cannot serve on {cfg['host']}:{cfg['port']}: {e.strerror or e}")


def instruction_mode(cfg):
    return bool(cfg["adapter"] or cfg["instruction"])


def read_request(body, enc, cfg, notes, config):
    """The prompt's tokens and the settings of one generation, from a request's JSON body: its text
    (prompt, or instruction and input) and any of SAMPLING, each one left out taking the server's
    setting, each one given checked as the command line checks it; the tokens checked against the
    model's config. A ValueError says what is wrong."""
    texts = ("instruction", "input") if instruction_mode(cfg) else ("prompt",)
    example = f'{{"{texts[0]}": "..."}}'
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: [[[[... nested deeper than Python goes
        raise ValueError(f"the request is not JSON: send an object like {example}") from None
    if not isinstance(request, dict) or texts[0] not in request:
        raise ValueError(f"the request must be a JSON object like {example}")
    unknown = sorted(set(request) - set(texts) - set(SAMPLING))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}: a request has {', '.join(texts + SAMPLING)}")
    for key in texts:
        if not isinstance(request.get(key, ""), str):
            raise ValueError(f"{key} must be a string, got {request[key]!r}")
    if instruction_mode(cfg) and not request["instruction"].strip():
        raise ValueError("type an instruction: this model answers one")
    settings = dict(cfg)
    for key in [key for key in SAMPLING if key in request]:
        value, number = request[key], type(cfg[key]) is float  # a float setting takes an integer too
        if isinstance(value, bool) or not isinstance(value, (int, float) if number else int):
            raise ValueError(f"{key} must be {'a number' if number else 'an integer'}, got {value!r}")
        error = cli.range_error(key, value, notes[key][1])
        if error:
            raise ValueError(error)
        settings[key] = float(value) if number else value
    if settings["max_new_tokens"] > MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens={settings['max_new_tokens']} is more than this server generates "
                         f"at a time: at most {MAX_NEW_TOKENS}")
    ids = text.prompt_tokens(enc, request.get("prompt", ""), request.get("instruction", ""), request.get("input", ""))
    if len(ids) > config.block_size:
        raise ValueError(f"the prompt is {len(ids)} tokens long: this model reads at most {config.block_size} "
                         f"(its block_size)")
    text.check_ids(enc, ids, config.vocab_size)
    return ids, settings


def serve(server, model, enc, cfg, notes):
    """Serve webpage.html at GET / and one generation at a time at POST /generate, streamed as
    server-sent events, each a JSON object: {"text": ...} for the pieces as they are generated, then
    {"tokens": n, "seconds": s, "seed": its seed, "end_of_text": whether it stopped there}; with no seed
    in the request nor --seed, each generation draws a fresh one. A bad request is a 4xx with
    {"error": ...}; one that comes while a generation runs is a 503; a generation stops when its
    browser goes away. Until Ctrl-C. notes: sample.py's defaults block, whose ranges a request's
    settings are checked against."""
    shown = ["init_from", "out_dir"] if cfg["init_from"] == "resume" else ["init_from", "adapter"]
    page_settings = {key: cfg[key] for key in ("instruction", "input") + SAMPLING}
    page_settings.update(prompt=text.read_prompt(cfg["start"]), instruction_mode=instruction_mode(cfg),
                         max_new_tokens_cap=MAX_NEW_TOKENS, block_size=model.config.block_size,
                         model=" ".join(f"--{k}={cfg[k]}" for k in shown + ["device", "dtype"] if cfg[k]))
    # "<" escaped, so that no text (a prompt holding </script>) can end the page's script early
    page = Path(__file__).with_name("webpage.html").read_text(encoding="utf-8")
    page = page.replace("{{settings}}", json.dumps(page_settings).replace("<", "\\u003c")).encode()
    generating, stopping = threading.Lock(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # seconds a silent browser holds its connection

        def handle(self):
            try:
                super().handle()
            except (ConnectionError, TimeoutError):  # the browser went away: Stop, or the tab closed
                pass

        def log_message(self, *args):  # the terminal shows the URL and nothing per request
            pass

        def send(self, status, body, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if content_type.startswith("text/html"):  # the page loads nothing from anywhere, not even by mistake
                self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                                                            "style-src 'unsafe-inline'; connect-src 'self'")
            self.end_headers()
            self.wfile.write(body)

        def refuse(self, status, message):
            self.send(status, json.dumps({"error": message}).encode())

        def do_GET(self):
            if self.path != "/":
                return self.refuse(404, f"no {self.path} here: this server has GET / and POST /generate")
            self.send(200, page, "text/html; charset=utf-8")

        def do_POST(self):
            if self.path != "/generate":
                return self.refuse(404, f"no {self.path} here: this server has GET / and POST /generate")
            # a page from elsewhere may send this server a form unasked, but no JSON: for that the
            # browser asks first, and it is not allowed
            if self.headers.get_content_type() != "application/json":
                return self.refuse(415, "send the request as Content-Type: application/json")
            try:
                length = int(self.headers["Content-Length"])
            except (TypeError, ValueError):
                length = 0
            if not 0 < length <= 1_000_000:
                return self.refuse(413 if length > 0 else 400,
                                   "the request needs a JSON body, of at most 1 MB, and its Content-Length")
            try:
                ids, settings = read_request(self.rfile.read(length), enc, cfg, notes, model.config)
            except ValueError as e:
                return self.refuse(400, str(e))
            if not generating.acquire(blocking=False):
                return self.refuse(503, "busy: this server runs one generation at a time; try again when it ends")
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                seed = text.seed_for_prompt(settings["seed"])
                torch.manual_seed(seed)
                started = time.perf_counter()
                with contextlib.closing(text.generate_text(model, enc, ids, settings, cfg["device"])) as pieces:
                    for tokens, piece in enumerate(pieces):  # the last piece is not a token's
                        if stopping.is_set():  # Ctrl-C: the server stops, and this generation with it
                            return
                        if piece:  # a write to a browser that went away fails: generation stops there
                            self.wfile.write(f"data: {json.dumps({'text': piece})}\n\n".encode())
                done = {"tokens": tokens, "seconds": round(time.perf_counter() - started, 3), "seed": seed,
                        "end_of_text": text.stopped_at_end_of_text(tokens, settings)}
                self.wfile.write(f"data: {json.dumps(done)}\n\n".encode())
            finally:
                generating.release()

    server.RequestHandlerClass = Handler
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port} (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    finally:  # a generation under way ends at its next token: torch must not be running when Python exits
        stopping.set()
        with generating:
            server.server_close()
