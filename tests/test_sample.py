"""sample.py end to end on a local Hugging Face-format directory, offline, against transformers."""
import os
import signal
import subprocess
import sys

import pytest
import tiktoken
import torch

from conftest import ROOT

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path, model


def run(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def greedy_reference(model, prompt, n):
    enc = tiktoken.get_encoding("gpt2")
    ids = torch.tensor([enc.encode(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0)[0, ids.size(1):].tolist()
    if enc.eot_token in out:
        out = out[:out.index(enc.eot_token)]
    return enc.decode(out)


def test_greedy_sample_matches_transformers(hf_dir):
    path, model = hf_dir
    r = run(f"--init_from={path}", "--start=Once upon a time", "--temperature=0", "--max_new_tokens=20",
            "--device=cpu", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Once upon a time" + greedy_reference(model, "Once upon a time", 20) + "\n"


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


def test_interactive_answers_each_line(hf_dir):
    path, model = hf_dir
    r = run(f"--init_from={path}", "--interactive", "--temperature=0", "--max_new_tokens=5", "--dtype=float32",
            stdin="Hello\nGood morning\n")
    assert r.returncode == 0, r.stderr
    expected = [greedy_reference(model, p, 5) for p in ("Hello", "Good morning")]
    assert r.stdout == "".join(e + "\n" for e in expected)


def test_long_prompt_is_cropped_with_a_notice(hf_dir):
    path, _ = hf_dir
    r = run(f"--init_from={path}", "--start=" + "word " * 100, "--max_new_tokens=3", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    assert "only the last 64 are used" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--init_from=gpt3"], "gpt2, gpt2-medium, gpt2-large, gpt2-xl"),
    (["--max_new_tokens=0"], "--max_new_tokens=0 is out of range: it must be >= 1"),
    (["--top_p=1.5"], "--top_p=1.5 is out of range: it must be (0, 1]"),
    (["--top_p=0"], "--top_p=0.0 is out of range: it must be (0, 1]"),
    (["--temprature=0.5"], "did you mean --temperature"),
    (["--num_samples=two"], "--num_samples in the command line expects int"),
    (["--start=FILE:/nonexistent/prompt.txt"], "cannot read the prompt file"),
])
def test_bad_input_is_one_line_and_exit_2(hf_dir, args, message):
    path, _ = hf_dir
    init = [] if any(a.startswith("--init_from") for a in args) else [f"--init_from={path}"]
    r = run(*init, *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = run(f"--init_from={tmp_path}")
    assert r.returncode == 2 and "has no model.safetensors" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_adapter_brings_its_base_model(hf_dir, tmp_path):
    from gpt import GPT, apply_lora, save_adapter
    path, _ = hf_dir
    model = GPT.from_pretrained(str(path))
    apply_lora(model, 2, 4.0)
    save_adapter(model, tmp_path, base_model=str(path))
    r = run(f"--adapter={tmp_path}", "--start=Hi", "--max_new_tokens=3", "--temperature=0")  # offline: not gpt2
    assert r.returncode == 0 and r.stdout.startswith("Hi"), r.stderr


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
            assert proc.returncode == 0 and err == ""
        else:
            assert proc.returncode == 130 and err.strip() == "interrupted"
