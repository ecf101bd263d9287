"""The capped CPU kernel caches (stages/contract/device.py): a process that meets many matmul shapes, as training
on batches of varying length does, keeps far fewer compiled kernels, and a capacity the user set stays."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qlora_pipeline.stages.contract.device import CPU_KERNEL_CACHE_ENV

_GROWTH = """
import sys
if sys.argv[1] == "capped":
    from qlora_pipeline.stages.contract.device import bound_cpu_kernel_caches
    bound_cpu_kernel_caches()
import torch
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
w, x = torch.randn(576, 1536).bfloat16(), torch.randn(600, 576).bfloat16()
(x[:10] @ w) @ w.t()
before = rss_mb()
for m in range(200, 400):  # 200 batch lengths, two bf16 matmul shapes each
    (x[:m] @ w) @ w.t()
print(rss_mb() - before)
"""


def _growth_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in CPU_KERNEL_CACHE_ENV}
    out = subprocess.run([sys.executable, "-c", _GROWTH, mode], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="no oneDNN bf16 matmuls on this torch or CPU (AVX2 only): nothing fills the caches",
)
def test_capped_caches_keep_a_fraction_of_the_kernels_of_many_shapes() -> None:
    default, capped = _growth_mb("default"), _growth_mb("capped")
    assert default > 100, f"400 shapes grew RSS by only {default:.0f} MB uncapped: the premise no longer holds"
    assert capped < default / 2, (capped, default)


def test_a_capacity_the_user_set_wins(monkeypatch) -> None:
    from qlora_pipeline.stages.contract.device import bound_cpu_kernel_caches

    env = {k: v for k, v in os.environ.items() if k not in CPU_KERNEL_CACHE_ENV}
    monkeypatch.setattr(os, "environ", env | {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"})
    bound_cpu_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
    assert os.environ["LRU_CACHE_CAPACITY"] == CPU_KERNEL_CACHE_ENV["LRU_CACHE_CAPACITY"]
