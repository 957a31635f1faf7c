"""Score a model on the benchmarks GPT-2 is known by, print a table and write eval.json.

    python eval.py --init_from=gpt2                                     # every task
    python eval.py --init_from=gpt2-xl --tasks=hellaswag,lambada
    python eval.py --init_from=resume --out_dir=out-tinystories --tasks=wikitext2
    python eval.py --init_from=gpt2 --adapter=out-alpaca --tasks=hellaswag
    python eval.py --init_from=gpt2 --tasks=wikitext103 --limit=200     # a quick look: the first 200 of each
    torchrun --standalone --nproc_per_node=8 eval.py --init_from=gpt2-xl   # 8 processes share the examples

  wikitext2, wikitext103  perplexity of the raw test split: per token (token_ppl), bits per byte, and
                          per WikiText word three ways: its words (word_ppl), its words and an <eos>
                          per line (word_eos_ppl, likely the GPT-2 paper's Table 3 count), or
                          lm-evaluation-harness's count (page_word_ppl); each count printed beside
  lambada                 OpenAI's LAMBADA test set: the last word right by greedy decoding (acc) and
                          its perplexity (ppl), as lm-evaluation-harness counts; the last BPE token
                          right (last_token_acc, the GPT-2 paper's accuracy) and its perplexity
  hellaswag               the validation set, completion style: the likeliest of 4 endings by
                          total (acc) or mean (acc_norm) log-probability per token
  val                     your own data: the val split of a folder prepare_data.py wrote (--data),
                          scored as WikiText is: loss per token, perplexity and bits per byte

    python eval.py --init_from=out-shakespeare --tasks=val --data=data/shakespeare
docs/evaluation.md says exactly how each is computed, beside the published figures.
"""
import json
import os
import sys
import time
from urllib.parse import urlsplit

import lib  # noqa: F401 -- first: a Ctrl-C while torch loads then ends the script with one line
import torch
import torch.distributed as dist

from lib import benchmarks, cli, datasets, downloads, files, models, processes, speed

# ----------------------------------------------------------------------------- defaults
# A note like `>= 1` or `[0, 1)` after a setting is its range, which lib/cli.py enforces.
# the model
init_from = ""            # gpt2 | gpt2-medium | ... | a local HF directory | resume; "": gpt2, or the adapter's base
out_dir = "out"           # eval.json is written here; --init_from=resume reads ckpt.pt from here
adapter = ""              # a LoRA or QLoRA adapter directory for init_from's model
tokenizer = ""            # the model's own if left out; a local HF directory records none: name it here, else gpt2
# the tasks
tasks = "wikitext2,wikitext103,lambada,hellaswag"  # and val, for --data
data = ""                 # a folder prepare_data.py wrote, whose val split --tasks=val scores
limit = 0                 # >= 0; score only the first N examples of each task (WikiText: lines); 0: all
stride = 0                # >= 0; how far each WikiText window moves on; 0: half the model's context (512 for GPT-2)
wikitext_text = "detokenized"  # detokenized: the paper's way | guide: lines joined by blank lines, as transformers' guide
lambada_url = benchmarks.LAMBADA_URL
hellaswag_url = benchmarks.HELLASWAG_URL
# system
batch_size = 16           # >= 1; sequences per forward pass
device = "auto"           # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
dtype = "auto"            # auto | float32 | bfloat16 | float16
# -----------------------------------------------------------------------------


def check(cfg):
    """Every mistake in the options, before anything is downloaded."""
    names = benchmarks.parse_tasks(cfg["tasks"], "--tasks", known=(*benchmarks.TASKS, "val"))
    if not names:
        cli.fail(f"--tasks is empty: name one or more of {', '.join(benchmarks.TASKS)}, val")
    if ("val" in names) != bool(cfg["data"]):
        cli.fail("--tasks=val scores the val split of --data=<a folder prepare_data.py wrote>: give both, or neither")
    if cfg["data"]:
        cfg["meta"] = datasets.read_meta(cfg["data"], 1)
    if cfg["wikitext_text"] not in ("detokenized", "guide"):
        cli.fail(f"--wikitext_text={cfg['wikitext_text']!r} is not one of 'detokenized', 'guide'")
    for key in ("lambada_url", "hellaswag_url"):
        if urlsplit(cfg[key]).scheme not in ("http", "https"):
            cli.fail(f"--{key}={cfg[key]!r} is not an http(s) URL")
    if any(name in benchmarks.WIKITEXT for name in names):
        datasets.require_pyarrow()
    return names


def table(results):
    """The results as the lines of a table: task, metric, value, examples, seconds."""
    lines = [f"{'task':12s} {'metric':14s} {'value':>10s} {'examples':>9s} {'seconds':>8s}"]
    for name, result in results.items():
        metrics = {k: v for k, v in result.items() if k not in ("examples", "seconds")}
        for j, (metric, value) in enumerate(metrics.items()):
            shown = f"{value:,d}" if isinstance(value, int) else f"{value:.4f}"
            tail = f" {result['examples']:9,d} {result['seconds']:8.1f}" if j == 0 else ""
            lines.append(f"{name if j == 0 else '':12s} {metric:14s} {shown:>10s}{tail}")
    return lines


def main(argv=None):
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
    cfg = cli.configure(defaults, argv, doc=__doc__, source=__file__)
    names = check(cfg)
    models.known_tokenizer(cfg)  # a --tokenizer that is not GPT-2's weights' fails before they are downloaded
    cli.writable_dir(cfg["out_dir"])
    rank, world_size, device = processes.setup_ddp(cli.pick_device(cfg["device"]))
    dtype = cli.pick_dtype(cfg["dtype"], device)
    speed.keep_freed_memory()
    with processes.rank_zero_first():  # downloads, once per node
        model, recorded = models.load_model(cfg)
        tokenizer_name = cfg["tokenizer"] or models.known_tokenizer(cfg, recorded) or "gpt2"
        config = model.config
        if cfg["stride"] > config.block_size:
            cli.fail(f"--stride={cfg['stride']} is longer than the model's context of {config.block_size} tokens: "
                     f"windows would skip tokens")
        if cfg["data"] and cfg["meta"]["tokenizer"] != tokenizer_name:
            cli.fail(f"{cfg['data']} holds {cfg['meta']['tokenizer']} token ids, and the model reads {tokenizer_name} "
                     f"ids: score it on data prepared with --tokenizer={tokenizer_name}")
        try:
            enc = datasets.get_tokenizer(tokenizer_name)
        except (ValueError, downloads.DownloadError) as e:
            cli.fail(str(e))
        loaded = [benchmarks.load_task(name, enc, config, stride=cfg["stride"], limit=cfg["limit"],
                                       text_form=cfg["wikitext_text"],
                                       urls={"lambada": cfg["lambada_url"], "hellaswag": cfg["hellaswag_url"]},
                                       data=cfg["data"])
                  for name in names]
    model.eval().to(device)
    if world_size > 1:  # rank 0 alone read a checkpoint's weights: every process scores with them
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    if dtype != "float32":
        speed.cast_for_inference(model, getattr(torch, dtype))

    results = {}
    for task in loaded:
        same = next((done for done in loaded[:loaded.index(task)] if done.text and done.text == task.text), None)
        if same is not None:  # the raw test splits of WikiText-2 and -103 are one text
            results[task.name] = dict(results[same.name], seconds=0.0)
            if rank == 0:
                print(f"{task.name}: the same text as {same.name}, scored once", file=sys.stderr)
            continue
        start = time.perf_counter()
        metrics = benchmarks.run_task(model, task, cfg["batch_size"], rank, world_size, device, dtype,
                                      progress=rank == 0)
        results[task.name] = {**metrics, "examples": task.count, "seconds": time.perf_counter() - start}
    if rank == 0:
        print("\n".join(table(results)))
        path = os.path.join(cfg["out_dir"], "eval.json")
        record = {"model": {k: cfg[k] for k in ("init_from", "adapter", "tokenizer")},
                  "settings": {"data": cfg["data"], "limit": cfg["limit"], "stride": cfg["stride"] or config.block_size // 2,
                               "wikitext_text": cfg["wikitext_text"], "block_size": config.block_size,
                               "dtype": dtype, "device": device, "processes": world_size},
                  "results": results}
        if cfg["init_from"] == "resume":
            record["model"]["checkpoint"] = os.path.join(cfg["out_dir"], "ckpt.pt")
        with files.atomic_write(path) as f:
            f.write((json.dumps(record, indent=2) + "\n").encode())
        print(f"results in {path}")
    processes.exit_ddp()


if __name__ == "__main__":
    cli.run(main)
