"""train.py on a tiny model and generated data: the loss falls, resume is exact (after a SIGKILL
too), 2 processes equal 1 with twice the accumulation, AMP runs on CPU, mistakes are one line."""
import json
import math
import os
import shutil
import signal
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from lib import benchmarks, checkpoints, datasets, downloads, logs, measure, models, training
from gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 128
TINY = ["--dataset=toy", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--sample_prompt=A", "--sample_tokens=8", "--warmup_iters=2",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--dtype=float32", "--device=cpu", "--peak_flops=1e12"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A random walk mod VOCAB in steps of 1 or 2: one bit per token (0.69 nats) to learn down to."""
    root = tmp_path_factory.mktemp("data")
    (root / "toy").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20000), ("val", 4000)):
        datasets.write_tokens(root / "toy" / f"{split}.bin", np.cumsum(rng.choice([1, 2], size=n)) % VOCAB, VOCAB)
    (root / "toy" / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": VOCAB, "eot_token": 50256}))
    return root


def command(args, data_dir, out_dir, tiny=True, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    base = [*TINY, f"--data_dir={data_dir}"] if tiny else []
    return [sys.executable, *launcher, str(ROOT / "train.py"), *base, f"--out_dir={out_dir}", *args]


def run(args, data_dir, out_dir, **kw):
    """train.py in a subprocess. On a time-out the whole tree goes: torchrun's processes run in a
    session of their own, and would outlive torchrun."""
    import psutil
    proc = subprocess.Popen(command(args, data_dir, out_dir, **kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        raise
    assert proc.returncode == 0, stdout[-3000:] + stderr[-12000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def read_log(out_dir):
    records = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


WHOLE = ["--max_iters=60", "--eval_interval=30", "--lr_decay_iters=60", "--dropout=0.1"]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    result = run(WHOLE, data_dir, out)
    return out, result


def test_loss_falls_and_everything_is_logged(trained):
    out, result = trained
    steps, evals = read_log(out)
    assert [r["iter"] for r in steps] == list(range(60))
    assert [r["iter"] for r in evals] == [0, 30, 60]
    assert evals[0]["val_loss"] == pytest.approx(math.log(VOCAB), abs=0.1)  # untrained: uniform guessing
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    for r in steps:
        assert {"lr", "tokens_per_s", "ms", "mfu", "mem"} <= set(r) and r["tokens_per_s"] > 0 and r["mem"] > 0
    assert all(isinstance(r["sample"], str) and r["sample"] for r in evals)
    assert "MFU" in result.stdout and "tokens/s" in result.stdout and "ms/iter" in result.stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_is_plain_data_and_reproduces_the_logged_val_loss(trained, data_dir):
    out, _ = trained
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert not [k for k in ckpt["model"] if k.startswith("_orig_mod.")]
    assert ckpt["iter"] == 60 and ckpt["config"]["n_layer"] == 2 and ckpt["tokenizer"] == "gpt2"
    _, evals = read_log(out)
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in evals)
    model = models.model_from_checkpoint(ckpt)
    get_batch = datasets.batch_loader(str(data_dir / "toy"), 4, 32, "cpu", train.DEFAULTS["seed"])
    losses = training.evaluate(model, get_batch, 2, splits=("val",))
    assert losses["val"] == pytest.approx(evals[-1]["val_loss"], abs=1e-5)


def test_resume_is_exact(trained, data_dir, tmp_path):
    run([*WHOLE, "--max_iters=30"], data_dir, tmp_path)
    # the saved config supplies everything else: only what the command line names changes
    run(["--init_from=resume", "--max_iters=60"], data_dir, tmp_path, tiny=False)
    whole, halves = read_log(trained[0]), read_log(tmp_path)
    assert [r["iter"] for r in halves[0]] == list(range(60))
    assert [(r["loss"], r["lr"]) for r in halves[0]] == [(r["loss"], r["lr"]) for r in whole[0]]  # to the bit
    assert [(r["val_loss"], r["sample"]) for r in halves[1]] == [(r["val_loss"], r["sample"]) for r in whole[1]]


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_the_last_checkpoint(data_dir, tmp_path):
    out = tmp_path / "killed"
    args = ["--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=10", "--dropout=0.1"]
    proc = subprocess.Popen(command(args, data_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # kill it a few steps after its first real checkpoint (iter 10)
            if (out / "log.jsonl").exists() and any(r["iter"] >= 13 for r in read_log(out)[0]):
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = {r["iter"]: r["loss"] for r in read_log(out)[0]}
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] % 10 == 0 and ckpt["iter"] >= 10
    end = ckpt["iter"] + 5
    run(["--init_from=resume", f"--max_iters={end}"], data_dir, out, tiny=False)
    steps, _ = read_log(out)
    assert [r["iter"] for r in steps] == list(range(end))  # no gap, no repeat
    redone = [it for it in range(ckpt["iter"], end) if it in before]
    assert redone and all(before[it] == steps[it]["loss"] for it in redone)  # the redone steps, bit for bit
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == end


def test_bfloat16_autocast_runs_on_cpu(data_dir, tmp_path, capsys):
    train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--dtype=bfloat16", "--max_iters=3",
                "--eval_interval=3"])
    assert "bfloat16" in capsys.readouterr().out
    steps, evals = read_log(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in steps) and math.isfinite(evals[-1]["val_loss"])
    model = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    seen = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    optimizer = training.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    get_batch = datasets.batch_loader(str(data_dir / "toy"), 4, 32, "cpu", seed=0)
    training.train_step(model, optimizer, training.make_scaler("cpu", "bfloat16"), get_batch, 0, 1e-3, dtype="bfloat16")
    assert seen == [torch.bfloat16] and model.lm_head.weight.dtype == torch.float32  # bf16 compute, fp32 weights


def test_float16_grad_scaler_state_is_checkpointed_and_restored(data_dir, tmp_path, capsys):
    train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--dtype=float16",
                "--max_iters=2", "--eval_interval=2"])
    scaler = torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    scaler["scale"] = 1024.0  # a value only a restored scaler would carry on from
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["scaler"] = scaler
    torch.save(ckpt, tmp_path / "ckpt.pt")
    train.main(["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=3"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"]["scale"] in (512.0, 1024.0)
    assert not training.make_scaler("cpu", "bfloat16").is_enabled()


def test_best_val_loss_is_not_overwritten_by_a_worse_one(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["best_val_loss"] = 0.5  # below anything this data allows (0.69)
    torch.save(ckpt, out / "ckpt.pt")
    train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=61"])
    assert read_log(out)[1][-1]["val_loss"] > 0.5
    assert torch.load(out / "ckpt.pt", weights_only=True)["best_val_loss"] == 0.5


def one_line_exit(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_unknown_option_is_one_line_naming_close_matches(capsys):
    err = one_line_exit(capsys, ["--learning_rat=1e-3"])
    assert "--learning_rat" in err and "--learning_rate" in err


def test_resume_refuses_a_changed_model_shape_but_takes_a_new_lr(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    err = one_line_exit(capsys, ["--init_from=resume", f"--out_dir={out}", "--n_layer=3", "--learning_rate=1e-3"])
    assert "n_layer=2" in err and "n_layer=3" in err
    train.main(["--init_from=resume", f"--out_dir={out}", "--learning_rate=1e-3", "--max_iters=62"])  # > lr_decay_iters
    steps, _ = read_log(out)
    assert [r["iter"] for r in steps][-2:] == [60, 61] and steps[-1]["lr"] == 3e-4  # past lr_decay_iters: min_lr


def test_resume_without_a_checkpoint_and_missing_data_are_one_line(tmp_path, capsys):
    assert "no checkpoint" in one_line_exit(capsys, ["--init_from=resume", f"--out_dir={tmp_path}"])
    assert "prepare_data.py" in one_line_exit(capsys, [f"--data_dir={tmp_path}", f"--out_dir={tmp_path}"])


@pytest.mark.slow
def test_compiled_model_checkpoints_without_orig_mod_keys(data_dir, tmp_path, monkeypatch, capsys):
    compile_ = torch.compile  # the eager backend wraps the model as inductor does, without the C++ build
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))
    args = [*TINY, f"--data_dir={data_dir}", "--max_iters=2", "--eval_interval=2"]
    train.main([*args, f"--out_dir={tmp_path}", "--compile=True"])
    keys = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"].keys()
    assert keys == GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)).state_dict().keys()
    # activation checkpointing under compile: the same losses as the compiled run without it
    train.main([*args, f"--out_dir={tmp_path / 'checkpointing'}", "--compile=True", "--activation_checkpointing=True"])
    np.testing.assert_allclose(losses(tmp_path / "checkpointing"), losses(tmp_path), rtol=0, atol=1e-6)
    # with dropout it would not be: the recomputation draws other masks
    with pytest.raises(SystemExit) as e:
        train.main([*args, f"--out_dir={tmp_path / 'dropout'}", "--compile=True", "--activation_checkpointing=True",
                    "--dropout=0.1"])
    assert e.value.code == 2 and "recomputes dropout with other masks" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_follows_a_cosine_to_min_lr():
    lr = [training.lr_at(it, 1.0, 0.1, 10, 110) for it in range(120)]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)
    assert lr[10] == pytest.approx(1.0) and lr[60] == pytest.approx(0.55) and lr[110:] == [0.1] * 10
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_optimizer_decays_matrices_only_and_holds_the_tied_embedding_once():
    model = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    decay, no_decay = training.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # named_parameters() lists the tied matrix once
    matrices = sorted(n for n, p in model.named_parameters() if p.dim() == 2)
    assert sorted(names[id(p)] for p in decay["params"]) == matrices
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params(non_embedding=False)
    assert any(p is model.lm_head.weight for p in decay["params"])


def test_batches_are_windows_of_the_data_fixed_by_their_key(data_dir):
    get_batch = datasets.batch_loader(str(data_dir / "toy"), 4, 32, "cpu", seed=1)
    x, y = get_batch("train", 7, 3)
    assert torch.equal(x, get_batch("train", 7, 3)[0]) and not torch.equal(x, get_batch("train", 7, 2)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    step = (y - x) % VOCAB  # the walk moves by 1 or 2
    assert ((step == 1) | (step == 2)).all()


def test_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoints.save(path, {"iter": 1, "w": torch.ones(3)})
    with pytest.raises(Exception):
        checkpoints.save(path, {"iter": 2, "bad": lambda: 0})  # fails while writing
    assert torch.load(path, weights_only=True)["iter"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left behind


def test_every_file_is_written_through_one_fsynced_atomic_write(tmp_path, monkeypatch):
    import gpt
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    checkpoints.save(tmp_path / "ckpt.pt", {"iter": 1})
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=16))
    model.save_pretrained(tmp_path / "hf")
    gpt.apply_lora(model, 2, 4.0)
    gpt.save_adapter(model, tmp_path / "adapter", base_model="gpt2")
    datasets.write_tokens(tmp_path / "x.bin", np.arange(10), 16)
    written = {os.path.relpath(p.removesuffix(".tmp"), tmp_path) for p in synced}
    assert {"ckpt.pt", "hf/config.json", "hf/model.safetensors", "adapter/adapter.json",
            "adapter/adapter.safetensors", "x.bin"} <= written
    assert all(p.endswith(".tmp") for p in synced) and not list(tmp_path.rglob("*.tmp"))


def test_sample_py_resumes_from_the_checkpoint(trained, capsys):
    import sample
    out, _ = trained
    sample.main(["--init_from=resume", f"--out_dir={out}", "--start=A", "--max_new_tokens=6", "--temperature=0",
                 "--device=cpu", "--dtype=float32"])
    model = models.model_from_checkpoint(torch.load(out / "ckpt.pt", weights_only=True)).eval()
    enc = datasets.get_tokenizer("gpt2")
    ids = enc.encode("A")
    for _ in range(6):  # greedy, recomputing the whole sequence each time
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert capsys.readouterr().out == enc.decode(ids) + "\n"


def test_init_from_a_hugging_face_directory_starts_from_its_weights(data_dir, tmp_path, capsys):
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    base.save_pretrained(tmp_path / "hf")
    train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", f"--init_from={tmp_path / 'hf'}",
                "--dropout=0.1", "--max_iters=0"])
    get_batch = datasets.batch_loader(str(data_dir / "toy"), 4, 32, "cpu", train.DEFAULTS["seed"])
    expected = training.evaluate(base, get_batch, 2)["val"]
    assert read_log(tmp_path / "out")[1][0]["val_loss"] == pytest.approx(expected, abs=1e-5)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["block_size"] == 64 and ckpt["model_args"]["dropout"] == 0.1
    assert models.model_from_checkpoint(ckpt).transformer.h[0].mlp.dropout.p == 0.1


def test_wandb_gets_the_numbers_when_asked(data_dir, tmp_path, monkeypatch, capsys):
    calls = []
    run = SimpleNamespace(log=lambda values, step: calls.append(("log", step, values)),
                          finish=lambda: calls.append(("finish",)))
    fake = type(sys)("wandb")
    fake.init = lambda project, name, config: calls.append(("init", project, config["max_iters"])) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)  # the real one is never required
    train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--wandb_log=True", "--max_iters=2",
                "--eval_interval=2"])
    assert calls[0] == ("init", "gpt2ref", 2) and calls[-1] == ("finish",)
    logged = [c for c in calls if c[0] == "log"]
    assert [step for _, step, _ in logged] == [0, 0, 1, 1, 2]  # eval 0, iter 0, iter 1, the estimate, eval 2
    assert "val_loss" in logged[0][2] and "loss" in logged[1][2] and "sample" not in logged[0][2]
    assert "estimated_seconds_left" in logged[3][2]


def start(args, data_dir, out_dir, nproc=1):
    """train.py running in the background, its stdout a pipe read line by line."""
    return subprocess.Popen(command(args, data_dir, out_dir, nproc=nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(proc, prefix):
    """Read proc's stdout up to the first line starting with prefix; return what was read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no {prefix!r} in the output:\n{''.join(lines)}{proc.stderr.read()[-2000:]}")


# stopped runs go on far past the reference runs, so that a signal always lands mid-run
LONG = ["--max_iters=100000", "--lr_decay_iters=60", "--eval_interval=30", "--dropout=0.1"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(trained, data_dir, tmp_path, sig):
    out = tmp_path / "stopped"
    proc = start(LONG, data_dir, out)
    wait_for(proc, "iter 12:")
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in err
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    stopped = ckpt["iter"]
    assert 13 <= stopped < 30 and not ckpt["evaluated"] and ckpt["script"] == "train.py"
    assert (f"stopped at iteration {stopped}; checkpoint in {out / 'ckpt.pt'}; resume with: "
            f"python train.py --init_from=resume --out_dir={out}") in rest.splitlines()
    run(["--init_from=resume", "--max_iters=60"], data_dir, out, tiny=False)
    whole, resumed = read_log(trained[0]), read_log(out)
    assert [r["iter"] for r in resumed[0]] == list(range(60))
    assert [(r["loss"], r["lr"]) for r in resumed[0]] == [(r["loss"], r["lr"]) for r in whole[0]]  # to the bit
    assert [(r["val_loss"], r["sample"]) for r in resumed[1]] == [(r["val_loss"], r["sample"]) for r in whole[1]]


def test_a_stop_just_before_an_evaluation_runs_it_on_resume(trained, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)  # stands for a run stopped by a signal at iteration 60, before its evaluation
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    checkpoints.save(out / "ckpt.pt", {**ckpt, "evaluated": False})
    train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=61"])
    _, evals = read_log(out)
    assert [r["iter"] for r in evals] == [0, 30, 60, 60, 61]
    assert evals[3]["val_loss"] == evals[2]["val_loss"]


@pytest.mark.slow
def test_a_second_signal_stops_at_once_leaving_the_last_checkpoint_whole(data_dir, tmp_path):
    out = tmp_path / "twice"
    proc = start([*LONG, "--eval_interval=10", "--eval_iters=2000"], data_dir, out)  # evaluations take seconds
    wait_for(proc, "iter 9:")
    proc.send_signal(signal.SIGINT)  # during the evaluation at 10
    assert "stopping after this step" in proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped at once" in err and "Traceback" not in err
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # the one written at iteration 0, whole
    assert ckpt["iter"] == 0 and ckpt["script"] == "train.py"


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_process_at_one_iteration(data_dir, tmp_path):
    args = ["--max_iters=100000", "--lr_decay_iters=12", "--eval_interval=6", "--dropout=0.1"]
    out = tmp_path / "stopped"
    proc = start(args, data_dir, out, nproc=2)
    wait_for(proc, "iter 4:")
    proc.send_signal(signal.SIGTERM)  # to torchrun, as a cluster does; it passes the signal on to its processes
    rest, err = proc.communicate(timeout=120)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    stopped = ckpt["iter"]
    assert 5 <= stopped < 12 and not ckpt["evaluated"]
    assert (f"stopped at iteration {stopped}; checkpoint in {out / 'ckpt.pt'}; resume with: torchrun --standalone "
            f"--nproc_per_node=2 train.py --init_from=resume --out_dir={out}") in rest.splitlines()
    run(["--init_from=resume", "--max_iters=12"], data_dir, out, tiny=False, nproc=2)
    run([*args, "--max_iters=12"], data_dir, tmp_path / "whole", nproc=2)
    whole, resumed = read_log(tmp_path / "whole"), read_log(out)
    assert [r["iter"] for r in resumed[0]] == list(range(12))
    assert [r["loss"] for r in resumed[0]] == [r["loss"] for r in whole[0]]
    assert [r["val_loss"] for r in resumed[1]] == [r["val_loss"] for r in whole[1]]


def test_loss_png_panels_share_the_iteration_axis(tmp_path, monkeypatch):
    """Steps are logged every log_interval (the last at 180 here), evaluations at the end (200):
    every panel spans the run to its end, the learning rate's too."""
    from matplotlib.figure import Figure
    log = tmp_path / "log.jsonl"
    with open(log, "w") as f:
        for it in range(0, 200, 20):
            f.write(json.dumps({"iter": it, "loss": 5 - it / 100, "lr": 1e-3, "tokens_per_s": 1e3, "mem": 100}) + "\n")
        for it in (0, 100, 200):
            f.write(json.dumps({"iter": it, "train_loss": 4.0, "val_loss": 4.1}) + "\n")
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or save(fig, *a, **k))
    logs.plot_log(log, tmp_path / "loss.png")
    (fig,) = figures
    limits = {ax.get_title(): ax.get_xlim() for ax in fig.axes}
    assert set(limits) == {"loss", "learning rate", "tokens/s", "peak memory (MB)"}
    assert len(set(limits.values())) == 1 and limits["learning rate"][1] >= 200


# ----------------------------------------------------------------------------- FSDP, activation checkpointing, resizing

SPLITS = ["--max_iters=10", "--eval_interval=5", "--lr_decay_iters=10", "--dropout=0.1", "--eval_iters=3"]


def losses(out_dir):
    steps, evals = read_log(out_dir)
    return [r["loss"] for r in steps] + [r["val_loss"] for r in evals]


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The reference: one process accumulating the two micro-batches of every step."""
    out = tmp_path_factory.mktemp("one")
    run([*SPLITS, "--gradient_accumulation_steps=2"], data_dir, out)
    steps, evals = read_log(out)
    assert [r["iter"] for r in steps] == list(range(10)) and [r["iter"] for r in evals] == [0, 5, 10]
    assert steps[-1]["loss"] < steps[0]["loss"]
    return losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["ddp", "fsdp"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp_ddp_and_one_process_log_the_same_losses(data_dir, tmp_path, one_process, split, checkpointing):
    """With activation checkpointing the processes also take the chunked loss, which runs inside the
    wrapped model's forward, where DDP's and FSDP's hooks run."""
    args = [*SPLITS, f"--fsdp={split == 'fsdp'}", f"--activation_checkpointing={checkpointing}",
            f"--chunked_loss={checkpointing}"]
    result = run(args, data_dir, tmp_path, nproc=2)
    assert f"2 process(es) ({split.upper()})" in result.stdout
    steps, evals = read_log(tmp_path)
    assert [r["iter"] for r in steps] == list(range(10)) and [r["iter"] for r in evals] == [0, 5, 10]
    np.testing.assert_allclose(losses(tmp_path), one_process, rtol=0, atol=1e-5)
    if checkpointing and split == "ddp":  # and on one process, recomputing changes nothing at all
        run([*SPLITS, "--gradient_accumulation_steps=2", "--activation_checkpointing=True"], data_dir, tmp_path / "one")
        assert losses(tmp_path / "one") == one_process


@pytest.mark.slow
def test_fsdp_shards_what_each_process_holds(data_dir, tmp_path):
    """The start-up line counts what one process holds: under FSDP about half of the whole model's
    weights (4 bytes each), gradients (4) and AdamW moments (8)."""
    out = run(["--max_iters=0", "--n_layer=2", "--n_embd=256", "--n_head=2", "--fsdp=True", "--sample_tokens=0"],
              data_dir, tmp_path, nproc=2).stdout
    line = next(line for line in out.splitlines() if line.startswith("per process:"))
    weights, gradients, moments = (float(x) for x in re.findall(r"([\d.]+) MiB", line))
    n = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=256)).num_params(non_embedding=False)
    whole = 4 * n / 2 ** 20
    assert 0.45 * whole <= weights <= 0.55 * whole and 0.45 * whole <= gradients <= 0.55 * whole
    assert 0.45 * 2 * whole <= moments <= 0.55 * 2 * whole


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_processes(data_dir, tmp_path, one_process, first, then):
    """Written by FSDP on 2 processes and resumed on 1 accumulating twice as much, or written by one
    process and resumed under FSDP on 2: the resumed run logs the uninterrupted one's losses."""
    start = [*SPLITS, "--max_iters=5", f"--fsdp={first == 2}", f"--gradient_accumulation_steps={3 - first}"]
    run(start, data_dir, tmp_path, nproc=first)
    resumed = run(["--init_from=resume", "--max_iters=10", "--fsdp=True"], data_dir, tmp_path, tiny=False, nproc=then)
    assert (f"resuming on {then} process(es) a run of {first}: gradient_accumulation_steps {3 - first} -> {3 - then}, "
            f"the same 2 micro-batches per step") in resumed.stdout
    np.testing.assert_allclose(losses(tmp_path), one_process, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_total_batch_size_keeps_the_step_on_any_number_of_processes(data_dir, tmp_path, one_process):
    """--total_batch_size=256 is 2 micro-batches of 4 x 32: 1 each on 2 processes, then 2 on 1 process
    after the resume; the run logs the one-process run's losses."""
    first = run([*SPLITS, "--max_iters=5", "--total_batch_size=256"], data_dir, tmp_path, nproc=2)
    assert "256 tokens per step (2 process(es) x 1 micro-batch(es) of 4 x 32) x 5 steps = 1,280 tokens" in first.stdout
    resumed = run(["--init_from=resume", "--max_iters=10"], data_dir, tmp_path, tiny=False)
    assert "256 tokens per step (1 process(es) x 2 micro-batch(es) of 4 x 32)" in resumed.stdout
    np.testing.assert_allclose(losses(tmp_path), one_process, rtol=0, atol=1e-5)


def test_a_resume_that_cannot_split_the_step_names_the_process_counts_that_can(capsys):
    ckpt = {"world_size": 1, "config": {"gradient_accumulation_steps": 3}}
    with pytest.raises(SystemExit) as e:
        checkpoints.resumed_accumulation(ckpt, 3, 2)
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: the checkpoint's steps take 3 micro-batches (1 process(es) x 3), which 2 processes cannot share "
        "evenly: resume on 1, 3 process(es)\n")
    assert checkpoints.resumed_accumulation(ckpt, 3, 3) == 1 and checkpoints.resumed_accumulation(ckpt, 5, 2) == 5


@pytest.mark.slow
def test_sigkill_in_the_middle_of_an_fsdp_checkpoint_write_leaves_the_last_one_whole(data_dir, tmp_path):
    import psutil
    args = ["--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=1", "--eval_iters=1", "--fsdp=True",
            "--n_layer=4", "--n_embd=256", "--n_head=4", "--sample_tokens=0"]
    proc = subprocess.Popen(command(args, data_dir, tmp_path, nproc=2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    partial = tmp_path / "ckpt.pt.tmp"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((tmp_path / "ckpt.pt").exists() and partial.exists()):
            time.sleep(0.001)  # a checkpoint after every step: one is being written most of the time
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.kill()  # torchrun and its processes, which run in a session of their own
    finally:
        proc.wait()
    assert partial.exists()  # killed while writing
    ckpt = checkpoints.load(tmp_path / "ckpt.pt")
    assert ckpt["world_size"] == 2
    run(["--init_from=resume", f"--max_iters={ckpt['iter'] + 2}"], data_dir, tmp_path, tiny=False)  # on 1 process
    assert checkpoints.load(tmp_path / "ckpt.pt")["iter"] == ckpt["iter"] + 2


# ----------------------------------------------------------------------------- benchmarks during training

@pytest.fixture
def task_cache(tmp_path, monkeypatch):
    """A dataset in GPT-2's vocabulary, and HellaSwag and LAMBADA files (in their real layouts) already
    in the download cache, where eval.py's downloads would put them."""
    import gpt
    root = tmp_path / "data" / "wide"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        datasets.write_tokens(root / f"{split}.bin", rng.integers(0, 50257, size=4000), 50257)
    (root / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}))
    monkeypatch.setenv("GPT2REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    words = "the cat sat on a mat and then a dog ran far away from home".split()
    hellaswag = [{"ctx": " ".join(rng.choice(words, size=rng.integers(3, 20))), "label": int(rng.integers(4)),
                  "endings": [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(4)]} for _ in range(7)]
    lambada = [{"text": " ".join(rng.choice(words, size=rng.integers(4, 30)))} for _ in range(6)]
    for url, records in ((benchmarks.HELLASWAG_URL, hellaswag), (benchmarks.LAMBADA_URL, lambada)):
        downloads.web_path(url).parent.mkdir(parents=True)
        downloads.web_path(url).write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "data"


BENCH = ["--dataset=wide", "--eval_tasks=hellaswag,lambada", "--eval_limit=5", "--max_iters=4", "--eval_interval=2",
         "--sample_tokens=0"]


@pytest.mark.slow
def test_eval_tasks_are_scored_logged_and_plotted(task_cache, tmp_path, capsys, monkeypatch):
    """Each evaluation scores the tasks (their first eval_limit examples), prints and logs them; the
    last one's numbers are those of the checkpoint's model; loss.png gets the benchmark panels."""
    import gpt
    from matplotlib.figure import Figure
    out = tmp_path / "out"
    train.main([*TINY, *BENCH, f"--data_dir={task_cache}", f"--out_dir={out}"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval ")]
    assert len(printed) == 3 and all("hellaswag_acc_norm" in line and "lambada_ppl" in line for line in printed)
    _, evals = read_log(out)
    assert [r["iter"] for r in evals] == [0, 2, 4]
    model = models.model_from_checkpoint(checkpoints.load(out / "ckpt.pt"))
    enc = datasets.get_tokenizer("gpt2")
    for name in ("hellaswag", "lambada"):
        task = benchmarks.load_task(name, enc, model.config, limit=5)
        assert task.count == 5
        for metric, value in benchmarks.run_task(model, task).items():  # float32 sums in another order,
            assert evals[-1][f"{name}_{metric}"] == pytest.approx(value, rel=1e-6)  # where BLAS's buffers differ
    assert 0 <= evals[-1]["hellaswag_acc"] <= 1 and evals[-1]["lambada_ppl"] > 1
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or save(fig, *a, **k))
    logs.plot_log(out / "log.jsonl", tmp_path / "loss.png")
    panels = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in figures[0].axes}
    assert panels["benchmark accuracy"] == ["hellaswag_acc", "hellaswag_acc_norm", "lambada_acc",
                                            "lambada_last_token_acc"]
    assert panels["benchmark perplexity"] == ["lambada_last_token_ppl", "lambada_ppl"]


@pytest.mark.slow
def test_eval_tasks_under_fsdp_score_what_one_process_scores(task_cache, tmp_path):
    """Under FSDP the tasks' forward passes are collective: both processes run as many (7 examples
    in batches of 4 rows: an odd number of batches), and the numbers are one process's."""
    args = [*BENCH, "--max_iters=0", "--eval_limit=7"]
    run(args, task_cache, tmp_path / "one")
    run([*args, "--fsdp=True"], task_cache, tmp_path / "two", nproc=2)
    (one,), (two,) = read_log(tmp_path / "one")[1], read_log(tmp_path / "two")[1]
    scores = [k for k in one if k.startswith(("hellaswag", "lambada"))]
    assert len(scores) == 6
    for key in scores:
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def test_eval_tasks_mistakes_are_one_line(data_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--eval_tasks=hellaswag,mmlu"])
    assert e.value.code == 2 and "unknown task 'mmlu'" in capsys.readouterr().err
    monkeypatch.setenv("GPT2REF_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--eval_tasks=lambada"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "lambada_test.jsonl is not cached" in err and len(err.strip().splitlines()) == 1


def test_eval_tasks_beyond_the_models_vocabulary_are_one_line(data_dir, task_cache, tmp_path, capsys):
    """The toy dataset's model knows 128 tokens; GPT-2's tokenizer gives LAMBADA's text larger ids."""
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--eval_tasks=lambada"])
    assert e.value.code == 2 and "beyond the model's vocabulary of 128" in capsys.readouterr().err


def test_chunked_loss_trains_the_run_of_the_plain_one_and_resumes_into_it(data_dir, tmp_path):
    """--chunked_loss=True (lib/speed.py's ChunkedLossGPT) logs the losses of the plain
    F.cross_entropy run, up to float32 rounding; its checkpoint resumes with the plain loss."""
    common = ["--max_iters=6", "--eval_interval=3", "--dropout=0.1"]
    for name, extra in (("plain", []), ("chunked", ["--chunked_loss=True"])):
        train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / name}", *common, *extra])
    (plain_steps, plain_evals), (steps, evals) = read_log(tmp_path / "plain"), read_log(tmp_path / "chunked")
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in plain_steps], abs=1e-4)
    assert [r["val_loss"] for r in evals] == pytest.approx([r["val_loss"] for r in plain_evals], abs=1e-4)
    train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'chunked'}", "--init_from=resume",
                "--max_iters=8", "--chunked_loss=False"])
    assert [r["iter"] for r in read_log(tmp_path / "chunked")[0]] == list(range(8))


def test_clock_counts_seconds_per_iteration_between_laps(monkeypatch):
    now = iter([10.0, 16.0, 17.0, 30.0, 34.0])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(now))
    clock = measure.Clock(0)           # t = 10
    assert clock.lap(2) == 2.0         # iterations 0, 1, 2 in 6 s
    assert clock.lap(3) == 1.0         # iteration 3 in 1 s
    clock.restart(5)                   # an evaluation: t = 30, iteration 5 next
    assert clock.lap(6) == 2.0         # iterations 5, 6 in 4 s


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_the_last_checkpoint_whole(data_dir, tmp_path):
    """A file-size limit stands for a full disk: the checkpoint cannot be written, the run stops
    with one line naming it, the cause and the command that resumes, and the last checkpoint,
    whole, resumes once there is room."""
    out = tmp_path / "run"
    run(["--max_iters=4", "--eval_interval=4"], data_dir, out)
    before = (out / "ckpt.pt").read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))
    r = subprocess.run(command(["--init_from=resume", "--max_iters=8"], data_dir, out), capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=small_files, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write the checkpoint {out / 'ckpt.pt'}: File too large" in lines[0]
    assert f"resume with: python train.py --init_from=resume --out_dir={out}" in lines[0]
    assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob("*.tmp"))
    run(["--init_from=resume", "--max_iters=8"], data_dir, out, tiny=False)
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 8


@pytest.mark.slow
def test_a_plot_that_cannot_be_written_is_a_warning_and_training_goes_on(data_dir, tmp_path):
    out = tmp_path / "run"
    (out / "loss.png.tmp").mkdir(parents=True)  # where the plot is written first: a folder, so the write fails
    result = run(["--max_iters=4", "--eval_interval=2"], data_dir, out)
    warnings = [line for line in result.stderr.splitlines() if "loss.png" in line]
    assert warnings and all(line.startswith("warning: could not write the plot") for line in warnings)
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 4


def test_a_resume_past_max_iters_says_there_is_nothing_to_do(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=30"])
    assert (f"nothing to do: the run in {out / 'ckpt.pt'} had reached iteration 60 already, and --max_iters=30"
            in capsys.readouterr().out)


def test_a_run_starts_from_another_run_s_weights_and_sample_py_reads_a_run_folder(trained, data_dir, tmp_path, capsys):
    """--init_from=<a train.py out_dir>: a new run from its weights (its first evaluation is the old
    run's last), and sample.py takes the folder as it takes GPT-2's name."""
    import sample
    source = trained[0]
    train.main([*TINY, f"--data_dir={data_dir}", f"--init_from={source}", f"--out_dir={tmp_path / 'new'}",
                "--max_iters=2", "--eval_interval=2"])
    assert "a new run from the weights of" in capsys.readouterr().err
    (_, old_evals), (_, new_evals) = read_log(source), read_log(tmp_path / "new")
    assert new_evals[0]["val_loss"] == pytest.approx(old_evals[-1]["val_loss"], abs=1e-5)
    sample.main([f"--init_from={source}", "--start=A", "--max_new_tokens=4", "--temperature=0", "--device=cpu"])
    assert capsys.readouterr().out.startswith("A")


def test_export_py_writes_a_run_that_transformers_reads_with_the_same_logits(trained, tmp_path, capsys):
    import export
    transformers = pytest.importorskip("transformers")
    export.main([f"--init_from={trained[0]}", f"--export_dir={tmp_path / 'hf'}"])
    assert "wrote" in capsys.readouterr().out
    ours = models.model_from_checkpoint(checkpoints.load(trained[0] / "ckpt.pt")).eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit) as e:  # never over an earlier export
        export.main([f"--init_from={trained[0]}", f"--export_dir={tmp_path / 'hf'}"])
    assert e.value.code == 2 and "holds an exported model already" in capsys.readouterr().err


def test_eval_py_scores_a_run_on_its_own_val_split_as_a_recomputation_does(trained, data_dir, tmp_path):
    """eval.py --tasks=val --data=<the run's data>: the loss per token, perplexity and bits per byte
    of the val split in windows of the block moving by half of it, every token but the first scored
    once, against the same windows scored one at a time with F.cross_entropy."""
    import eval as evaluate
    evaluate.main([f"--init_from={trained[0]}", "--tasks=val", f"--data={data_dir / 'toy'}", "--device=cpu",
                   "--dtype=float32", f"--out_dir={tmp_path}", "--limit=40"])  # the first 40 windows
    result = json.loads((tmp_path / "eval.json").read_text())["results"]["val"]
    model = models.model_from_checkpoint(checkpoints.load(trained[0] / "ckpt.pt")).eval()
    tokens = torch.from_numpy(datasets.read_tokens(data_dir / "toy" / "val.bin").astype(np.int64))
    nll, count, begin = 0.0, 0, 0
    for _ in range(40):
        end = min(begin + 32, len(tokens) - 1)  # the window reads tokens[begin:end] and predicts up to tokens[end]
        with torch.no_grad():
            logits = model(tokens[None, begin:end])[0][0]
        new = end - count  # targets tokens[count + 1 .. end] are not scored yet
        nll += torch.nn.functional.cross_entropy(logits[-new:], tokens[end - new + 1:end + 1], reduction="sum").item()
        count += new
        begin += 16
    n_bytes = len(datasets.get_tokenizer("gpt2").decode_bytes(tokens[:count + 1].tolist()))
    assert result["tokens"] == count == 16 * 40 + 16
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_eval_py_refuses_val_without_data_and_a_task_file_without_examples(trained, tmp_path, monkeypatch, capsys):
    """An empty task file would have given NaN, which eval.json cannot hold as JSON."""
    import eval as evaluate
    monkeypatch.setenv("GPT2REF_CACHE", str(tmp_path / "cache"))
    empty = downloads.web_path(benchmarks.HELLASWAG_URL)
    empty.parent.mkdir(parents=True)
    empty.write_text("")
    for args, words in ((["--tasks=val"], "--tasks=val scores the val split of --data="),
                        (["--tasks=hellaswag"], f"hellaswag: {empty} holds no examples")):
        with pytest.raises(SystemExit) as e:
            evaluate.main([f"--init_from={trained[0]}", "--device=cpu", f"--out_dir={tmp_path}", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and words in err, err
