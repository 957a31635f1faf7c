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
seed = 1337             # [0, 2**63)
device = "auto"         # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
dtype = "auto"          # auto | float32 | bfloat16 | float16
interactive = False     # read prompts from stdin, one per line, and answer each
serve = False           # serve a web page to try the model on, instead of printing
host = "127.0.0.1"      # where --serve listens: 127.0.0.1 is this machine alone, 0.0.0.0 every network it is on
port = 8000             # [1, 65535]; the port --serve listens on
tokenizer = "gpt2"
adapter = ""            # a LoRA or QLoRA adapter directory (adapter.json + adapter.safetensors) for init_from's model
instruction = ""        # answer this instruction in the Alpaca format, printing only the response
input = ""              # the instruction's input, if it has one
# -----------------------------------------------------------------------------


def stream(model, enc, ids, cfg, device):
    """Generate after ids, writing each piece of text as soon as its bytes decode."""
    for piece in text.generate_text(model, enc, ids, cfg, device):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def several(model, enc, ids, cfg, device):
    """num_samples continuations of ids, decoded together as the rows of one batch (each step reads
    the weights once for all of them) with a progress bar; their texts, each cut at its end of text."""
    eos, n = text.end_of_text(model, enc), cfg["num_samples"]
    idx = torch.tensor([ids] * n, dtype=torch.long, device=device)
    rows = [[] for _ in range(n)]
    with cli.autocast(device, cfg["dtype"]):
        tokens = model.generate_stream(idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None,
                                       cfg["top_p"], eos_id=eos)
        for token in tqdm(tokens, total=cfg["max_new_tokens"], desc=f"{n} samples", unit="token", leave=False):
            for row, t in zip(rows, token[:, 0].tolist()):
                row.append(t)
    return [enc.decode(row[:row.index(eos)] if eos in row else row) for row in rows]


def interact(model, enc, cfg):
    """Answer each line of stdin; at a terminal, with a banner and a prompt. Ctrl-C or Ctrl-D ends it quietly."""
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
            stream(model, enc, text.encode_prompt(enc, line.rstrip("\n"), model.config.block_size), cfg, cfg["device"])
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
    if cfg["serve"] and cfg["max_new_tokens"] > webpage.MAX_NEW_TOKENS:
        cli.fail(f"--max_new_tokens={cfg['max_new_tokens']} is more than --serve generates at a time: "
                 f"at most {webpage.MAX_NEW_TOKENS}")
    if not cfg["serve"] and (cfg["host"], cfg["port"]) != (defaults["host"], defaults["port"]):
        cli.fail("--host and --port go with --serve")
    server = webpage.listen(cfg) if cfg["serve"] else None
    cfg["device"] = cli.pick_device(cfg["device"])
    cfg["dtype"] = cli.pick_dtype(cfg["dtype"], cfg["device"])
    model, tokenizer_name = models.load_model(cfg)
    model.eval().to(cfg["device"])
    if cfg["dtype"] != "float32":
        speed.cast_for_inference(model, getattr(torch, cfg["dtype"]))
    try:
        enc = datasets.get_tokenizer(tokenizer_name)
    except (ValueError, downloads.DownloadError) as e:
        cli.fail(str(e))
    if cfg["serve"]:
        webpage.serve(server, model, enc, cfg, cli.read_notes(__file__))
        return
    torch.manual_seed(cfg["seed"])  # after the model is built, whose initial weights draw random numbers too
    if cfg["interactive"]:
        interact(model, enc, cfg)
        return
    if cfg["instruction"]:
        ids = text.prompt_tokens(enc, "", cfg["instruction"], cfg["input"])
    else:
        ids = text.encode_prompt(enc, text.read_prompt(cfg["start"]), model.config.block_size)
    prompt = enc.decode(ids) if cfg["start"] else ""
    if cfg["num_samples"] == 1:
        sys.stdout.write(prompt)
        stream(model, enc, ids, cfg, cfg["device"])
        return
    texts = several(model, enc, ids, cfg, cfg["device"])
    print("\n---------------\n".join(prompt + text for text in texts))


if __name__ == "__main__":
    cli.run(main)
