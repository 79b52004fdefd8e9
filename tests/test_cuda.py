"""The engine's math on CUDA gives the CPU's numbers (runs only where a GPU is present; CI has none).

Elementwise float32 arithmetic is IEEE-exact on both, so TA, TIES and DARE-TIES agree bitwise;
PCB's exp and tanh differ in the last bits between the two libraries, so PCB is compared closely.
"""

from __future__ import annotations

import pytest
import torch

from mergeflow.checkpoint import load_state_dict
from mergeflow.checkpoint_writer import save_checkpoint
from mergeflow.engine import merge_checkpoints

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_zoo")
    g = torch.Generator().manual_seed(0)
    base = {"embed": torch.randn(300, 64, generator=g), "norm": torch.randn(64, generator=g)}
    dirs = [root / "base"]
    save_checkpoint(base, dirs[0])
    for i in range(3):
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        dirs.append(root / f"ft{i}")
        save_checkpoint(ft, dirs[-1])
    return dirs


@pytest.mark.parametrize("method, hp, exact", [
    ("task_arithmetic", {"lam": 0.3}, True),
    ("ties", {"k": 0.2, "lam": 1.0}, True),
    ("ties", {"k": 0.3, "agg": "max"}, True),
    ("dare_ties", {"p": 0.5, "seed": 1}, True),
    ("pcb", {"ratio": 0.1}, False),
    ("pcb", {"ratio": 0.1, "variant": "vision_es", "lam": [0.9, 1.1, 1.0]}, False),
])
def test_cuda_merge_equals_cpu(checkpoints, tmp_path, method, hp, exact):
    base, *models = checkpoints
    cpu = merge_checkpoints(method, base, models, tmp_path / "cpu", hp, progress=False, chunk_elems=4096)
    gpu = merge_checkpoints(method, base, models, tmp_path / "gpu", hp, progress=False, chunk_elems=4096,
                            device="cuda")
    a, b = load_state_dict(tmp_path / "cpu"), load_state_dict(tmp_path / "gpu")
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    if exact:
        assert cpu.output_hash == gpu.output_hash
