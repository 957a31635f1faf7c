"""gpt.py's model, weight loading/export and generation, checked against transformers and recomputation."""
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt
from conftest import cl100k_or_skip
from lib import datasets, downloads, speed, weightfiles
from gpt import GPT, GPTConfig, KVCache, sample_next

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def randomize_(model, seed):
    """Weights far from init (biases and LayerNorm included), so that every mapping mistake shows
    and greedy decoding has clear winners instead of near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "ln_" in name and name.endswith("weight") else 0.15 * noise)
    return model.eval()


def hf_gpt2(seed=0, vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2):
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                                     n_layer=n_layer, n_head=n_head, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    return randomize_(transformers.GPT2LMHeadModel(config), seed)


def tiny_gpt(seed=0, **overrides):
    config = dict(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(seed)
    return randomize_(GPT(GPTConfig(**{**config, **overrides})), seed)


def batch(vocab_size=300, B=3, T=20, seed=1):
    return torch.randint(vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def write_hub_layout(hf_model, directory):
    """The real openai-community/gpt2 file: keys without "transformer.", the old causal-mask buffers
    h.N.attn.bias, no lm_head, and a header whose length is not a multiple of 8. Written by hand."""
    directory.mkdir(parents=True, exist_ok=True)
    c = hf_model.config
    tensors = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(c.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, c.n_positions, c.n_positions).tril()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    blob = json.dumps(header).encode()
    if len(blob) % 8 == 0:
        blob += b" "
    assert len(blob) % 8
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.contiguous().numpy().tobytes())
    (directory / "config.json").write_text(c.to_json_string())
    return directory


# ----------------------------------------------------------------------------- transformers oracle

def test_transformers_checkpoint_gives_same_logits(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    idx = batch()
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape == (3, 20, 300)
    assert (ours - theirs).abs().max() <= 1e-4


def test_greedy_generate_matches_transformers(tmp_path):
    hf = hf_gpt2(seed=3)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    idx = batch(B=2, T=6, seed=4)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=30, do_sample=False,
                         pad_token_id=0)
    ours = model.generate(idx, 30, temperature=0)
    assert ours.shape == (2, 36)
    assert ours.tolist() == theirs.tolist()


def test_real_hub_layout_loads(tmp_path):
    hf = hf_gpt2(seed=5)
    write_hub_layout(hf, tmp_path)
    assert len(safetensors_torch.load_file(tmp_path / "model.safetensors")) > 0  # valid for the reference reader
    model = GPT.from_pretrained(tmp_path).eval()
    idx = batch()
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path):
    model = tiny_gpt(seed=6, block_size=64)
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = batch()
    with torch.no_grad():
        assert (model(idx)[0] - hf.eval()(idx).logits).abs().max() <= 1e-4
    again = GPT.from_pretrained(tmp_path)  # and back
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("change", [dict(pos_emb="rope"), dict(mlp="swiglu"), dict(bias=False)])
def test_export_refuses_non_gpt2_variants(tmp_path, change):
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, **change))
    with pytest.raises(ValueError, match="only the GPT-2 variant"):
        model.save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())


def test_loss_with_ignore_index_matches_transformers(tmp_path):
    hf = hf_gpt2(seed=7)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    x, y = batch(T=16, seed=8), batch(T=16, seed=9)
    y[0, :10] = -100  # a masked prompt
    y[2, 5] = -100
    # transformers shifts labels by one inside: append a dummy input and prepend a dummy label,
    # so that its logits[:, t] are scored against y[:, t] exactly as ours are
    x_hf = torch.cat([x, torch.zeros(3, 1, dtype=torch.long)], dim=1)
    labels = torch.cat([torch.full((3, 1), -100), y], dim=1)
    with torch.no_grad():
        logits, loss = model(x)[0], model(x, targets=y)[1]
        theirs = hf(x_hf, labels=labels).loss
        unmasked = model(x, targets=y.clamp(min=0))[1]
    assert abs(loss.item() - theirs.item()) <= 1e-5
    assert abs(loss.item() - unmasked.item()) > 1e-3  # the mask made a difference
    keep = y != -100
    manual = -logits.log_softmax(-1)[keep].gather(1, y[keep][:, None]).mean()
    assert abs(loss.item() - manual.item()) <= 1e-5


def test_targets_may_be_a_slice_of_the_input():
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    seq = torch.randint(0, 64, (2, 17))
    x, y = seq[:, :-1], seq[:, 1:]  # y is not contiguous
    with torch.no_grad():
        assert torch.equal(model(x, y)[1], model(x, y.contiguous())[1])


# ----------------------------------------------------------------------------- init

def test_gpt2_init():
    n_layer = 8
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=n_layer, n_head=4, n_embd=256))
    stds = {name: p.std().item() for name, p in model.named_parameters() if name.endswith("weight") and p.dim() == 2}
    residual = 0.02 / math.sqrt(2 * n_layer)
    for name, std in stds.items():
        expected = residual if name.endswith("c_proj.weight") else 0.02
        assert abs(std - expected) < 0.05 * expected, (name, std, expected)
    assert sum(name.endswith("c_proj.weight") for name in stds) == 2 * n_layer
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        elif "ln_" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_from_pretrained_keeps_embeddings_tied(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_from_pretrained_sets_dropout_everywhere_a_fresh_model_has_it(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, dropout=0.25)
    fresh = GPT(model.config)
    assert model.config.dropout == 0.25 and GPT.from_pretrained(tmp_path).config.dropout == 0.0

    def rates(m):
        return [(n, x.p) for n, x in m.named_modules() if isinstance(x, torch.nn.Dropout)] + \
               [(n, x.dropout) for n, x in m.named_modules() if isinstance(x, gpt.CausalSelfAttention)]
    assert rates(model) == rates(fresh) and {p for _, p in rates(model)} == {0.25}


# ----------------------------------------------------------------------------- generation

VARIANTS = [dict(pos_emb="learned", mlp="gelu"), dict(pos_emb="rope", mlp="swiglu"),
            dict(pos_emb="rope", mlp="gelu"), dict(pos_emb="learned", mlp="swiglu")]
SAMPLING = [dict(temperature=0), dict(temperature=0.9, top_k=40), dict(temperature=1.2, top_p=0.8),
            dict(temperature=1.0, top_k=50, top_p=0.9)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['pos_emb']}-{v['mlp']}")
@pytest.mark.parametrize("sampling", SAMPLING, ids=str)
def test_kv_cache_equals_recomputation(variant, sampling):
    model = tiny_gpt(seed=10, block_size=16, **variant)
    idx = batch(B=2, T=5, seed=11)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(12)
        outputs.append(model.generate(idx, 40, use_cache=use_cache, **sampling))  # runs past block_size
    assert outputs[0].shape == (2, 45)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("variant", VARIANTS[:2], ids=lambda v: v["pos_emb"])
def test_prompt_longer_than_block(variant):
    model = tiny_gpt(seed=21, block_size=16, **variant)
    idx = batch(B=2, T=23, seed=22)
    torch.manual_seed(23)
    cached = model.generate(idx, 12, top_k=30)
    torch.manual_seed(23)
    assert torch.equal(cached, model.generate(idx, 12, top_k=30, use_cache=False))
    assert cached.shape == (2, 35) and torch.equal(cached[:, :23], idx)


def test_greedy_equals_argmax_of_forward():
    """temperature=0 against an independent loop over model(...): argmax of the last logits, with the
    context cropped the way generation documents it (context_start)."""
    model = tiny_gpt(seed=13, block_size=16)
    seq = batch(B=2, T=7, seed=14)
    out = model.generate(seq, 30, temperature=0)
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(seq[:, model.context_start(seq.size(1)):])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_context_window_past_block_size():
    """Once a sequence outgrows the block, the context stays within it, keeps at least half of it,
    and its start only moves when the block is full again (so a refilled cache gets reused)."""
    for block_size in (16, 15, 7, 2):
        model = GPT(GPTConfig(block_size=block_size, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
        previous = 0
        for length in range(1, 100):
            start = model.context_start(length)
            assert block_size // 2 <= length - start <= block_size or length < block_size // 2
            assert start == previous or length - start == block_size // 2
            previous = start


def test_cache_processes_one_token_per_step(monkeypatch):
    """The prompt runs once, then one token per step; past block_size only occasional refills."""
    model = tiny_gpt(seed=15, block_size=16)
    lengths = []
    hidden_states = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda idx, *a, **k: lengths.append(idx.size(1)) or hidden_states(idx, *a, **k))
    model.generate(batch(B=1, T=4), 40, temperature=0)
    assert lengths[0] == 4 and len(lengths) == 40
    assert sum(n > 1 for n in lengths) <= 4  # the prompt and a refill every ~9 steps
    assert sum(lengths) < 4 + 40 + 3 * 8


def test_cached_chunk_after_prefix():
    """Several new tokens after a cached prefix (the shifted causal mask) equal one full pass."""
    for variant in VARIANTS[:2]:
        model = tiny_gpt(seed=16, **variant)
        idx = batch(B=2, T=12)
        caches = [KVCache(12) for _ in range(model.config.n_layer)]
        with torch.no_grad():
            full = model.hidden_states(idx)
            model.hidden_states(idx[:, :5], caches)
            chunk = model.hidden_states(idx[:, 5:], caches, pos=5)
        assert (chunk - full[:, 5:]).abs().max() < 1e-5


def test_batched_generation_stops_each_row_at_eos():
    model = tiny_gpt(seed=17, vocab_size=64, block_size=64)
    prompts = batch(vocab_size=64, B=3, T=4, seed=18)
    alone = [model.generate(prompts[i:i + 1], 40, temperature=0)[0, 4:].tolist() for i in range(3)]
    # an eos id that each row produces, at different steps, well before 40 tokens
    firsts = {t: [row.index(t) for row in alone] for t in range(64) if all(t in row[:30] for row in alone)}
    candidates = [t for t, steps in firsts.items() if len(set(steps)) > 1]
    assert candidates, "seed gives no common token: pick another seed"
    eos = candidates[0]
    stops = firsts[eos]
    out = model.generate(prompts, 40, temperature=0, eos_id=eos)
    assert out.size(1) == 4 + max(stops) + 1  # stopped as soon as the last row ended
    for i in range(3):
        expected = alone[i][:stops[i] + 1] + [eos] * (max(stops) - stops[i])
        assert out[i, 4:].tolist() == expected
        single = model.generate(prompts[i:i + 1], 40, temperature=0, eos_id=eos)
        assert single[0, 4:].tolist() == alone[i][:stops[i] + 1]


def test_generate_stream_yields_tokens_as_generate():
    model = tiny_gpt(seed=19)
    idx = batch(B=2, T=3)
    tokens = list(model.generate_stream(idx, 10, temperature=0))
    assert len(tokens) == 10 and all(t.shape == (2, 1) for t in tokens)
    assert torch.equal(torch.cat([idx, *tokens], dim=1), model.generate(idx, 10, temperature=0))


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_p=-0.2), dict(temperature=-1.0), dict(top_k=0)])
def test_generate_rejects_bad_arguments(bad):
    model = tiny_gpt()
    args = {"max_new_tokens": 5, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        model.generate(batch(B=1, T=3), **args)


def test_forward_rejects_sequences_longer_than_block():
    model = tiny_gpt(block_size=8)
    with pytest.raises(ValueError, match="block_size=8"):
        model(batch(B=1, T=9))


# ----------------------------------------------------------------------------- sample_next

PROBS = np.array([0.05, 0.30, 0.02, 0.18, 0.12, 0.08, 0.15, 0.06, 0.03, 0.01])


def sampled_distribution(monkeypatch, **kwargs):
    """The probabilities sample_next hands to torch.multinomial, for logits = log(PROBS)."""
    seen = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, num_samples: seen.append(p) or multinomial(p, num_samples))
    token = sample_next(torch.tensor(np.log(PROBS), dtype=torch.float32)[None], **kwargs)
    assert token.shape == (1, 1)
    return seen[0][0].double().numpy()


def reference(probs, top_k=None, top_p=None):
    keep = np.zeros(len(probs), dtype=bool)
    order = np.argsort(-probs)
    keep[order[:top_k or len(probs)]] = True
    probs = np.where(keep, probs, 0) / probs[keep].sum()
    if top_p is not None:
        cumulative = np.cumsum(probs[order])
        n = np.searchsorted(cumulative, top_p) + 1  # the smallest prefix whose mass reaches top_p
        keep = np.zeros(len(probs), dtype=bool)
        keep[order[:n]] = True
        probs = np.where(keep, probs, 0) / probs[keep].sum()
    return probs


@pytest.mark.parametrize("top_k", [1, 3, 7, 10])
def test_top_k_keeps_exactly_k(monkeypatch, top_k):
    p = sampled_distribution(monkeypatch, top_k=top_k)
    assert (p > 0).sum() == top_k
    np.testing.assert_allclose(p, reference(PROBS, top_k=top_k), atol=1e-6)


@pytest.mark.parametrize("top_p", [0.1, 0.29, 0.31, 0.5, 0.75, 0.9, 0.99, 1.0])
def test_top_p_keeps_smallest_set_reaching_p(monkeypatch, top_p):
    p = sampled_distribution(monkeypatch, top_p=top_p)
    expected = reference(PROBS, top_p=top_p)
    assert (p > 0).sum() == (expected > 0).sum()
    np.testing.assert_allclose(p, expected, atol=1e-6)


def test_top_k_then_top_p_and_temperature(monkeypatch):
    p = sampled_distribution(monkeypatch, top_k=4, top_p=0.7)
    np.testing.assert_allclose(p, reference(PROBS, top_k=4, top_p=0.7), atol=1e-6)
    p = sampled_distribution(monkeypatch, temperature=0.5)
    sharpened = PROBS ** 2 / (PROBS ** 2).sum()
    np.testing.assert_allclose(p, sharpened, atol=1e-6)


def test_temperature_zero_is_argmax():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(20))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_next(logits, temperature=0, top_k=5, top_p=0.5), logits.argmax(-1, keepdim=True))


# ----------------------------------------------------------------------------- from_pretrained input errors

def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained("gpt3")
    assert "'gpt3'" in str(e.value)
    assert all(name in str(e.value) for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_directory_without_files(tmp_path, missing):
    hf_gpt2().save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        GPT.from_pretrained(tmp_path)


def rewrite_weights(directory, change):
    tensors = weightfiles.read_safetensors(directory / "model.safetensors")
    change(tensors)
    weightfiles.write_safetensors(directory / "model.safetensors", tensors)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("transformer.h.1.ln_2.weight"), "missing tensors transformer.h.1.ln_2.weight"),
    (lambda t: t.update({"transformer.h.0.mlp.c_fc.bias": torch.zeros(7)}), "shape"),
    (lambda t: t.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(96, 32)}), "shape"),
    (lambda t: t.update({"transformer.h.9.ln_1.weight": torch.zeros(32)}), "unexpected tensor"),
])
def test_bad_weights_raise(tmp_path, change, message):
    hf_gpt2().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, change)
    with pytest.raises(ValueError, match=message) as e:
        GPT.from_pretrained(tmp_path)
    assert "model.safetensors" in str(e.value)


def test_config_without_gpt2_fields_raises(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["n_positions"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks n_positions"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("n_inner", 100),
                                        ("scale_attn_weights", False), ("layer_norm_epsilon", 1e-6)])
def test_unsupported_config_raises(tmp_path, key, value):
    hf_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=key):
        GPT.from_pretrained(tmp_path)


def rewrite_config(directory, text):
    (directory / "config.json").write_text(text)
    return directory / "config.json"


@pytest.mark.parametrize("text, message", [
    ('{"n_embd": ', "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    ('{"n_layer": 2, "n_layer": 3}', "key 'n_layer' given twice"),
])
def test_malformed_config_raises(tmp_path, text, message):
    tiny_gpt().save_pretrained(tmp_path)
    path = rewrite_config(tmp_path, text)
    with pytest.raises(ValueError, match=message) as e:
        GPT.from_pretrained(tmp_path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("key, value, message", [
    ("n_layer", "2", "is not a positive integer"), ("n_layer", -1, "is not a positive integer"),
    ("n_head", True, "is not a positive integer"), ("n_embd", 32.0, "is not a positive integer"),
    ("n_head", 3, "multiple of n_head"),
    ("n_embd", 10 ** 6, "too small for the model"),  # never allocated: 10**12 weights per layer
    ("n_layer", 10 ** 6, "too few for config.json's n_layer"),  # never built: a million layers
])
def test_config_sizes_checked_before_the_model_is_built(tmp_path, key, value, message):
    tiny_gpt().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rewrite_config(tmp_path, json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=message) as e:
        GPT.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_tensor_under_both_names_raises(tmp_path):
    tiny_gpt().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda t: t.update({"wte.weight": t["transformer.wte.weight"].clone()}))
    with pytest.raises(ValueError, match="'wte.weight' given twice"):
        GPT.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_names_and_fetch_failures(monkeypatch):
    import requests
    import tiktoken
    assert datasets.get_tokenizer("gpt2").encode("Hello world") == [15496, 995]  # GPT-2's own ids
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'.*cl100k_base"):
        datasets.get_tokenizer("gpt5")

    def offline(name):
        raise requests.ConnectionError("no route to host")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(downloads.DownloadError, match="TIKTOKEN_CACHE_DIR"):
        datasets.get_tokenizer("cl100k_base")
    monkeypatch.undo()
    cl100k_or_skip()
    assert datasets.get_tokenizer("cl100k_base").eot_token == 100257


def test_gpt2_s_tokenizer_comes_from_the_shipped_files_and_equals_tiktoken_s():
    """lib/gpt2_bpe/ holds GPT-2's two files: a process with no tiktoken cache and no network at all
    tokenizes as tiktoken's own gpt2 encoding does (prose, code, emoji, other scripts, the special token)."""
    import subprocess
    import sys
    import tiktoken
    texts = ["Hello world", "def f(x):\n\treturn x ** 2  # code", "日本語 🙂 ünïcödé", "a<|endoftext|>b", "  \n\n spaces"]
    code = ("import json, sys, requests\n"
            "def offline(*a, **k): raise requests.ConnectionError('no network here')\n"
            "requests.get = requests.Session.request = offline\n"
            "from lib import datasets\n"
            "enc = datasets.get_tokenizer('gpt2')\n"
            "print(json.dumps([enc.encode(t, allowed_special='all') for t in json.loads(sys.argv[1])]))")
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(texts)], capture_output=True, text=True, env=env,
                       cwd=Path(gpt.__file__).parent, timeout=120)
    assert r.returncode == 0, r.stderr
    reference = tiktoken.get_encoding("gpt2")
    assert json.loads(r.stdout) == [reference.encode(t, allowed_special="all") for t in texts]


def test_gpt_py_reads_in_order():
    """gpt.py's parts (opened by a `# ==== Part N: name` line, as its docstring lists them) use
    only names defined in themselves or above. Part I, the model, stands alone: it imports only
    torch and the standard library, and run by itself it builds the same model, logits, loss and
    generation as the whole file."""
    import ast
    import re
    import sys
    source = Path(gpt.__file__).read_text()
    lines = source.splitlines()
    starts = [(i + 1, m.group(1)) for i, line in enumerate(lines) if (m := re.match(r"# =+ (Part \w+): ", line))]
    assert [name for _, name in starts] == ["Part I", "Part II", "Part III"]
    assert all(f"{name}, " in gpt.__doc__ for _, name in starts)

    def part(lineno):
        return [name for start, name in starts if start <= lineno][-1] if lineno >= starts[0][0] else "Part I"
    order = [name for _, name in starts]
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        else:
            names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        defined.update((name, part(node.lineno)) for name in names)
    later = [(part(node.lineno), use.id) for node in tree.body for use in ast.walk(node)
             if isinstance(use, ast.Name) and use.id in defined and order.index(defined[use.id]) > order.index(part(node.lineno))]
    assert later == []

    part_one = "\n".join(lines[:starts[1][0] - 1])
    imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(part_one)) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(part_one)) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"torch"}
    alone = {}
    exec(compile(part_one, "gpt.py Part I", "exec"), alone)
    config = dict(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    ours = alone["GPT"](alone["GPTConfig"](**config)).eval()
    torch.manual_seed(0)
    whole = GPT(GPTConfig(**config)).eval()
    x, y = batch(seed=2), batch(seed=3)
    logits, loss = ours(x, y)
    assert torch.equal(logits, whole(x, y)[0]) and torch.equal(loss, whole(x, y)[1])
    torch.manual_seed(4)
    sampled = ours.generate(x[:, :5], 8, temperature=1.0, top_k=20, top_p=0.9)
    torch.manual_seed(4)
    assert torch.equal(sampled, whole.generate(x[:, :5], 8, temperature=1.0, top_k=20, top_p=0.9))


def test_bfloat16_generation_keeps_a_float32_cache_on_the_cpu(monkeypatch):
    model = speed.cast_for_inference(tiny_gpt(seed=31, block_size=64), torch.bfloat16)
    prompt = batch(B=2, T=5, seed=32)
    dtypes, update = set(), KVCache.update

    def spy(self, k, v, pos):
        dtypes.add((k.dtype, self.k.dtype if self.k is not None else None))
        keys, values = update(self, k, v, pos)
        dtypes.add((k.dtype, keys.dtype))
        return keys, values
    monkeypatch.setattr(KVCache, "update", spy)
    with torch.autocast("cpu", torch.bfloat16):
        cached = model.generate(prompt, 30, temperature=0)
        recomputed = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert (torch.bfloat16, torch.float32) in dtypes and all(d in (None, torch.float32) for _, d in dtypes)
    # float32 attention over the cache vs bfloat16 attention without: on this seed's clear winners, the same tokens
    assert torch.equal(cached, recomputed)
