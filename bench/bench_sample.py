"""Sampling speed of GPT-B: gpt.generate (static KV cache) against a full-recompute baseline.

    python bench/bench_sample.py --tokens 64              # CPU, fp32: a minute or two
    python bench/bench_sample.py                          # CPU, 256 tokens (16 x 16, as c2i_B_256)
    python bench/bench_sample.py --device cuda            # GPU, bf16: eager, compiled and baseline

Random weights (speed does not depend on them), the demo settings of the official sample_c2i.py:
8 labels with cfg 4.0 (16 rows through the model), top-k 2000, temperature 1. The baseline has no KV
cache: each step re-runs the full forward over the whole prefix, as a plain `model(idx, cond)`
would. tokens/s counts image tokens of the 8 images (not the doubled CFG rows).
"""

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import gpt  # noqa: E402


@torch.no_grad()
def generate_full_recompute(model, labels, cfg_scale, top_k, generator, steps=None):
    """Baseline: token i costs a forward over all i previous tokens (no cache) -> (B, block_size).

    steps=k runs only k evenly spaced positions of the sequence (on a random prefix), so that
    total time * block_size / k estimates a full run; the cost per step grows with the prefix.
    """
    B, L = labels.shape[0], model.config.block_size
    cond = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])  # [cond; null]
    idx = torch.randint(
        model.config.vocab_size, (2 * B, L), device=labels.device, generator=generator
    )
    for i in baseline_positions(L, steps):
        logits, _ = model(idx[:, :i], cond)  # (2B, i+1, V)
        with_label, null = logits[:, -1].chunk(2)  # classifier-free guidance, as gpt.generate
        tok = gpt.sample(null + (with_label - null) * cfg_scale, 1.0, top_k, 1.0, generator)
        idx[:, i] = torch.cat([tok, tok])[:, 0]  # (B, 1) -> both halves
    return idx[:B]


def baseline_positions(L, steps=None):
    """All L positions, or `steps` of them evenly spaced from 0 to L - 1."""
    return (
        list(range(L))
        if not steps
        else sorted({round(k * (L - 1) / max(steps - 1, 1)) for k in range(steps)})
    )


def timed(fn, device, repeats):
    """Best wall time of `repeats` calls, synchronising the GPU."""
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if math.isqrt(args.tokens) ** 2 != args.tokens:
        raise SystemExit(f"--tokens must be a square (a token grid), got {args.tokens}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig.from_name(args.model, block_size=args.tokens)).eval()
    torch.nn.init.normal_(
        model.output.weight, std=0.02
    )  # the init zeroes the head; any weights will do
    model.to(device, dtype)  # as sample.py: the whole GPT in the sampling precision
    labels = torch.arange(args.batch, device=device) * 97 % 1000
    gen = torch.Generator(device).manual_seed(0)
    runs = [
        (
            "kv-cache",
            lambda: gpt.generate(
                model, labels, cfg_scale=args.cfg_scale, top_k=args.top_k, generator=gen
            ),
        )
    ]
    if args.compile or (device.type == "cuda" and not args.no_compile):
        # the caller compiles the decode step (gpt-fast generate.py); compiled once, reused
        compiled_decode = torch.compile(
            gpt.decode_one_token, mode="reduce-overhead", fullgraph=True
        )
        runs.append(
            (
                "kv-cache+compile",
                lambda: gpt.generate(
                    model,
                    labels,
                    cfg_scale=args.cfg_scale,
                    top_k=args.top_k,
                    generator=gen,
                    decode_fn=compiled_decode,
                ),
            )
        )
    if not args.no_baseline:
        runs.append(
            (
                "full-recompute",
                lambda: generate_full_recompute(
                    model, labels, args.cfg_scale, args.top_k, gen, args.baseline_steps
                ),
            )
        )
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{args.model} ({n_params:.0f}M), {args.tokens} tokens, batch {args.batch} x2 "
        f"(cfg {args.cfg_scale}), top-k {args.top_k}, {precision} on {device} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(f"{'method':<18} {'seconds':>9} {'tokens/s':>10} {'images/s':>9} {'speed-up':>9}")
    base = None
    for name, fn in runs:
        for _ in range(args.warmup if name != "kv-cache+compile" else max(args.warmup, 2)):
            fn()  # compile: the first calls trace and capture graphs
        sec = timed(fn, device, args.repeats)
        note = ""
        if name == "full-recompute" and args.baseline_steps:
            done = len(baseline_positions(args.tokens, args.baseline_steps))
            sec, note = (
                sec * args.tokens / done,
                f"  (estimated from {done} of {args.tokens} steps)",
            )
        base = sec if name == "kv-cache" else base
        print(
            f"{name:<18} {sec:>9.2f} {args.batch * args.tokens / sec:>10.1f} "
            f"{args.batch / sec:>9.3f} {base / sec:>8.2f}x{note}",
            flush=True,
        )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GPT sampling speed: KV cache vs full recompute")
    p.add_argument(
        "--model", default="GPT-B", type=functools.partial(common.preset, gpt.GPT_CONFIGS)
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=256,
        help="image tokens (a square: 256 = 16 x 16, 576 = 24 x 24)",
    )
    p.add_argument("--batch", type=int, default=8, help="images (rows are doubled by CFG)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--mixed-precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="default: bf16 on GPU, fp32 on CPU",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the compiled decode step (on by default on GPU)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the compiled run on GPU")
    p.add_argument(
        "--no-baseline", action="store_true", help="skip the (slow) full-recompute baseline"
    )
    p.add_argument(
        "--baseline-steps",
        type=int,
        default=None,
        help="time only this many evenly spaced baseline steps and extrapolate (CPU)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--repeats", type=int, default=1, help="timed runs per method; the best is reported"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed runs first (default: 1 on GPU, 0 on CPU)"
    )
    args = p.parse_args(argv)
    args.warmup = (
        args.warmup if args.warmup is not None else (1 if torch.cuda.is_available() else 0)
    )
    return args


if __name__ == "__main__":
    main(parse_args())
