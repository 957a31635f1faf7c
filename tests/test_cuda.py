"""The CUDA paths, where there are GPUs, each against the CPU in float32: fused AdamW, bfloat16
autocast, float16 with the GradScaler, flash / memory-efficient attention (training and the KV
cache), torch.compile, pinned-memory batches, nccl, FSDP's bfloat16 MixedPrecisionPolicy, NF4
and LoRA, sample.py and eval.py. Skipped, with the reason, on a machine without them."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt
from lib import datasets, measure, training
from test_train import BENCH, ROOT, SPLITS, TINY, data_dir, losses, read_log, run, task_cache  # noqa: F401 (fixtures)

one_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nccl, FSDP in bfloat16)")
bf16_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(),
                              reason="needs a CUDA GPU with bfloat16")
CUDA = ["--device=cuda", "--dtype=bfloat16"]


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matmuls in float32 on the GPU (not TF32), for the comparisons with the CPU."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(**{**dict(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=64), **overrides}))


def fixed_batch(seed=1, B=4, T=64, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (B, T), generator=g), torch.randint(vocab, (B, T), generator=g)


def one_step(model, device, dtype, steps=3):
    """Losses of `steps` train_steps of model on device (a copy), and the trained copy on the CPU."""
    model = copy.deepcopy(model).to(device)
    optimizer, scaler = training.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), device), training.make_scaler(device, dtype)
    x, y = (t.to(device) for t in fixed_batch())
    out = [training.train_step(model, optimizer, scaler, lambda *key: (x, y), it, 1e-3, device=device, dtype=dtype).item()
           for it in range(steps)]
    return out, model.cpu(), optimizer


@one_gpu
def test_fused_adamw_step_equals_the_cpu():
    model = tiny()
    cpu_losses, cpu_model, _ = one_step(model, "cpu", "float32")
    gpu_losses, gpu_model, optimizer = one_step(model, "cuda", "float32")
    assert all(group["fused"] for group in optimizer.param_groups)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4)
    for (name, a), b in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)  # lr 1e-3: an update is about 1e-3


@bf16_gpu
def test_bfloat16_autocast_step_is_close_to_the_cpu_in_float32():
    model = tiny()
    cpu_losses, _, _ = one_step(model, "cpu", "float32")
    gpu_losses, _, _ = one_step(model, "cuda", "bfloat16")
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=2e-2)


@one_gpu
def test_float16_with_the_grad_scaler_is_close_and_skips_an_overflowing_step():
    model = tiny()
    cpu_losses, _, _ = one_step(model, "cpu", "float32")
    gpu_losses, _, _ = one_step(model, "cuda", "float16")
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=2e-2)
    # a step whose gradients overflow changes no weight and halves the scale
    model = tiny().cuda()
    optimizer, scaler = training.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cuda"), training.make_scaler("cuda", "float16")
    x, y = (t.cuda() for t in fixed_batch())
    before, scale = copy.deepcopy(model.state_dict()), scaler.get_scale()
    hook = model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: g * float("inf"))
    training.train_step(model, optimizer, scaler, lambda *key: (x, y), 0, 1e-3, device="cuda", dtype="float16")
    hook.remove()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == scale / 2
    training.train_step(model, optimizer, scaler, lambda *key: (x, y), 1, 1e-3, device="cuda", dtype="float16")
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@bf16_gpu
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_flash_and_efficient_attention_in_training_and_with_the_kv_cache(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny().eval()
    x, y = fixed_batch()
    with torch.no_grad():
        reference, loss = model(x, y)
    gpu = copy.deepcopy(model).cuda()
    with sdpa_kernel(getattr(SDPBackend, backend)), torch.autocast("cuda", torch.bfloat16):  # this kernel or an error
        logits, gpu_loss = gpu(x.cuda(), y.cuda())
        gpu_loss.backward()  # the kernel's backward pass
        with torch.no_grad():
            prompt = x[:2, :8].cuda()
            cached = gpu.generate(prompt, 20, temperature=0)
            steps = gpu(cached[:, :-1])[0]  # the whole sequence at once, as the cache saw it step by step
    assert gpu_loss.item() == pytest.approx(loss.item(), rel=2e-2)
    torch.testing.assert_close(logits.float().cpu(), reference, atol=5e-2, rtol=5e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
    # each generated token is the argmax of the uncached forward pass, but where bfloat16 nearly ties
    chosen = steps[:, 7:].float().gather(-1, cached[:, 8:, None])[..., 0]
    assert (chosen >= steps[:, 7:].float().max(-1).values - 5e-2).all()


@one_gpu
def test_compiled_train_step_and_forward_equal_eager():
    model = tiny()
    eager_losses, eager_model, _ = one_step(model, "cuda", "float32")
    compiled_losses, _, _ = one_step(torch.compile(copy.deepcopy(model)), "cuda", "float32")
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)
    x, _ = fixed_batch()
    eager_model = eager_model.cuda().eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(eager_model)(x.cuda())[0], eager_model(x.cuda())[0],
                                   rtol=1e-4, atol=1e-4)


@one_gpu
def test_compiled_train_py_run_tracks_the_eager_one(data_dir, tmp_path):
    args = [*SPLITS, "--device=cuda", "--dtype=float32", "--dropout=0"]
    run([*args, "--compile=False"], data_dir, tmp_path / "eager")
    run([*args, "--compile=True"], data_dir, tmp_path / "compiled")
    np.testing.assert_allclose(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-3)


@one_gpu
def test_batches_come_pinned_and_equal_the_cpus(data_dir):
    folder = str(data_dir / "toy")
    on_cpu, on_gpu = datasets.batch_loader(folder, 4, 32, "cpu", 0), datasets.batch_loader(folder, 4, 32, "cuda", 0)
    for key in range(3):
        (x, y), (gx, gy) = on_cpu("train", key, 0), on_gpu("train", key, 0)
        assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


@one_gpu
def test_train_py_under_torchrun_on_nccl_tracks_the_cpu(data_dir, tmp_path):
    """torchrun on 1 GPU (2 where there are two), so nccl; the same run on one CPU process, which
    accumulates what the processes split. No dropout: CUDA draws other masks than the CPU."""
    nproc = min(2, torch.cuda.device_count())
    run([*SPLITS, "--dropout=0", f"--gradient_accumulation_steps={nproc}"], data_dir, tmp_path / "cpu")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'gpu'}", *SPLITS,
               "--dropout=0", "--device=cuda", "--dtype=float32"]
    r = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "gpu"), losses(tmp_path / "cpu"), rtol=1e-3)


@one_gpu
def test_nf4_and_lora_on_the_gpu_equal_the_cpu():
    model = tiny(n_embd=128)
    gpt.quantize_model(model)
    gpt.apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    gpu = copy.deepcopy(model).cuda()
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu.buffers(), model.buffers()))  # codes moved, not redone
    weight = torch.randn(128, 256)
    cpu_q, gpu_q = gpt.nf4_quantize(weight), gpt.nf4_quantize(weight.cuda())
    assert cpu_q.keys() == gpu_q.keys()
    # quantized on the GPU: the same codes but where a weight sits on a midpoint, to the last bit
    assert (cpu_q["packed"] != gpu_q["packed"].cpu()).float().mean() < 1e-3
    torch.testing.assert_close(gpt.nf4_dequantize(gpu_q, weight.shape).cpu(), gpt.nf4_dequantize(cpu_q, weight.shape),
                               rtol=0, atol=0.05)
    x, y = fixed_batch()
    _, loss = model(x, y)
    loss.backward()
    _, gpu_loss = gpu(x.cuda(), y.cuda())
    gpu_loss.backward()
    assert gpu_loss.item() == pytest.approx(loss.item(), rel=1e-4)
    for (name, p), q in zip(model.named_parameters(), gpu.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


@one_gpu
def test_sample_py_on_the_gpu_writes_what_the_cpu_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64))
    with torch.no_grad():  # weights far from init: greedy decoding with clear winners, not near-ties
        for name, p in hf.named_parameters():
            if ".ln_" not in name and "ln_f" not in name:
                p.normal_(0, 0.15)
    hf.save_pretrained(tmp_path)
    outputs = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--init_from={tmp_path}", "--start=Once upon",
                            "--temperature=0", "--max_new_tokens=12", f"--device={device}", f"--dtype={dtype}"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outputs[device, dtype] = r.stdout
    assert outputs["cuda", "float32"] == outputs["cpu", "float32"]
    assert outputs["cuda", "bfloat16"].startswith("Once upon")


@bf16_gpu
def test_eval_tasks_on_one_gpu_score_what_the_cpu_scores(task_cache, tmp_path):
    args = [*BENCH, "--max_iters=0", "--eval_limit=7"]
    run(args, task_cache, tmp_path / "cpu")
    run([*args, *CUDA], task_cache, tmp_path / "gpu")
    (cpu,), (gpu,) = read_log(tmp_path / "cpu")[1], read_log(tmp_path / "gpu")[1]
    assert gpu["lambada_ppl"] == pytest.approx(cpu["lambada_ppl"], rel=0.02)


@one_gpu
def test_the_matmul_peak_is_measured_on_the_gpu():
    peak = measure.matmul_flops("cuda", "float32")
    assert 1e12 < peak < 1e16  # any GPU: a teraFLOP/s or more, and no runaway timer
    assert measure.matmul_flops("cuda", "float16") > peak  # tensor cores


@two_gpus
def test_fsdp_in_bfloat16_on_nccl_tracks_ddp_and_resumes_on_one_gpu(data_dir, tmp_path):
    """FSDP gathers bfloat16 weights and reduces float32 gradients (a MixedPrecisionPolicy), DDP
    autocasts: not the same arithmetic, so close rather than equal; and the FSDP checkpoint
    resumes on one GPU accumulating twice as much."""
    run([*SPLITS, *CUDA, "--fsdp=False"], data_dir, tmp_path / "ddp", nproc=2)
    run([*SPLITS, *CUDA, "--fsdp=True", "--max_iters=5"], data_dir, tmp_path / "fsdp", nproc=2)
    run(["--init_from=resume", "--max_iters=10"], data_dir, tmp_path / "fsdp", tiny=False)
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), rtol=0, atol=3e-2)


@two_gpus
def test_eval_tasks_on_two_gpus_under_fsdp_score_what_the_cpu_scores(task_cache, tmp_path):
    """The benchmarks' forward passes in bfloat16 on 2 GPUs (FSDP), their tables summed over nccl,
    against one CPU process in float32: close, as bfloat16 rounds."""
    args = [*BENCH, "--max_iters=0", "--eval_limit=7"]
    run(args, task_cache, tmp_path / "cpu")
    run([*args, *CUDA, "--fsdp=True"], task_cache, tmp_path / "gpu", nproc=2)
    (cpu,), (gpu,) = read_log(tmp_path / "cpu")[1], read_log(tmp_path / "gpu")[1]
    assert gpu["lambada_ppl"] == pytest.approx(cpu["lambada_ppl"], rel=0.02)
    assert {k for k in gpu if k.startswith("hellaswag")} == {"hellaswag_acc", "hellaswag_acc_norm"}
