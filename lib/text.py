"""Text into a model and back: prompts as tokens, and generated tokens streamed back as text."""
import codecs
import sys

import torch

from lib import cli, datasets


def read_prompt(text):
    if not text.startswith("FILE:"):
        return text
    try:
        with open(text[5:], encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        cli.fail(f"cannot read the prompt file {text[5:]}: {e}")


def prompt_tokens(enc, text, instruction="", input=""):
    """The tokens to generate after: an instruction (and its input) in the Alpaca prompt, encoded as in
    training (the prompt's text is ordinary text), else the text, in which <|endoftext|> may stand;
    empty text starts from <|endoftext|>."""
    if instruction:
        return enc.encode_ordinary(datasets.alpaca_prompt(instruction, input))
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
    cut off at the end, usually nothing. The command line and the page both show these pieces."""
    eos = end_of_text(model, enc)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    with cli.autocast(device, cfg["dtype"]):
        for token in model.generate_stream(idx, cfg["max_new_tokens"], cfg["temperature"],
                                           cfg["top_k"] or None, cfg["top_p"], eos_id=eos):
            if token.item() == eos:
                break
            yield decoder.decode(enc.decode_single_token_bytes(token.item()))
    yield decoder.decode(b"", final=True)
