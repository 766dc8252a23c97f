"""bench_qlora's --max-seq search and --memory summary on the CPU: the doubling stops at the
first out-of-memory length, the limit or the time budget, an out-of-memory step leaves nothing
behind, and the allocator-trace replay finds the peak and who holds it. (The 8B runs are GPU-only.)"""
import gc
import math
import weakref
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bq(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_qlora
    return bench_qlora


def fits_up_to(longest):
    return lambda tokens: 1.0 + tokens / 1e4 if tokens <= longest else None


def test_doubles_until_out_of_memory(bq):
    found = bq.longest_sequence(fits_up_to(16384), 4096, 1 << 20, math.inf)
    assert (found["tokens"], found["stop"]) == (16384, "oom")
    assert [t for t, _, _ in found["tried"]] == [4096, 8192, 16384, 32768]
    assert found["peak"] == pytest.approx(1 + 16384 / 1e4)


def test_stops_at_the_limit_and_when_the_start_does_not_fit(bq):
    found = bq.longest_sequence(fits_up_to(1 << 30), 4096, 20000, math.inf)
    assert (found["tokens"], found["stop"]) == (16384, "limit")
    found = bq.longest_sequence(fits_up_to(1000), 4096, 1 << 20, math.inf)
    assert (found["tokens"], found["stop"], len(found["tried"])) == (0, "oom", 1)


def test_does_not_start_a_length_predicted_to_end_past_the_deadline(bq):
    now = [0.0]

    def trial(tokens):  # a step takes tokens / 1000 s (2x per doubling; the search predicts 3x)
        now[0] += tokens / 1000
        return 1.0

    found = bq.longest_sequence(trial, 4096, 1 << 30, 100.0, clock=lambda: now[0])
    # 4.1 + 8.2 + 16.4 + 32.8 = 61.4 s; the next (predicted 3 x 32.8 s) would end past 100 s
    assert (found["tokens"], found["stop"]) == (32768, "time")
    assert now[0] <= 100.0


def test_an_out_of_memory_step_frees_what_it_made(bq, monkeypatch):
    model = bq.prepare("nf4", bq.TINY, torch.device("cpu"))
    made = []

    def hook(module, args, output):  # the last layer's output exists, then the "GPU" is full
        made.append(weakref.ref(output[0] if isinstance(output, tuple) else output))
        if made[-1]().shape[1] > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.model.layers[-1].register_forward_hook(hook)
    assert math.isnan(bq.train_one_step(model, bq.TINY, torch.device("cpu"), 64))
    assert bq.train_one_step(model, bq.TINY, torch.device("cpu"), 128) is None
    gc.collect()
    assert [r() for r in made] == [None] * len(made)
    assert all(p.grad is None for p in model.parameters())


def test_other_errors_are_not_taken_for_out_of_memory(bq):
    model = bq.prepare("nf4", bq.TINY, torch.device("cpu"))
    model.model.layers[-1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("bad shape")))
    with pytest.raises(RuntimeError, match="bad shape"):
        bq.train_one_step(model, bq.TINY, torch.device("cpu"), 64)
    assert bq.out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert bq.out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))


def test_baselines_first_and_time_kept_for_the_rest(bq, monkeypatch):
    calls = []
    monkeypatch.setattr(bq, "max_sequence", lambda setup, shape, device, start, limit, deadline:
                        calls.append((setup, deadline)) or {"setup": setup})
    monkeypatch.setattr(bq.time, "perf_counter", lambda: 0.0)
    bq.max_sequences(["nf4 patched offload", "bnb + peft"], bq.TINY, None, 4096, 1 << 18, 500.0, 100.0)
    assert calls == [("bnb + peft", 400.0), ("nf4 patched offload", 500.0)]


def test_report_gives_the_ratio_and_marks_lower_bounds(bq):
    def row(setup, tokens, stop):
        return dict(setup=setup, tokens=tokens, stop=stop, peak=10.0, tried=[(tokens, 1.0, 10.0)])

    text = bq.max_seq_report([row("bnb + peft", 32768, "oom"), row("nf4 patched offload", 131072, "oom")],
                             4096, 1 << 18, 540)
    assert "4x bnb + peft's longest sequence (131,072 vs 32,768; goal >= 4x: met)" in text
    text = bq.max_seq_report([row("bnb + peft", 32768, "oom"), row("nf4 patched", 65536, "time")],
                             4096, 1 << 18, 540)
    assert "~2x" in text and ">= 65,536" in text and "goal >= 4x: undecided" in text
    text = bq.max_seq_report([row("bnb + peft", 32768, "oom"), row("nf4 patched", 65536, "oom")],
                             4096, 1 << 18, 540)
    assert "goal >= 4x: NOT met" in text
    text = bq.max_seq_report([row("bnb + peft", 32768, "time"), row("nf4 patched", 131072, "oom")],
                             4096, 1 << 18, 540)
    assert "~4x" in text and "goal >= 4x: undecided" in text  # the baseline might train longer


def test_peak_sites_replays_the_trace(bq):
    frames = {name: [{"filename": "/x/lib/python3.11/site-packages/torch/nn/functional.py", "line": 1,
                      "name": "linear"}, {"filename": f"/repo/nf4/{name}.py", "line": 7, "name": "f"}]
              for name in ("a", "b")}
    trace = [dict(action="alloc", addr=1, size=100, frames=frames["a"]),
             dict(action="alloc", addr=2, size=50, frames=frames["b"]),
             dict(action="alloc", addr=3, size=30, frames=frames["a"]),  # peak: 180
             dict(action="free_requested", addr=1, size=100),
             dict(action="free_completed", addr=1, size=100),
             dict(action="alloc", addr=4, size=90, frames=[])]           # 170
    best, sites = bq.peak_sites(trace)
    assert best == 180
    assert sites == [("nf4/a.py:7 f", 130, 2), ("nf4/b.py:7 f", 50, 1)]


def test_memory_breakdown_runs_every_phase(bq, tmp_path):
    text = bq.memory_breakdown("nf4", bq.TINY, torch.device("cpu"), 32, tmp_path)
    for phase in ("after setup (weights)", "before the step", "| forward |", "| backward |", "| optimizer |"):
        assert phase in text
    assert (tmp_path / "memory_nf4.txt").read_text() == text
