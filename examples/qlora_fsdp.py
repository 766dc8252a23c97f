"""QLoRA fine-tuning of an nf4 model under PyTorch FSDP2, on N GPUs (or N CPU processes).

    torchrun --nproc-per-node 2 examples/qlora_fsdp.py                 # tiny Llama, 2 ranks
    python examples/qlora_fsdp.py                                       # the same on one device,
                                                                        # no FSDP at all
    torchrun --nproc-per-node 2 examples/qlora_fsdp.py --model-8b-shaped --seq-len 2048 \\
        --global-batch 2 --micro-batch 1 --steps 6 --checkpointing      # Llama-3-8B shapes

The base model is quantized to NF4 (double quant, bf16 compute) on each rank's device; LoRA rank
16 / alpha 32 on q, k, v, o, gate, up and down; AdamW on the adapters only. With torchrun the
model is sharded with ``nf4.distributed.shard_model`` (backend nccl on GPUs, gloo on CPUs);
without it, it trains unsharded on one device.

Note: the same loss curve on any number of ranks.
    Every step takes a fixed global batch of ``--global-batch`` sequences, cut into micro-batches
    of ``--micro-batch``: rank r runs micro-batches r*a .. r*a+a-1 (a = global / (micro * N),
    accumulated with loss / a); one device accumulates all of them in the same order. Each
    micro-batch's forward and backward thus runs the same shapes on the same data either way,
    and only the order in which micro-batch gradients are summed can differ. FSDP averages the
    ranks' gradients (a sum, then / N) and a power-of-two scale is exact in floating point, so
    with the defaults (4 sequences, micro-batch 2) one device computes g0/2 + g1/2 and two
    ranks (g0 + g1)/2: the same bits, hence the same loss curve, adapters and optimizer state
    (AdamW is elementwise). Other splits add the micro-batch gradients in another order: with
    bf16 compute each adapter gradient carries 8 significant bits, so their float32 sums are
    exact unless magnitudes differ by 2^16, and on the CPU 4 micro-batches on 1 process vs 2 on
    each of 2 gave the same bits too; in general expect agreement to float32 rounding. On a GPU,
    kernels that do not reproduce bits from run to run (split-K atomics) add their own noise.
    The logged loss is the mean over all micro-batches of all ranks.

Outputs (``--out``): ``model/`` a bitsandbytes 4-bit checkpoint (frozen base) and ``adapter/``
the LoRA weights (peft's ``adapter_model.safetensors`` + ``adapter_config.json``), both written
by rank 0 from complete tensors; ``--loss-json`` the loss curve and throughput.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import nf4
import nf4.distributed
from nf4.testing import fixtures_dir

# This example's checkout: its tests/fixtures hold the default tiny Llama (NF4_FIXTURES overrides).
CHECKOUT = Path(__file__).resolve().parents[1]

log = logging.getLogger("qlora_fsdp")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Llama-3-8B's shapes (the end-to-end benchmark's model, bench/RESULTS.md).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=None,
                     help="a local folder or Hub name (default: the bundled tiny Llama fixture)")
    src.add_argument("--model-8b-shaped", action="store_true",
                     help="a Llama-3-8B-shaped model with random bf16 weights (seeded), quantized in place")
    p.add_argument("--num-layers", type=int, default=None,
                   help="with --model-8b-shaped: fewer decoder layers than 32 (a quick check of the path)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global-batch", type=int, default=4, help="sequences per optimizer step, all ranks")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per forward on one rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the tokens/s figure")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) even when there are GPUs")
    p.add_argument("--out", type=Path, default=None, help="save the bnb checkpoint and the adapter here")
    p.add_argument("--loss-json", type=Path, default=None, help="write losses and tokens/s here (rank 0)")
    args = p.parse_args(argv)
    for name in ("steps", "global_batch", "micro_batch", "seq_len", "rank"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0 or args.warmup >= args.steps:
        p.error(f"--warmup must be in [0, --steps), got {args.warmup}")
    return args


def setup_distributed(cpu: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: a process group (nccl with GPUs, else gloo)."""
    gpu = torch.cuda.is_available() and not cpu
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda", 0) if gpu else torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def build_model(args: argparse.Namespace, device: torch.device):
    lora = dict(lora_rank=args.rank, lora_alpha=args.alpha, target_modules=TARGETS)
    # The same seed on every rank: every rank builds the same adapters (lora_A is random), and
    # for the 8B-shaped model the same random base weights; each rank then keeps its own shard.
    torch.manual_seed(args.seed)
    if not args.model_8b_shaped:
        path = args.model if args.model is not None else fixtures_dir(CHECKOUT) / "tiny_llama_bf16"
        return nf4.from_pretrained(str(path), device=device, progress=False, **lora)
    import transformers  # optional dependency (the [hf] extra); only this path builds from a config

    shape = dict(LLAMA3_8B)
    if args.num_layers is not None:
        shape["num_hidden_layers"] = args.num_layers
    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False, attention_bias=False,
                                      mlp_bias=False)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return nf4.quantize_model(model, device=device, **lora)


def freeze_base(model) -> None:
    """Only the LoRA adapters train: from_pretrained leaves embeddings, norms and lm_head
    trainable (as transformers does), QLoRA freezes them."""
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nf4.QuantLinear4bit) and m.lora_rank:
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)


def make_batches(args: argparse.Namespace, vocab: int) -> torch.Tensor:
    """[steps, global_batch, seq_len] token ids from ``--seed``: every sequence walks one fixed
    cycle of 8 tokens from a random phase, a pattern LoRA picks up within a few steps (the
    loss falls from ln(vocab) towards 0), so the curves compared across ranks move."""
    g = torch.Generator().manual_seed(args.seed + 1)
    cycle = torch.randperm(vocab, generator=g)[:8]
    phase = torch.randint(len(cycle), (args.steps, args.global_batch, 1), generator=g)
    return cycle[(phase + torch.arange(args.seq_len)) % len(cycle)]


def enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args: argparse.Namespace) -> dict:
    rank, world, device = setup_distributed(args.cpu)
    if args.global_batch % (args.micro_batch * world):
        raise ValueError(f"--global-batch {args.global_batch} must be a multiple of --micro-batch "
                         f"{args.micro_batch} x {world} ranks")
    accum = args.global_batch // (args.micro_batch * world)
    model = build_model(args, device)
    freeze_base(model)
    if args.checkpointing:
        enable_checkpointing(model)
    model.train()
    if dist.is_initialized():
        nf4.distributed.shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach on both paths: the same elementwise maths on shards and on whole tensors.
    opt = torch.optim.AdamW(params, lr=args.lr, foreach=True)
    batches = make_batches(args, model.config.vocab_size)
    if device.type == "cuda":
        # Training memory apart from building the model (an 8B-shaped random model is made in
        # bf16 before it is quantized, whole on every rank before sharding).
        sync(device)
        setup_peak = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    timed_tokens = 0
    timer = None
    for step in range(args.steps):
        if step == args.warmup:
            sync(device)
            timer = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for j in range(accum):
            first = (rank * accum + j) * args.micro_batch
            ids = batches[step, first:first + args.micro_batch].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            (loss / accum).backward()
            total += loss.detach().double()
        opt.step()
        if step == args.steps - 1:
            with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
        opt.zero_grad(set_to_none=True)
        if dist.is_initialized():
            dist.all_reduce(total)
        mean = float(total) / (accum * world)
        losses.append(mean)
        if step >= args.warmup:
            timed_tokens += args.global_batch * args.seq_len
        log.info("step %d loss %.6f", step, mean)
    sync(device)
    elapsed = time.perf_counter() - timer
    tokens_per_s = timed_tokens / elapsed
    result = {"world_size": world, "sharded": dist.is_initialized(), "device": str(device.type),
              "losses": losses, "tokens_per_s": tokens_per_s, "step_s": elapsed / (args.steps - args.warmup),
              "global_batch": args.global_batch, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
              "accumulation": accum,
              "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
              "setup_peak_gb": setup_peak if device.type == "cuda" else None,
              "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
              "with_grad": with_grad,
              "optimizer_state": sum(1 for p in params if opt.state.get(p))}
    log.info("%d rank(s): %.0f tokens/s (%.3f s/step), training peak %s GB (model setup %s GB)", world,
             tokens_per_s, result["step_s"], "n/a" if result["peak_gb"] is None else f"{result['peak_gb']:.2f}",
             "n/a" if result["setup_peak_gb"] is None else f"{result['setup_peak_gb']:.2f}")
    if args.out is not None:
        nf4.distributed.save_pretrained(model, args.out / "model")
        nf4.distributed.save_adapter(model, args.out / "adapter")
    if args.loss_json is not None and rank == 0:
        args.loss_json.parent.mkdir(parents=True, exist_ok=True)
        args.loss_json.write_text(json.dumps(result, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()  # leave together: gloo aborts a rank whose peer has torn down first
        dist.destroy_process_group()
    return result


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [rank " + os.environ.get("RANK", "0")
                        + "] %(name)s %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
