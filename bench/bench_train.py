"""GPT training throughput: tokens/s and peak memory per preset, one full optimizer step at a time.

    python bench/bench_train.py                                      # CPU: GPT-tiny and GPT-B (batch 2)
    python bench/bench_train.py --models B L XL --batch-size 32 --steps 20 --compile   # one GPU
    python bench/bench_train.py --models B --batch-size 32 --full-logits              # memory of the old loss

Random tokens at the official c2i shapes (vocab 16384, 256 tokens = 256 px through VQ-16), the
trainer's loss call (chunked cross-entropy unless --full-logits), AdamW as in train_gpt.py, bf16
autocast on GPUs and fp32 on the CPU (the trainer's defaults). Peak memory is
torch.cuda.max_memory_allocated on a GPU, and the process's peak RSS on the CPU (monotonic, so run
small models first).
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import data  # noqa: E402
from gpt import GPT, GPT_CONFIGS, GPTConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "B"])
    p.add_argument(
        "--batch-size", type=int, nargs="+", default=[32, 2], help="one per model, or one for all"
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up step")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument(
        "--mixed-precision", choices=["fp32", "bf16"], help="default bf16 on GPUs, fp32 on CPU"
    )
    p.add_argument("--full-logits", action="store_true", help="materialise (B, L, V) fp32 logits")
    p.add_argument("--compile", action="store_true")
    return p.parse_args(argv)


def bench(name, batch, args, device, precision):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig.from_name(
            name, vocab_size=args.vocab_size, block_size=args.block_size, num_classes=1000
        )
    ).to(device)
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        fused=device.type == "cuda",
    )
    ctx = data.autocast_ctx(device, precision)
    z = torch.randint(0, args.vocab_size, (batch, args.block_size), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.steps + 1):
        if i == 1:  # the first step pays for allocation (and compilation)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with ctx:
            _, loss = step_model(z[:, :-1], y, targets=z, return_logits=args.full_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    dt = (time.perf_counter() - t0) / args.steps
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{name:9s} {params:8.1f}M  batch {batch:3d}  {dt * 1000:9.1f} ms/step  "
        f"{batch * args.block_size / dt:10.0f} tokens/s  peak {peak:8.0f} MiB  loss {loss.item():.3f}",
        flush=True,
    )


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    sizes = args.batch_size * len(args.models) if len(args.batch_size) == 1 else args.batch_size
    print(
        f"torch {torch.__version__}, {name}, {precision}, vocab {args.vocab_size}, {args.block_size} tokens, "
        f"{'full logits' if args.full_logits else 'chunked CE'}{', compiled' if args.compile else ''}"
    )
    for model, batch in zip(args.models, sizes):
        bench(common.preset(GPT_CONFIGS, model), batch, args, device, precision)


if __name__ == "__main__":
    data.cli(main, parse_args)
