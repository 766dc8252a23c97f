"""Benchmarks behave on a machine without a GPU: one line and exit status 1, RESULTS.md untouched
by runs that are not the published measurement (bench/common.py, Note: where benchmarks run)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@NO_GPU
@pytest.mark.parametrize("script", ["bench_matmul", "bench_dequantize"])
def test_gpu_benchmark_without_gpu_says_so_in_one_line(script):
    result = subprocess.run([sys.executable, "-m", f"bench.{script}"], capture_output=True, text=True,
                            timeout=240, cwd=ROOT)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"bench.{script}: needs a CUDA GPU{' and nf4._C' if script == 'bench_dequantize' else ''}: "
        f"{common.no_gpu_reason()}; nothing measured, bench/RESULTS.md unchanged"]


@NO_GPU
def test_require_gpu_exits():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        common.require_gpu("x")


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


def test_load_benchmark_needs_a_scratch_folder():
    result = subprocess.run([sys.executable, "-m", "bench.bench_load"], capture_output=True, text=True,
                            timeout=240, cwd=ROOT)
    assert result.returncode == 2 and "--dir" in result.stderr
