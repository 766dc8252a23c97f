"""The benchmarks on a CPU: every module imports, the GPU ones refuse in one line, and
bench_host's measurement functions run end to end on tiny shapes, so that a typo or a wrong
signature shows here and not on the GPU machine's scarce time."""
import importlib
import importlib.util
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODULES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__")
CPU = torch.device("cpu")
# A Llama small enough for a CPU generate in a second: head_dim 8, 2 KV heads.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, rope_theta=10000.0)


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.fixture
def bench_host():
    return importlib.import_module("bench.bench_host")


def test_bench_modules_found():
    assert {"bench_host", "bench_matmul", "common"} <= set(BENCH_MODULES)


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_bench_module_imports_on_cpu(name):
    try:
        importlib.import_module(f"bench.{name}")
    except ImportError as e:
        # bench_quantize, bench_dequantize and profile_matmul time the CUDA extension's kernels
        # and import it at the top; CI builds it (NF4_BUILD_CUDA=1), NF4_BUILD_CUDA=0 does not.
        if importlib.util.find_spec("nf4._C") is None and "_C" in str(e):
            pytest.skip(f"bench.{name} needs the CUDA extension nf4._C, not built here")
        raise


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without a GPU sees")
@pytest.mark.parametrize("name", ["bench_host", "bench_matmul"])
def test_gpu_benchmark_refuses_without_gpu(name):
    common = importlib.import_module("bench.common")
    before = common.RESULTS.read_bytes()
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == common.NO_GPU_EXIT, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    # The last line: an installed bitsandbytes may log a warning of its own before it.
    assert proc.stderr.splitlines()[-1] == f"{name}: needs a CUDA GPU and torch sees none; nothing measured"
    assert common.RESULTS.read_bytes() == before


def _check_calls(bh, results, expected_names):
    assert [m.name for m in results] == expected_names
    lora = {bh.BF16_LORA, bh.BNB_LORA, bh.NF4_LORA, bh.NF4_LORA_BF16}
    for m in results:
        assert (m.grad is not None) == (m.name in lora), m.name
        for t in (m.no_grad, m.grad):
            if t is not None:
                assert t.us > 0 and math.isfinite(t.us)
                assert math.isnan(t.device_us) and math.isnan(t.kernels)  # no CUDA events on a CPU
    text, goals = bh.calls_report(results)
    for name in expected_names:
        assert f"| {name} |" in text
    assert [g[0] for g in goals] == [
        f"{bh.NF4_MATMUL} / {bh.F_LINEAR}, no grad", f"{bh.NF4_LAYER} / {bh.F_LINEAR}, no grad",
        f"{bh.NF4_COMPAT} / {bh.F_LINEAR}, no grad",
        f"{bh.NF4_LORA} / {bh.BF16_LORA}, no grad", f"{bh.NF4_LORA} / {bh.BF16_LORA}, grad",
        f"{bh.NF4_LORA_BF16} / {bh.BF16_LORA}, no grad", f"{bh.NF4_LORA_BF16} / {bh.BF16_LORA}, grad"]
    return text, goals


def test_host_calls_run_on_cpu_without_bitsandbytes(bench_host, monkeypatch):
    bh = bench_host
    monkeypatch.setattr(bh, "bnb", None)
    results = bh.measure_calls(CPU, 32, 64, calls=3, repeats=1, warmup=1, profiled=1)
    _check_calls(bh, results, [bh.F_LINEAR, bh.NF4_MATMUL, bh.NF4_LAYER, bh.NF4_COMPAT, bh.BF16_LORA,
                               bh.NF4_LORA, bh.NF4_LORA_BF16])


def test_host_calls_run_on_cpu_with_bitsandbytes(bench_host):
    pytest.importorskip("bitsandbytes")
    bh = bench_host
    results = bh.measure_calls(CPU, 32, 64, calls=2, repeats=1, warmup=1, profiled=1)
    _check_calls(bh, results, [bh.F_LINEAR, bh.BNB_MATMUL, bh.NF4_MATMUL, bh.BNB_LAYER, bh.NF4_LAYER,
                               bh.NF4_COMPAT, bh.BF16_LORA, bh.BNB_LORA, bh.NF4_LORA, bh.NF4_LORA_BF16])


def test_every_4bit_row_computes_the_same_product(bench_host):
    """Each row holds W (not some other weight): its output is F.linear's up to 4-bit error."""
    bh = bench_host
    torch.manual_seed(1)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    calls = {c.name: c.fn for c in bh.build_calls(CPU, 32, 64)}
    with torch.no_grad():
        ref = calls[bh.F_LINEAR](x).float()
        for name, fn in calls.items():
            if name in (bh.F_LINEAR, bh.BF16_LORA, bh.BNB_LORA, bh.NF4_LORA, bh.NF4_LORA_BF16):
                continue
            y = fn(x)
            assert y.shape == ref.shape and y.dtype == torch.bfloat16, name
            y = y.float()
            # NF4 at blocksize 64 is off by ~0.1 of the output's scale on Gaussian data; a layer
            # holding another random weight would be off by ~1.4 (two independent products).
            assert (y - ref).abs().max() / ref.abs().max() < 0.3, name


def test_generate_runs_on_cpu(bench_host):
    pytest.importorskip("transformers")
    bh = bench_host
    setups = ["bf16", "nf4"] + (["bnb"] if bh.bnb is not None else [])
    results = bh.measure_generate(CPU, TINY, 1, setups, prompt=3, new_tokens=2, repeats=1, warmup_tokens=1)
    assert [r.setup for r in results] == setups
    by = {r.setup: r for r in results}
    assert by["bf16"].quantized == 0
    assert by["nf4"].quantized == 7  # q, k, v, o, gate, up, down of one layer; lm_head stays bf16
    if "bnb" in by:
        assert by["bnb"].quantized == by["nf4"].quantized
    for r in results:
        assert r.tokens_per_s > 0 and math.isnan(r.weights_gb)
    text, goals = bh.generate_report(results)
    assert "| nf4 | 7 |" in text
    assert goals[0][0] == "generate: nf4 tokens/s / bf16" and goals[0][2] == ">= 1.0"
    args = bh.parse_args(["--layers", "1"])
    calls_text = "| call |"
    body = bh.report(calls_text, goals, text, args.layers, args)
    assert "1 of its 32 layers" in body and text in body


def test_report_without_generate(bench_host):
    bh = bench_host
    body = bh.report("| call |", [], None, 32, bh.parse_args(["--no-generate"]))
    assert "generate: not run" in body


def test_profile_writes_top_functions(bench_host):
    out = io.StringIO()
    bench_host.profile_matmul(CPU, 32, 64, calls=3, top=5, stream=out)
    text = out.getvalue()
    assert text.startswith("cProfile of 3 nf4.matmul_4bit calls, 1 token, 32x64, cpu")
    assert "cumulative" in text and "matmul_4bit" in text


@pytest.fixture
def bench_matmul():
    return importlib.import_module("bench.bench_matmul")


def test_matmul_calls_cycle_through_weight_copies(bench_matmul):
    """Each library gets copies spanning rotate_bytes of its own format (4 KiB of bf16 and about
    1 KiB of nf4 per 32x64 weight at 8 KiB: 2 and 8), every call computing its own copy's product."""
    bm = bench_matmul
    calls = bm.shape_calls(32, 64, CPU, rotate_bytes=8192)
    assert len(calls["bf16"]) == 2 and len(calls["nf4"]) == 8
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        refs = [f(x).float() for f in calls["bf16"]]
        assert (refs[0] - refs[1]).abs().max() > 0.1 * refs[0].abs().max()  # two different weights
        for lib in ("nf4", "bnb"):
            for i, fn in enumerate(calls.get(lib, [])):
                ref = refs[i % 2]
                # 4-bit error, as in test_every_4bit_row_computes_the_same_product.
                assert (fn(x).float() - ref).abs().max() / ref.abs().max() < 0.3, (lib, i)
    assert ("bnb" in calls) == (importlib.util.find_spec("bitsandbytes") is not None)
    if "bnb" in calls:
        assert len(calls["bnb"]) == 8


def _check_matmul_section(bm, rows, libs):
    assert [(r.shape, r.tokens) for r in rows] == [((32, 64), 1), ((32, 64), 3)]
    for r in rows:
        for times in (r.graph_us, r.eager_us, r.host_us):
            assert sorted(times) == sorted(libs) and all(v > 0 for v in times.values())
    body = bm.section(rows, 0.0045, "a route")
    assert "auto backend: a route" in body and "measures 4.5 µs" in body
    assert "| nf4 eager µs | bnb eager µs |" in body and "| nf4/bf16 eager | bnb/bf16 eager | nf4/bnb eager |" in body
    assert body.count("| 32x64 |") == 2
    return body


def test_matmul_table_runs_on_cpu_without_bitsandbytes(bench_matmul, monkeypatch):
    bm = bench_matmul
    monkeypatch.setattr(bm, "bnb_weight", lambda W: None)
    rows = bm.measure_rows([(32, 64)], [1, 3], CPU, rotate_bytes=8192)
    body = _check_matmul_section(bm, rows, ["bf16", "nf4"])
    assert "bitsandbytes is not installed here" in body
    assert all(math.isnan(r.ratio("nf4", "bnb", "eager")) for r in rows)


def test_matmul_table_runs_on_cpu_with_bitsandbytes(bench_matmul):
    pytest.importorskip("bitsandbytes")
    bm = bench_matmul
    rows = bm.measure_rows([(32, 64)], [1, 3], CPU, rotate_bytes=8192)
    body = _check_matmul_section(bm, rows, ["bf16", "nf4", "bnb"])
    worst = max(rows, key=lambda r: r.ratio("nf4", "bnb", "eager"))
    assert f"worst {worst.ratio('nf4', 'bnb', 'eager'):.3g} at 32x64, {worst.tokens} tokens" in body


def test_host_run_on_cpu_builds_the_section(bench_host):
    """What main runs after the GPU check, on tiny shapes: both parts and the section text."""
    pytest.importorskip("transformers")
    bh = bench_host
    args = bh.parse_args(["--calls", "2", "--repeats", "1", "--warmup", "1", "--layers", "1",
                          "--new-tokens", "2", "--prompt", "3", "--generate-repeats", "1"])
    body = bh.run(args, CPU, shape=(32, 64), model_shape=TINY)
    assert body.startswith("## host: per-call host cost and transformers generate")
    assert "Per call: 1 token, 32x64" in body and f"| {bh.NF4_LORA} |" in body
    assert "| nf4 | 7 |" in body and "| generate: nf4 tokens/s / bf16 |" in body
    assert f"| {bh.NF4_MATMUL} / {bh.F_LINEAR}, no grad |" in body


def test_bench_load_needs_a_directory():
    """bench_load writes a 16 GB checkpoint: only under a folder the user named."""
    env = {k: v for k, v in os.environ.items() if k != "NF4_BENCH_LOAD_DIR"}
    run = subprocess.run([sys.executable, "-m", "bench.bench_load", "--shape", "tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--dir (or NF4_BENCH_LOAD_DIR) is required" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU run writes bench/RESULTS.md; the CPU run prints it")
def test_bench_load_tiny_on_cpu_prints_where_the_time_goes(tmp_path):
    """Two loaders in fresh processes (bench/load_child.py), the phase table and the probe bytes."""
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, "-m", "bench.bench_load", "--shape", "tiny", "--dir", str(tmp_path / "b"),
                          "--repeats", "1", "--cold-repeats", "0", "--only", "nf4:auto,nf4-seq:auto"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "| loader | page cache | runs | wall s (median) | wall s (best) | process s (median) |" in out
    assert "| phase (s since spawn) | nf4 (auto) | nf4-seq:auto |" in out
    for phase in ("python", "import torch", "import nf4", "import transformers + model class", "meta model",
                  "plan", "attach", "load", "loaded (process s)"):
        assert f"\n| {phase} | " in out, phase
    worker = next(line for line in out.splitlines() if line.startswith("| quantize (worker) |"))
    assert worker.split("|")[2].strip() and not worker.split("|")[3].strip()  # nf4 (auto) only
    assert "nf4 (auto) vs nf4-seq:auto: weight: 0 of 22528 bytes differ; weight.absmax: 0 of 704 bytes differ." in out
    assert not (tmp_path / "b").exists()  # no --keep: the checkpoint is gone


def test_bench_load_only_names_known_variants(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.bench_load", "--shape", "tiny", "--dir", str(tmp_path),
                          "--only", "nf4:auto,nf4:fast"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--only: ['nf4:fast'] are not among" in run.stderr
