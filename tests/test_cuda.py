"""The CUDA paths, where there are GPUs: nccl, FSDP's bfloat16 MixedPrecisionPolicy, fused AdamW,
the benchmarks' float64 tables all-reduced over nccl.
Skipped, with the reason, on a machine without them."""
import numpy as np
import pytest
import torch

from test_train import BENCH, SPLITS, data_dir, losses, read_log, run, task_cache  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nccl, FSDP in bfloat16)")
CUDA = ["--device=cuda", "--dtype=bfloat16"]


def test_fsdp_in_bfloat16_on_nccl_tracks_ddp_and_resumes_on_one_gpu(data_dir, tmp_path):
    """FSDP gathers bfloat16 weights and reduces float32 gradients (a MixedPrecisionPolicy), DDP
    autocasts: not the same arithmetic, so close rather than equal; and the FSDP checkpoint
    resumes on one GPU accumulating twice as much."""
    run([*SPLITS, *CUDA, "--fsdp=False"], data_dir, tmp_path / "ddp", nproc=2)
    run([*SPLITS, *CUDA, "--fsdp=True", "--max_iters=5"], data_dir, tmp_path / "fsdp", nproc=2)
    run(["--init_from=resume", "--max_iters=10"], data_dir, tmp_path / "fsdp", tiny=False)
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), rtol=0, atol=3e-2)


def test_eval_tasks_on_two_gpus_under_fsdp_score_what_the_cpu_scores(task_cache, tmp_path):
    """The benchmarks' forward passes in bfloat16 on 2 GPUs (FSDP), their tables summed over nccl,
    against one CPU process in float32: close, as bfloat16 rounds."""
    args = [*BENCH, "--max_iters=0", "--eval_limit=7"]
    run(args, task_cache, tmp_path / "cpu")
    run([*args, *CUDA, "--fsdp=True"], task_cache, tmp_path / "gpu", nproc=2)
    (cpu,), (gpu,) = read_log(tmp_path / "cpu")[1], read_log(tmp_path / "gpu")[1]
    assert gpu["lambada_ppl"] == pytest.approx(cpu["lambada_ppl"], rel=0.02)
    assert {k for k in gpu if k.startswith("hellaswag")} == {"hellaswag_acc", "hellaswag_acc_norm"}
