"""Sample from GPT-2 or from a model trained here, streaming the text as it is generated.

    python sample.py --init_from=gpt2 --start="Once upon a time" --max_new_tokens=100
    python sample.py --init_from=path/to/hf_dir --start=FILE:prompt.txt --num_samples=3
    python sample.py --init_from=resume --out_dir=out-tinystories
    python sample.py --init_from=gpt2 --interactive     # one prompt per line on stdin
    python sample.py --init_from=gpt2 --adapter=out-alpaca --instruction="Explain gravity to a child."
    python sample.py --init_from=resume --out_dir=out-tinystories --serve   # a web page: http://127.0.0.1:8000

--instruction (and --input) wraps the text in the Alpaca prompt that finetune_alpaca.py trains on
and prints only the response; without --adapter, the same command shows the base model's answer.
--serve loads the model once and serves a page to try it (sample.html) until Ctrl-C: a prompt, or
an instruction and its input with --adapter or --instruction, and the sampling settings.
"""
import codecs
import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from tqdm import tqdm

from cli import autocast, configure, fail, pick_device, pick_dtype, range_error, read_notes, run
from data import alpaca_prompt
from gpt import DownloadError, get_tokenizer
from training import load_model

# ----------------------------------------------------------------------------- defaults
init_from = ""          # gpt2 | gpt2-medium | ... | a local HF directory | resume; "": gpt2, or the adapter's base
out_dir = "out"         # where --init_from=resume finds ckpt.pt
start = ""              # the prompt, or FILE:path to read it from a file; empty starts from <|endoftext|>
num_samples = 1         # >= 1; several are decoded together, as the rows of one batch
max_new_tokens = 200    # >= 1
temperature = 0.8       # >= 0; 0 is greedy
top_k = 200             # >= 0; 0 turns top-k filtering off
top_p = 1.0             # (0, 1]; nucleus sampling: 1.0 turns it off
seed = 1337             # [0, 2**63)
device = "auto"         # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
dtype = "auto"          # auto | float32 | bfloat16 | float16
interactive = False     # read prompts from stdin, one per line, and answer each
serve = False           # serve a web page to try the model on, instead of printing
host = "127.0.0.1"      # where --serve listens: 127.0.0.1 is this machine alone, 0.0.0.0 every network it is on
port = 8000             # [1, 65535]; the port --serve listens on
tokenizer = "gpt2"
adapter = ""            # a LoRA or QLoRA adapter directory (adapter.json + adapter.safetensors) for init_from's model
instruction = ""        # answer this instruction in the Alpaca format, printing only the response
input = ""              # the instruction's input, if it has one
# -----------------------------------------------------------------------------


def read_prompt(text):
    if not text.startswith("FILE:"):
        return text
    try:
        with open(text[5:], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt file {text[5:]}: {e}")


def prompt_tokens(enc, text, instruction="", input=""):
    """The tokens to generate after: an instruction (and its input) in the Alpaca prompt, encoded as in
    training (the prompt's text is ordinary text), else the text, in which <|endoftext|> may stand;
    empty text starts from <|endoftext|>."""
    if instruction:
        return enc.encode_ordinary(alpaca_prompt(instruction, input))
    return enc.encode(text, allowed_special={"<|endoftext|>"}) if text else [enc.eot_token]


def encode_prompt(enc, text, block_size):
    ids = prompt_tokens(enc, text)
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens; the model sees at most block_size={block_size}, "
              f"so only the last {block_size} are used", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def end_of_text(model, enc):
    """The token that ends a text, if the model's vocabulary has it."""
    return enc.eot_token if enc.eot_token < model.config.vocab_size else None


def generate_text(model, enc, ids, cfg, device):
    """Generate after ids: yield the text of each new token as soon as its bytes decode (a token can
    end mid-character, whose text then comes with the next token's), then what is left of a character
    cut off at the end, usually nothing. The command line and the page both show these pieces."""
    eos = end_of_text(model, enc)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    with autocast(device, cfg["dtype"]):
        for token in model.generate_stream(idx, cfg["max_new_tokens"], cfg["temperature"],
                                           cfg["top_k"] or None, cfg["top_p"], eos_id=eos):
            if token.item() == eos:
                break
            yield decoder.decode(enc.decode_single_token_bytes(token.item()))
    yield decoder.decode(b"", final=True)


def stream(model, enc, ids, cfg, device):
    """Generate after ids, writing each piece of text as soon as its bytes decode."""
    for piece in generate_text(model, enc, ids, cfg, device):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def several(model, enc, ids, cfg, device):
    """num_samples continuations of ids, decoded together as the rows of one batch (each step reads
    the weights once for all of them) with a progress bar; their texts, each cut at its end of text."""
    eos, n = end_of_text(model, enc), cfg["num_samples"]
    idx = torch.tensor([ids] * n, dtype=torch.long, device=device)
    rows = [[] for _ in range(n)]
    with autocast(device, cfg["dtype"]):
        tokens = model.generate_stream(idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None,
                                       cfg["top_p"], eos_id=eos)
        for token in tqdm(tokens, total=cfg["max_new_tokens"], desc=f"{n} samples", unit="token", leave=False):
            for row, t in zip(rows, token[:, 0].tolist()):
                row.append(t)
    return [enc.decode(row[:row.index(eos)] if eos in row else row) for row in rows]


def interact(model, enc, cfg):
    """Answer each line of stdin; at a terminal, with a banner and a prompt. Ctrl-C or Ctrl-D ends it quietly."""
    terminal = sys.stdin.isatty()
    if terminal:
        print("type a prompt and press Enter; Ctrl-D or Ctrl-C to quit", file=sys.stderr)
    try:
        while True:
            if terminal:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            stream(model, enc, encode_prompt(enc, line.rstrip("\n"), model.config.block_size), cfg, cfg["device"])
    except KeyboardInterrupt:
        pass
    if terminal:
        sys.stderr.write("\n")


# ----------------------------------------------------------------------------- --serve: a web page

_SERVE_MAX_NEW_TOKENS = 1024  # per request: one generation holds the server, so none may run on for long
SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")  # what a request sets besides its text


def listen(cfg):
    """--serve's server, bound before the model loads, so that a port in use is an error at once."""
    try:
        return ThreadingHTTPServer((cfg["host"], cfg["port"]), BaseHTTPRequestHandler)
    except OSError as e:  # in use, or an address this machine does not have
        fail(f"cannot serve on {cfg['host']}:{cfg['port']}: {e.strerror or e}")


def instruction_mode(cfg):
    return bool(cfg["adapter"] or cfg["instruction"])


def read_request(body, enc, cfg, notes, block_size):
    """The prompt's tokens and the settings of one generation, from a request's JSON body: its text
    (prompt, or instruction and input) and any of SAMPLING, each one left out taking the server's
    setting, each one given checked as the command line checks it. A ValueError says what is wrong."""
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
        error = range_error(key, value, notes[key][1])
        if error:
            raise ValueError(error)
        settings[key] = float(value) if number else value
    if settings["max_new_tokens"] > _SERVE_MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens={settings['max_new_tokens']} is more than this server generates "
                         f"at a time: at most {_SERVE_MAX_NEW_TOKENS}")
    ids = prompt_tokens(enc, request.get("prompt", ""), request.get("instruction", ""), request.get("input", ""))
    if len(ids) > block_size:
        raise ValueError(f"the prompt is {len(ids)} tokens long: this model reads at most {block_size} "
                         f"(its block_size)")
    return ids, settings


def serve_page(server, model, enc, cfg):
    """Serve sample.html at GET / and one generation at a time at POST /generate, streamed as
    server-sent events, each a JSON object: {"text": ...} for the pieces as they are generated, then
    {"tokens": n, "seconds": s}. A bad request is a 4xx with {"error": ...}; one that comes while a
    generation runs is a 503; a generation stops when its browser goes away. Until Ctrl-C."""
    notes = read_notes(__file__)
    shown = ["init_from", "out_dir"] if cfg["init_from"] == "resume" else ["init_from", "adapter"]
    page_settings = {key: cfg[key] for key in ("instruction", "input") + SAMPLING}
    page_settings.update(prompt=read_prompt(cfg["start"]), instruction_mode=instruction_mode(cfg),
                         max_new_tokens_cap=_SERVE_MAX_NEW_TOKENS, block_size=model.config.block_size,
                         model=" ".join(f"--{k}={cfg[k]}" for k in shown + ["device", "dtype"] if cfg[k]))
    # "<" escaped, so that no text (a prompt holding </script>) can end the page's script early
    page = Path(__file__).with_name("sample.html").read_text(encoding="utf-8")
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
                ids, settings = read_request(self.rfile.read(length), enc, cfg, notes, model.config.block_size)
            except ValueError as e:
                return self.refuse(400, str(e))
            if not generating.acquire(blocking=False):
                return self.refuse(503, "busy: this server runs one generation at a time; try again when it ends")
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                torch.manual_seed(settings["seed"])
                started = time.perf_counter()
                with contextlib.closing(generate_text(model, enc, ids, settings, cfg["device"])) as pieces:
                    for tokens, piece in enumerate(pieces):  # the last piece is not a token's
                        if stopping.is_set():  # Ctrl-C: the server stops, and this generation with it
                            return
                        if piece:  # a write to a browser that went away fails: generation stops there
                            self.wfile.write(f"data: {json.dumps({'text': piece})}\n\n".encode())
                done = {"tokens": tokens, "seconds": round(time.perf_counter() - started, 3)}
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


def main(argv=None):
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
    cfg = configure(defaults, argv, doc=__doc__, source=__file__)
    if cfg["input"] and not cfg["instruction"]:
        fail("--input goes with an --instruction")
    if cfg["instruction"] and (cfg["start"] or cfg["interactive"]):
        fail("--instruction makes its own prompt: leave out --start and --interactive")
    if cfg["serve"] and (cfg["interactive"] or cfg["num_samples"] > 1):
        fail("--serve takes its prompts from the page, one sample each: leave out --interactive and --num_samples")
    if cfg["serve"] and cfg["max_new_tokens"] > _SERVE_MAX_NEW_TOKENS:
        fail(f"--max_new_tokens={cfg['max_new_tokens']} is more than --serve generates at a time: "
             f"at most {_SERVE_MAX_NEW_TOKENS}")
    if not cfg["serve"] and (cfg["host"], cfg["port"]) != (defaults["host"], defaults["port"]):
        fail("--host and --port go with --serve")
    server = listen(cfg) if cfg["serve"] else None
    cfg["device"] = pick_device(cfg["device"])
    cfg["dtype"] = pick_dtype(cfg["dtype"], cfg["device"])
    model, tokenizer_name = load_model(cfg)
    model.eval().to(cfg["device"])
    if cfg["dtype"] != "float32":
        model.cast_for_inference(getattr(torch, cfg["dtype"]))
    try:
        enc = get_tokenizer(tokenizer_name)
    except (ValueError, DownloadError) as e:
        fail(str(e))
    if cfg["serve"]:
        serve_page(server, model, enc, cfg)
        return
    torch.manual_seed(cfg["seed"])  # after the model is built, whose initial weights draw random numbers too
    if cfg["interactive"]:
        interact(model, enc, cfg)
        return
    if cfg["instruction"]:
        ids = prompt_tokens(enc, "", cfg["instruction"], cfg["input"])
    else:
        ids = encode_prompt(enc, read_prompt(cfg["start"]), model.config.block_size)
    prompt = enc.decode(ids) if cfg["start"] else ""
    if cfg["num_samples"] == 1:
        sys.stdout.write(prompt)
        stream(model, enc, ids, cfg, cfg["device"])
        return
    texts = several(model, enc, ids, cfg, cfg["device"])
    print("\n---------------\n".join(prompt + text for text in texts))


if __name__ == "__main__":
    run(main)
