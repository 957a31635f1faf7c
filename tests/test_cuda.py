"""The CUDA paths, where there are GPUs: nccl, FSDP's bfloat16 MixedPrecisionPolicy, fused AdamW.
Skipped, with the reason, on a machine without them."""
import numpy as np
import pytest
import torch

from test_train import SPLITS, data_dir, losses, run  # noqa: F401 (data_dir is a fixture)

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
