"""A complete QLoRA fine-tune with nf4: load in 4 bits, train LoRA adapters, save, reload.

    python examples/qlora_finetune.py                          # the tiny test Llama, a few steps
    python examples/qlora_finetune.py meta-llama/Llama-3.2-1B --steps 200 --seq-len 512

1. ``nf4.from_pretrained(model, lora_rank=16)`` streams the checkpoint into 4-bit layers
   (NF4, double quantization) with float32 LoRA adapters on the attention and MLP projections.
2. Everything but the adapters is frozen; AdamW trains them under bf16 autocast (on the CPU too).
3. The adapters alone (``lora_A``/``lora_B`` tensors, a few MB for an 8B model) are saved as
   safetensors next to a small JSON config, then loaded into a freshly loaded model, whose outputs
   must equal the trained model's exactly.

The default model is the 2-layer Llama of nf4's test fixtures; the dataset is generated text
(arithmetic facts), so the example needs no network. Any Hub id or folder of a Llama-like
safetensors checkpoint works; a tokenizer is needed only for those (the fixture has none, so the
text is encoded as bytes there).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import nf4
from nf4.nn import QuantLinear4bit
from nf4.testing import fixtures_dir

# This example's checkout: its tests/fixtures hold the default tiny Llama (NF4_FIXTURES overrides).
CHECKOUT = Path(__file__).resolve().parents[1]

log = logging.getLogger("qlora_finetune")

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


# ------------------------------------------------------------------------------- data
def make_dataset(n: int, seed: int = 0) -> list[str]:
    """``n`` lines of simple arithmetic facts ("17 plus 5 is 22."): learnable structure, no download."""
    rng = random.Random(seed)
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        name = rng.choice(sorted(ops))
        lines.append(f"{a} {name} {b} is {ops[name](a, b)}.")
    return lines


class ByteTokenizer:
    """UTF-8 bytes as token ids (for checkpoints without a tokenizer, such as the test fixture)."""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"byte tokens need a vocabulary of at least 256, the model has {vocab_size}")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def tokenizer_for(source: str, vocab_size: int):
    """The checkpoint's tokenizer when it has one, else bytes."""
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        log.info("no tokenizer with %s: encoding the text as bytes", source)
        return ByteTokenizer(vocab_size)


def batches(lines: list[str], tokenizer, seq_len: int, batch_size: int, device) -> list[torch.Tensor]:
    """The text packed into [batch_size, seq_len] token blocks (the remainder is dropped)."""
    ids = []
    for line in lines:
        ids += tokenizer.encode(line + "\n")
    block = seq_len * batch_size
    n = len(ids) // block
    if n == 0:
        raise ValueError(f"{len(ids)} tokens of text cannot fill one batch of {batch_size}x{seq_len}")
    data = torch.tensor(ids[: n * block]).view(n, batch_size, seq_len)
    return [b.to(device) for b in data]


# ------------------------------------------------------------------------------- adapters
def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the trained tensors: every QuantLinear4bit's lora_A and lora_B."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
            if k.endswith((".lora_A", ".lora_B"))}


def save_adapter(model: torch.nn.Module, out: Path, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(out / ADAPTER_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(folder: Path, device) -> torch.nn.Module:
    """A fresh 4-bit model from the config's base, with the saved adapters loaded."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = nf4.from_pretrained(config["base_model"], device=device, lora_rank=config["lora_rank"],
                                lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
                                progress=False)
    tensors = load_file(str(folder / ADAPTER_FILE), device=str(device))
    expected = set(adapter_state(model))
    if set(tensors) != expected:
        raise ValueError(f"{folder / ADAPTER_FILE}: adapter keys do not match the model "
                         f"(missing {sorted(expected - set(tensors))[:3]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:3]})")
    model.load_state_dict(tensors, strict=False)
    return model


# ------------------------------------------------------------------------------- training
def train(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    source = str(args.model)
    model = nf4.from_pretrained(source, device=device, lora_rank=args.rank, lora_alpha=args.alpha,
                                target_modules=args.target_modules)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))
    params = [p for p in model.parameters() if p.requires_grad]
    layers = sum(isinstance(m, QuantLinear4bit) for m in model.modules())
    log.info("%s on %s: %d 4-bit layers, %.2f M trainable adapter parameters (%s)", source, device,
             layers, sum(p.numel() for p in params) / 1e6, params[0].dtype)

    tokenizer = tokenizer_for(source, model.config.vocab_size)
    data = batches(make_dataset(args.lines, args.seed), tokenizer, args.seq_len, args.batch_size, device)
    opt = torch.optim.AdamW(params, lr=args.lr)
    model.train()
    losses = []
    bar = tqdm(range(args.steps), desc="qlora", unit="step")
    for step in bar:
        ids = data[step % len(data)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    log.info("loss %.4f -> %.4f over %d steps", losses[0], losses[-1], len(losses))

    config = {"base_model": source, "lora_rank": args.rank, "lora_alpha": args.alpha,
              "target_modules": args.target_modules, "nf4_version": nf4.__version__}
    save_adapter(model, args.out, config)
    log.info("adapters saved to %s (%s, %s)", args.out, ADAPTER_FILE, CONFIG_FILE)

    # Reload into a fresh model: the outputs must be identical, bit for bit (same 4-bit base from
    # the same checkpoint, same adapter tensors, same kernels).
    model.eval()
    reloaded = load_adapter(args.out, device).eval()
    probe = data[0][:1]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        want = model(input_ids=probe).logits
        got = reloaded(input_ids=probe).logits
    if not torch.equal(got, want):
        raise RuntimeError(f"reloaded adapters give different logits (max diff "
                           f"{(got.float() - want.float()).abs().max().item():.3g})")
    log.info("reloaded into a fresh model: identical logits")
    return {"losses": losses, "out": args.out}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=str(fixtures_dir(CHECKOUT) / "tiny_llama_bf16"),
                        help="Hub id or local folder (default: nf4's tiny test Llama)")
    parser.add_argument("--out", type=Path, default=Path("qlora-adapter"), help="where the adapters go")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lines", type=int, default=400, help="lines of generated text")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--target-modules", nargs="+",
                        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
