"""Speed of fid.py: Inception feature extraction (images/s, both preprocessing modes) and the
float64 Frechet distance on 2048-dim statistics. Random weights, no download.

    python bench/bench_fid.py                      # CPU, then the GPU when there is one
    python bench/bench_fid.py --batch-size 64 --iters 5 --devices cuda
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid  # noqa: E402


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def bench_features(device, mode, batch_size, iters, image_size):
    """Images/s of model(uint8 images) -> (pool3, spatial, logits), preprocessing included."""
    model = fid.InceptionV3().eval().to(device)
    x = torch.randint(
        0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device
    )
    model(x, mode)  # warm-up (cuDNN autotuning, allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        model(x, mode)
    sync(device)
    return batch_size * iters / (time.perf_counter() - t0)


def bench_frechet(dim=2048, n=4 * 2048):
    """Seconds for one full-rank frechet_distance (one D x D eigh + one eigvalsh, float64 numpy)."""
    rng = np.random.default_rng(0)
    stats = [
        fid.compute_statistics(rng.standard_normal((n, dim)).astype(np.float32)) for _ in range(2)
    ]
    t0 = time.perf_counter()
    fid.frechet_distance(*stats[0], *stats[1])
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument(
        "--image-size", type=int, default=256, help="input size before the resize to 299"
    )
    p.add_argument(
        "--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    torch.backends.cudnn.allow_tf32 = False  # as fid.main: fp32 convolutions
    for device in args.devices:
        iters = args.iters if device == "cpu" else max(args.iters, 10)
        for mode in fid.MODES:
            ips = bench_features(device, mode, args.batch_size, iters, args.image_size)
            print(
                f"{device:5s} {mode:12s} batch {args.batch_size:4d}, {args.image_size}px: "
                f"{ips:8.1f} images/s"
            )
    print(f"frechet_distance, 2048-dim, float64 numpy: {bench_frechet():.2f} s")


if __name__ == "__main__":
    main()
