"""GPT-2 in one file, to be read top to bottom.

Part I, the model: config -> layers -> GPT (forward, loss) -> generation. It needs nothing below it.
Part II, GPT-2's weights: from_pretrained and save_pretrained, in Hugging Face's layout.
Part III, LoRA on 4-bit NF4 weights (QLoRA): fine-tuning a few numbers beside frozen ones.

The defaults are OpenAI's GPT-2 exactly (learned positions, tanh GELU, pre-norm LayerNorm, tied
embeddings); pos_emb="rope" and mlp="swiglu" give the modern variant.
"""
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ============================================================================= Part I: the model

@dataclass
class GPTConfig:
    block_size: int = 1024     # longest context the model sees
    vocab_size: int = 50257    # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True          # biases in Linear and LayerNorm, as GPT-2 has
    pos_emb: str = "learned"   # "learned" (GPT-2) | "rope" (rotary, as in Llama)
    mlp: str = "gelu"          # "gelu" (GPT-2) | "swiglu" (gated, as in Llama)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.pos_emb not in ("learned", "rope"):
            raise ValueError(f"pos_emb={self.pos_emb!r}: expected 'learned' or 'rope'")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp={self.mlp!r}: expected 'gelu' or 'swiglu'")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head size (n_embd // n_head)")


def rope_tables(config, base=10000.0):
    """cos and sin of every position times every rotary frequency, shape (block_size, head_size)."""
    head_size = config.n_embd // config.n_head
    freqs = 1.0 / base ** (torch.arange(0, head_size, 2).float() / head_size)
    angles = torch.outer(torch.arange(config.block_size).float(), freqs)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) by its position's angle: q.k then depends on distance only."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, pos=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dtype = q.dtype
        if cache is not None:  # generation: see KVCache below
            k, v = cache.update(k, v, pos)  # (B, nh, S, hs): the S = pos + T positions so far
            q = q.to(k.dtype)  # attention in the cache's dtype
        dropout = self.dropout if self.training else 0.0
        S = k.size(2)
        with torch.autocast(x.device.type, enabled=False):  # in q's dtype: autocast would cast a float32 cache down
            if S == T:    # the whole sequence at once: the usual causal mask
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:         # T new tokens after a cached prefix: causal, shifted by the prefix
                mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = swiglu_hidden(config.n_embd) if self.swiglu else 4 * config.n_embd
        # SwiGLU computes its gate and its value in one matmul, then splits them
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))


def swiglu_hidden(n_embd):
    """SwiGLU's width: 8/3 * n_embd keeps the parameter count of a 4x GELU MLP; rounded up to 64."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), rope, cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos_emb == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        self.activation_checkpointing = False  # set by the trainer: recompute each block in the backward pass
        # GPT-2 scales the layers that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth (two writes per block)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx, targets=None):
        """(logits (B, T, vocab_size), the mean cross-entropy over the targets != -100, or None)."""
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def hidden_states(self, idx, caches=None, pos=0):
        """The final normalized hidden state of every position, (B, T, n_embd). In generation, caches
        holds each layer's KVCache and pos is where idx starts in the cached sequence."""
        T = idx.size(1)
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(torch.arange(pos, pos + T, device=idx.device))
        else:
            rope = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and torch.is_grad_enabled():
                # keep only the block's input; its activations are recomputed when the backward pass
                # needs them (with the same dropout masks): memory for one block's worth of compute
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, pos, use_reentrant=False)
            else:
                x = block(x, rope, None if caches is None else caches[i], pos)
        return self.transformer.ln_f(x)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameters counted once (the tied matrix too); without the position table by default.
        A layer that keeps its weight in another form than a parameter (Part III's 4-bit buffers)
        says how many numbers it stands for with weight_numel()."""
        n = sum(p.numel() for p in self.parameters())
        n += sum(m.weight_numel() for m in self.modules() if hasattr(m, "weight_numel"))
        if non_embedding and self.config.pos_emb == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                        use_cache=True):
        """Yield the next token of every row, shape (B, 1), max_new_tokens times or until all rows
        have produced eos_id (a finished row then repeats eos_id). With use_cache the prompt runs
        once and each step feeds one token; without, every step recomputes the whole context, and
        both give the same tokens."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        seq = idx
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        start, caches = None, None
        for _ in range(max_new_tokens):
            new_start = self.context_start(seq.size(1))
            if not use_cache:
                h = self.hidden_states(seq[:, new_start:])
            elif new_start != start:  # first step, or the block is full: (re)fill the cache
                start = new_start
                capacity = min(self.config.block_size, seq.size(1) - start + max_new_tokens)
                # on a CPU the cache keeps float32: its attention kernels for one new token run
                # several times faster in float32 than in bfloat16, and the cache is small
                cache_dtype = torch.float32 if idx.device.type == "cpu" else None
                caches = [KVCache(capacity, cache_dtype) for _ in self.transformer.h]
                h = self.hidden_states(seq[:, start:], caches)
            else:
                h = self.hidden_states(seq[:, -1:], caches, pos=seq.size(1) - 1 - start)
            logits = self.lm_head(h[:, -1, :]).float()  # (B, vocab_size): the last position's only
            token = sample_next(logits, temperature, top_k, top_p)  # (B, 1)
            if eos_id is not None:
                token = torch.where(finished[:, None], torch.full_like(token, eos_id), token)
                finished |= token[:, 0] == eos_id
            seq = torch.cat([seq, token], dim=1)
            yield token
            if eos_id is not None and finished.all():
                return

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, use_cache=True):
        """The prompt idx (B, T) followed by the generated tokens; see generate_stream."""
        tokens = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache)
        return torch.cat([idx, *tokens], dim=1)

    def context_start(self, length):
        """Where the context for the next token starts: once a sequence outgrows the block, the oldest
        tokens go and the last half block is kept; the start then stays put while the context fills
        the block again, so the refilled cache serves the steps that follow."""
        block, keep = self.config.block_size, self.config.block_size // 2
        if length <= block:
            return 0
        step = block + 1 - keep  # how far the window jumps each time it overflows
        return step * ((length - keep) // step)


class KVCache:
    """Keys and values one attention layer has seen, in buffers allocated once per generation and
    written in place: each new token computes its own key and value only. dtype: the buffers'
    (None: the keys' own)."""

    def __init__(self, capacity, dtype=None):
        self.capacity, self.dtype, self.k, self.v = capacity, dtype, None, None

    def update(self, k, v, pos):
        if self.k is None:
            shape = (k.size(0), k.size(1), self.capacity, k.size(3))  # (B, nh, capacity, hs)
            self.k, self.v = (t.new_empty(shape, dtype=self.dtype or t.dtype) for t in (k, v))
        end = pos + k.size(2)
        self.k[:, :, pos:end], self.v[:, :, pos:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token per row from logits (B, vocab): greedy at temperature 0, else sampled from the
    softmax at that temperature, restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (the first token always stays)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the tokens before it already reach top_p
        drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")


# ============================================================================= Part II: GPT-2's weights
#
# Hugging Face keeps GPT-2 as config.json and model.safetensors. Loading them is three translations:
# the config's names to GPTConfig's, the tensors' names to our state_dict's, and four matrices
# transposed. The safetensors bytes are read and written in lib/weightfiles.py, imported here and
# not at the top, so that Part I stands alone.

from lib import weightfiles  # noqa: E402

PRETRAINED = {"gpt2": "124M", "gpt2-medium": "350M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
# OpenAI wrote these four as Conv1D layers, whose weight is (in, out): the transpose of nn.Linear's
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_SIZES = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")


def _hf_config_to_ours(hf, source):
    missing = [k for k in HF_SIZES if k not in hf]
    if missing:
        raise ValueError(f"{source}: not a GPT-2 config.json, it lacks {', '.join(missing)}")
    for key in HF_SIZES:
        if not (weightfiles.is_size(hf[key]) and hf[key] > 0):
            raise ValueError(f"{source}: {key}={weightfiles.short(hf[key])} is not a positive integer")
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * hf["n_embd"])),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "reorder_and_upcast_attn": (hf.get("reorder_and_upcast_attn", False), (False,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(f"{source}: {key}={weightfiles.short(value)} is not GPT-2 as this file implements it")
    try:
        return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)
    except ValueError as e:  # n_embd not a multiple of n_head
        raise ValueError(f"{source}: {e}") from None


def _our_key(name):
    """Our state_dict key for a tensor of a Hugging Face GPT-2 file; None for those not loaded: the
    old causal-mask buffers, and the head, tied to wte."""
    if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
        return None
    return name if name.startswith("transformer.") else "transformer." + name


def _expected_shapes(cls, config, entries, path):
    """{key: shape as the file stores it} for every tensor the config implies, worked out without
    allocating the model. Raises ValueError if the file is too small to hold them."""
    c = config
    # every tensor must be in the file, each element in a byte at least, so the largest (wte, wpe or
    # an MLP matrix) fits in it: checked first, as sizes past int64 fail even on the meta device
    if max(c.vocab_size, c.block_size, 4 * c.n_embd) * c.n_embd > os.path.getsize(path):
        raise ValueError(f"{path}: too small for the model in config.json (n_embd={c.n_embd}, "
                         f"vocab_size={c.vocab_size}, n_positions={c.block_size})")
    with torch.device("meta"):  # shapes without memory; the layers are alike, so one describes all
        one = {k: list(t.shape) for k, t in cls(replace(c, n_layer=1)).state_dict().items()}
    layer = {k.removeprefix("transformer.h.0."): s for k, s in one.items() if k.startswith("transformer.h.0.")}
    if c.n_layer * len(layer) > len(entries):
        raise ValueError(f"{path}: {len(entries)} tensors are too few for config.json's n_layer={c.n_layer}")
    shapes = {k: shape for k, shape in one.items() if k != "lm_head.weight" and not k.startswith("transformer.h.")}
    shapes.update((f"transformer.h.{i}.{k}", shape) for i in range(c.n_layer) for k, shape in layer.items())
    return {k: shape[::-1] if k.endswith(CONV1D) else shape for k, shape in shapes.items()}


def _check_weights(cls, config, path):
    """The file must hold exactly the tensors the config implies, each once and of its shape: all
    checked on the header, before the model is allocated (a corrupt config could ask for terabytes)."""
    entries, _ = weightfiles.read_safetensors_header(path)
    expected, seen = _expected_shapes(cls, config, entries, path), set()
    for _, _, name, _, shape in entries:
        key = _our_key(name)
        if key is None:
            continue
        if key not in expected:
            raise ValueError(f"{path}: unexpected tensor {weightfiles.short(name)}")
        if key in seen:
            raise ValueError(f"{path}: tensor {weightfiles.short(name)} given twice (with and without 'transformer.')")
        if shape != expected[key]:
            raise ValueError(f"{path}: {weightfiles.short(name)} has shape {weightfiles.short(shape)}, "
                             f"config.json implies {expected[key]}")
        seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{path}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _resolve_pretrained(name_or_dir):
    """(config.json, model.safetensors) paths for a hub name or a local directory."""
    if os.path.isdir(name_or_dir):
        files = Path(name_or_dir) / "config.json", Path(name_or_dir) / "model.safetensors"
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{name_or_dir} has no {f.name}: expected the Hugging Face layout "
                                        "(config.json + model.safetensors) as save_pretrained writes it")
        return files
    if name_or_dir not in PRETRAINED:
        raise ValueError(f"unknown model {name_or_dir!r}: expected one of {', '.join(PRETRAINED)} "
                         "or a directory holding config.json and model.safetensors")
    return weightfiles.from_hub(f"openai-community/{name_or_dir}", ("config.json", "model.safetensors"))


def load_pretrained(cls, name_or_dir, dropout=0.0):
    """GPT.from_pretrained(name_or_dir): GPT-2's weights from the hub (gpt2, gpt2-medium, gpt2-large,
    gpt2-xl) or from a local directory in its layout, the files checked against each other, then
    copied in. dropout: for fine-tuning, as GPT-2's files come without."""
    config_path, weights_path = _resolve_pretrained(str(name_or_dir))
    hf = weightfiles.read_json_file(config_path)
    config = replace(_hf_config_to_ours(hf, config_path), dropout=dropout)
    _check_weights(cls, config, weights_path)
    model = cls(config)
    ours = model.state_dict()
    with torch.no_grad():
        for name, tensor in weightfiles.iter_safetensors(weights_path):
            if (key := _our_key(name)) is not None:
                ours[key].copy_(tensor.t() if key.endswith(CONV1D) else tensor)
    return model


def write_pretrained(model, directory):
    """model.save_pretrained(directory): config.json, and model.safetensors with Conv1D's layout
    restored, as transformers' GPT2LMHeadModel reads them."""
    c = model.config
    if c.pos_emb != "learned" or c.mlp != "gelu" or not c.bias:
        raise ValueError("only the GPT-2 variant (pos_emb='learned', mlp='gelu', bias=True) can be "
                         "exported to the Hugging Face GPT-2 format")
    with torch.device("meta"):  # the tensors a plain GPT of this config has, at no cost
        plain = type(model)(c).state_dict().keys()
    if model.state_dict().keys() != plain:
        raise ValueError("GPT-2's format has no place for LoRA adapters or 4-bit weights: fold them into "
                         "plain layers first with gpt.merge_and_unload(model)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied: transformers restores it from wte
        tensors[key] = t.t().contiguous() if key.endswith(CONV1D) else t
    weightfiles.write_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
          "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
          "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
          "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
          "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True}
    if c.vocab_size > 50256:  # GPT-2's <|endoftext|>
        hf["bos_token_id"] = hf["eos_token_id"] = 50256
    weightfiles.write_json(directory / "config.json", hf)


# nanoGPT's spelling, GPT.from_pretrained("gpt2") and model.save_pretrained(directory), given to the
# class here rather than inside it, so that Part I needs nothing from this part
GPT.from_pretrained = classmethod(load_pretrained)
GPT.save_pretrained = write_pretrained


# ============================================================================= Part III: LoRA and 4-bit weights (QLoRA)

# ----------------------------------------------------------------------------- nf4

# QLoRA's 4-bit NormalFloat (Dettmers et al. 2023). Trained weights are close to normal, so the 16
# levels are quantiles of N(0, 1) scaled into [-1, 1]: each level then stands for about as many
# weights as any other. Each block of 64 weights is divided by its absolute maximum (its absmax)
# and every weight is rounded to the nearest level: 4 bits, two of them packed into a byte.
NF4_BLOCK = 64       # weights sharing one absmax scale
ABSMAX_BLOCK = 256   # absmax scales sharing one scale of their own, with double quantization


def nf4_levels():
    """The 16 NF4 values, computed as bitsandbytes' create_normal_map does (the QLoRA paper's table):
    8 positive quantiles and 7 negative ones around an exact zero, so zeros (and padding) survive."""
    # the quantile at probability 1 is infinite; the paper's outermost one is at 0.9677, halfway
    # between 1 - 1/(2*15) and 1 - 1/(2*16) (half a step in from the end, for 15 and 16 levels)
    offset = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2

    def normal_quantile(p):
        return math.sqrt(2) * torch.special.erfinv(2 * p - 1)

    positive = normal_quantile(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal_quantile(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


NF4_LEVELS = nf4_levels()


def nf4_quantize(weight, double_quant=True):
    """Quantize a float tensor to NF4: a dict of tensors, `packed` (uint8, two 4-bit codes a byte,
    high nibble first) and the per-block scales, `absmax` (float32, one per 64 weights) or, with
    double quantization, those scales quantized again to 8 bits: `absmax_q` (int8), `absmax_scale`
    (float32, one per 256 scales) and `absmax_mean` (float32)."""
    flat = weight.detach().float().flatten()
    blocks = F.pad(flat, (0, -flat.numel() % NF4_BLOCK)).view(-1, NF4_BLOCK)  # zero padding stays zero
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    levels = NF4_LEVELS.to(flat.device)
    codes = torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(-1)  # nearest level
    q = {"packed": codes[0::2] << 4 | codes[1::2]}
    if not double_quant:
        q["absmax"] = absmax
        return q
    # the scales cost 32/64 = 0.5 bits per weight; as 8-bit numbers they cost 8/64 + 32/(64*256) =
    # 0.127. They are all positive: centring them on their mean first uses the 8 bits' sign too
    mean = absmax.mean()
    centred = F.pad(absmax - mean, (0, -absmax.numel() % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    scale = centred.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q["absmax_q"] = torch.round(centred / scale[:, None]).to(torch.int8).view(-1)
    q["absmax_scale"], q["absmax_mean"] = scale, mean
    return q


def nf4_dequantize(q, shape, dtype=torch.float32):
    """The tensor of the given shape that nf4_quantize's dict q stands for, in dtype."""
    packed = q["packed"]
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1).int()
    if "absmax" in q:
        absmax = q["absmax"]
    else:
        scales = q["absmax_q"].view(-1, ABSMAX_BLOCK).float() * q["absmax_scale"][:, None]
        absmax = scales.view(-1)[:codes.numel() // NF4_BLOCK] + q["absmax_mean"]
    blocks = NF4_LEVELS.to(packed.device, dtype)[codes].view(-1, NF4_BLOCK) * absmax.to(dtype)[:, None]
    return blocks.view(-1)[:math.prod(shape)].view(shape)


def nf4_bits_per_param(q, numel):
    """Storage of the quantized tensor, scales included, per original number."""
    return 8 * sum(t.numel() * t.element_size() for t in q.values()) / numel


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantized just for this product. Autograd would keep the float W of every
    layer alive until the backward pass; this dequantizes it again there instead, so only one
    layer's float weight exists at a time. No gradient flows into W."""

    @staticmethod
    def forward(ctx, x, layer):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return x.to(dtype) @ layer.dequantize(dtype).t()

    @staticmethod
    def backward(ctx, grad):
        return (grad @ ctx.layer.dequantize(grad.dtype)).to(ctx.x_dtype), None


class NF4Linear(nn.Module):
    """A linear layer whose weight is kept in NF4 (buffers: it is not trained) and dequantized to
    the compute dtype for each product; the bias stays as it was."""

    def __init__(self, linear, double_quant=True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.double_quant = double_quant
        self.set_weight(linear.weight)
        self.bias = linear.bias

    def set_weight(self, weight):
        for name, t in nf4_quantize(weight, self.double_quant).items():
            self.register_buffer(name, t)

    def quantized(self):
        return dict(self.named_buffers(recurse=False))

    def dequantize(self, dtype=torch.float32):
        return nf4_dequantize(self.quantized(), (self.out_features, self.in_features), dtype)

    def weight_numel(self):
        return self.in_features * self.out_features

    def forward(self, x):
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# quantize_model below and apply_lora in the next section put new layers in place of these
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the linear layers of a block


def replace_block_linears(model, paths, new_layer):
    """Put new_layer(path, layer) in place of each named linear layer of every block."""
    for block in model.transformer.h:
        for path in paths:
            parent, _, name = path.rpartition(".")
            module = block.get_submodule(parent)
            setattr(module, name, new_layer(path, getattr(module, name)))
    return model


def quantize_model(model, double_quant=True):
    """Replace every linear layer of every block by an NF4Linear, in place. The tied embedding and
    lm_head stay as they are: they are one matrix that reads and writes tokens, and small next to
    the blocks for the larger models."""
    def quantize(path, layer):
        if type(layer) is not nn.Linear:
            raise ValueError(f"{path} is a {type(layer).__name__}: quantize a model before adding LoRA, once")
        return NF4Linear(layer, double_quant)
    return replace_block_linears(model, BLOCK_LINEARS, quantize)


# ----------------------------------------------------------------------------- lora

# LoRA (Hu et al. 2021): what fine-tuning changes in a weight matrix has low rank, so learn the
# change as a product B @ A (out x r times r x in, r small) beside the frozen W:
#     y = W x + (alpha / r) * B A x
# B starts at zero, so a fresh adapter changes nothing. On an NF4Linear base (the section above) this is QLoRA.
LORA_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or NF4Linear) plus a trainable low-rank update."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        device = next(iter(base.state_dict().values())).device
        self.base, self.rank, self.alpha, self.scale = base, rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as the LoRA code does
        self.dropout = nn.Dropout(dropout)  # on the update's input only
        self.merged = False

    def delta(self):
        return self.scale * self.lora_B @ self.lora_A

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # the update is inside the base weight now
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self):
        """W += (alpha / r) B A: inference then costs what the base model costs."""
        if self.merged:
            raise RuntimeError("this LoRA layer is merged already: merging again would add its update twice")
        _add_to_weight(self.base, self.delta())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged: there is nothing to take out")
        _add_to_weight(self.base, -self.delta())
        self.merged = False


def _add_to_weight(layer, delta):
    """A quantized weight cannot be added to in place: dequantize, add, and quantize again (so a
    merge into NF4 is exact only up to one more rounding, and so is an unmerge)."""
    if isinstance(layer, NF4Linear):
        layer.set_weight(layer.dequantize() + delta)
    else:
        layer.weight += delta.to(layer.weight.dtype)


def apply_lora(model, rank, alpha, dropout=0.0, targets=BLOCK_LINEARS):
    """Wrap the targeted linear layers of every block in LoRALinear, in place, and freeze all the
    rest (embeddings, the tied lm_head, norms, base weights): only the adapters train."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    unknown = [t for t in targets if t not in BLOCK_LINEARS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or targets} are not among {', '.join(BLOCK_LINEARS)}")
    model.requires_grad_(False)

    def wrap(path, layer):
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{path} has a LoRA adapter already")
        if rank > min(layer.in_features, layer.out_features):  # B A would be a full matrix, and cost more
            raise ValueError(f"LoRA rank {rank} is larger than {path}'s {layer.out_features} x {layer.in_features} "
                             f"weight: a low-rank update needs a rank of at most {min(layer.in_features, layer.out_features)}")
        return LoRALinear(layer, rank, alpha, dropout).train(model.training)  # a new module is in training mode
    return replace_block_linears(model, targets, wrap)


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model):
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model):
    for layer in lora_layers(model).values():
        layer.unmerge()


@torch.no_grad()
def merge_and_unload(model):
    """Fold every adapter into its weight and turn every LoRA and NF4 layer back into a float32
    nn.Linear, in place: the model is a plain GPT again, every parameter trainable (apply_lora
    froze the rest), which save_pretrained can export."""
    def unload(path, layer):
        if type(layer) is nn.Linear:
            return layer
        base = layer.base if isinstance(layer, LoRALinear) else layer
        weight = base.dequantize() if isinstance(base, NF4Linear) else base.weight.float()
        if isinstance(layer, LoRALinear) and not layer.merged:
            weight = weight + layer.delta()
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
        plain.weight.copy_(weight)
        if base.bias is not None:
            plain.bias.copy_(base.bias)
        return plain
    return replace_block_linears(model, BLOCK_LINEARS, unload).requires_grad_(True)


def adapter_config(model):
    """What it takes to rebuild the model's adapters on a fresh base model, read off its layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = next(iter(layers.values()))
    quantized = isinstance(first.base, NF4Linear)
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.dropout.p,
            "targets": [t for t in BLOCK_LINEARS if any(name.endswith("." + t) for name in layers)],
            "quantize": "nf4" if quantized else None, "double_quant": quantized and first.base.double_quant}


def save_adapter(model, directory, base_model, state=None):
    """Write the adapter alone: adapter.safetensors (every lora_A and lora_B, a few MB) and
    adapter.json (rank, alpha, dropout, targets, quantization and the base model's name). state:
    where the tensors are, if not in model.state_dict() (a sharded model's, gathered)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    tensors = {name: p for name, p in state.items() if name.endswith(LORA_SUFFIXES)}
    weightfiles.write_safetensors(directory / "adapter.safetensors", tensors, metadata={"format": "pt"})
    weightfiles.write_json(directory / "adapter.json", {"base_model": str(base_model), **adapter_config(model)})


ADAPTER_FIELDS = {"base_model": str, "rank": int, "alpha": (int, float), "dropout": (int, float), "targets": list,
                  "quantize": (str, type(None)), "double_quant": bool}


def read_adapter_config(directory):
    """adapter.json, checked: every field save_adapter writes, of the right type."""
    path = Path(directory) / "adapter.json"
    config = weightfiles.read_json_file(path)
    wrong = [k for k, kind in ADAPTER_FIELDS.items() if not isinstance(config.get(k), kind)]
    if wrong:
        raise ValueError(f"{path} lacks or mistypes {', '.join(wrong)}: is it save_adapter's?")
    return config


def load_adapter(model, directory):
    """Put the adapter saved in directory on model, its base model: quantize it as in training, add
    the LoRA layers and load their tensors. Returns adapter.json's contents."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    if config["quantize"] == "nf4":
        quantize_model(model, config["double_quant"])
    apply_lora(model, config["rank"], config["alpha"], config["dropout"], config["targets"])
    path = directory / "adapter.safetensors"
    ours = {name: p for name, p in model.named_parameters() if name.endswith(LORA_SUFFIXES)}
    tensors = weightfiles.read_safetensors(path)
    if set(tensors) != set(ours):
        raise ValueError(f"{path}: its tensors do not match adapter.json's layers "
                         f"(missing {sorted(set(ours) - set(tensors))[:3]}, extra {sorted(set(tensors) - set(ours))[:3]})")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != ours[name].shape:
                raise ValueError(f"{path}: {name} has shape {list(t.shape)}, the model needs {list(ours[name].shape)}")
            ours[name].copy_(t)
    return config
