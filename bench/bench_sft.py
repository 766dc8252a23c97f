"""A user's TRL SFTTrainer QLoRA script on an 8B-shaped model, the bitsandbytes way and nf4's two ways.

    python -m bench.bench_sft --dir DIR [--shape llama3-8b|tiny] [--steps 10] [--seq 2048]
                              [--setups "install(),Nf4Config,bitsandbytes"]

Issue 16's GPU check. The checkpoint is bench_load's (random bf16 Llama-3-8B weights, 4 shards,
written under ``--dir`` once and shared with bench_load). Each setup runs in a fresh process, as
a user's script does:

- ``install()``: the script as written for bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True,
  nf4, double quant, bf16 compute)``) plus the one added line ``nf4.hf.install()``;
- ``Nf4Config``: the same script with ``quantization_config=nf4.hf.Nf4Config(...)``;
- ``install(patch=True)``: the bitsandbytes script with ``nf4.hf.install(patch=True)``: the fused
  training path (``nf4.models.patch``) under TRL (not in the default set until measured);
- ``bitsandbytes``: the script as written, on bitsandbytes itself (when it is installed).

Each trains r=16 ``"all-linear"`` LoRA adapters with gradient checkpointing for ``--steps`` steps
of one ``--seq``-token sequence, saving a checkpoint halfway, then resumes a second trainer from
that checkpoint to the end, saves the adapters, reloads them (nf4 alone for the nf4 setups, and
transformers from the saved folder) and compares logits with the resumed trainer's model.
Reported per setup: the load time, the median step (steps after the first, saving excluded),
tokens/s, peak GPU memory during training, how far the resumed adapters are from the
uninterrupted run's (the norm over all adapters, against how far the resumed steps moved them), and whether the reloads give
the trainer's logits exactly. Exits with status 1 when a reload's logits differ.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.bench_load import SHAPES, _shapes, prepare
from bench.common import stamp, table, write_section

SETUPS = ("install()", "Nf4Config", "bitsandbytes")
# Runnable with --setups; not in the default set.
EXTRA_SETUPS = ("install(patch=True)",)
GB = 1e9
log = logging.getLogger("bench_sft")


def tokenizer(vocab: int):
    """A word-level tokenizer over the model's ids ("w0", "w1", ...): the random checkpoint has none."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1",
                                                eos_token="w2", pad_token="w0")


def quantization_config(setup: str):
    import transformers

    if setup == "Nf4Config":
        import nf4.hf
        return nf4.hf.Nf4Config(compute_dtype=torch.bfloat16)
    if setup in ("install()", "install(patch=True)"):
        import nf4.hf
        nf4.hf.install(patch=setup == "install(patch=True)")  # the one line added to a bitsandbytes script
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


def step_timer(device: torch.device):
    """A TrainerCallback timing each optimizer step from its beginning to its end, which excludes
    checkpoint saving (built here: transformers is imported in the child only)."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def train(model, folder: Path, out_dir: Path, steps: int, seq: int, vocab: int, cpu: bool, resume=None):
    import datasets
    import peft
    import trl

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, vocab, (seq,), generator=g)) for _ in range(steps)]
    args = trl.SFTConfig(output_dir=str(out_dir), max_steps=steps, save_steps=max(1, steps // 2),
                         per_device_train_batch_size=1, learning_rate=2e-4, max_length=seq,
                         gradient_checkpointing=True, bf16=not cpu, use_cpu=cpu, report_to=[], seed=0,
                         logging_steps=1, disable_tqdm=True, save_only_model=False)
    timer = step_timer(model.device)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer(vocab), callbacks=[timer],
                             peft_config=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                         task_type="CAUSAL_LM"))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, timer.times


def adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if "lora_" in k}


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids.to(model.device)).logits.float().cpu()


def child(setup: str, folder: str, out: str, steps: int, seq: int) -> None:
    import peft
    import transformers

    folder = Path(folder)
    cpu = not torch.cuda.is_available()
    device_map = "cpu" if cpu else "cuda"
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    config = quantization_config(setup)

    def load(path):
        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config,
                                                                  device_map=device_map)
        return model, time.perf_counter() - t0

    result = dict(setup=setup)
    with tempfile.TemporaryDirectory(prefix="nf4_sft_") as tmp:
        run = Path(tmp) / "run"
        model, result["load_s"] = load(folder)
        if not cpu:
            torch.cuda.reset_peak_memory_stats()
        full, times = train(model, folder, run, steps, seq, vocab, cpu)
        result["peak_gb"] = torch.cuda.max_memory_allocated() / GB if not cpu else float("nan")
        result["step_s"] = statistics.median(times[1:] or times)
        result["step_range"] = (min(times[1:] or times), max(times[1:] or times))
        result["tokens_per_s"] = seq / result["step_s"]
        middle = max(1, steps // 2)
        want = adapters(full.model)
        result["adapter_dtype"] = _dtypes(full.model)
        del full, model
        torch.cuda.empty_cache()  # a no-op without CUDA

        model, _ = load(folder)
        resumed, _ = train(model, folder, run, steps, seq, vocab, cpu, resume=str(run / f"checkpoint-{middle}"))
        got = adapters(resumed.model)
        result["adapter_dtype"] += " / " + _dtypes(resumed.model)
        start = load_file(str(run / f"checkpoint-{middle}" / "adapter_model.safetensors"))
        # Norms over all adapters, not a max: Adam moves an element whose gradient is nearly zero
        # by a whole learning rate in either direction, so one rounding difference can flip it.
        result["resume_moved"] = _norm(want[k] - start[k.replace(".default", "")].float() for k in want)
        result["resume_apart"] = _norm(want[k] - got[k] for k in want)

        final = Path(tmp) / "final"
        resumed.save_model(str(final))
        ids = torch.randint(3, vocab, (1, 64), generator=torch.Generator().manual_seed(1))
        reference = logits(resumed.model, ids)
        del resumed, model
        torch.cuda.empty_cache()  # a no-op without CUDA
        if setup != "bitsandbytes":
            import nf4
            # the patched setup reloads patched (its logits come from the same kernels)
            base = nf4.from_pretrained(folder, device=device_map, progress=False, patch=setup in EXTRA_SETUPS)
            alone = peft.PeftModel.from_pretrained(base, final)
            result["reload_nf4"] = _compare(logits(alone, ids), reference)
            del alone
        by_transformers, _ = load(final)
        result["reload_transformers"] = _compare(logits(by_transformers, ids), reference)
    Path(out).write_text(json.dumps(result))


def _dtypes(model) -> str:
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if "lora_" in n}))


def _norm(tensors) -> float:
    return sum(t.double().square().sum().item() for t in tensors) ** 0.5


def _compare(got: torch.Tensor, want: torch.Tensor) -> str:
    return "identical" if torch.equal(got, want) else f"max diff {(got - want).abs().max().item():.3g}"


def run_child(setup: str, folder: Path, steps: int, seq: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "bench.bench_sft", "--child", setup, str(folder), f.name,
               "--steps", str(steps), "--seq", str(seq)]
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            return dict(setup=setup, error=f"exit status {proc.returncode}")
        return json.loads(Path(f.name).read_text())


def report(results: list[dict], shape: str, steps: int, seq: int) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["setup"], r["error"]] + [""] * 8)
            continue
        rows.append([r["setup"], f"{r['load_s']:.1f}", f"{1000 * r['step_s']:.0f} ({1000 * r['step_range'][0]:.0f}-{1000 * r['step_range'][1]:.0f})", f"{r['tokens_per_s']:,.0f}",
                     f"{r['peak_gb']:.2f}", r["adapter_dtype"], f"{r['resume_apart']:.2g} / {r['resume_moved']:.2g}",
                     r.get("reload_nf4", "-"), r["reload_transformers"]])
    return "\n".join([
        "## TRL SFTTrainer script (bench_sft)", "",
        stamp(), "",
        f"{shape} shapes, random bf16 weights (bench_load's checkpoint), r=16 all-linear LoRA, gradient "
        f"checkpointing, bf16, batch 1 x {seq} tokens, {steps} steps with a checkpoint at step "
        f"{max(1, steps // 2)}, then resumed from it. Step: median after the first, saving excluded. "
        "Adapters: their dtype in the uninterrupted run and after resuming (TRL casts a quantized "
        "model's adapters to bf16 when it builds the peft model; the resumed trainer loads them from the "
        "checkpoint). Resume: ‖resumed − uninterrupted‖ over all adapters / ‖how far the resumed steps moved them‖.", "",
        table(["setup", "load s", "step ms (min-max)", "tokens/s", "peak GB", "adapters (run / resumed)", "resume apart / moved",
               "reload: nf4 alone", "reload: transformers"], rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="bench_load's checkpoint folder's parent (written if missing)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--child", nargs=3, metavar=("SETUP", "DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (a checkpoint halfway, then resume), got {args.steps}")
    if args.child:
        child(*args.child, steps=args.steps, seq=args.seq)
        return
    if args.dir is None:
        parser.error("--dir is required: the checkpoint is written there")
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = set(setups) - set(SETUPS) - set(EXTRA_SETUPS)
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}; choose from {list(SETUPS + EXTRA_SETUPS)}")
    has_bnb = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True).returncode == 0
    if "bitsandbytes" in setups and not (has_bnb and torch.cuda.is_available()):
        log.warning("bitsandbytes row skipped (needs bitsandbytes and a GPU)")
        setups.remove("bitsandbytes")
    folder = prepare(args, _shapes(args.shape))
    results = []
    for setup in setups:
        t0 = time.perf_counter()
        results.append(run_child(setup, folder, args.steps, args.seq))
        log.info("%s: %s (%.0f s)", setup, results[-1], time.perf_counter() - t0)
    body = report(results, args.shape, args.steps, args.seq)
    if torch.cuda.is_available():
        write_section("sft", body)
    else:
        print(body)
    failed = [r["setup"] for r in results
              if "error" in r or any(v.startswith("max diff") for k, v in r.items() if k.startswith("reload"))]
    if failed:
        sys.exit(f"bench_sft: {', '.join(failed)}: failed or reloaded logits differ")


if __name__ == "__main__":
    main()
