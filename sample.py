"""Sample from GPT-2 or from a model trained here, streaming the text as it is generated.

    python sample.py --init_from=gpt2 --start="Once upon a time" --max_new_tokens=100
    python sample.py --init_from=path/to/hf_dir --start=FILE:prompt.txt --num_samples=3
    python sample.py --init_from=resume --out_dir=out-tinystories
    python sample.py --init_from=gpt2 --interactive     # one prompt per line on stdin
    python sample.py --init_from=gpt2 --adapter=out-alpaca --instruction="Explain gravity to a child."

--instruction (and --input) wraps the text in the Alpaca prompt that finetune_alpaca.py trains on
and prints only the response; without --adapter, the same command shows the base model's answer.
"""
import codecs
import sys

import torch
from tqdm import tqdm

from cli import autocast, configure, fail, pick_device, pick_dtype, run
from data import alpaca_prompt
from gpt import DownloadError, get_tokenizer
from training import load_model

# ----------------------------------------------------------------------------- defaults
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
tokenizer = "gpt2"
adapter = ""            # a LoRA or QLoRA adapter directory (adapter.json + adapter.safetensors) for init_from's model
instruction = ""        # answer this instruction in the Alpaca format, printing only the response
input = ""              # the instruction's input, if it has one
# -----------------------------------------------------------------------------


def read_prompt(text):
    if not text.startswith("FILE:"):
        return text
    try:
        with open(text[5:], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt file {text[5:]}: {e}")


def prompt_tokens(enc, text, instruction="", input=""):
    """The tokens to generate after: an instruction (and its input) in the Alpaca prompt, encoded as in
    training (the prompt's text is ordinary text), else the text, in which <|endoftext|> may stand;
    empty text starts from <|endoftext|>."""
    if instruction:
        return enc.encode_ordinary(alpaca_prompt(instruction, input))
    return enc.encode(text, allowed_special={"<|endoftext|>"}) if text else [enc.eot_token]


def encode_prompt(enc, text, block_size):
    ids = prompt_tokens(enc, text)
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens; the model sees at most block_size={block_size}, "
              f"so only the last {block_size} are used", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def end_of_text(model, enc):
    """The token that ends a text, if the model's vocabulary has it."""
    return enc.eot_token if enc.eot_token < model.config.vocab_size else None


def generate_text(model, enc, ids, cfg, device):
    """Generate after ids: yield the text of each new token as soon as its bytes decode (a token can
    end mid-character, whose text then comes with the next token's), then what is left of a character
    cut off at the end, usually nothing."""
    eos = end_of_text(model, enc)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    with autocast(device, cfg["dtype"]):
        for token in model.generate_stream(idx, cfg["max_new_tokens"], cfg["temperature"],
                                           cfg["top_k"] or None, cfg["top_p"], eos_id=eos):
            if token.item() == eos:
                break
            yield decoder.decode(enc.decode_single_token_bytes(token.item()))
    yield decoder.decode(b"", final=True)


def stream(model, enc, ids, cfg, device):
    """Generate after ids, writing each piece of text as soon as its bytes decode."""
    for piece in generate_text(model, enc, ids, cfg, device):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def several(model, enc, ids, cfg, device):
    """num_samples continuations of ids, decoded together as the rows of one batch (each step reads
    the weights once for all of them) with a progress bar; their texts, each cut at its end of text."""
    eos, n = end_of_text(model, enc), cfg["num_samples"]
    idx = torch.tensor([ids] * n, dtype=torch.long, device=device)
    rows = [[] for _ in range(n)]
    with autocast(device, cfg["dtype"]):
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
            stream(model, enc, encode_prompt(enc, line.rstrip("\n"), model.config.block_size), cfg, cfg["device"])
    except KeyboardInterrupt:
        pass
    if terminal:
        sys.stderr.write("\n")


def main(argv=None):
    defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
    cfg = configure(defaults, argv, doc=__doc__, source=__file__)
    if cfg["input"] and not cfg["instruction"]:
        fail("--input goes with an --instruction")
    if cfg["instruction"] and (cfg["start"] or cfg["interactive"]):
        fail("--instruction makes its own prompt: leave out --start and --interactive")
    cfg["device"] = pick_device(cfg["device"])
    cfg["dtype"] = pick_dtype(cfg["dtype"], cfg["device"])
    torch.manual_seed(cfg["seed"])
    model, tokenizer_name = load_model(cfg)
    model.eval().to(cfg["device"])
    if cfg["dtype"] != "float32":
        model.cast_for_inference(getattr(torch, cfg["dtype"]))
    try:
        enc = get_tokenizer(tokenizer_name)
    except (ValueError, DownloadError) as e:
        fail(str(e))
    if cfg["interactive"]:
        interact(model, enc, cfg)
        return
    if cfg["instruction"]:
        ids = prompt_tokens(enc, "", cfg["instruction"], cfg["input"])
    else:
        ids = encode_prompt(enc, read_prompt(cfg["start"]), model.config.block_size)
    prompt = enc.decode(ids) if cfg["start"] else ""
    if cfg["num_samples"] == 1:
        sys.stdout.write(prompt)
        stream(model, enc, ids, cfg, cfg["device"])
        return
    texts = several(model, enc, ids, cfg, cfg["device"])
    print("\n---------------\n".join(prompt + text for text in texts))


if __name__ == "__main__":
    run(main)
