"""sample.py --serve over real HTTP and in a real browser: the page streams the text that sample.py
prints for the same prompt, settings and seed; bad requests are a 4xx with a message; one generation
runs at a time and stops when its browser goes away; Ctrl-C ends the server with one line."""
import base64
import contextlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import test_sample
from conftest import ROOT
from test_sample import run  # sample.py as a process

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
hf_dir = test_sample.hf_dir  # the fixture: a tiny GPT-2 directory, and its transformers model
eot_dir = test_sample.eot_dir  # one whose greedy text ends at <|endoftext|> after some prompts
small_vocab_dir = test_sample.small_vocab_dir  # one of GPT-2's first 300 ids only


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(*args):
    """sample.py --serve with args on a free port, once it says it serves; its port and process.
    Afterwards it must have written nothing but that line."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--serve", f"--port={port}", "--device=cpu",
                             "--dtype=float32", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT)
    try:
        assert select.select([proc.stderr], [], [], 120)[0], "sample.py --serve said nothing for 120 s"
        line = proc.stderr.readline()  # once the model has loaded: a few seconds
        assert line == f"serving on http://127.0.0.1:{port} (Ctrl-C to stop)\n", line + proc.stderr.read()
        yield port, proc
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=60)
    assert not out and not err, err


@pytest.fixture(scope="module")
def server(hf_dir):
    with serving(f"--init_from={hf_dir[0]}", "--max_new_tokens=24") as (port, _):
        yield port


def request(port, method, path, body=None, content_type="application/json"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
    return connection.getresponse()


def events(response):
    """The JSON objects of a server-sent event stream, as they come."""
    for line in response:
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


def generate(port, **fields):
    """The text the server streams for a request of these fields, and its closing event."""
    response = request(port, "POST", "/generate", json.dumps(fields))
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    *pieces, done = events(response)
    assert all(set(p) == {"text"} for p in pieces) and set(done) == {"tokens", "seconds", "seed", "end_of_text"}
    return "".join(p["text"] for p in pieces), done


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    {"temperature": 0.8, "top_k": 200, "seed": 7},        # sampled, with a seed other than the server's
    {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "seed": 1337},  # the server's own --seed
    {"temperature": 0},                                    # greedy
], ids=["seed 7", "seed 1337 top_p", "greedy"])
def test_the_page_streams_what_sample_py_prints(server, hf_dir, settings):
    text, done = generate(server, prompt="Once upon a time", max_new_tokens=30, **settings)
    assert done["tokens"] == 30 and done["seconds"] > 0
    r = run(f"--init_from={hf_dir[0]}", "--start=Once upon a time", "--max_new_tokens=30", "--device=cpu",
            "--dtype=float32", *[f"--{key}={value}" for key, value in settings.items()])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Once upon a time" + text + "\n"
    assert generate(server, prompt="Once upon a time", max_new_tokens=30, **settings)[0] == text  # seeded again


def test_seeds_give_their_own_texts(server):
    texts = {generate(server, prompt="The cat", max_new_tokens=12, seed=seed)[0] for seed in (1, 2, 3)}
    assert len(texts) == 3


@pytest.mark.slow
def test_each_request_without_a_seed_draws_one_that_gives_its_text_again(server, hf_dir):
    (first, one), (second, other) = (generate(server, prompt="The cat", max_new_tokens=12) for _ in range(2))
    assert one["seed"] != other["seed"] and first != second
    assert generate(server, prompt="The cat", max_new_tokens=12, seed=one["seed"])[0] == first
    r = run(f"--init_from={hf_dir[0]}", "--start=The cat", "--max_new_tokens=12", f"--seed={other['seed']}",
            "--device=cpu", "--dtype=float32")
    assert r.returncode == 0 and r.stdout == "The cat" + second + "\n", r.stderr


@pytest.fixture(scope="module")
def small_server(small_vocab_dir):
    with serving(f"--init_from={small_vocab_dir}", "--seed=5") as (port, _):
        yield port


@pytest.mark.slow
def test_with_seed_every_request_uses_it(small_server):
    (first, one), (second, other) = (generate(small_server, prompt="x", max_new_tokens=12) for _ in range(2))
    assert one["seed"] == other["seed"] == 5 and first == second
    assert generate(small_server, prompt="x", max_new_tokens=12, seed=5)[0] == first
    assert generate(small_server, prompt="x", max_new_tokens=12, seed=6)[0] != first
    assert '"seed": 5' in request(small_server, "GET", "/").read().decode()  # the page shows it


@pytest.mark.slow
def test_the_last_event_says_whether_it_stopped_at_end_of_text(eot_dir):
    import tiktoken
    path, model = eot_dir
    enc = tiktoken.get_encoding("gpt2")
    ended, stopped = test_sample.greedy_tokens(model, "Once upon a time", 20)
    going, stopped_too = test_sample.greedy_tokens(model, "The cat", 20)
    assert stopped and not stopped_too
    with serving(f"--init_from={path}") as (port, _):
        text, done = generate(port, prompt="Once upon a time", max_new_tokens=20, temperature=0)
        assert text == enc.decode(ended) and done["tokens"] == len(ended) and done["end_of_text"] is True
        text, done = generate(port, prompt="The cat", max_new_tokens=20, temperature=0)
        assert text == enc.decode(going) and done["tokens"] == 20 and done["end_of_text"] is False


def test_a_prompt_beyond_the_vocabulary_is_a_400(small_server):
    once = request(small_server, "POST", "/generate", json.dumps({"prompt": "Once upon a time"}))
    assert once.status == 400 and json.load(once)["error"].startswith(
        "the prompt has token 7454 ('Once'), beyond the model's vocabulary of 300")
    empty = request(small_server, "POST", "/generate", json.dumps({"prompt": ""}))
    assert empty.status == 400 and json.load(empty)["error"] == \
        "an empty prompt starts from <|endoftext|> (id 50256), beyond the model's vocabulary of 300: give a prompt"


@pytest.mark.slow
def test_instruction_mode_with_an_adapter_matches_sample_py(hf_dir, tmp_path):
    import torch

    from gpt import GPT, apply_lora, lora_layers, save_adapter
    model = GPT.from_pretrained(str(hf_dir[0]))
    apply_lora(model, 2, 4.0)
    torch.manual_seed(1)
    for layer in lora_layers(model).values():  # a trained adapter changes the output; a fresh one does not
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    save_adapter(model, tmp_path, base_model=str(hf_dir[0]))
    with serving(f"--adapter={tmp_path}") as (port, _):
        page = request(port, "GET", "/").read().decode()
        assert '"instruction_mode": true' in page
        text, _ = generate(port, instruction="Name a colour.", input="of the sky", max_new_tokens=16, seed=5)
        wrong = request(port, "POST", "/generate", json.dumps({"prompt": "Hi"}))
        assert wrong.status == 400 and json.load(wrong)["error"] == \
            'the request must be a JSON object like {"instruction": "..."}'
    r = run(f"--adapter={tmp_path}", "--instruction=Name a colour.", "--input=of the sky", "--max_new_tokens=16",
            "--seed=5", "--device=cpu", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == text + "\n"


BAD_REQUESTS = [
    (b"", 400, "needs a JSON body"),
    (b"Once upon a time", 400, 'the request is not JSON: send an object like {"prompt": "..."}'),
    (b"[" * 100_000, 400, "the request is not JSON"),
    (b"[1, 2]", 400, 'the request must be a JSON object like {"prompt": "..."}'),
    (b'{"max_new_tokens": 5}', 400, 'the request must be a JSON object like {"prompt": "..."}'),
    ({"prompt": 5}, 400, "prompt must be a string, got 5"),
    ({"prompt": "Hi", "max_new_tokens": 100000}, 400, "max_new_tokens=100000 is more than this server generates "
                                                      "at a time: at most 1024"),
    ({"prompt": "Hi", "max_new_tokens": 0}, 400, "max_new_tokens=0 is out of range: it must be >= 1"),
    ({"prompt": "Hi", "temperature": -1}, 400, "temperature=-1 is out of range: it must be >= 0 (0 is greedy)"),
    ({"prompt": "Hi", "temperature": "hot"}, 400, "temperature must be a number, got 'hot'"),
    (b'{"prompt": "Hi", "temperature": NaN}', 400, "temperature=nan is not a finite number"),
    ({"prompt": "Hi", "top_k": 1.5}, 400, "top_k must be an integer, got 1.5"),
    ({"prompt": "Hi", "top_p": 0}, 400, "top_p=0 is out of range: it must be (0, 1]"),
    ({"prompt": "Hi", "seed": 2**63}, 400, "seed=9223372036854775808 is out of range: it must be [-1, 2**63)"),
    ({"prompt": "Hi", "seed": True}, 400, "seed must be an integer, got True"),
    ({"prompt": "Hi", "temprature": 1}, 400, "unknown field 'temprature'"),
    ({"prompt": "word " * 100}, 400, "the prompt is 101 tokens long: this model reads at most 64 (its block_size)"),
]


@pytest.mark.parametrize("body, status, words", BAD_REQUESTS, ids=[words for _, _, words in BAD_REQUESTS])
def test_a_bad_request_is_a_4xx_with_a_message(server, body, status, words):
    response = request(server, "POST", "/generate", body if isinstance(body, bytes) else json.dumps(body))
    assert response.status == status
    assert response.headers["Content-Type"] == "application/json"
    assert words in json.load(response)["error"]


def test_only_the_page_and_its_api_are_served(server):
    page = request(server, "GET", "/")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]  # no asset from anywhere
    html = page.read().decode()
    assert "{{settings}}" not in html and '"max_new_tokens": 24' in html and "http" not in html.lower()
    assert '"seed": -1' in html  # no --seed: the page leaves it empty, and each generation draws one
    for method, path in (("GET", "/generate"), ("GET", "/sample.py"), ("GET", "/../ckpt.pt"), ("POST", "/")):
        response = request(server, method, path, b"{}" if method == "POST" else None)
        assert response.status == 404 and "this server has GET / and POST /generate" in json.load(response)["error"]
    form = request(server, "POST", "/generate", b"prompt=Hi", "application/x-www-form-urlencoded")
    assert form.status == 415 and "Content-Type: application/json" in json.load(form)["error"]


def test_a_body_over_1_mb_is_refused_unread(server):
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    connection.putrequest("POST", "/generate")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "2000000")
    connection.endheaders()  # and no body: the answer comes first
    response = connection.getresponse()
    assert response.status == 413 and "of at most 1 MB" in json.load(response)["error"]


@pytest.mark.slow
def test_one_generation_at_a_time_and_an_abandoned_one_stops(server):
    _, whole = generate(server, prompt="Hi", max_new_tokens=1024)
    assert whole["tokens"] == 1024
    first = request(server, "POST", "/generate", json.dumps({"prompt": "Hi", "max_new_tokens": 1024}))
    next(events(first))  # under way
    busy = request(server, "POST", "/generate", json.dumps({"prompt": "Hi"}))
    assert busy.status == 503 and json.load(busy)["error"].startswith("busy: this server runs one generation at a time")
    first.close()  # the browser goes away
    left = time.perf_counter()
    while (second := request(server, "POST", "/generate", json.dumps({"prompt": "Hi", "max_new_tokens": 1}))).status == 503:
        assert time.perf_counter() - left < whole["seconds"] / 2, "the abandoned generation went on"
        time.sleep(0.01)
    assert second.status == 200 and list(events(second))[-1]["tokens"] == 1


@pytest.mark.slow
def test_a_port_in_use_is_one_line_and_exit_2(hf_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run(f"--init_from={hf_dir[0]}", "--serve", f"--port={port}")
    assert r.returncode == 2 and r.stderr == f"error: cannot serve on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.slow
def test_ctrl_c_stops_the_server_with_one_line(hf_dir):
    for generating in (False, True):
        with serving(f"--init_from={hf_dir[0]}") as (port, proc):
            if generating:
                response = request(port, "POST", "/generate", json.dumps({"prompt": "Hi", "max_new_tokens": 1024}))
                next(events(response))
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
            assert proc.stderr.read() == "\ninterrupted\n"  # as any sample.py run interrupted, no traceback
            proc.stderr = None  # read: serving() finds nothing more


# ----------------------------------------------------------------------------- in a real browser

class DevTools:
    """Headless Chromium driven by its DevTools protocol over --remote-debugging-pipe: JSON messages,
    each ended by a NUL byte, that it reads on its fd 3 and writes on its fd 4."""

    def __init__(self, binary, profile):
        # the shell hands it our pipes as fds 3 and 4; no sandbox: the tests may run as root
        self.proc = subprocess.Popen(["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', binary,
                                      "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                                      "--no-first-run", f"--user-data-dir={profile}", "--window-size=900,720"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.calls, self.received = 0, b""

    def call(self, method, session=None, **params):
        self.calls += 1
        message = {"id": self.calls, "method": method, "params": params} | ({"sessionId": session} if session else {})
        self.proc.stdin.write(json.dumps(message).encode() + b"\0")
        self.proc.stdin.flush()
        while True:  # events come in between: skip them
            reply = self.receive()
            if reply.get("id") == self.calls:
                assert "error" not in reply, reply
                return reply["result"]

    def receive(self):
        while b"\0" not in self.received:
            assert select.select([self.proc.stdout], [], [], 60)[0], "Chromium said nothing for 60 s"
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            assert chunk, "Chromium closed its pipe"
            self.received += chunk
        message, _, self.received = self.received.partition(b"\0")
        return json.loads(message)


def wait_for(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "the page did not get there in time"
        time.sleep(0.05)
    return value


def test_the_page_in_headless_chromium(server, tmp_path):
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if binary is None:
        pytest.skip("no Chromium on PATH: install it (apt-get install chromium, as .ci/run does) to test the page")
    browser = DevTools(binary, tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url=f"http://127.0.0.1:{server}/")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

        def js(expression):
            return browser.call("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")

        def click(element_id):
            x, y = js(f"(r => [r.x + r.width / 2, r.y + r.height / 2])"
                      f"(document.getElementById('{element_id}').getBoundingClientRect())")
            for kind in ("mousePressed", "mouseReleased"):
                browser.call("Input.dispatchMouseEvent", session, type=kind, x=x, y=y, button="left", clickCount=1)

        def status():
            return js("document.getElementById('status').textContent")

        wait_for(lambda: js("location.pathname == '/' && document.readyState == 'complete'"))
        click("prompt")
        browser.call("Input.insertText", session, text="Once upon a time")
        click("go")
        wait_for(lambda: "tokens/s" in status())
        shown, done = js("document.getElementById('output').textContent"), status()
        screenshot = base64.b64decode(browser.call("Page.captureScreenshot", session)["data"])
        (tmp_path / "serve.png").write_bytes(screenshot)

        js("document.getElementById('temperature').value = '-1'")
        click("go")
        error = wait_for(lambda: "out of range" in status() and status())
        assert js("document.getElementById('status').className") == "error"
    finally:
        browser.proc.kill()
        browser.proc.wait()
    assert screenshot.startswith(b"\x89PNG") and len(screenshot) > 10_000
    seed = int(re.fullmatch(r"24 tokens in [\d.]+ s: [\d.]+ tokens/s, seed (\d+)", done)[1])
    expected, _ = generate(server, prompt="Once upon a time", seed=seed)  # the page sends the server's settings
    assert shown == "Once upon a time" + expected
    assert error == "temperature=-1 is out of range: it must be >= 0 (0 is greedy)"
