"""The notebooks run top to bottom, offline, as a reader would run them: a cell that raises fails
its notebook, and so does a cell whose printed output is not the committed one (the outputs on
GitHub must be the ones this code gives). They run in memory; the committed files are never rewritten.

To refresh a notebook's outputs after a change, run it as this test does (one thread, no GPT-2
download cached; without a network, TIKTOKEN_CACHE_DIR set as conftest.py sets it), from notebooks/:

    OMP_NUM_THREADS=1 GPT2REF_CACHE=$(mktemp -d) jupyter nbconvert --to notebook --execute --inplace \
        --ExecutePreprocessor.record_timing=False NN_name.ipynb
"""
import copy
import difflib
import json
import math
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import cl100k_or_skip

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# What legitimately differs between two runs of the same notebook on the same machine, found by
# executing every notebook twice and diffing the outputs. Each pattern is replaced, on both the
# committed and the fresh side, by a placeholder. Between machines, float kernels differ too
# (AVX2 and AVX-512 round differently), so decimals are compared with a tolerance: see same_line.
NOISE = [
    # tempfile's random names, tmp + 8 of [a-z0-9_], and the temp folder before them:
    # "/tmp/tmp8e4x4zwh/stories/train.bin" (notebook 1), "full fine-tune of /tmp/tmpxgi2cexk/base" (9)
    (re.compile(r"[^\s'\"]*/tmp[a-z0-9_]{8}(?![a-z0-9_])"), "<tmpdir>"),
    # wall-clock time of a training step in finetune_alpaca's log (notebook 9): "245.2 ms/iter"
    (re.compile(r"\d[\d,]*(?:\.\d+)? ms/iter"), "<t> ms/iter"),
    # the throughput derived from it: "824 tokens/s"
    (re.compile(r"\d[\d,]* tokens/s"), "<n> tokens/s"),
    # the process's peak resident memory in the same log line, which moves by a few MB: "mem 780 MB"
    (re.compile(r"mem \d[\d,]* MB"), "mem <n> MB"),
    # KV-cache speed-ups measured with perf_counter (notebook 5): "speed-up: 16: 1.3x, 64: 1.7x, ..."
    (re.compile(r"(\d+): \d+\.\dx"), r"\1: <f>x"),
]


def normalize(text):
    for pattern, placeholder in NOISE:
        text = pattern.sub(placeholder, text)
    return text


def printed(cell):
    """A code cell's text outputs as lines, normalized. Figures (image/png) are left out, their
    text/plain ("<Figure size 700x300 with 1 Axes>") is kept. Consecutive stream outputs are joined:
    where the kernel cuts one cell's stdout into messages depends on timing, not on the code."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            if parts and parts[-1][0] == out.name:
                parts[-1][1] += out.text
            else:
                parts.append([out.name, out.text])
        elif out.output_type in ("execute_result", "display_data"):
            parts.append([out.output_type, out.get("data", {}).get("text/plain", "")])
        else:  # "error"
            parts.append([out.output_type, f"{out.get('ename')}: {out.get('evalue')}"])
    return [f"[{kind}] {line}" for kind, text in parts for line in normalize(text).splitlines()]


DECIMAL = re.compile(r"-?\d[\d,]*\.\d+(?:e[-+]?\d+)?|-?\d+e[-+]?\d+")


def same_line(committed, executed, rel=0.01, abs_=5e-3):
    """Equal text around the decimals, equal integers, and each decimal within 1% or 0.005 of the
    committed one: another CPU's last digits pass (a rounding-level difference, a sampled frequency
    0.053 for 0.055), a changed loss, count or message does not."""
    if DECIMAL.sub("<d>", committed) != DECIMAL.sub("<d>", executed):
        return False
    pairs = zip(DECIMAL.findall(committed), DECIMAL.findall(executed))
    return all(math.isclose(float(a.replace(",", "")), float(b.replace(",", "")), rel_tol=rel, abs_tol=abs_)
               for a, b in pairs)


def output_mismatches(name, committed, executed, context=2, max_lines=24):
    """One message per code cell whose printed output differs: the notebook, the cell and a short diff."""
    messages = []
    for index, (old, new) in enumerate(zip(committed.cells, executed.cells)):
        if old.cell_type != "code":
            continue
        before, after = printed(old), printed(new)
        if len(before) != len(after) or not all(map(same_line, before, after)):
            diff = list(difflib.unified_diff(before, after, "committed", "executed", n=context, lineterm=""))
            if len(diff) > max_lines:
                diff = diff[:max_lines] + [f"... ({len(diff) - max_lines} more diff lines)"]
            messages.append(f"{name}, cell {index} (In [{old.execution_count}]):\n" + "\n".join(diff))
    return messages


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory):
    """A folder holding a `python3` kernelspec that runs this very interpreter: put first on
    JUPYTER_PATH, it wins over any python3 kernel installed elsewhere for another Python."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, jupyter_path, monkeypatch, tmp_path):
    """Executed once, in memory: no cell raises, and every code cell prints what the committed
    notebook shows, up to the run-to-run noise in NOISE."""
    # The kernel is a child process and inherits this environment. The notebooks know nothing of
    # the test machines: an offline tiktoken cache reaches them as TIKTOKEN_CACHE_DIR (conftest sets
    # it when the cache is there), and an empty download cache makes "are GPT-2's weights cached?"
    # (notebook 6) answer the same on every machine.
    if "cl100k_base" in path.read_text():
        cl100k_or_skip()  # notebook 1 compares GPT-2's vocabulary with GPT-4's
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("GPT2REF_CACHE", str(tmp_path / "cache"))
    # One thread: float sums split over more threads round differently (notebook 4's "largest weight
    # difference" changes in its 7th digit), so the outputs depend on the core count; one thread also
    # runs these small models fastest, and does not fight the rest of a busy machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    committed = nbformat.read(path, as_version=4)
    executed = copy.deepcopy(committed)
    client = NotebookClient(executed, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    mismatches = output_mismatches(path.name, committed, executed)
    if mismatches:
        pytest.fail("outputs differ from the committed ones; if the change is meant, re-execute the notebook "
                    "(see the top of this file) and commit it:\n\n" + "\n\n".join(mismatches), pytrace=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_with_outputs(path):
    """Every code cell ran, in order, in one session: the outputs on GitHub are the ones this code gives."""
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


def test_normalization_is_narrow():
    """The noise patterns hide what varies between runs and nothing else: a printed number that
    is not a timing, a memory figure or a temp path still counts."""
    assert normalize("/tmp/tmp8e4x4zwh/stories/train.bin: 5,657 tokens") == "<tmpdir>/stories/train.bin: 5,657 tokens"
    assert normalize("iter 10: loss 9.8797, lr 2.87e-03, 1,249.5 ms/iter, 840 tokens/s, mem 1,847 MB") == \
        "iter 10: loss 9.8797, lr 2.87e-03, <t> ms/iter, <n> tokens/s, mem <n> MB"
    assert normalize("speed-up: 16: 1.3x, 1023: 14.7x") == "speed-up: 16: <f>x, 1023: <f>x"
    for kept in ("1.64M of 1.63M parameters train", "loss 10.8524", "5,657 tokens in 270 documents",
                 "packed torch.uint8 x1179648", "4x wider", "/work/tmp_dir/out.txt", "(6, 57)"):
        assert normalize(kept) == kept


def test_decimals_get_a_tolerance_and_nothing_else_does():
    for committed, executed in [("largest gap 0.00047285668551921844", "largest gap 0.00047326087951660156"),
                                ("total variation distance 0.053", "total variation distance 0.055"),
                                ("difference 5.937459945926093e-07", "difference 6.975338919801288e-07"),
                                ("loss 3.430990, lr 2.87e-03", "loss 3.430989, lr 2.87e-03")]:
        assert same_line(committed, executed)
    for committed, executed in [("loss 10.781", "loss 10.95"), ("5,657 tokens", "5,658 tokens"),
                                ("loss 3.43", "loss: 3.43"), ("(6, 57)", "(6, 58)"), ("x 1.5", "x 1.5 1.5")]:
        assert not same_line(committed, executed)


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    assert NOTEBOOKS and all(f"notebooks/{p.name}" in readme for p in NOTEBOOKS)
