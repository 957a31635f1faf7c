"""config/gpt2_124m.py, the GPT-2 (124M) reproduction: its tokens per step on 1, 2 and 8 processes,
the start-up lines and the estimate, and a CPU smoke run of the README's command on a tiny shape."""
import json
import runpy
import subprocess
import sys

import pytest

import prepare_data
from conftest import ROOT
from lib import logs, measure, training

RECIPE = runpy.run_path(str(ROOT / "config" / "gpt2_124m.py"))


@pytest.mark.parametrize("world_size, accumulation", [(1, 8), (2, 4), (8, 1)])
def test_the_step_is_524288_tokens_on_any_number_of_gpus(world_size, accumulation):
    b, t, total = RECIPE["batch_size"], RECIPE["block_size"], RECIPE["total_batch_size"]
    assert training.accumulation_for(total, b, t, world_size) == accumulation
    assert world_size * accumulation * b * t == total == 2 ** 19
    assert RECIPE["max_iters"] * total == pytest.approx(10e9, rel=1e-4)  # 10B tokens


def test_a_step_that_processes_cannot_share_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        training.accumulation_for(RECIPE["total_batch_size"], RECIPE["batch_size"], RECIPE["block_size"], 3)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--total_batch_size=524288 is not a multiple of 3 process(es)" in err


def test_evaluations_left_counts_the_multiples_and_the_end():
    for it, interval, max_iters in [(5, 10, 30), (0, 250, 19073), (19000, 250, 19073), (6, 3, 7), (3, 1, 9)]:
        expected = len({j for j in range(it + 1, max_iters + 1) if j % interval == 0 or j == max_iters})
        assert training.evaluations_after(it, interval, max_iters) == expected


def test_duration_reads_as_a_person_says_it():
    assert [measure.duration(s) for s in (42.4, 425, 11520, 187200)] == ["42 s", "7 min 5 s", "3 h 12 min", "2 d 4 h"]


def test_the_estimate_is_printed_and_logged(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    logs.log_estimate(log, 10, 0.5, 1000, 90, 4, 2.0)
    record = json.loads(log.read_text())
    assert record == {"iter": 10, "estimated_tokens_per_s": 2000.0, "estimated_seconds_left": 0.5 * 90 + 2.0 * 4}
    assert capsys.readouterr().out == ("estimate: 2,000 tokens/s; 90 steps left take 45 s, 4 evaluations 8 s: "
                                       "about 53 s in all\n")


@pytest.mark.slow
def test_cpu_smoke_run_of_the_recipe(tmp_path):
    """The README's command with the config as it is, on a tiny shape: few documents, 2 steps."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"Document {i}. " + "The cat sat on the mat and looked at the sky.\n" * 40)
    prepare_data.main(["text", f"--input={docs}", f"--out_dir={tmp_path / 'data' / 'fineweb-edu'}"])
    tiny = ["--device=cpu", "--dtype=float32", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=32", "--batch_size=2", "--total_batch_size=128", "--max_iters=2", "--warmup_iters=1",
            "--eval_iters=1", "--log_interval=1", "--eval_tasks=", "--sample_tokens=4", f"--data_dir={tmp_path / 'data'}",
            f"--out_dir={tmp_path / 'out'}"]
    done = subprocess.run([sys.executable, "train.py", "config/gpt2_124m.py", *tiny], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "128 tokens per step (1 process(es) x 2 micro-batch(es) of 2 x 32) x 2 steps = 256 tokens" in done.stdout
    assert "estimate: " in done.stdout and "done: 2 iterations" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any("estimated_seconds_left" in r for r in records)
    saved = json.loads(json.dumps(records[-1]))
    assert saved["iter"] == 2 and "val_loss" in saved
