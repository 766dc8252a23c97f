"""Benchmarks on a machine without a GPU or without nf4._C: one line, status NO_GPU_EXIT, and
RESULTS.md untouched (bench/common.py, Note: where benchmarks run, and what they write)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@NO_GPU
@pytest.mark.parametrize("script", ["bench_dequantize", "bench_quantize", "profile_matmul", "bench_layer"])
def test_gpu_benchmark_without_gpu_says_so_in_one_line(script):
    before = common.RESULTS.read_bytes()
    result = subprocess.run([sys.executable, "-m", f"bench.{script}"], capture_output=True, text=True,
                            timeout=240, cwd=ROOT)
    assert result.returncode == common.NO_GPU_EXIT
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"{script}: needs a CUDA GPU and torch sees none; nothing measured"
    assert common.RESULTS.read_bytes() == before


@NO_GPU
def test_require_extension_checks_the_gpu_first():
    with pytest.raises(SystemExit) as exit_info:
        common.require_extension("x")
    assert exit_info.value.code == common.NO_GPU_EXIT

