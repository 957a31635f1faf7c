"""sample.py end to end on a local Hugging Face-format directory, offline, against transformers."""
import os
import re
import signal
import subprocess
import sys

import pytest
import tiktoken
import torch

from conftest import ROOT, cl100k_or_skip

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def eot_dir(tmp_path_factory):
    """hf_dir's model with <|endoftext|>'s embedding, tied to its output row, tripled: greedy decoding then
    ends some prompts there within a few tokens ("Once upon a time" after 4), others not ("The cat")."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight[50256] *= 3
    path = tmp_path_factory.mktemp("hf-eot")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    """A model of GPT-2's first 300 ids only, as trained on a dataset that uses no others: no <|endoftext|>."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=300)
    path = tmp_path_factory.mktemp("hf-small")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def run(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def greedy_tokens(model, prompt, n):
    """transformers' greedy tokens after prompt, cut at <|endoftext|>, and whether they were."""
    enc = tiktoken.get_encoding("gpt2")
    ids = torch.tensor([enc.encode(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0)[0, ids.size(1):].tolist()
    return (out[:out.index(enc.eot_token)], True) if enc.eot_token in out else (out, False)


def greedy_reference(model, prompt, n):
    return tiktoken.get_encoding("gpt2").decode(greedy_tokens(model, prompt, n)[0])


@pytest.mark.slow
def test_greedy_sample_matches_transformers(hf_dir):
    path, model = hf_dir
    r = run(f"--init_from={path}", "--start=Once upon a time", "--temperature=0", "--max_new_tokens=20",
            "--device=cpu", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Once upon a time" + greedy_reference(model, "Once upon a time", 20) + "\n"


@pytest.mark.slow
def test_prompt_from_file_and_several_samples(hf_dir, tmp_path):
    path, model = hf_dir
    (tmp_path / "prompt.txt").write_text("The cat", encoding="utf-8")
    r = run(f"--init_from={path}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--temperature=0",
            "--max_new_tokens=8", "--num_samples=2", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    one = "The cat" + greedy_reference(model, "The cat", 8) + "\n"
    assert r.stdout == one + "---------------\n" + one


def library_samples(path, prompt, n, max_new_tokens, seed, dtype=torch.float32, **sampling):
    """What sample.py should print, computed with the library: n rows of one batch after the prompt."""
    from gpt import GPT
    from lib import speed
    enc = tiktoken.get_encoding("gpt2")
    model = GPT.from_pretrained(str(path)).eval()
    if dtype != torch.float32:
        speed.cast_for_inference(model, dtype)
    torch.manual_seed(seed)  # as sample.py: once the model is built, just before generating
    idx = torch.tensor([enc.encode(prompt)] * n)
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        rows = model.generate(idx, max_new_tokens, eos_id=enc.eot_token, **sampling)[:, idx.size(1):].tolist()
    return [prompt + enc.decode(row[:row.index(enc.eot_token)] if enc.eot_token in row else row) for row in rows]


@pytest.mark.slow
def test_several_samples_are_decoded_as_one_batch(hf_dir):
    path, _ = hf_dir
    r = run(f"--init_from={path}", "--start=The cat", "--num_samples=3", "--max_new_tokens=12", "--seed=7",
            "--dtype=float32")
    assert r.returncode == 0, r.stderr
    expected = library_samples(path, "The cat", 3, 12, seed=7, temperature=0.8, top_k=200, top_p=1.0)
    assert len(set(expected)) == 3  # sampled: the rows differ
    assert r.stdout == "\n---------------\n".join(expected) + "\n"


def test_bfloat16_samples_with_bfloat16_weights(hf_dir, monkeypatch, capsys):
    import sample
    from gpt import GPT
    path, _ = hf_dir
    seen, generate_stream = [], GPT.generate_stream

    def spy(self, *args, **kwargs):
        seen.append({p.dtype for name, p in self.named_parameters() if ".ln_" not in name and "ln_f" not in name})
        return generate_stream(self, *args, **kwargs)
    monkeypatch.setattr(GPT, "generate_stream", spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sample.main([f"--init_from={path}", "--start=Once upon a time", "--temperature=0", "--max_new_tokens=16",
                 "--dtype=bfloat16", "--device=cpu"])
    assert seen == [{torch.bfloat16}]  # the weights themselves, not autocast over float32 ones
    (expected,) = library_samples(path, "Once upon a time", 1, 16, seed=1337, dtype=torch.bfloat16, temperature=0)
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.slow
def test_interactive_answers_each_line(hf_dir):
    path, model = hf_dir
    r = run(f"--init_from={path}", "--interactive", "--temperature=0", "--max_new_tokens=5", "--dtype=float32",
            stdin="Hello\nGood morning\n")
    assert r.returncode == 0, r.stderr
    expected = [greedy_reference(model, p, 5) for p in ("Hello", "Good morning")]
    assert r.stdout == "".join(e + "\n" for e in expected)


@pytest.mark.slow
def test_long_prompt_is_cropped_with_a_notice(hf_dir):
    path, _ = hf_dir
    r = run(f"--init_from={path}", "--start=" + "word " * 100, "--max_new_tokens=3", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    assert "only the last 64 are used" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--init_from=gpt3"], "gpt2, gpt2-medium, gpt2-large, gpt2-xl"),
    (["--max_new_tokens=0"], "--max_new_tokens=0 is out of range: it must be >= 1"),
    (["--top_p=1.5"], "--top_p=1.5 is out of range: it must be (0, 1]"),
    (["--top_p=0"], "--top_p=0.0 is out of range: it must be (0, 1]"),
    (["--temprature=0.5"], "did you mean --temperature"),
    (["--num_samples=two"], "--num_samples in the command line expects int"),
    (["--start=FILE:/nonexistent/prompt.txt"], "cannot read the prompt file"),
    (["--seed=-2"], "--seed=-2 is out of range: it must be [-1, 2**63) (-1: 1337 for a plain run"),
    (["--interactive", "--num_samples=2"], "--interactive answers each prompt with one sample"),
])
def test_bad_input_is_one_line_and_exit_2(hf_dir, args, message):
    path, _ = hf_dir
    init = [] if any(a.startswith("--init_from") for a in args) else [f"--init_from={path}"]
    r = run(*init, *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = run(f"--init_from={tmp_path}")
    assert r.returncode == 2 and "has no model.safetensors" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_an_adapter_brings_its_base_model(hf_dir, tmp_path):
    from gpt import GPT, apply_lora, save_adapter
    path, _ = hf_dir
    model = GPT.from_pretrained(str(path))
    apply_lora(model, 2, 4.0)
    save_adapter(model, tmp_path, base_model=str(path))
    r = run(f"--adapter={tmp_path}", "--start=Hi", "--max_new_tokens=3", "--temperature=0")  # offline: not gpt2
    assert r.returncode == 0 and r.stdout.startswith("Hi"), r.stderr


@pytest.mark.slow
def test_ctrl_c_ends_interactive_quietly_and_a_run_with_one_line(hf_dir):
    path, _ = hf_dir
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for args in (["--interactive"], ["--max_new_tokens=100000", "--start=Hi"]):
        proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--init_from={path}", "--temperature=0",
                                 "--max_new_tokens=4", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        if "--interactive" in args:
            proc.stdin.write("Hello\n")
            proc.stdin.flush()
            proc.stdout.readline()  # the first answer: the loop is waiting for the next line
        else:
            proc.stdout.read(2)  # generating
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        if "--interactive" in args:
            assert proc.returncode == 0 and re.fullmatch(r"\[seed \d+\]\n", err), err
        else:
            assert proc.returncode == 130 and err.strip() == "interrupted"


@pytest.mark.slow
def test_a_sample_that_ends_at_end_of_text_says_so(eot_dir):
    path, model = eot_dir
    enc = tiktoken.get_encoding("gpt2")
    ended, stopped = greedy_tokens(model, "Once upon a time", 20)
    going, stopped_too = greedy_tokens(model, "The cat", 20)
    assert stopped and ended and not stopped_too  # the fixture does what it says
    greedy = [f"--init_from={path}", "--temperature=0", "--max_new_tokens=20", "--dtype=float32"]
    notice = f"[stopped at <|endoftext|> after {len(ended)} tokens]\n"
    r = run(*greedy, "--start=Once upon a time")
    assert r.returncode == 0 and r.stdout == "Once upon a time" + enc.decode(ended) + "\n" and r.stderr == notice
    r = run(*greedy, "--start=The cat")
    assert r.returncode == 0 and r.stdout == "The cat" + enc.decode(going) + "\n" and r.stderr == ""
    r = run(*greedy, "--interactive", "--seed=1", stdin="The cat\nOnce upon a time\n")
    assert r.returncode == 0 and r.stdout == enc.decode(going) + "\n" + enc.decode(ended) + "\n" and r.stderr == notice
    r = run(*greedy, "--start=Once upon a time", "--num_samples=2")  # stderr holds the progress bar too
    assert r.returncode == 0 and re.findall(r"\[sample .*?\]\n", r.stderr) == \
        [f"[sample {i} stopped at <|endoftext|> after {len(ended)} tokens]\n" for i in (1, 2)]


@pytest.mark.slow
def test_interactive_draws_a_seed_per_prompt_and_shows_it(hf_dir):
    path, _ = hf_dir
    args = [f"--init_from={path}", "--max_new_tokens=12", "--device=cpu", "--dtype=float32"]
    r = run(*args, "--interactive", stdin="The cat\nThe cat\n")
    assert r.returncode == 0, r.stderr
    seeds = [int(seed) for seed in re.fullmatch(r"\[seed (\d+)\]\n\[seed (\d+)\]\n", r.stderr).groups()]
    first, second = (library_samples(path, "The cat", 1, 12, seed=seed, temperature=0.8, top_k=200)[0]
                     for seed in seeds)
    assert seeds[0] != seeds[1] and first != second
    assert r.stdout == first.removeprefix("The cat") + "\n" + second.removeprefix("The cat") + "\n"
    again = run(*args, "--start=The cat", f"--seed={seeds[1]}")  # the seed shown gives the text again
    assert again.returncode == 0 and again.stdout == second + "\n", again.stderr
    r = run(*args, "--interactive", "--seed=7", stdin="The cat\nThe cat\n")
    (seven,) = library_samples(path, "The cat", 1, 12, seed=7, temperature=0.8, top_k=200)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == 2 * (seven.removeprefix("The cat") + "\n")


@pytest.mark.slow
def test_a_batch_that_cannot_fit_is_refused_with_the_most_that_fits(hf_dir):
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("the available memory is read from /proc/meminfo, which only Linux has")
    r = run(f"--init_from={hf_dir[0]}", "--num_samples=1000000000", "--start=Hi", "--device=cpu")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    m = re.fullmatch(r"error: --num_samples=1000000000 needs about ([\d.]+) GiB \(KV cache, activations, logits\), "
                     r"and ([\d.]+) GiB is free on cpu: at most --num_samples=(\d+) fits\n", r.stderr)
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert m and abs(float(m[2]) * 2**30 - free) < 0.2 * free and 0 < int(m[3]) < 10**9, r.stderr
    assert float(m[1]) * 2**30 > 10**9 * 50257 * 4  # at least the logits


# sample.py with a given amount of free memory; then how much more memory than at the start it held at its peak
MEASURED = """import sys
import sample
def peak():
    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM'))
sample.available_memory = lambda device: int(sys.argv[1])
with open('/proc/self/clear_refs', 'w') as f:  # the peak counts from here: ru_maxrss would carry over pytest's at exec
    f.write('5')
before = peak()
try:
    sample.main(sys.argv[2:])
finally:
    print(peak() - before, file=sys.stderr)
"""


@pytest.mark.slow
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_the_most_samples_said_to_fit_do(hf_dir, top_p):
    """The batch's own memory, what the peak grows by beyond one sample's run (the model, the
    tokenizer and the allocator's arenas are there whatever the batch), stays within the budget."""
    if sys.platform != "linux":
        pytest.skip("VmHWM: Linux only")
    budget = 400 * 2**20
    args = [sys.executable, "-c", MEASURED, str(budget), f"--init_from={hf_dir[0]}", "--start=Hi", "--max_new_tokens=6",
            "--device=cpu", "--dtype=float32", f"--top_p={top_p}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    refused = subprocess.run([*args, "--num_samples=100000"], capture_output=True, text=True, env=env, cwd=ROOT)
    fits = int(re.search(r"at most --num_samples=(\d+) fits", refused.stderr)[1])
    grown = []
    for n in (1, fits):
        r = subprocess.run([*args, f"--num_samples={n}"], capture_output=True, text=True, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        grown.append(int(r.stderr.splitlines()[-1]))
    assert budget / 3 < grown[1] - grown[0] <= budget, (fits, grown)


@pytest.mark.slow
def test_a_tokenizer_other_than_the_models_is_refused(hf_dir, tmp_path):
    from dataclasses import asdict

    from gpt import GPT, apply_lora, save_adapter
    # GPT-2's weights: before they are fetched (nothing is, offline)
    r = run("--init_from=gpt2", "--tokenizer=cl100k_base")
    assert r.returncode == 2 and r.stderr == \
        "error: --tokenizer=cl100k_base is not this model's: it was trained with gpt2; leave --tokenizer out\n"
    model = GPT.from_pretrained(str(hf_dir[0]))
    torch.save({"iter": 1, "config": {}, "model_args": asdict(model.config), "model": model.state_dict(),
                "tokenizer": "gpt2"}, tmp_path / "ckpt.pt")
    apply_lora(model, 2, 4.0)
    save_adapter(model, tmp_path / "adapter", base_model=str(hf_dir[0]))
    for args in ([f"--adapter={tmp_path / 'adapter'}"], ["--init_from=resume", f"--out_dir={tmp_path}"]):
        r = run(*args, "--tokenizer=cl100k_base", "--device=cpu")
        assert r.returncode == 2 and r.stderr.endswith("it was trained with gpt2; leave --tokenizer out\n"), r.stderr
        r = run(*args, "--tokenizer=gpt2", "--start=Hi", "--max_new_tokens=2", "--device=cpu")
        assert r.returncode == 0 and r.stdout.startswith("Hi"), r.stderr


@pytest.mark.slow
def test_a_prompt_the_model_cannot_embed_is_one_line(hf_dir, small_vocab_dir):
    cl100k = cl100k_or_skip()
    beyond = next(i for i in cl100k.encode(" Quantum chromodynamics") if i >= 50257)
    # a local HF directory does not record its tokenizer: --tokenizer is taken, and the prompt checked
    r = run(f"--init_from={hf_dir[0]}", "--tokenizer=cl100k_base", "--start= Quantum chromodynamics")
    assert r.returncode == 2 and r.stderr.startswith(f"error: the prompt has token {beyond} "
                                                     f"({cl100k.decode([beyond])!r}), beyond the model's vocabulary "
                                                     f"of 50257: it was trained on fewer ids of cl100k_base"), r.stderr
    once = tiktoken.get_encoding("gpt2").encode("Once")[0]
    small = f"--init_from={small_vocab_dir}"
    for args, stdin in ((["--start=Once upon a time"], None), (["--interactive"], "Once upon a time\n"),
                        (["--instruction=Say x."], None)):
        r = run(small, *args, stdin=stdin)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "beyond the model's vocabulary of 300" \
            in r.stderr and not r.stdout, r.stderr
    assert f"the prompt has token {once} ('Once')" in run(small, "--start=Once upon a time").stderr
    r = run(small)
    assert r.returncode == 2 and r.stderr == "error: an empty prompt starts from <|endoftext|> (id 50256), beyond " \
                                             "the model's vocabulary of 300: give a prompt\n"
    r = run(small, "--start=x", "--max_new_tokens=5")  # ids below 300: bytes
    assert r.returncode == 0 and r.stdout.startswith("x"), r.stderr
