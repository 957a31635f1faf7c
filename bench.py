"""Measure what the README promises, on this machine, and write the figures to bench.json.

    python bench.py                      # everything
    python bench.py --only=generate      # one section (comma-separated names)

Each section returns rows (what, value, unit); where transformers is installed, it is measured in
the same run as the reference to beat.
"""
import json
import os
import tempfile
import time

import torch

from cli import configure, fail
from gpt import GPT, GPTConfig


def timed(fn, repeat=1):
    """Best wall time of fn() over repeat runs, after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_generate(new_tokens=256, prompt_len=16):
    """Generation tokens/s at GPT-2 124M shape (random weights), batch 1, greedy."""
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    prompt = torch.randint(0, 50257, (1, prompt_len))
    rows = []
    t_cache = timed(lambda: model.generate(prompt, new_tokens, temperature=0), repeat=2)
    rows.append(("generate, KV cache", new_tokens / t_cache, "tokens/s"))
    t_nocache = timed(lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=False))
    rows.append(("generate, no cache (recompute)", new_tokens / t_nocache, "tokens/s"))
    rows.append(("KV-cache speed-up", t_nocache / t_cache, "x"))
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return rows
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = GPT2LMHeadModel.from_pretrained(d).eval()
    mask = torch.ones_like(prompt)
    t_hf = timed(lambda: hf.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=0), repeat=2)
    rows.append(("transformers generate (its cache)", new_tokens / t_hf, "tokens/s"))
    rows.append(("ours vs transformers", t_hf / t_cache, "x"))
    return rows


BENCHES = {"generate": bench_generate}


def main():
    cfg = configure({"only": "", "out": "bench.json"}, doc=__doc__)
    names = [n for n in cfg["only"].split(",") if n] or list(BENCHES)
    for n in names:
        if n not in BENCHES:
            fail(f"unknown section {n!r}: choose from {', '.join(BENCHES)}")
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for name in names:
        rows = BENCHES[name]()
        results[name] = [{"what": w, "value": round(v, 3), "unit": u} for w, v, u in rows]
        for what, value, unit in rows:
            print(f"{name:10s} {what:45s} {value:12.2f} {unit}", flush=True)
    tmp = cfg["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, cfg["out"])


if __name__ == "__main__":
    main()
