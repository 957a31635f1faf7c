"""Text into a model and back: prompts as tokens, and generated tokens streamed back as text."""
import codecs
import secrets
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


def check_ids(enc, ids, vocab_size):
    """A ValueError if the model, of vocab_size, has no embedding for one of the prompt's ids: a model
    trained on a dataset that uses only the first ids of its tokenizer, or with another tokenizer."""
    beyond = [i for i in ids if i >= vocab_size]
    if ids == [enc.eot_token] and beyond:
        raise ValueError(f"an empty prompt starts from <|endoftext|> (id {enc.eot_token}), beyond the model's "
                         f"vocabulary of {vocab_size}: give a prompt")
    if beyond:
        raise ValueError(f"the prompt has token {beyond[0]} ({enc.decode([beyond[0]])!r}), beyond the model's "
                         f"vocabulary of {vocab_size}: it was trained on fewer ids of {enc.name}, or with another "
                         f"tokenizer; leave that text out")


def encode_prompt(enc, text, block_size, vocab_size):
    """The prompt's tokens for a model of block_size and vocab_size: its last block_size (with a note if
    that cuts it), a ValueError if the model has no embedding for one of them."""
    ids = prompt_tokens(enc, text)
    check_ids(enc, ids[-block_size:], vocab_size)
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens; the model sees at most block_size={block_size}, "
              f"so only the last {block_size} are used", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def end_of_text(model, enc):
    """The token that ends a text, if the model's vocabulary has it."""
    return enc.eot_token if enc.eot_token < model.config.vocab_size else None


def seed_for_prompt(seed):
    """The seed of one prompt of --interactive or --serve: seed if one is given, else (-1) a fresh one,
    short enough to type back as --seed= to get the same text again."""
    return seed if seed >= 0 else secrets.randbelow(2**32)


def stopped_at_end_of_text(tokens, cfg):
    """Whether a generation of this many tokens ended at <|endoftext|>: it stops only there or at max_new_tokens."""
    return tokens < cfg["max_new_tokens"]


def generate_text(model, enc, ids, cfg, device):
    """Generate after ids: yield the text of each new token as soon as its bytes decode (a token can
    end mid-character, whose text then comes with the next token's), then what is left of a character
    cut off at the end, usually nothing: one piece per token before <|endoftext|> and one more. The
    command line and the page both show these pieces."""
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
