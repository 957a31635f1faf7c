"""LoRA in gpt.py: a fresh adapter is a no-op, merge is exact, only the adapters train, and an
adapter saves and loads alone. The references are recomputations by hand and transformers."""
import json

import pytest
import torch
import torch.nn.functional as F

import gpt
from lib import checkpoints, datasets, models, training, weightfiles
from gpt import GPT, GPTConfig

CONFIG = dict(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=64)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CONFIG, **overrides})).eval()


def randomize_adapters(model, seed=1):
    """A trained adapter, as far as these tests care: B is no longer zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in gpt.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def tokens(seed=0, shape=(2, 16)):
    return torch.randint(0, CONFIG["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def test_fresh_adapter_changes_nothing():
    model = tiny_model()
    idx = tokens()
    before = model(idx)[0]
    gpt.apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(idx)[0], before)
    assert len(gpt.lora_layers(model)) == CONFIG["n_layer"] * 4


def test_lora_forward_matches_the_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    layer = gpt.LoRALinear(base, rank=4, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 64)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ base.weight.detach().T + base.bias.detach() + (16 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_is_on_the_update_only():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    layer = gpt.LoRALinear(base, rank=4, alpha=16, dropout=1.0).train()  # drops every input of B A
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), base(x))
    assert not torch.allclose(layer.eval()(x), base(x))


def test_merge_and_unmerge_keep_the_logits_and_refuse_twice():
    model = tiny_model()
    idx = tokens()
    original = model(idx)[0]
    gpt.apply_lora(model, rank=4, alpha=8)
    randomize_adapters(model)
    adapted = model(idx)[0]
    assert (adapted - original).abs().max() > 1e-2  # the adapter does something
    gpt.merge_lora(model)
    torch.testing.assert_close(model(idx)[0], adapted, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged already"):
        gpt.merge_lora(model)
    gpt.unmerge_lora(model)
    torch.testing.assert_close(model(idx)[0], adapted, rtol=0, atol=1e-5)
    layer = model.transformer.h[0].attn.c_attn
    torch.testing.assert_close(layer.base.weight, tiny_model().transformer.h[0].attn.c_attn.weight, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_only_lora_parameters_train():
    model = tiny_model(dropout=0.1).train()
    gpt.apply_lora(model, rank=4, alpha=8, dropout=0.1)
    randomize_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == CONFIG["n_layer"] * 4 * 2
    idx = tokens()
    _, loss = model(idx[:, :-1], idx[:, 1:].contiguous())
    loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert type(model.lm_head) is torch.nn.Linear  # the tied embedding is never adapted
    assert model.lm_head.weight is model.transformer.wte.weight


def test_targets_choose_the_layers():
    model = tiny_model()
    gpt.apply_lora(model, rank=2, alpha=2, targets=("attn.c_attn", "mlp.c_proj"))
    block = model.transformer.h[1]
    assert isinstance(block.attn.c_attn, gpt.LoRALinear) and isinstance(block.mlp.c_proj, gpt.LoRALinear)
    assert type(block.attn.c_proj) is torch.nn.Linear and type(block.mlp.c_fc) is torch.nn.Linear
    with pytest.raises(ValueError, match="has a LoRA adapter already"):
        gpt.apply_lora(model, rank=2, alpha=2, targets=("attn.c_attn",))
    with pytest.raises(ValueError, match="not among"):
        gpt.apply_lora(tiny_model(), rank=2, alpha=2, targets=("lm_head",))
    with pytest.raises(ValueError, match="rank"):
        gpt.apply_lora(tiny_model(), rank=0, alpha=2)


def test_adapter_saves_alone_and_loads_back(tmp_path):
    model = tiny_model(n_embd=128)
    gpt.apply_lora(model, rank=4, alpha=8, dropout=0.05, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc"))
    randomize_adapters(model)
    gpt.save_adapter(model, tmp_path, base_model="tiny")
    tensors = weightfiles.read_safetensors(tmp_path / "adapter.safetensors")
    assert set(tensors) == {n for n, p in model.named_parameters() if p.requires_grad}
    n_lora = sum(t.numel() for t in tensors.values())
    assert n_lora == CONFIG["n_layer"] * 4 * ((128 + 3 * 128) + (128 + 128) + (128 + 4 * 128))
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert size < 4 * n_lora + 4096 < 4 * sum(p.numel() for p in model.parameters()) / 10
    config = json.loads((tmp_path / "adapter.json").read_text())
    assert config == {"base_model": "tiny", "rank": 4, "alpha": 8, "dropout": 0.05,
                      "targets": ["attn.c_attn", "attn.c_proj", "mlp.c_fc"], "quantize": None, "double_quant": False}
    fresh = tiny_model(n_embd=128)
    assert gpt.load_adapter(fresh, tmp_path) == config
    idx = tokens()
    torch.testing.assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if not n.endswith(gpt.LORA_SUFFIXES))


def test_adapter_for_another_shape_is_refused(tmp_path):
    model = tiny_model()
    gpt.apply_lora(model, rank=4, alpha=8)
    gpt.save_adapter(model, tmp_path, base_model="tiny")
    with pytest.raises(ValueError, match="shape"):
        gpt.load_adapter(tiny_model(n_embd=128), tmp_path)


def test_merged_export_matches_transformers(tmp_path):
    """merge_and_unload leaves a plain GPT; save_pretrained of it is read by transformers with the
    adapted model's logits: the independent check that the update landed in the right weights."""
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    gpt.apply_lora(model, rank=4, alpha=8)
    randomize_adapters(model)
    idx = tokens()
    adapted = model(idx)[0]
    with pytest.raises(ValueError, match="merge_and_unload"):  # lora_A has no place in GPT-2's file
        model.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged" / "model.safetensors").exists()
    gpt.merge_and_unload(model)
    assert not gpt.lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())  # trainable again, embeddings and norms too
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, adapted, rtol=0, atol=1e-4)


def test_lora_layer_follows_the_input_through_autocast():
    torch.manual_seed(0)
    layer = gpt.LoRALinear(torch.nn.Linear(64, 32), rank=4, alpha=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 64))
    assert y.dtype == torch.bfloat16
    F.mse_loss(y.float(), torch.zeros_like(y, dtype=torch.float32)).backward()
    assert layer.lora_B.grad.dtype == torch.float32


def test_train_py_qlora_on_a_text_corpus_trains_adapters_only_and_resumes_exactly(tmp_path):
    """train.py --lora_rank --quantize=nf4: the 4-bit base stays as quantized, the adapters learn,
    the checkpoint rebuilds the same layers, and a resumed run repeats an uninterrupted one."""
    np = pytest.importorskip("numpy")
    import train
    data = tmp_path / "data" / "toy"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 8000), ("val", 2000)):  # a random walk mod 128 in steps of 1 or 2
        datasets.write_tokens(data / f"{split}.bin", np.cumsum(rng.choice([1, 2], size=n)) % 128, 128)
    (data / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 128, "eot_token": 50256}))
    base = tiny_model(block_size=64, vocab_size=128)
    base.save_pretrained(tmp_path / "base")
    args = [f"--init_from={tmp_path / 'base'}", "--dataset=toy", f"--data_dir={tmp_path / 'data'}", "--lora_rank=4",
            "--quantize=nf4", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3", "--batch_size=4", "--block_size=32",
            "--eval_iters=2", "--log_interval=1", "--sample_prompt=A", "--sample_tokens=4", "--learning_rate=1e-2", "--warmup_iters=1",
            "--dtype=float32", "--device=cpu", "--peak_flops=1e12"]
    train.main([*args, f"--out_dir={tmp_path / 'whole'}"])
    train.main([*args, f"--out_dir={tmp_path / 'halves'}", "--max_iters=3"])
    train.main(["--init_from=resume", f"--out_dir={tmp_path / 'halves'}", "--max_iters=6"])

    def numbers(run):
        records = [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]
        return [(r["iter"], r.get("loss"), r.get("val_loss")) for r in records if "loss" in r or "val_loss" in r]

    assert numbers("halves") == numbers("whole")
    evals = [v for _, _, v in numbers("whole") if v is not None]
    assert evals[-1] < evals[0]
    model = models.model_from_checkpoint(checkpoints.load(tmp_path / "whole" / "ckpt.pt"))
    layer = model.transformer.h[1].mlp.c_fc
    assert isinstance(layer, gpt.LoRALinear) and isinstance(layer.base, gpt.NF4Linear)
    assert layer.lora_B.abs().sum() > 0
    expected = gpt.nf4_quantize(base.transformer.h[1].mlp.c_fc.weight)
    assert all(torch.equal(t, expected[name]) for name, t in layer.base.quantized().items())
    with pytest.raises(SystemExit):  # the adapters' shape is fixed once a run starts
        train.main(["--init_from=resume", f"--out_dir={tmp_path / 'whole'}", "--lora_rank=8"])
