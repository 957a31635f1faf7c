"""Sample from GPT-2 or from a model trained here, streaming the text as it is generated.

    python sample.py --init_from=gpt2 --start="Once upon a time" --max_new_tokens=100
    python sample.py --init_from=path/to/hf_dir --start=FILE:prompt.txt --num_samples=3
    python sample.py --init_from=resume --out_dir=out-tinystories
    python sample.py --init_from=gpt2 --interactive     # one prompt per line on stdin
    python sample.py --init_from=gpt2 --adapter=out-alpaca --instruction="Explain gravity to a child."
    python sample.py --init_from=resume --out_dir=out-tinystories --serve   # a web page: http://127.0.0.1:8000

--instruction (and --input) wraps the text in the Alpaca prompt that finetune_alpaca.py trains on
and prints only the response; without --adapter, the same command shows the base model's answer.
--serve loads the model once and serves a page to try it (lib/webpage.html) until Ctrl-C: a prompt, or
an instruction and its input with --adapter or --instruction, and the sampling settings.
"""
import sys

import lib  # noqa: F401 -- first: a Ctrl-C while torch loads then ends the script with one line
import torch
from tqdm import tqdm

from lib import cli, datasets, downloads, models, speed, text, webpage

# ----------------------------------------------------------------------------- defaults
# A note like `>= 1` or `[0, 1)` after a setting is its range, which lib/cli.py enforces.
init_from = ""          # gpt2 | gpt2-medium | ... | a local HF directory | resume; "": gpt2, or the adapter's base
out_dir = "out"         # where --init_from=resume finds ckpt.pt
start = ""              # the prompt, or FILE:path to read it from a file; empty starts from <|endoftext|>
num_samples = 1         # >= 1; several are decoded together, as the rows of one batch
max_new_tokens = 200    # >= 1
temperature = 0.8       # >= 0; 0 is greedy
top_k = 200             # >= 0; 0 turns top-k filtering off
top_p = 1.0             # (0, 1]; nucleus sampling: 1.0 turns it off
seed = -1               # [-1, 2**63); -1: 1337 for a plain run, a fresh one per prompt with --interactive or --serve
device = "auto"         # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
dtype = "auto"          # auto | float32 | bfloat16 | float16
interactive = False     # read prompts from stdin, one per line, and answer each
serve = False           # serve a web page to try the model on, instead of printing
host = "127.0.0.1"      # where --serve listens: 127.0.0.1 is this machine alone, 0.0.0.0 every network it is on
port = 8000             # [1, 65535]; the port --serve listens on
tokenizer = ""          # the model's own if left out; a local HF directory records none: name it here, else gpt2
adapter = ""            # a LoRA or QLoRA adapter directory (adapter.json + adapter.safetensors) for init_from's model
instruction = ""        # answer this instruction in the Alpaca format, printing only the response
input = ""              # the instruction's input, if it has one
# -----------------------------------------------------------------------------


def stream(model, enc, ids, cfg, device):
    """Generate after ids, writing each piece of text as soon as its bytes decode; then, on stderr,
    whether it stopped at <|endoftext|>."""
    tokens = 0
    for tokens, piece in enumerate(text.generate_text(model, enc, ids, cfg, device)):  # the last piece is not a token's
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if text.stopped_at_end_of_text(tokens, cfg):
        print(f"[stopped at <|endoftext|> after {tokens} tokens]", file=sys.stderr)


def several(model, enc, ids, cfg, device):
    """num_samples continuations of ids, decoded together as the rows of one batch (each step reads
    the weights once for all of them) with a progress bar; their tokens, each cut at its end of text."""
    eos, n = text.end_of_text(model, enc), cfg["num_samples"]
    idx = torch.tensor([ids] * n, dtype=torch.long, device=device)
    rows = [[] for _ in range(n)]
    with cli.autocast(device, cfg["dtype"]):
        tokens = model.generate_stream(idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None,
                                       cfg["top_p"], eos_id=eos)
        for token in tqdm(tokens, total=cfg["max_new_tokens"], desc=f"{n} samples", unit="token", leave=False):
            for row, t in zip(rows, token[:, 0].tolist()):
                row.append(t)
    return [row[:row.index(eos)] if eos in row else row for row in rows]


def available_memory(device):
    """Bytes free for generating on device: the GPU's free memory on CUDA, the kernel's MemAvailable on
    Linux, None where it is not known (macOS, Windows)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def check_batch_fits(model, ids, cfg):
    """Refuse a --num_samples that cannot fit in memory, before any of it is allocated. Each sample
    holds a KV cache (keys and values of every layer, for the whole context), the activations of the
    prompt's pass and its logits."""
    c, n = model.config, cfg["num_samples"]
    context = min(c.block_size, len(ids) + cfg["max_new_tokens"])
    width = 4 if cfg["dtype"] == "float32" else 2
    cache = 2 * c.n_layer * context * c.n_embd * (4 if cfg["device"] == "cpu" else width)  # gpt.py: float32 on a CPU
    prompt_pass = 2 * min(len(ids), c.block_size) * 4 * c.n_embd * width  # the MLP's hidden layer, around its GELU
    logits = c.vocab_size * 4 * (9 if cfg["top_p"] < 1 else 5)  # float32, and the copies sampling makes (measured)
    per_sample, free = cache + prompt_pass + logits, available_memory(cfg["device"])
    if free is not None and n * per_sample > free:
        fits = free // per_sample
        cli.fail(f"--num_samples={n} needs about {n * per_sample / 2**30:.1f} GiB (KV cache, activations, logits), "
                 f"and {free / 2**30:.1f} GiB is free on {cfg['device']}: "
                 + (f"at most --num_samples={fits} fits" if fits else "not even one sample fits"))


def prompt_ids(model, enc, cfg, prompt):
    """The tokens to generate after: the instruction's Alpaca prompt, or the prompt's; each one the
    model can embed, else a one-line error."""
    try:
        if cfg["instruction"]:
            ids = text.prompt_tokens(enc, "", cfg["instruction"], cfg["input"])
            text.check_ids(enc, ids, model.config.vocab_size)
            return ids
        return text.encode_prompt(enc, prompt, model.config.block_size, model.config.vocab_size)
    except ValueError as e:
        cli.fail(str(e))


def interact(model, enc, cfg):
    """Answer each line of stdin; at a terminal, with a banner and a prompt. Ctrl-C or Ctrl-D ends it
    quietly. Each line is seeded afresh: with --seed, or with a new seed it shows, for --seed= to repeat."""
    terminal = sys.stdin.isatty()
    if terminal:
        print("type a prompt and press Enter; Ctrl-D or Ctrl-C to quit", file=sys.stderr)
    try:
        while True:
            if terminal:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            ids = prompt_ids(model, enc, cfg, line.rstrip("\n"))
            seed = text.seed_for_prompt(cfg["seed"])
            if cfg["seed"] < 0:
                print(f"[seed {seed}]", file=sys.stderr)
            torch.manual_seed(seed)
            stream(model, enc, ids, cfg, cfg["device"])
    except KeyboardInterrupt:
        pass
    if terminal:
        sys.stderr.write("\n")


def main(argv=None):
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
    cfg = cli.configure(defaults, argv, doc=__doc__, source=__file__)
    if cfg["input"] and not cfg["instruction"]:
        cli.fail("--input goes with an --instruction")
    if cfg["instruction"] and (cfg["start"] or cfg["interactive"]):
        cli.fail("--instruction makes its own prompt: leave out --start and --interactive")
    if cfg["serve"] and (cfg["interactive"] or cfg["num_samples"] > 1):
        cli.fail("--serve takes its prompts from the page, one sample each: leave out --interactive and --num_samples")
    if cfg["interactive"] and cfg["num_samples"] > 1:
        cli.fail("--interactive answers each prompt with one sample: leave out --num_samples")
    if cfg["serve"] and cfg["max_new_tokens"] > webpage.MAX_NEW_TOKENS:
        cli.fail(f"--max_new_tokens={cfg['max_new_tokens']} is more than --serve generates at a time: "
                 f"at most {webpage.MAX_NEW_TOKENS}")
    if not cfg["serve"] and (cfg["host"], cfg["port"]) != (defaults["host"], defaults["port"]):
        cli.fail("--host and --port go with --serve")
    models.known_tokenizer(cfg)  # a --tokenizer that is not GPT-2's weights' fails before they are downloaded
    server = webpage.listen(cfg) if cfg["serve"] else None
    cfg["device"] = cli.pick_device(cfg["device"])
    cfg["dtype"] = cli.pick_dtype(cfg["dtype"], cfg["device"])
    model, recorded = models.load_model(cfg)
    known = models.known_tokenizer(cfg, recorded)
    model.eval().to(cfg["device"])
    if cfg["dtype"] != "float32":
        speed.cast_for_inference(model, getattr(torch, cfg["dtype"]))
    try:
        enc = datasets.get_tokenizer(cfg["tokenizer"] or known or "gpt2")
    except (ValueError, downloads.DownloadError) as e:
        cli.fail(str(e))
    if cfg["serve"]:
        webpage.serve(server, model, enc, cfg, cli.read_notes(__file__))
        return
    if cfg["interactive"]:
        interact(model, enc, cfg)
        return
    ids = prompt_ids(model, enc, cfg, text.read_prompt(cfg["start"]))
    check_batch_fits(model, ids, cfg)
    # after the model is built, whose initial weights draw random numbers too; -1, the default, is 1337 here
    torch.manual_seed(cfg["seed"] if cfg["seed"] >= 0 else 1337)
    prompt = enc.decode(ids) if cfg["start"] else ""
    if cfg["num_samples"] == 1:
        sys.stdout.write(prompt)
        stream(model, enc, ids, cfg, cfg["device"])
        return
    rows = several(model, enc, ids, cfg, cfg["device"])
    print("\n---------------\n".join(prompt + enc.decode(row) for row in rows))
    for i, row in enumerate(rows, start=1):
        if text.stopped_at_end_of_text(len(row), cfg):
            print(f"[sample {i} stopped at <|endoftext|> after {len(row)} tokens]", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
