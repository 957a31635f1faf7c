"""The zero-shot benchmarks GPT-2 is known by: WikiText, LAMBADA and HellaSwag, as eval.py and train.py score them.

WikiText-2 and WikiText-103: the perplexity of the test split; LAMBADA: the last word of a passage;
HellaSwag: the right ending of four.

A task is a list of examples, an example a list of requests (tokens, n): "how likely are the last
n of these tokens, each given all the tokens before it?". The model answers many requests per
forward pass, padded on the right: a causal model never looks ahead, so the padding changes
nothing before it. Under torchrun each process takes a share of the batches and writes each of
its examples' numbers into that example's row of one table; the processes add their tables up
(every row has one author, so the sum is exact) and any number of processes gives the numbers of
one. docs/evaluation.md says what each number means.
"""
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lib.cli import autocast, fail
from lib.datasets import parquet_texts, read_tokens
from lib.downloads import DownloadError, hub_file, web_file, web_path
from lib.speed import exp_shifted_, logit_chunks

# ----------------------------------------------------------------------------- the tasks' files

TASKS = ("wikitext2", "wikitext103", "lambada", "hellaswag")
WIKITEXT = {"wikitext2": "wikitext-2-raw-v1", "wikitext103": "wikitext-103-raw-v1"}  # Salesforce/wikitext
LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"  # the GPT-2 paper's
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def parse_tasks(text, option, known=TASKS):
    """The task names of a comma-separated list, each known and named once."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or len(set(names)) != len(names):
        problem = f"unknown task {unknown[0]!r}" if unknown else "a task named twice"
        fail(f"{option}={text!r}: {problem}; choose from {', '.join(known)}")
    return names


def task_file(name, urls):
    """The local path of a task's file, downloaded into the cache once."""
    try:
        if name in WIKITEXT:
            return hub_file("Salesforce/wikitext", f"{WIKITEXT[name]}/test-00000-of-00001.parquet", repo_type="dataset")
        return web_file(urls[name])
    except DownloadError as e:
        instead = ("HF_ENDPOINT=<a mirror of the hub>" if name in WIKITEXT else
                   f"eval.py --{name}_url=<another copy>, or a copy of the file at {web_path(urls[name])}")
        fail(f"{e}. Without it: {instead}")


def read_jsonl(path, check, what):
    """The records of a JSON-lines file; check(record) names what is wrong with one, or None."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            problem = "not a JSON object" if not isinstance(record, dict) else check(record)
            if problem:
                fail(f"{path}, line {number}: {problem}; is it {what}? Delete the file to download it again")
            records.append(record)
    return records


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score(model, requests, device="cpu", dtype="float32"):
    """For each request (tokens, n), (the sum of the log-probabilities of its last n tokens, each
    given the tokens before it; whether every one of them was the model's most likely next token).
    A request longer than the model's context loses its oldest tokens."""
    block = model.config.block_size
    rows = [tokens[-(block + 1):] for tokens, _ in requests]  # the model reads all but the last token
    x = torch.zeros(len(rows), max(len(row) for row in rows) - 1, dtype=torch.long)
    y = torch.full_like(x, -1)  # the scored targets; -1 elsewhere, the padding included
    for i, (row, (_, n)) in enumerate(zip(rows, requests)):
        n = min(n, len(row) - 1)
        x[i, :len(row) - 1] = torch.tensor(row[:-1])
        y[i, len(row) - 1 - n:len(row) - 1] = torch.tensor(row[-n:])
    x, y = x.to(device), y.to(device)
    with autocast(device, dtype):
        h = model.hidden_states(x)                   # (R, T, n_embd)
    scored = y >= 0
    owner = scored.nonzero()[:, 0]                   # the request of each scored position, (M,)
    h, targets = h[scored], y[scored]                # (M, n_embd), (M,): only these need logits
    logprob = torch.empty(len(targets), device=device)
    top = torch.empty(len(targets), dtype=torch.bool, device=device)
    low = getattr(torch, dtype)                      # the matmul's dtype, as autocast's; the softmax in float32
    for chunk, logits, _ in logit_chunks(h.to(low), model.lm_head.weight.to(low)):
        top[chunk] = logits.argmax(-1) == targets[chunk]
        target = logits.gather(1, targets[chunk, None])
        largest, total = exp_shifted_(logits)
        logprob[chunk] = (target - largest - total.log())[:, 0]
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, owner, logprob.double())
    misses = torch.zeros(len(rows), dtype=torch.long, device=device).index_add_(0, owner, (~top).long())
    return list(zip(sums.tolist(), (misses == 0).tolist()))


@dataclass
class Task:
    name: str
    examples: list        # per example, its requests [(tokens, n), ...]
    values: Callable      # (example index, its requests' scores) -> that example's row of numbers
    summarize: Callable   # (the table of rows, (examples, width)) -> {metric: value}
    width: int
    count: int            # the examples as the results count them (WikiText: lines of text)
    unit: str             # what the progress bar counts
    text: str = ""        # the text scored, for WikiText


def batches_of(examples, batch_size):
    """Lists of example indices with at most batch_size requests each (an example's requests stay
    together), the examples sorted by length so that little padding is needed."""
    order = sorted(range(len(examples)), key=lambda i: max(len(tokens) for tokens, _ in examples[i]))
    batches, current, rows = [], [], 0
    for i in order:
        if current and rows + len(examples[i]) > batch_size:
            batches.append(current)
            current, rows = [], 0
        current.append(i)
        rows += len(examples[i])
    return batches + [current] if current else batches


def run_task(model, task, batch_size=16, rank=0, world_size=1, device="cpu", dtype="float32", progress=False):
    """{metric: value} of model on task. Under torchrun every process calls it and runs as many
    forward passes (FSDP's are collective): one with fewer batches repeats its last, uncounted."""
    batches = batches_of(task.examples, batch_size)
    table = torch.zeros(len(task.examples), task.width, dtype=torch.float64)
    mine = range(rank, math.ceil(len(batches) / world_size) * world_size, world_size)
    training = model.training
    model.eval()
    with tqdm(total=sum(len(batches[b]) for b in mine if b < len(batches)), unit=task.unit,
              desc=task.name if world_size == 1 else f"{task.name}, process 1 of {world_size}",
              disable=None if progress else True) as bar:  # None: only at a terminal
        for b in mine:
            batch = batches[min(b, len(batches) - 1)]
            scores = score(model, [request for i in batch for request in task.examples[i]], device, dtype)
            if b >= len(batches):
                continue
            for i in batch:
                mine_scores, scores = scores[:len(task.examples[i])], scores[len(task.examples[i]):]
                table[i] = torch.tensor(task.values(i, mine_scores), dtype=torch.float64)
            bar.update(len(batch))
    model.train(training)
    if world_size > 1:
        table = table.to(device)
        dist.all_reduce(table)
        table = table.cpu()
    return task.summarize(table.numpy())


# ----------------------------------------------------------------------------- WikiText

_DETOKENIZE = [  # WikiText's tokenization undone, in this order: ' @-@ ', ' , ', '( x )', '" x "', ...
    (re.compile(r" @(.)@ "), r"\1"),                        # 1 @,@ 000 -> 1,000; M @-@ 82 -> M-82
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),                # no space before closing punctuation
    (re.compile(r"([(\[{$]) "), r"\1"),                      # nor after an opening one
    (re.compile(r" '(s|re|ve|ll|m|d|t)\b"), r"'\1"),         # it 's -> it's, didn 't -> didn't
    (re.compile(r"s ' "), "s' "),                            # the players ' -> the players'
    (re.compile(r'" ([^"\n]*?) "'), r'"\1"'),                # " quoted " -> "quoted"
    (re.compile(r"=( =)+"), lambda m: "=" * ((len(m.group(0)) + 1) // 2)),  # = = Career = = -> == Career ==
    (re.compile(r" *\n *"), "\n"),                           # each line began with a space
]


def wikitext_detokenize(text):
    """WikiText's text as ordinary prose, the form GPT-2 read in training: the GPT-2 paper scores
    WikiText after such "invertible de-tokenizers" (its own were not published; these are ours)."""
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text)
    return text.lstrip(" ")


def wikitext_windows(length, block, stride):
    """[(begin, end, n)] over a sequence of `length` tokens: window k reads tokens begin = k * stride
    up to end (at most block of them) and scores the n targets begin+1..end that no earlier window
    scored, so every token but the first is scored once, with at least block - stride tokens of
    context once the first window is done. stride = block gives non-overlapping windows."""
    windows, done = [], 0
    for begin in range(0, length - 1, stride):
        end = min(begin + block, length - 1)
        windows.append((begin, end, end - done))
        done = end
        if end == length - 1:
            break
    return windows


_TITLE = re.compile(r"= [^=].* =")  # an article's title line, " = Title = "; its sections' are " = = Section = = "


def wikitext_word_counts(rows):
    """The three word counts that WikiText's word-level perplexities divide by, for the lines
    (rows) of a raw split: one total NLL, divided by each, gives a perplexity of its own.
    words: WikiText's own whitespace-separated tokens;
    words_eos: those and one <eos> per line, blank lines included, as word-level language models
      read the split: the 245,569 test tokens the dataset's paper gives (its 4,358 lines);
    page_words: lm-evaluation-harness's len(re.split(r"\\s+", page)) summed over the articles: an
      article begins and ends with whitespace, an empty string at each end: its words plus 2."""
    words = sum(len(row.split()) for row in rows)
    articles = sum(1 for row in rows if _TITLE.fullmatch(row.strip()))
    return {"words": words, "words_eos": words + len(rows), "page_words": words + 2 * articles}


def wikitext(name, path, enc, block, stride, limit, text_form):
    """The test split as one stream after <|endoftext|>, so that its first token is scored too.
    text_form "detokenized": the lines as the file has them, de-tokenized (the paper's way);
    "guide": the lines joined by blank lines, as transformers' perplexity guide does."""
    rows = [row for batch, _ in parquet_texts(path) for row in batch][:limit or None]
    raw = "".join(row or "\n" for row in rows)
    text = wikitext_detokenize(raw) if text_form == "detokenized" else "\n\n".join(rows)
    if not text.strip():
        fail(f"{path}: the test split holds no text")
    tokens = [enc.eot_token] + enc.encode_ordinary(text)
    n_bytes = len(text.encode("utf-8"))
    words = wikitext_word_counts(rows)

    def summarize(table):
        nll, count = table[:, 0].sum(), table[:, 1].sum()
        return {"token_ppl": math.exp(nll / count), "word_ppl": math.exp(nll / words["words"]),
                "word_eos_ppl": math.exp(nll / words["words_eos"]),
                "page_word_ppl": math.exp(nll / words["page_words"]),
                "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": int(count), **words}

    examples = [[(tokens[begin:end + 1], n)] for begin, end, n in wikitext_windows(len(tokens), block, stride)]
    return Task(name, examples, lambda i, scores: (-scores[0][0], examples[i][0][1]), summarize, 2, len(rows),
                "windows", text)


# ----------------------------------------------------------------------------- your own data

class Windows:
    """The requests of each window, [(tokens, n)], sliced from the shard when asked: a val split of
    100M tokens (FineWeb-Edu's) stays on disk rather than becoming lists of Python ints."""

    def __init__(self, tokens, windows):
        self.tokens, self.windows = tokens, windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Windows(self.tokens, self.windows[i])
        begin, end, n = self.windows[i]
        return [(self.tokens[begin:end + 1].tolist(), n)]


def validation_split(folder, enc, block, stride, limit):
    """A prepared dataset's val split (prepare_data.py's val.bin), scored as WikiText is: windows
    moving by stride, every token but the first scored once. Bits per byte count the bytes of the
    text, its <|endoftext|> markers left out. limit: the first limit windows."""
    tokens = read_tokens(os.path.join(folder, "val.bin"))
    if len(tokens) < 2:
        fail(f"the val split of {folder} holds {len(tokens)} token(s): too few to score")
    windows = wikitext_windows(len(tokens), block, stride)[:limit or None]
    scored = tokens[:windows[-1][1] + 1]
    step = 1 << 20  # decoded a million tokens at a time: a token's bytes do not depend on its neighbours
    n_bytes = sum(len(enc.decode_bytes(chunk[chunk != enc.eot_token].tolist()))
                  for chunk in (scored[i:i + step] for i in range(0, len(scored), step)))

    def summarize(table):
        nll, count = table[:, 0].sum(), table[:, 1].sum()
        return {"loss": nll / count, "ppl": math.exp(nll / count), "bits_per_byte": nll / math.log(2) / n_bytes,
                "tokens": int(count)}

    examples = Windows(tokens, windows)
    return Task("val", examples, lambda i, scores: (-scores[0][0], examples[i][0][1]), summarize, 2, len(examples),
                "windows")


# ----------------------------------------------------------------------------- LAMBADA

def _lambada_problem(record):
    text = record.get("text")
    if not isinstance(text, str):
        return "no 'text' field (a string)"
    if " " not in text.strip():
        return "its text has no last word after a space"
    return None


def lambada(path, enc, limit):
    """Each passage's last word, after a space, given the rest, counted two ways.
    acc, ppl: the whole word, right when greedy decoding gives every one of its tokens (the model's
    top choice at each, given the true ones before), as lm-evaluation-harness's lambada_openai counts.
    last_token_acc, last_token_ppl: only the passage's last BPE token, given every token before it,
    the word's first pieces included, as OpenAI scored the GPT-2 paper's accuracy. A word of one
    token counts the same both ways; of several, its last piece is often easy once its first is given.
    Each passage is two requests on the same tokens, as HellaSwag's endings repeat their context."""
    records = read_jsonl(path, _lambada_problem, "OpenAI's lambada_test.jsonl")[:limit or None]
    examples = []
    for record in records:
        context, word = record["text"].strip().rsplit(" ", 1)
        word_tokens = enc.encode_ordinary(" " + word)
        tokens = enc.encode_ordinary(context) + word_tokens
        examples.append([(tokens, len(word_tokens)), (tokens, 1)])

    def values(i, scores):
        (word, word_right), (last, last_right) = scores
        return -word, float(word_right), -last, float(last_right)

    def summarize(table):
        return {"acc": table[:, 1].mean(), "ppl": math.exp(table[:, 0].mean()),
                "last_token_acc": table[:, 3].mean(), "last_token_ppl": math.exp(table[:, 2].mean())}

    return Task("lambada", examples, values, summarize, 4, len(examples), "passages")


# ----------------------------------------------------------------------------- HellaSwag

def _hellaswag_problem(record):
    endings, label = record.get("endings"), record.get("label")
    if not isinstance(record.get("ctx"), str):
        return "no 'ctx' field (a string)"
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        return "'endings' is not a list of 4 strings"
    if isinstance(label, bool) or label not in (0, 1, 2, 3):
        return f"'label' is {label!r}, not 0, 1, 2 or 3"
    return None


def hellaswag(path, enc, limit):
    """Each context with its 4 endings (after a space), completion style: the ending the model
    finds likeliest wins, by the sum of its tokens' log-probabilities (acc) or by their mean
    (acc_norm), as llm.c's and Karpathy's GPT-2 reproductions count them."""
    records = read_jsonl(path, _hellaswag_problem, "HellaSwag's hellaswag_val.jsonl")[:limit or None]
    examples = []
    for record in records:
        context = enc.encode_ordinary(record["ctx"]) or [enc.eot_token]
        endings = [enc.encode_ordinary(" " + ending) for ending in record["endings"]]
        examples.append([(context + ending, len(ending)) for ending in endings])

    def values(i, scores):
        logprob = np.array([s for s, _ in scores])
        lengths = np.array([n for _, n in examples[i]])
        label = records[i]["label"]
        return float(logprob.argmax() == label), float((logprob / lengths).argmax() == label)

    def summarize(table):
        return {"acc": table[:, 0].mean(), "acc_norm": table[:, 1].mean()}

    return Task("hellaswag", examples, values, summarize, 2, len(examples), "examples")


# ----------------------------------------------------------------------------- loading

def load_task(name, enc, config, *, stride=0, limit=0, text_form="detokenized", urls=None, data=""):
    """A task ready to run on a model of this config, its file downloaded and its examples
    tokenized with enc. stride: how far WikiText's windows move, 0 for half the context. data: the
    prepared dataset's folder whose val split the task "val" scores."""
    if name == "val":
        return validation_split(data, enc, config.block_size, stride or max(1, config.block_size // 2), limit)
    urls = {"lambada": LAMBADA_URL, "hellaswag": HELLASWAG_URL, **(urls or {})}
    path = task_file(name, urls)
    if name in WIKITEXT:
        task = wikitext(name, path, enc, config.block_size, stride or max(1, config.block_size // 2), limit,
                        text_form)
    else:
        task = (lambada if name == "lambada" else hellaswag)(path, enc, limit)
    if not task.examples:  # every number would be 0 / 0
        fail(f"{name}: {path} holds no examples (limit {limit or 'none'}); give the task's whole file")
    if any(max(tokens) >= config.vocab_size for example in task.examples for tokens, _ in example):
        fail(f"{name} tokenized with {enc.name} has token ids beyond the model's vocabulary of {config.vocab_size}")
    return task
