"""finetune_alpaca.py: the prompt format and the loss mask token by token against tiktoken, the
split and the batches, and LoRA, QLoRA and full runs end to end, offline: a tiny GPT-2 and a
generated Alpaca file served by the loopback hub mirror, a crash and a resume that must repeat
the uninterrupted run exactly, and sample.py --adapter against transformers on the merged model."""
import json
import os
import random
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tiktoken
import torch

from lib import datasets
import finetune_alpaca as fa
import gpt
from lib import checkpoints, downloads, models, training, weightfiles
from conftest import ROOT
from hub_mirror import HubMirror

ENC = tiktoken.get_encoding("gpt2")
# the templates as the issue quotes them from Stanford Alpaca
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
              "### Input:\n{input}\n\n### Response:")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def make_records(n=40, seed=0):
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "quiet", "tiger", "lemon"]
    records = []
    for i in range(n):
        w = rng.choice(words)
        if i % 3:
            records.append({"instruction": f"Repeat the word {w} twice.", "input": "", "output": f"{w} {w}"})
        else:
            records.append({"instruction": "Reverse the letters of the input.", "input": w, "output": w[::-1]})
    records.append({"instruction": "Write at length.", "input": "", "output": "word " * 300})  # over max_seq_len
    return records


# ----------------------------------------------------------------------------- prompts and labels

def test_prompts_are_the_templates_then_a_newline():
    assert datasets.PROMPT_WITH_INPUT == WITH_INPUT and datasets.PROMPT_NO_INPUT == NO_INPUT
    assert datasets.alpaca_prompt("Name a color.") == NO_INPUT.format(instruction="Name a color.") + "\n"
    assert datasets.alpaca_prompt("Sum these.", "2, 3") == WITH_INPUT.format(instruction="Sum these.", input="2, 3") + "\n"
    assert datasets.alpaca_prompt("{input} braces stay", "") .startswith(NO_INPUT.split("{")[0])


def test_example_is_prompt_then_response_then_eot():
    record = {"instruction": "Say hi <|endoftext|>", "input": "", "output": "Hi there!"}
    ids, n_prompt = fa.encode_example(ENC, record)
    prompt = ENC.encode_ordinary(NO_INPUT.format(instruction=record["instruction"]) + "\n")
    assert ids[:n_prompt] == prompt and n_prompt == len(prompt)
    assert ids[n_prompt:] == ENC.encode_ordinary("Hi there!") + [ENC.eot_token]
    assert ENC.eot_token not in ids[:-1]  # text in a record never becomes the special token
    assert ENC.decode(ids[:-1]) == prompt_text(record) + "Hi there!"


def prompt_text(record):
    template = WITH_INPUT if record["input"] else NO_INPUT
    return template.format(**record) + "\n"


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_labels_are_minus_100_exactly_on_prompt_and_padding(mask_prompt):
    records = [{"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."},
               {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
               {"instruction": "Reply.", "input": "", "output": "\n  Spaces and a newline first."}]
    examples = [fa.encode_example(ENC, r) for r in records]
    x, y = fa.collate(examples, mask_prompt, pad_id=ENC.eot_token)
    assert x.shape == y.shape == (3, max(len(ids) for ids, _ in examples) - 1)
    for row, r in enumerate(records):
        prompt = ENC.encode_ordinary(prompt_text(r))
        response = ENC.encode_ordinary(r["output"]) + [ENC.eot_token]
        tokens = prompt + response
        for t in range(x.size(1)):
            if t + 1 >= len(tokens):  # padding
                assert y[row, t] == -100 and x[row, t] == ENC.eot_token
            elif t + 1 < len(prompt) and mask_prompt:  # predicting a prompt token
                assert x[row, t] == tokens[t] and y[row, t] == -100
            else:
                assert x[row, t] == tokens[t] and y[row, t] == tokens[t + 1]
        targets = y[row][y[row] != -100].tolist()
        assert targets == (response if mask_prompt else tokens[1:])  # the EOT is the last target


def test_loss_counts_the_response_only():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=128, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)).eval()
    record = {"instruction": "Name a fruit.", "input": "", "output": "A pear."}
    ids, n_prompt = fa.encode_example(ENC, record)
    x, y = fa.collate([(ids, n_prompt)], True, ENC.eot_token)
    logits, loss = model(x)[0], model(x, y)[1]
    logprobs = logits[0].log_softmax(-1)
    manual = -sum(logprobs[t, ids[t + 1]] for t in range(n_prompt - 1, len(ids) - 1)) / (len(ids) - n_prompt)
    torch.testing.assert_close(loss, manual)


# ----------------------------------------------------------------------------- data

def test_split_is_seeded_and_held_out_set_ignores_subset():
    records = make_records(60)
    train_a, val_a = fa.split_records(records, 10, 0, seed=1)
    train_b, val_b = fa.split_records(records, 10, 0, seed=1)
    assert (train_a, val_a) == (train_b, val_b) and len(val_a) == 10 and len(train_a) == 51
    assert fa.split_records(records, 10, 0, seed=2)[1] != val_a
    sub_train, sub_val = fa.split_records(records, 10, 20, seed=1)
    assert sub_val == val_a and sub_train == train_a[:20]
    assert sorted(map(json.dumps, train_a + val_a)) == sorted(map(json.dumps, records))


def test_a_subset_larger_than_the_records_says_what_it_trains_on(capsys):
    train, _ = fa.split_records(make_records(60), 10, 500, seed=1)
    assert len(train) == 51 and "--subset=500, but 51 records are left" in capsys.readouterr().out


def test_read_records_rejects_malformed_files(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "ok", "output": "fine"}, {"instruction": 3, "output": "x"}]))
    with pytest.raises(SystemExit) as e:
        fa.read_records(path)
    assert e.value.code == 2 and "record 1" in capsys.readouterr().err
    path.write_text("[{")
    with pytest.raises(SystemExit):
        fa.read_records(path)
    path.write_text(json.dumps([{"instruction": "no input key", "output": "fine"}]))
    assert fa.read_records(path) == [{"instruction": "no input key", "input": "", "output": "fine"}]


def test_training_batches_walk_epochs_and_are_pure():
    examples = [([i, i + 1, i + 2], 1) for i in range(10)]  # ids identify the example
    splits = {"train": examples, "val": examples[:3]}
    get_batch, step_tokens = fa.batch_loader(splits, 3, 2, True, 0, "cpu", seed=5)
    seen = [get_batch("train", it, index)[0][:, 0].tolist() for it in range(3) for index in range(2)]
    for epoch in (seen[:3], seen[3:]):  # an epoch is 3 batches of 3 distinct examples; one is left out
        assert len(set(sum(epoch, []))) == 9
    assert seen[3:] != seen[:3]  # each epoch has its own order
    assert torch.equal(get_batch("train", 7, 1)[1], get_batch("train", 7, 1)[1])
    assert get_batch("val", "eval", 0)[0][:, 0].tolist() == [0, 1, 2]
    assert step_tokens(0) == 2 * 3 * 2


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The hub as the scripts see it: a tiny GPT-2 under openai-community/gpt2 and the generated
    records as yahma/alpaca-cleaned, with the cache in a fresh folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny-gpt2")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    with HubMirror() as mirror, pytest.MonkeyPatch.context() as mp:
        mirror.add("openai-community/gpt2/resolve/main/config.json", (model_dir / "config.json").read_bytes(), lfs=False)
        mirror.add("openai-community/gpt2/resolve/main/model.safetensors", (model_dir / "model.safetensors").read_bytes())
        mirror.add("datasets/yahma/alpaca-cleaned/resolve/main/alpaca_data_cleaned.json",
                   json.dumps(make_records()).encode(), lfs=False)
        mp.setenv("HF_ENDPOINT", mirror.url)
        mp.setenv("GPT2REF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield mirror


def test_data_sources_go_through_the_cache(hub, tmp_path):
    records = make_records(5, seed=3)
    hub.add("stanford/alpaca_data.json", json.dumps(records).encode(), lfs=False)
    c = SimpleNamespace(data="alpaca", data_path="", alpaca_url=f"{hub.url}/stanford/alpaca_data.json")
    path = fa.alpaca_file(c)
    assert path == downloads.cache_dir() / "alpaca" / "alpaca_data.json" and fa.read_records(path) == records
    cleaned = fa.alpaca_file(SimpleNamespace(data="alpaca-cleaned", data_path="", alpaca_url=""))
    assert cleaned == downloads.cache_dir() / "datasets" / "yahma/alpaca-cleaned" / "alpaca_data_cleaned.json"
    assert json.loads(cleaned.read_text()) == make_records()
    (tmp_path / "mine.json").write_text(json.dumps(records))
    assert fa.alpaca_file(SimpleNamespace(data="ignored", data_path=str(tmp_path / "mine.json"))) == str(tmp_path / "mine.json")
    requests = len(hub.requests)
    fa.alpaca_file(c)
    assert len(hub.requests) == requests  # cached: no second download


MODES = {"lora": ["--lora_rank=4", "--lora_alpha=8"],
         "qlora": ["--lora_rank=4", "--lora_alpha=8", "--quantize=nf4"],
         "full": ["--lora_rank=0", "--learning_rate=1e-3"]}


def run_args(out_dir, *extra):
    return [f"--out_dir={out_dir}", "--init_from=gpt2", "--max_iters=6", "--eval_interval=3", "--log_interval=1",
            "--batch_size=4", "--gradient_accumulation_steps=2", "--val_size=6", "--eval_iters=2",
            "--eval_prompts=2", "--sample_tokens=6", "--max_seq_len=128", "--warmup_iters=2",
            "--lora_dropout=0.1", "--device=cpu", "--dtype=float32", "--merge=True", *extra]


def finetune(out_dir, *extra):
    fa.main(run_args(out_dir, *extra))


def finetune_on_two_processes(out_dir, *extra):
    """The same run under torchrun with FSDP on 2 processes, each taking one of a step's 2 micro-batches."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "finetune_alpaca.py"), *run_args(out_dir, "--gradient_accumulation_steps=1", "--fsdp=True",
                                                           *extra)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) (FSDP)" in result.stdout
    return result


def assert_same_log(one, two):
    """Two runs' logs: the same records, their losses within 1e-5 and their greedy responses equal."""
    one, two = log_without_timing(one / "log.jsonl"), log_without_timing(two / "log.jsonl")
    assert [r["iter"] for r in two] == [r["iter"] for r in one]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "train_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5)
        assert [r["response"] for r in b.get("responses", [])] == [r["response"] for r in a.get("responses", [])]


class Crash(Exception):
    pass


def log_without_timing(path):
    records = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "ms", "mem")} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_run_crash_resume_and_sample(mode, hub, tmp_path, monkeypatch, capsys):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    finetune(straight, *MODES[mode])
    out = capsys.readouterr().out
    assert "dropped 1 of" in out  # the over-long record
    log = log_without_timing(straight / "log.jsonl")
    evals = [r for r in log if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 3, 6] and [r["iter"] for r in log if "loss" in r] == list(range(6))
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    assert [set(r) for r in evals[-1]["responses"]] == [{"instruction", "input", "output", "response"}] * 2
    assert (straight / "loss.png").stat().st_size > 0 and (straight / "merged" / "model.safetensors").exists()

    real_step = training.train_step

    def crash_at_4(*args, **kwargs):
        if args[4] == 4:
            raise Crash
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", crash_at_4)
    with pytest.raises(Crash):
        finetune(crashed, *MODES[mode])
    monkeypatch.setattr(training, "train_step", real_step)
    fa.main([f"--out_dir={crashed}", "--init_from=resume"])
    assert log_without_timing(crashed / "log.jsonl") == log  # the same numbers, bit for bit

    ckpt = checkpoints.load(straight / "ckpt.pt")
    if mode == "full":
        assert "model" in ckpt and not (straight / "adapter.json").exists()
        resumed = checkpoints.load(crashed / "ckpt.pt")["model"]
        assert all(torch.equal(t, resumed[k]) for k, t in ckpt["model"].items())
        return
    assert set(ckpt["adapter"]) == set(weightfiles.read_safetensors(straight / "adapter.safetensors"))
    assert all(k.endswith(gpt.LORA_SUFFIXES) for k in ckpt["adapter"]) and "model" not in ckpt
    capsys.readouterr()
    with pytest.raises(SystemExit):  # what sample.py --init_from=resume would do with it
        models.model_from_checkpoint(ckpt)
    assert "--init_from=gpt2 --adapter=" in capsys.readouterr().err
    adapter = json.loads((straight / "adapter.json").read_text())
    assert adapter["base_model"] == "gpt2" and adapter["quantize"] == ("nf4" if mode == "qlora" else None)
    resumed = weightfiles.read_safetensors(crashed / "adapter.safetensors")
    for name, t in weightfiles.read_safetensors(straight / "adapter.safetensors").items():
        assert torch.equal(t, resumed[name]), name

    # sample.py puts the adapter on the cached base model; transformers reads the merged export
    instruction = "Repeat the word apple twice."
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--init_from=gpt2", f"--adapter={straight}",
                        f"--instruction={instruction}", "--temperature=0", "--max_new_tokens=12", "--device=cpu",
                        "--dtype=float32"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    import transformers
    hf = transformers.GPT2LMHeadModel.from_pretrained(straight / "merged").eval()
    ids = torch.tensor([ENC.encode_ordinary(NO_INPUT.format(instruction=instruction) + "\n")])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      pad_token_id=0)[0, ids.size(1):].tolist()
    out = out[:out.index(ENC.eot_token)] if ENC.eot_token in out else out
    assert r.stdout == ENC.decode(out) + "\n"


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(hub, tmp_path, monkeypatch, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finetune(straight, *MODES["lora"])
    real_step = training.train_step

    def ctrl_c_in_step_4(*args, **kwargs):
        if args[4] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # mid-step, as a user's Ctrl-C lands
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", ctrl_c_in_step_4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        finetune(stopped, *MODES["lora"])
    assert e.value.code == 130
    ckpt = checkpoints.load(stopped / "ckpt.pt")
    assert ckpt["iter"] == 5 and not ckpt["evaluated"] and ckpt["script"] == "finetune_alpaca.py"
    assert (f"stopped at iteration 5; checkpoint in {stopped / 'ckpt.pt'}; resume with: python finetune_alpaca.py "
            f"--init_from=resume --out_dir={stopped}") in capsys.readouterr().out.splitlines()
    monkeypatch.setattr(training, "train_step", real_step)
    fa.main([f"--out_dir={stopped}", "--init_from=resume"])
    assert log_without_timing(stopped / "log.jsonl") == log_without_timing(straight / "log.jsonl")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run gave Ctrl-C back


def test_small_files_and_small_models_get_defaults_that_fit(hub, tmp_path, capsys):
    records = make_records(20, seed=5)
    (tmp_path / "small.json").write_text(json.dumps(records))
    fa.main([f"--out_dir={tmp_path / 'out'}", "--init_from=gpt2", f"--data_path={tmp_path / 'small.json'}",
             "--max_iters=1", "--batch_size=2", "--eval_iters=1", "--eval_prompts=0", "--device=cpu",
             "--dtype=float32"])
    out = capsys.readouterr().out
    assert "--val_size=0: holding out 2 of the 21 records" in out  # a tenth, not 500
    assert fa.sequence_length(0, 256) == 256 and fa.sequence_length(0, 1024) == 512
    assert fa.sequence_length(100, 256) == 100


@pytest.mark.slow
def test_sample_refuses_a_bad_adapter_or_a_lone_input(hub, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (tmp_path / "adapter.json").write_text("{}")
    for args, message in ((["--input=x"], "--input goes with an --instruction"),
                          ([f"--adapter={tmp_path}"], "cannot load the adapter"),
                          ([f"--adapter={tmp_path / 'missing'}"], "cannot load the adapter")):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--init_from=gpt2", "--device=cpu", *args],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_a_failed_download_says_what_to_do_instead(hub, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2REF_CACHE", str(tmp_path))  # not the cache an earlier test filled
    missing = SimpleNamespace(data="alpaca", data_path="", alpaca_url=f"{hub.url}/no/alpaca_data.json")
    with pytest.raises(SystemExit) as e:
        fa.alpaca_file(missing)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "404" in err and "Without it: a local copy with --data_path=file.json, or another --alpaca_url" in err


@pytest.mark.slow
def test_lora_under_fsdp_on_two_processes_equals_one_process(hub, tmp_path):
    """torchrun with 2 processes, FSDP (and activation checkpointing) against 1 process accumulating
    the same 2 micro-batches per step: the same losses, responses and adapter."""
    finetune(tmp_path / "one", *MODES["lora"])
    result = finetune_on_two_processes(tmp_path / "two", "--activation_checkpointing=True", *MODES["lora"])
    assert result.stdout.count("done: 6 iterations") == 1
    assert_same_log(tmp_path / "one", tmp_path / "two")
    adapters = [weightfiles.read_safetensors(tmp_path / run / "adapter.safetensors") for run in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-5) for k in adapters[0])
    assert json.loads((tmp_path / "two" / "adapter.json").read_text()) == json.loads((tmp_path / "one" / "adapter.json").read_text())
    merged = [weightfiles.read_safetensors(tmp_path / run / "merged" / "model.safetensors") for run in ("one", "two")]
    assert all(torch.allclose(merged[0][k], merged[1][k], atol=1e-5) for k in merged[0])


@pytest.mark.slow
def test_a_full_fine_tune_under_fsdp_resumes_on_one_process(hub, tmp_path):
    """The README's gpt2-xl example, small: a full fine-tune sharded over 2 processes, then resumed
    on 1 process accumulating twice as much, logs what a 1-process run resumed the same way logs."""
    finetune(tmp_path / "one", *MODES["full"])
    finetune_on_two_processes(tmp_path / "two", *MODES["full"])
    for run in ("one", "two"):
        fa.main([f"--out_dir={tmp_path / run}", "--init_from=resume", "--max_iters=9"])
    assert_same_log(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_a_train_py_run_is_fine_tuned_and_its_adapter_found_from_another_folder(hub, tmp_path, monkeypatch, capsys):
    """--init_from=<a train.py out_dir>: the LoRA adapter records the run's absolute path, so sample.py
    --adapter finds its base from any folder."""
    import numpy as np
    import sample
    import train
    (tmp_path / "data" / "toy").mkdir(parents=True)
    ids = np.random.default_rng(0).integers(0, 1000, 4000)  # GPT-2 token ids, as Alpaca's prompts are
    for split in ("train", "val"):
        datasets.write_tokens(tmp_path / "data" / "toy" / f"{split}.bin", ids, 50257)
    (tmp_path / "data" / "toy" / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257}))
    monkeypatch.chdir(tmp_path)
    train.main(["--data_dir=data", "--dataset=toy", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=128",
                "--batch_size=2", "--max_iters=2", "--eval_iters=1", "--sample_tokens=0", "--device=cpu",
                "--dtype=float32", "--out_dir=run"])
    finetune(tmp_path / "alpaca", "--init_from=run", "--lora_rank=2", "--max_iters=2", "--merge=False")
    assert json.loads((tmp_path / "alpaca" / "adapter.json").read_text())["base_model"] == str(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "alpaca")
    capsys.readouterr()
    sample.main(["--adapter=.", "--instruction=Say 1.", "--max_new_tokens=3", "--device=cpu", "--dtype=float32"])
    assert capsys.readouterr().err.count("error") == 0
