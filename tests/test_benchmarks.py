"""eval.py and lib/benchmarks.py against transformers computing the same things one example at a time:
strided WikiText perplexity, HellaSwag and LAMBADA; the downloads through the loopback mirror,
malformed records, and torchrun's 2 processes against 1."""
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch
import transformers

from lib import benchmarks, checkpoints, downloads, speed, training
import gpt
from hub_mirror import HubMirror

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64
WORDS = "the cat sat on a mat and then a dog ran far away from home , . it 's @-@".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny random GPT-2: transformers' and ours, from the same files."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK, vocab_size=50257)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf")
    theirs.save_pretrained(path)
    return path, theirs, gpt.GPT.from_pretrained(path).eval()


def wikitext_rows(rng, lines=40):
    rows = []
    for a in range(2):
        rows += ["", f" = Title {a} = \n", "", f" = = Part {a} = = \n"]
        rows += [" " + " ".join(rng.choice(WORDS, size=rng.integers(3, 25))) + " \n" for _ in range(lines // 2)]
    return rows


def parquet(rows):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": rows}), buffer)
    return buffer.getvalue()


def records(rng):
    hellaswag = [{"ctx": " ".join(rng.choice(WORDS, size=rng.integers(2, 90))), "label": int(rng.integers(4)),
                  "endings": [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(4)]}
                 for _ in range(9)]
    lambada = [{"text": " ".join(rng.choice(WORDS[:12], size=rng.integers(3, 80)))} for _ in range(9)]
    return hellaswag, lambada


def jsonl(items):
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def nll_of(theirs, row, n):
    """transformers' summed NLL of the last n tokens of row, and whether each was its argmax."""
    with torch.no_grad():
        logits = theirs(torch.tensor([row[:-1]])).logits[0, -n:].double()
    targets = torch.tensor(row[-n:])
    nll = -logits.log_softmax(-1)[torch.arange(n), targets].sum().item()
    return nll, bool((logits.argmax(-1) == targets).all())


# ----------------------------------------------------------------------------- WikiText

@pytest.mark.parametrize("stride", [BLOCK, 32, 19, 5])
def test_strided_perplexity_equals_transformers_on_the_same_windows(models, tmp_path, stride):
    """The windows rebuilt here from their definition, each fed to transformers: every target
    after the first token scored once, with at least BLOCK - stride tokens before it."""
    _, theirs, ours = models
    path = tmp_path / "test.parquet"
    path.write_bytes(parquet(wikitext_rows(np.random.default_rng(1))))
    enc = tiktoken.get_encoding("gpt2")
    task = benchmarks.wikitext("wikitext2", path, enc, BLOCK, stride, 0, "detokenized")
    tokens = [enc.eot_token] + enc.encode_ordinary(task.text)
    assert len(tokens) > 4 * BLOCK and (len(tokens) - 1) % stride
    total, scored, begin = 0.0, [], 0
    while not scored or scored[-1] < len(tokens) - 1:
        end = min(begin + BLOCK, len(tokens) - 1)
        new = [t for t in range(begin + 1, end + 1) if not scored or t > scored[-1]]
        assert not scored or new[0] - begin >= BLOCK - stride
        total += nll_of(theirs, tokens[begin:end + 1], len(new))[0]
        scored += new
        begin += stride
    assert scored == list(range(1, len(tokens)))
    got = benchmarks.run_task(ours, task, batch_size=3)
    assert got["tokens"] == len(scored)
    assert math.log(got["token_ppl"]) == pytest.approx(total / len(scored), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / len(task.text.encode()), rel=1e-5)
    file = "".join(row or " \n" for row in wikitext_rows(np.random.default_rng(1)))  # the raw file's lines
    counts = {"words": len(file.split()),
              "words_eos": sum(len(line.split()) + 1 for line in io.StringIO(file)),  # word-level LMs' <eos>
              "page_words": sum(len(re.split(r"\s+", page)) for page in harness_pages(file))}
    assert len(set(counts.values())) == 3
    for count, ppl in (("words", "word_ppl"), ("words_eos", "word_eos_ppl"), ("page_words", "page_word_ppl")):
        assert got[count] == counts[count]
        assert math.log(got[ppl]) == pytest.approx(total / counts[count], rel=1e-5)


def harness_pages(file):
    """lm-evaluation-harness's articles (EleutherAI/wikitext_document_level): the file's lines
    joined by newlines, a new one at each title line "= Title =" (its sections' "= = Part = ="
    lines, once "= =" is written "==", do not start with "= "); whitespace-only pages dropped."""
    pages, lines = [], []
    for line in file.split("\n"):
        flat = line.replace("= = =", "===").replace("= =", "==").strip()
        if flat.startswith("= ") and flat.endswith(" ="):
            pages.append("\n".join(lines))
            lines = []
        lines.append(line)
    return [page for page in pages + ["\n".join(lines)] if page.strip()]


def test_stride_equal_to_the_context_is_the_mean_loss_of_non_overlapping_windows(models, tmp_path):
    _, _, ours = models
    enc = tiktoken.get_encoding("gpt2")
    rows = wikitext_rows(np.random.default_rng(2))
    path = tmp_path / "test.parquet"
    path.write_bytes(parquet(rows))
    task = benchmarks.wikitext("wikitext2", path, enc, BLOCK, BLOCK, 0, "guide")
    assert task.text == "\n\n".join(rows)
    tokens = torch.tensor([enc.eot_token] + enc.encode_ordinary(task.text))
    k = (len(tokens) - 1) // BLOCK
    tokens = tokens[:k * BLOCK + 1]
    x, y = tokens[:-1].view(k, BLOCK), tokens[1:].view(k, BLOCK)
    with torch.no_grad():
        mean = ours(x, y)[1].item()
    task.examples = task.examples[:k]  # the whole windows only
    assert math.log(benchmarks.run_task(ours, task)["token_ppl"]) == pytest.approx(mean, rel=1e-5)


def test_detokenizer_undoes_wikitexts_tokenization():
    lines = (" = Robert Boulter = \n \n M @-@ 82 begins at a junction , west of Fremont . \n"
             " = = Career = = \n He won 1 @,@ 000 ( about 3 @.@ 5 % ) in \" Dead Man 's \" ; it didn 't last . \n")
    assert benchmarks.wikitext_detokenize(lines) == (
        "= Robert Boulter =\n\nM-82 begins at a junction, west of Fremont.\n== Career ==\n"
        "He won 1,000 (about 3.5%) in \"Dead Man's\"; it didn't last.\n")


# ----------------------------------------------------------------------------- HellaSwag, LAMBADA

def test_hellaswag_and_lambada_equal_one_example_at_a_time_and_batching_changes_nothing(models, tmp_path):
    """Some contexts are longer than the model's 64 tokens: a request keeps its last 65 tokens."""
    _, theirs, ours = models
    enc = tiktoken.get_encoding("gpt2")
    hellaswag, lambada = records(np.random.default_rng(3))
    (tmp_path / "h.jsonl").write_bytes(jsonl(hellaswag))
    (tmp_path / "l.jsonl").write_bytes(jsonl(lambada))
    acc = acc_norm = 0
    for r in hellaswag:
        context = enc.encode_ordinary(r["ctx"])
        scores = []
        for ending in r["endings"]:
            tail = enc.encode_ordinary(" " + ending)
            scores.append((-nll_of(theirs, (context + tail)[-(BLOCK + 1):], len(tail))[0], len(tail)))
        acc += int(np.argmax([s for s, _ in scores]) == r["label"])
        acc_norm += int(np.argmax([s / n for s, n in scores]) == r["label"])
    assert max(len(enc.encode_ordinary(r["ctx"])) for r in hellaswag) > BLOCK
    right, nll = 0, 0.0
    for r in lambada:
        context, word = r["text"].rsplit(" ", 1)
        tail = enc.encode_ordinary(" " + word)
        one, greedy = nll_of(theirs, (enc.encode_ordinary(context) + tail)[-(BLOCK + 1):], len(tail))
        right, nll = right + greedy, nll + one
    for batch_size in (1, 5, 64):
        h = benchmarks.run_task(ours, benchmarks.hellaswag(tmp_path / "h.jsonl", enc, 0), batch_size)
        assert (h["acc"], h["acc_norm"]) == (acc / len(hellaswag), acc_norm / len(hellaswag))
        la = benchmarks.run_task(ours, benchmarks.lambada(tmp_path / "l.jsonl", enc, 0), batch_size)
        assert la["acc"] == right / len(lambada)
        assert la["ppl"] == pytest.approx(math.exp(nll / len(lambada)), rel=1e-5)


def lambada_passages_with_right_last_tokens(theirs, enc, rng, n=12):
    """Passages whose last token transformers' model predicts: the last word is its top choice
    after the context, a word of one token; or a stem, then its top choice of a piece of word,
    which the whole word's first token seldom is. Kept when the text tokenizes to those tokens."""
    def top(tokens):
        with torch.no_grad():
            return theirs(torch.tensor([tokens[-BLOCK:]])).logits[0, -1].argmax().item()
    texts = []
    for _ in range(n):
        context = " ".join(rng.choice(WORDS[:12], size=rng.integers(3, 80)))
        for stem, piece in (("", r" [a-z]+"), (" " + str(rng.choice(["mat", "dog", "home"])), "[a-z]+")):
            tokens = enc.encode_ordinary(context + stem)
            text = context + stem + enc.decode([top(tokens)])
            if re.fullmatch(piece, enc.decode([top(tokens)])) and enc.encode_ordinary(text) == tokens + [top(tokens)]:
                texts.append(text)
    return texts


def test_lambada_last_token_accuracy_equals_transformers_on_the_whole_passage(models, tmp_path):
    """OpenAI's way: each passage tokenized whole, transformers' logits for its last token given
    all before it. Some passages are built so that the last token is right and the word is not."""
    _, theirs, ours = models
    enc = tiktoken.get_encoding("gpt2")
    rng = np.random.default_rng(6)
    texts = lambada_passages_with_right_last_tokens(theirs, enc, rng) + [r["text"] for r in records(rng)[1]]
    (tmp_path / "l.jsonl").write_bytes(jsonl([{"text": text} for text in texts]))
    right, nll = 0, 0.0
    for text in texts:
        one, greedy = nll_of(theirs, enc.encode_ordinary(text)[-(BLOCK + 1):], 1)
        right, nll = right + greedy, nll + one
    got = benchmarks.run_task(ours, benchmarks.lambada(tmp_path / "l.jsonl", enc, 0), batch_size=5)
    assert got["last_token_acc"] == right / len(texts)
    assert got["last_token_ppl"] == pytest.approx(math.exp(nll / len(texts)), rel=1e-5)
    assert 0 < got["acc"] < got["last_token_acc"] < 1  # the two counts differ on these passages


def test_score_over_several_logit_chunks_equals_transformers(models):
    """12 requests of 64 scored tokens: 768 rows of logits in chunks of 320, 320 and 128, each
    chunk's buffers reused by the next; every sum and every greedy flag as transformers gives it."""
    _, theirs, ours = models
    rng = np.random.default_rng(5)
    requests = [(rng.integers(0, 50257, BLOCK + 1).tolist(), BLOCK) for _ in range(12)]
    requests[0] = (ours.generate(torch.tensor([[11]]), BLOCK, temperature=0)[0].tolist(), BLOCK)  # all greedy
    for (got, greedy), (row, n) in zip(benchmarks.score(ours, requests), requests):
        nll, all_greedy = nll_of(theirs, row, n)
        assert got == pytest.approx(-nll, rel=1e-5) and greedy == all_greedy
    assert benchmarks.score(ours, requests)[0][1]
    chunks = [rows for rows, _, _ in speed.logit_chunks(torch.zeros(768, 32), torch.zeros(50257, 32))]
    assert [c.stop - c.start for c in chunks] == [320, 320, 128]


# ----------------------------------------------------------------------------- eval.py

def eval_py(*args, env=None, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, str(ROOT / "eval.py"), "--dtype=float32", "--device=cpu", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The real layouts at the real paths: the hub's parquet file, and OpenAI's and HellaSwag's
    files at their URLs' paths."""
    rng = np.random.default_rng(4)
    hellaswag, lambada = records(rng)
    with HubMirror() as hub:
        for config in benchmarks.WIKITEXT.values():
            hub.add(f"datasets/Salesforce/wikitext/resolve/main/{config}/test-00000-of-00001.parquet",
                    parquet(wikitext_rows(rng)))
        hub.add("gpt-2/data/lambada_test.jsonl", jsonl(lambada), lfs=False)
        hub.add("rowanz/hellaswag/master/data/hellaswag_val.jsonl", jsonl(hellaswag), lfs=False)
        hub.add("bad/hellaswag_val.jsonl", jsonl(hellaswag[:2] + [{"ctx": "x", "label": 7}]), lfs=False)
        urls = [f"--lambada_url={hub.url}/gpt-2/data/lambada_test.jsonl",
                f"--hellaswag_url={hub.url}/rowanz/hellaswag/master/data/hellaswag_val.jsonl"]
        yield hub, urls, tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_eval_py_downloads_scores_every_task_and_then_runs_offline(models, mirror, tmp_path):
    path, _, ours = models
    hub, urls, cache = mirror
    env = {"HF_ENDPOINT": hub.url, "GPT2REF_CACHE": str(cache)}
    result = eval_py(f"--init_from={path}", f"--out_dir={tmp_path}", "--batch_size=7", *urls, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    for word in ("wikitext2", "wikitext103", "lambada", "hellaswag", "word_ppl", "word_eos_ppl", "page_word_ppl",
                 "words_eos", "last_token_acc", "last_token_ppl", "acc_norm", "bits_per_byte"):
        assert word in result.stdout
    saved = json.loads((tmp_path / "eval.json").read_text())["results"]
    enc = tiktoken.get_encoding("gpt2")
    os.environ["GPT2REF_CACHE"], before = str(cache), os.environ.get("GPT2REF_CACHE")
    try:
        for name in benchmarks.TASKS:
            given = dict(arg[2:].replace("_url", "").split("=", 1) for arg in urls)
            task = benchmarks.load_task(name, enc, ours.config, urls=given)
            expected = benchmarks.run_task(ours, task)
            for metric, value in expected.items():
                assert saved[name][metric] == pytest.approx(value, rel=1e-9), (name, metric)
    finally:
        os.environ.pop("GPT2REF_CACHE") if before is None else os.environ.update(GPT2REF_CACHE=before)
    assert (cache / "datasets/Salesforce/wikitext/wikitext-103-raw-v1/test-00000-of-00001.parquet").exists()
    offline = eval_py(f"--init_from={path}", f"--out_dir={tmp_path / 'again'}", *urls,
                      env={**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert json.loads((tmp_path / "again" / "eval.json").read_text())["results"].keys() == saved.keys()


def test_the_real_urls_are_the_cached_paths():
    assert downloads.web_path(benchmarks.LAMBADA_URL).parts[-4:] == (
        "openaipublic.blob.core.windows.net", "gpt-2", "data", "lambada_test.jsonl")
    assert downloads.web_path(benchmarks.HELLASWAG_URL).parts[-6:] == (
        "raw.githubusercontent.com", "rowanz", "hellaswag", "master", "data", "hellaswag_val.jsonl")


@pytest.mark.slow
def test_a_malformed_record_and_bad_options_are_one_line(models, mirror, tmp_path):
    path, _, _ = models
    hub, urls, _ = mirror
    env = {"HF_ENDPOINT": hub.url, "GPT2REF_CACHE": str(tmp_path / "cache")}
    bad = eval_py(f"--init_from={path}", f"--out_dir={tmp_path}", "--tasks=hellaswag",
                  f"--hellaswag_url={hub.url}/bad/hellaswag_val.jsonl", env=env)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert lines[-1].startswith("error: ") and "hellaswag_val.jsonl, line 3: 'endings' is not a list" in lines[-1]
    for args, message in ((["--tasks=nope"], "unknown task 'nope'"), (["--tasks=lambada,lambada"], "named twice"),
                          (["--stride=65", "--tasks=wikitext2"], "longer than the model's context of 64"),
                          (["--wikitext_text=x"], "not one of"), (["--lambada_url=ftp://x"], "not an http(s) URL")):
        result = eval_py(f"--init_from={path}", f"--out_dir={tmp_path}", *args, env=env)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.slow
def test_two_processes_give_exactly_the_numbers_of_one(models, mirror, tmp_path):
    """9 examples in batches of 4 rows: HellaSwag takes 9 batches, an odd number."""
    path, _, _ = models
    hub, urls, cache = mirror
    env = {"HF_ENDPOINT": hub.url, "GPT2REF_CACHE": str(cache)}
    args = [f"--init_from={path}", "--tasks=wikitext2,lambada,hellaswag", "--batch_size=4", *urls]
    one = eval_py(*args, f"--out_dir={tmp_path / 'one'}", env=env)
    two = eval_py(*args, f"--out_dir={tmp_path / 'two'}", env=env, nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    results = [json.loads((tmp_path / d / "eval.json").read_text())["results"] for d in ("one", "two")]
    for name in results[0]:
        results[0][name].pop("seconds"), results[1][name].pop("seconds")
    assert results[0] == results[1]


@pytest.mark.slow
def test_a_checkpoint_and_an_adapter_are_scored_as_loaded(models, mirror, tmp_path):
    """--init_from=resume reads out_dir/ckpt.pt; --adapter applies a LoRA adapter (perturbed, so
    that it changes the numbers) to its base model: eval.py's numbers are those of the same models
    scored in-process."""
    from dataclasses import asdict
    path, _, ours = models
    hub, urls, cache = mirror
    env = {"HF_ENDPOINT": hub.url, "GPT2REF_CACHE": str(cache)}
    enc = tiktoken.get_encoding("gpt2")
    before = os.environ.get("GPT2REF_CACHE")
    os.environ["GPT2REF_CACHE"] = str(cache)
    try:
        task = benchmarks.load_task("lambada", enc, ours.config, urls={"lambada": urls[0].split("=", 1)[1]})
    finally:
        os.environ.pop("GPT2REF_CACHE") if before is None else os.environ.update(GPT2REF_CACHE=before)
    trained = gpt.GPT.from_pretrained(path)
    with torch.no_grad():
        trained.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    (tmp_path / "run").mkdir()
    checkpoints.save(tmp_path / "run" / "ckpt.pt", {
        "model": trained.state_dict(), "config": {"lora_rank": 0, "quantize": "none"},
        "model_args": asdict(trained.config), "iter": 0, "tokenizer": "gpt2"})
    adapted = gpt.GPT.from_pretrained(path)
    gpt.apply_lora(adapted, 4, 8.0)
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in gpt.lora_layers(adapted).values():
            layer.lora_B.normal_(std=0.5)
    gpt.save_adapter(adapted, tmp_path / "adapter", base_model=path)
    for args, model in ((["--init_from=resume", f"--out_dir={tmp_path / 'run'}"], trained),
                        ([f"--adapter={tmp_path / 'adapter'}", f"--out_dir={tmp_path / 'a'}"], adapted)):
        result = eval_py(*args, "--tasks=lambada", urls[0], env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        out_dir = args[-1].split("=", 1)[1]
        saved = json.loads((Path(out_dir) / "eval.json").read_text())["results"]["lambada"]
        expected = benchmarks.run_task(model.eval(), task)
        assert saved["ppl"] == pytest.approx(expected["ppl"], rel=1e-9) and saved["acc"] == expected["acc"]
        assert saved["ppl"] != pytest.approx(benchmarks.run_task(ours, task)["ppl"], rel=1e-3)


def test_bfloat16_scores_with_bfloat16_weights(models, mirror, tmp_path, monkeypatch):
    import copy
    import importlib
    eval_script = importlib.import_module("eval")
    path, _, ours = models
    hub, urls, cache = mirror
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("GPT2REF_CACHE", str(cache))
    seen, run_task = [], benchmarks.run_task

    def spy(model, task, *args, **kwargs):
        seen.append({p.dtype for name, p in model.named_parameters() if "ln_" not in name})
        return run_task(model, task, *args, **kwargs)
    monkeypatch.setattr(benchmarks, "run_task", spy)
    eval_script.main([f"--init_from={path}", f"--out_dir={tmp_path}", "--tasks=hellaswag", "--dtype=bfloat16",
                      "--device=cpu", *urls])
    assert seen == [{torch.bfloat16}]  # the weights themselves, not autocast over float32 ones
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["settings"]["dtype"] == "bfloat16"
    task = benchmarks.load_task("hellaswag", tiktoken.get_encoding("gpt2"), ours.config,
                                urls={"hellaswag": urls[1].split("=", 1)[1]})
    cast = speed.cast_for_inference(copy.deepcopy(ours), torch.bfloat16)
    expected = run_task(cast, task, dtype="bfloat16")
    assert saved["results"]["hellaswag"]["acc_norm"] == pytest.approx(expected["acc_norm"], rel=1e-9)
