"""Benchmarks on a machine without a GPU or without nf4._C: one line and status NO_GPU_EXIT, and
RESULTS.md untouched by runs that are not the published measurement (bench/common.py, Note:
where benchmarks run, and what they write)."""
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


def test_unpublished_run_leaves_results_alone(tmp_path, monkeypatch, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- load:start -->\nGPU figures\n<!-- load:end -->\n")
    monkeypatch.setattr(common, "RESULTS", results)
    monkeypatch.delenv("OUT", raising=False)
    before = results.read_text()
    common.write_section("load", "tiny figures", publish=False)
    assert results.read_text() == before
    assert "tiny figures" in capsys.readouterr().out
    common.write_section("load", "new figures")
    assert "<!-- load:start -->\nnew figures\n<!-- load:end -->" in results.read_text()

