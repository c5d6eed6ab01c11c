"""Every speed and memory figure the project claims, from one command: one table, the same numbers
as JSON, each figure beside its floor where one is defined.

    python bench/run_all.py --quick --json bench-quick.json   # tiny models on the CPU, < 1 min
    python bench/run_all.py --gpu-tests --json bench.json     # one GPU: released shapes, < 8 min
    OMP_NUM_THREADS=1 python bench/run_all.py --only jacobi --batch 1   # CPU: Jacobi, GPT-B 256
    python bench/run_all.py --batch 1 --seeds 32 \
        --jacobi-ckpt results/gpt/000-GPT-tiny/checkpoints/last.pt   # Jacobi, the quick start's GPT

Random weights in the released shapes (speed does not depend on the values), nothing downloaded.
What is measured (the sections of --only, in this order):
- train: tokens/s and peak memory of train_gpt.train_step (AdamW, clipping, the trainer's loss)
  for GPT-B and GPT-L, and the same step with a plain full-logits cross-entropy of the same model
  (issue 16: ours must be no slower), as a time ratio; also GPT-B fp32 batch 4 on the CPU, the
  configuration of the issue (the only training figure of a run without a GPU). Floor: model
  FLOPs 6 * N * tokens / peak FLOP/s (N = weights that multiply: embeddings excluded; attention
  scores not counted), i.e. the fraction is MFU.
- tokenizer: images/s of train_vq.Trainer.train_step with every loss of the recipe on (LPIPS on
  random VGG weights, the PatchGAN from step 0).
- extract: images/s of the tokenizer's encoder as `data.py extract` runs it (fp32, two crops per
  image: the centre crop and its mirror), model only, no image decoding.
- fid: images/s of fid.extract (Inception, both preprocessing modes), and the float64 Frechet
  distance.
- jacobi: speculative Jacobi decoding, gpt.generate(jacobi_window=W) for W in 0, 8, 16, 32, on
  --batch images with guidance (--cfg-scale): forward passes (one call on the [cond; null] batch
  counts once; every pass serves all images) and wall time per call, the mean of --seeds calls
  (call s: seed s, classes s, s+1, ...). Random weights overstate the step compression: their
  next-token distribution depends little on the earlier tokens, so a draft drawn from the last
  pass's p passes the check almost surely. The figure that counts comes from a trained model:
  --jacobi-ckpt, a checkpoint of train_gpt.py (the quick start's GPT-tiny, say).
- sample: 8 images with guidance (16 rows), demo settings (cfg 4.0, top-k 2000), GPT-B/L/XL at 256
  and 384 px (256 / 576 tokens), bf16 and fp32, eager and with the decode step compiled as
  sample.py --compile does; plus the no-KV-cache baseline (every token re-runs the whole prefix)
  for GPT-B 256, estimated from a few evenly spaced steps. Floor: one read of the weights per
  token, tokens * weight bytes / memory bandwidth (KV-cache reads excluded, so it is optimistic
  at 576 tokens).

Peaks: dense bf16 FLOP/s and memory bandwidth from the spec sheet for the GPUs in PEAKS, else
measured here (a large copy and a matmul), as on the CPU. --budget: on a GPU the runs that start
after 360 s are skipped (listed at the end), so the whole call stays under 8 minutes; the runs go
in order of interest. --gpu-tests runs the GPU-only tests first, in the same call
(`pytest -k "gpu or cuda"`: the tests that skip without CUDA).
"""

import argparse
import dataclasses
import datetime
import functools
import itertools
import math
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import fid  # noqa: E402
import gpt  # noqa: E402
import train_gpt  # noqa: E402
import train_vq  # noqa: E402
import vq  # noqa: E402

# dense bf16 FLOP/s and memory bandwidth (bytes/s) of the SXM parts, by a piece of the device name
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}
CLASSES = 1000  # ImageNet
CFG_SCALE, TOP_K = 4.0, 2000  # the demo settings of the official sample_c2i.py
WINDOWS = (0, 8, 16, 32)  # Jacobi windows (0 = ordinary decoding)
PRECISIONS, DECODE = ("bf16", "fp32"), ("eager", "compiled")  # of every sampling figure

# What to measure. Lists are in order of interest: on a GPU the time budget cuts from the end.
FULL = dict(
    vocab=16384,  # VQ-16's codebook, the released c2i GPTs' vocabulary
    # (preset, image tokens): 576 = 384 px, 256 = 256 px through VQ-16
    sample=[("GPT-B", 576), ("GPT-XL", 576), ("GPT-B", 256)]
    + [("GPT-L", 576), ("GPT-L", 256), ("GPT-XL", 256)],
    baseline=("GPT-B", 256, 16),  # preset, tokens, timed steps of the no-cache baseline
    jacobi=("GPT-B", 256),
    # (device, preset, batch, tokens, timed steps); the CPU row is issue 16's comparison
    train=[("cuda", "GPT-B", 32, 256, 5), ("cuda", "GPT-L", 32, 256, 5)]
    + [("cpu", "GPT-B", 4, 256, 2)],
    tokenizer=("VQ-16", 256, 16, 5),  # preset, image size, batch, timed steps
    extract=("VQ-16", 256, 64, 5),
    fid=(100, 256, 5, 2048),  # batch, image size, batches, Frechet dimension
    peak_sizes=(2**26, 8192),  # copied floats, matmul side (GPU; the CPU takes a quarter)
)
QUICK = dict(  # the same figures with tiny models; 16 and 36 tokens stand in for 256 and 576
    vocab=1024,  # VQ-tiny's, as in the quick start
    sample=[("GPT-tiny", 36), ("GPT-tiny", 16)],
    baseline=("GPT-tiny", 16, 4),
    jacobi=("GPT-tiny", 64),
    train=[("cpu", "GPT-tiny", 4, 64, 2)],
    tokenizer=("VQ-tiny", 32, 4, 1),
    extract=("VQ-tiny", 32, 8, 1),
    fid=(2, 64, 1, 64),
    peak_sizes=(2**24, 2048),
)


# ----------------------------------------------------------------------------------------------
# Measuring


def clock(device, fn, repeat=1):
    """(seconds per call, peak GPU memory in MiB or None on the CPU) of `repeat` calls of fn."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / repeat
    return seconds, torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None


def measure_peaks(device, copied, side) -> dict:
    """What this device reaches: bytes/s of a large copy (read + write) and FLOP/s of a square
    matmul (bf16 on a GPU, fp32 on the CPU: the precision each trains in)."""
    side = side if device.type == "cuda" else side // 4
    src = torch.ones(copied if device.type == "cuda" else copied // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = min(clock(device, lambda: dst.copy_(src))[0] for _ in range(5))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(side, side, device=device, dtype=dtype)
    matmul_s = min(clock(device, lambda: a @ a)[0] for _ in range(3))
    return dict(bandwidth=2 * src.nbytes / copy_s, flops=2 * side**3 / matmul_s)


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


# fields of a figure that its name already says: kept in the JSON, left out of the table
DETAILS_HIDDEN = ("model", "tokens", "precision", "decode", "window", "batch")


class Bench:
    """The rows measured so far, the devices' peaks, the clock of the time budget."""

    def __init__(self, args):
        self.args, self.rows, self.notes, self.peaks = args, [], [], {}
        self.plan = QUICK if args.quick else FULL
        self.env = common.setup()
        if args.quick:  # tiny models on the CPU, whatever the machine has
            self.env = dataclasses.replace(common.setup("fp32"), device=torch.device("cpu"))
        self.device = self.env.device
        cuda = self.device.type == "cuda"
        self.budget = args.budget if args.budget is not None else 360 if cuda else math.inf
        self.start = time.perf_counter()

    def peak(self, device) -> dict:
        """Peak FLOP/s and bandwidth of `device`: the spec sheet's, or measured once."""
        if device.type not in self.peaks:
            cuda = device.type == "cuda"
            threads = f"CPU, {torch.get_num_threads()} threads"
            name = torch.cuda.get_device_name(device) if cuda else threads
            spec = next((v for k, v in PEAKS.items() if k in name), None)
            if spec:
                found = dict(flops=spec[0], bandwidth=spec[1], source="spec sheet, dense bf16")
            else:
                found = dict(**measure_peaks(device, *self.plan["peak_sizes"]), source="measured")
            self.peaks[device.type] = dict(device=name, **found)
            print(
                f"{name}: {found['flops'] / 1e12:.3g} TFLOP/s, "
                f"{found['bandwidth'] / 1e9:.3g} GB/s ({found['source']})",
                flush=True,
            )
        return self.peaks[device.type]

    def add(self, section, name, value, unit, floor=None, **extra):
        """One figure. floor: the best possible value in the same unit (a time for "s": the
        fraction is floor / value; else a rate: value / floor), None where none is defined."""
        fraction = None
        if floor and value:
            fraction = floor / value if unit == "s" else value / floor
        row = dict(section=section, name=name, value=value, unit=unit, floor=floor)
        self.rows.append(dict(row, fraction=fraction, **extra))
        details = ", ".join(f"{k} {fmt(v)}" for k, v in extra.items() if k not in DETAILS_HIDDEN)
        share = "-" if fraction is None else f"{fraction:.1%}"
        print(
            f"{section:<9} {name:<34} {fmt(value):>9} {unit:<8} {fmt(floor):>9} {share:>6}  "
            f"{details}",
            flush=True,
        )
        self.save()  # after every figure: a run killed at its time limit keeps what it measured

    def save(self):
        """The JSON of --json: the figures so far, the peaks, the notes."""
        if self.args.json:
            report = dict(date=datetime.date.today().isoformat(), torch=torch.__version__)
            report.update(quick=self.args.quick, seconds=time.perf_counter() - self.start)
            report.update(peaks=self.peaks, figures=self.rows, notes=self.notes)
            common.write_json(report, self.args.json)

    def out_of_time(self, what) -> bool:
        """True (and a note) once the time budget is spent: `what` is skipped."""
        if time.perf_counter() - self.start < self.budget:
            return False
        self.notes.append(f"skipped {what}: past the time budget ({self.budget:.0f} s)")
        return True


def autocast(device, precision):
    """The sampling and training precision: bf16 autocast, or fp32 (no context)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def free_memory():
    torch._dynamo.reset()  # compiled graphs (and their CUDA graph pools) of the last model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def multiplied_weights(model) -> list:
    """The parameters every decode step reads and every training token multiplies by: all but
    the embedding tables (a step looks up a few rows of them)."""
    skip = ("tok_embeddings", "cls_embedding")
    return [p for n, p in model.named_parameters() if not n.startswith(skip)]


# ----------------------------------------------------------------------------------------------
# Sampling and Jacobi decoding


def random_gpt(bench, preset, tokens, precision) -> gpt.GPT:
    """A GPT of the released shape with random weights, cast whole to the sampling precision as
    sample.py does (RMSNorm, RoPE and the logits stay fp32 inside)."""
    torch.manual_seed(0)
    config = gpt.GPTConfig.from_name(preset, block_size=tokens, vocab_size=bench.plan["vocab"])
    with bench.device:  # built in place: a GPT-XL initialises in seconds on a GPU, not minutes
        model = gpt.GPT(config)
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the init zeroes the head
    return model.to({"bf16": torch.bfloat16}.get(precision, torch.float32)).eval()


def sample(model, labels, precision, cfg_scale=CFG_SCALE, seed=0, **kwargs) -> int:
    """One gpt.generate call at the demo settings -> its forward passes."""
    stats, device = {}, labels.device
    with autocast(device, precision):
        gpt.generate(
            model,
            labels,
            cfg_scale,
            top_k=TOP_K,
            stats=stats,
            generator=torch.Generator(device).manual_seed(seed),
            **kwargs,
        )
    return stats["forward_passes"]


def compile_decode(quick):
    """The decode step compiled as sample.py --compile does (CUDA graphs on a GPU). --quick only
    traces it (fullgraph, no Inductor, whose C++ builds take minutes on a small CPU): a graph
    break still fails the quick run."""
    free_memory()  # a fresh cache per model, else its recompiles hit dynamo's cache limit
    if quick:
        return torch.compile(gpt.decode_one_token, backend="eager", fullgraph=True)
    return torch.compile(gpt.decode_one_token, mode="reduce-overhead", fullgraph=True)


def sample_section(bench):
    """Every (model, size) eager in bf16 and fp32, the no-cache baseline, then every (model,
    size) compiled in bf16, then in fp32 (compiling takes the most time: it comes last)."""
    sizes, labels = bench.plan["sample"], torch.arange(bench.args.batch) * 97 % CLASSES
    labels = labels.to(bench.device)
    for run in [(*size, p, "eager") for size in sizes for p in PRECISIONS]:
        sample_run(bench, labels, *run)
    if not bench.out_of_time("the no-KV-cache baseline"):
        baseline(bench, labels)
    for run in [(*size, p, "compiled") for p in PRECISIONS for size in sizes]:
        sample_run(bench, labels, *run)


def sample_run(bench, labels, preset, tokens, precision, decode):
    """Seconds for one batch, against the floor of reading the weights once per token."""
    name = f"{preset} {math.isqrt(tokens) * 16}px {precision} {decode}"
    if bench.out_of_time(f"sample {name}"):
        return
    device, batch = bench.device, len(labels)
    model = random_gpt(bench, preset, tokens, precision)
    run = functools.partial(sample, model, labels, precision)
    extra = {}
    if decode == "compiled":
        run = functools.partial(run, decode_fn=compile_decode(bench.args.quick))
        extra["first_calls_s"] = clock(device, run, 2)[0] * 2  # compile, record the graphs
    seconds, mib = clock(device, run)
    weight_bytes = sum(p.nbytes for p in multiplied_weights(model))
    bench.add(
        "sample",
        name,
        seconds,
        "s",
        tokens * weight_bytes / bench.peak(device)["bandwidth"],
        images_per_s=batch / seconds,
        ms_per_token=1e3 * seconds / tokens,
        peak_mib=mib,
        model=preset,
        tokens=tokens,
        precision=precision,
        decode=decode,
        **extra,
    )
    model.teardown_caches()
    del model, run
    free_memory()


@torch.no_grad()
def generate_without_cache(model, labels, positions):
    """The baseline: token i costs a forward over all i tokens before it (no KV cache), guided
    and filtered as gpt.generate; only `positions` are run (on a random prefix)."""
    B, L = len(labels), model.config.block_size
    cond = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])  # [cond; null]
    idx = torch.randint(model.config.vocab_size, (2 * B, L), device=labels.device)
    for i in positions:
        logits, _ = model(idx[:, :i], cond)  # (2B, i + 1, V)
        with_label, null = logits[:, -1].chunk(2)
        token = gpt.draw(gpt.probs(null + (with_label - null) * CFG_SCALE, top_k=TOP_K))
        idx[:, i] = torch.cat([token, token])


def baseline(bench, labels):
    """Seconds of a whole no-cache run, estimated from `steps` evenly spaced positions (a step's
    cost grows with its prefix), beside the KV-cache decoder on the same model."""
    preset, tokens, steps = bench.plan["baseline"]
    precision = bench.env.precision
    model = random_gpt(bench, preset, tokens, precision)
    positions = sorted({round(k * (tokens - 1) / (steps - 1)) for k in range(steps)})
    with autocast(bench.device, precision):
        part, _ = clock(bench.device, lambda: generate_without_cache(model, labels, positions))
    kv_cache, _ = clock(bench.device, lambda: sample(model, labels, precision))
    seconds = part * tokens / len(positions)
    name = f"{preset} {math.isqrt(tokens) * 16}px {precision} no KV cache"
    bench.add("sample", name, seconds, "s", kv_cache_s=kv_cache, slower=seconds / kv_cache)


def jacobi_section(bench):
    """Forward passes and wall time for each Jacobi window, on random weights of the released
    shape or on a trained checkpoint (--jacobi-ckpt), with the demo settings."""
    device, precision, path = bench.device, bench.env.precision, bench.args.jacobi_ckpt
    if path:
        try:
            model = gpt.GPT.from_checkpoint(common.load_checkpoint(path))
        except ValueError as e:  # an official file (no config) or not a GPT
            raise common.UserError(f"--jacobi-ckpt {path}: {e}") from None
        if model.config.model_type != "c2i":
            raise common.UserError(f"--jacobi-ckpt {path}: a class-conditional GPT is needed")
        model.to(device, {"bf16": torch.bfloat16}.get(precision))
        label = Path(path).parent.parent.name if path.endswith("last.pt") else Path(path).stem
    else:
        preset, tokens = bench.plan["jacobi"]
        model = random_gpt(bench, preset, tokens, precision)
        label = f"{preset} {tokens} tokens, random"
    c, (batch, seeds) = model.config, (bench.args.batch, bench.args.seeds)
    # guidance needs the null class
    cfg_scale = bench.args.cfg_scale if c.class_dropout_prob > 0 else 1.0
    ordinary = None
    for window in WINDOWS:
        if bench.out_of_time(f"jacobi W={window}"):
            continue
        passes = []

        def run():  # seed s samples classes s, s+1, ...: every class, given enough seeds
            for s in range(seeds):
                labels = (torch.arange(batch, device=device) + s) % c.num_classes
                kw = dict(seed=s, jacobi_window=window)
                passes.append(sample(model, labels, precision, cfg_scale, **kw))

        seconds, _ = clock(device, run)
        seconds /= seeds
        ordinary = ordinary or seconds
        mean = sum(passes) / seeds
        bench.add(
            "jacobi",
            f"{label} W={window}",
            mean,
            "passes",
            seconds=seconds,
            step_compression=c.block_size / mean,
            speedup=ordinary / seconds,
            window=window,
            batch=batch,
            seeds=seeds,
            cfg_scale=cfg_scale,
            passes_min=min(passes),
            passes_max=max(passes),
        )


# ----------------------------------------------------------------------------------------------
# Training, tokenizer, extraction, FID


class FullLogitsLoss(torch.nn.Module):
    """The textbook loss beside ours: all (B, S+1, V) fp32 logits, one cross-entropy over them;
    called by train_gpt.train_step exactly as the model it wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, cond, targets, *unused, **unused_kwargs):  # c2i: no mask, all valid
        logits, _ = self.model(idx, cond)  # (B, S+1, V)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def train_section(bench):
    """train_gpt's own step (its optimizer, clipping and loss) on random codes, then the same
    step with FullLogitsLoss; tokens/s against the MFU ceiling, peak memory, and the ratio."""
    for device, preset, batch, tokens, steps in bench.plan["train"]:
        if device == "cuda" and bench.device.type != "cuda":  # GPU batch sizes: hours here
            bench.notes.append(f"skipped train {preset} batch {batch}: no GPU")
            continue
        if bench.out_of_time(f"train {preset} on the {device}"):
            continue
        device = bench.device if device == "cuda" else torch.device("cpu")
        precision = "bf16" if device.type == "cuda" else "fp32"  # the trainer's defaults
        env = dataclasses.replace(common.setup(precision), device=device)  # a CPU run: fp32
        argv = ["--code-path", "-", "--model", preset, "--global-batch-size", str(batch)]
        args = train_gpt.parse_args(argv)
        vocab = bench.plan["vocab"]  # the preset with the trainer's default dropouts:
        config = gpt.GPTConfig.from_name(preset, vocab_size=vocab, block_size=tokens)
        parts = train_gpt.build_model(args, env, config, None)
        codes = torch.randint(vocab, (batch, tokens)), torch.randint(CLASSES, (batch,))
        flops = 6 * sum(p.numel() for p in multiplied_weights(parts[1])) * tokens * batch
        times = {}
        for loss, model in ("ours", parts[0]), ("full-logits", FullLogitsLoss(parts[1])):
            batches = itertools.repeat(codes)
            sums = torch.zeros(3, device=device)  # what train_step adds up for the log
            step = functools.partial(
                train_gpt.train_step, args, env, [model, *parts[1:]], batches, args.lr, sums
            )
            step()  # allocations (and cuBLAS heuristics) happen in the first step
            times[loss], mib = clock(device, step, steps)
            bench.add(
                "train",
                f"{preset} {loss} {device.type} {precision} b{batch}",
                batch * tokens / times[loss],
                "tokens/s",
                bench.peak(device)["flops"] * batch * tokens / flops,
                s_per_step=times[loss],
                peak_mib=mib,
                model=preset,
                batch=batch,
            )
        ratio = times["ours"] / times["full-logits"]
        bench.add(
            "train", f"{preset} {device.type} ours/full-logits", ratio, "x time", model=preset
        )
        del parts, model, step
        free_memory()
    if bench.device.type == "cuda":
        bench.notes.append(
            "FSDP throughput is not measured by run_all (one process); the GPU tests run "
            "train_gpt.py --fsdp under torchrun on one GPU"
        )


def tokenizer_section(bench):
    """train_vq's Trainer.train_step: reconstruction, LPIPS (random VGG: the same cost, nothing
    downloaded), codebook losses and the PatchGAN from step 0, in the trainer's precision."""
    preset, size, batch, steps = bench.plan["tokenizer"]
    argv = ["--data-path", "-", "--model", preset, "--image-size", str(size)]
    argv += ["--global-batch-size", str(batch), "--perceptual-weight", "0", "--disc-start", "0"]
    args = train_vq.parse_args(argv)
    trainer = train_vq.Trainer(args, bench.env, None)
    trainer.lpips = train_vq.LPIPS(pretrained=False).to(bench.device)
    args.perceptual_weight = 1.0  # the recipe's weight, now that LPIPS is there
    images = torch.rand(batch, 3, size, size) * 2 - 1  # (B, 3, S, S) in [-1, 1]
    labels = torch.zeros(batch, dtype=torch.long)  # >= 0: every image readable
    step = lambda: trainer.train_step(images, labels, 1)
    step()
    seconds, mib = clock(bench.device, step, steps)
    name = f"{preset} train step {size}px b{batch} {bench.env.precision}"
    bench.add("tokenizer", name, batch / seconds, "images/s", peak_mib=mib)


@torch.inference_mode()
def extract_section(bench):
    """The encoder pass of `data.py extract`: two crops per image, fp32, eval."""
    preset, size, batch, steps = bench.plan["extract"]
    model = vq.VQModel(vq.VQConfig.from_name(preset)).to(bench.device).eval()
    crops = torch.rand(2 * batch, 3, size, size, device=bench.device) * 2 - 1
    model.encode(crops)
    seconds, _ = clock(bench.device, lambda: model.encode(crops), steps)
    bench.add("extract", f"{preset} encode {size}px, 2 crops", batch / seconds, "images/s")


def fid_section(bench):
    """fid.extract on uint8 batches (host to device included, and the statistics of the set),
    both modes, fp32 convolutions as fid.main sets them; then one Frechet distance (two
    eigendecompositions in float64)."""
    batch, size, steps, dim = bench.plan["fid"]
    model = fid.load_inception("random").to(bench.device)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)  # NHWC, as arr_0
    torch.backends.cudnn.allow_tf32 = False
    # fewer images than feature dimensions: fid warns that such an FID is biased; no FID here
    warnings.filterwarnings("ignore", "only .* images for")
    for mode in fid.MODES:
        opts = SimpleNamespace(device=bench.device, mode=mode)
        run = lambda n: fid.extract(model, batch * n, iter([images] * n), opts, "bench")
        run(1)  # cuDNN picks its algorithms
        seconds, _ = clock(bench.device, lambda: run(steps))
        bench.add("fid", f"Inception features {mode} {size}px", batch * steps / seconds, "images/s")
    torch.backends.cudnn.allow_tf32 = True  # common.setup's
    rng = np.random.default_rng(0)
    features = [rng.standard_normal((2 * dim, dim)).astype(np.float32) for _ in range(2)]
    stats = [fid.compute_statistics(f) for f in features]
    seconds, _ = clock(torch.device("cpu"), lambda: fid.frechet_distance(*stats[0], *stats[1]))
    bench.add("fid", f"Frechet distance {dim}-dim float64", seconds, "s")


def gpu_tests(bench):
    """The tests that skip without CUDA (compiled decode = eager tokens, bf16, FSDP)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-k", "gpu or cuda", "tests"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    passed = re.search(r"(\d+) passed", summary)
    bench.add("tests", "GPU-only tests", int(passed[1]) if passed else 0, "passed", summary=summary)
    if result.returncode not in (0, 5):  # 5: nothing collected
        print(result.stdout[-5000:] + result.stderr[-2000:])
        raise RuntimeError(f"GPU tests failed: {summary}")


SECTIONS = dict(
    train=train_section,
    tokenizer=tokenizer_section,
    extract=extract_section,
    fid=fid_section,
    jacobi=jacobi_section,
    sample=sample_section,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="every speed and memory figure of the project: one table, and JSON",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU, under a minute")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument(
        "--only", nargs="+", choices=list(SECTIONS), help="run only these sections (None: all)"
    )
    p.add_argument("--batch", type=int, default=8, help="images per sampling call (x2 with CFG)")
    p.add_argument(
        "--jacobi-ckpt", help="a train_gpt.py checkpoint: Jacobi windows on it (only, by default)"
    )
    p.add_argument("--seeds", type=int, default=1, help="jacobi: calls per window, seeds 0, 1, ...")
    p.add_argument("--cfg-scale", type=float, default=CFG_SCALE, help="jacobi: guidance scale")
    p.add_argument("--gpu-tests", action="store_true", help="first run the GPU-only tests")
    p.add_argument(
        "--budget",
        type=float,
        help="seconds after which no run starts (None: 360 on a GPU, no limit on a CPU)",
    )
    args = p.parse_args(argv)
    if args.batch < 1 or args.seeds < 1:
        p.error("--batch and --seeds must be at least 1")
    args.only = args.only or (["jacobi"] if args.jacobi_ckpt else list(SECTIONS))
    return args


def main(args):
    bench = Bench(args)
    print(f"torch {torch.__version__}, {bench.env}, quick={args.quick}", flush=True)
    print(f"{'section':<9} {'figure':<34} {'value':>9} {'unit':<8} {'floor':>9} {'of it':>6}")
    steps = ([gpu_tests] if args.gpu_tests else []) + [SECTIONS[s] for s in args.only]
    for section in steps:
        try:
            section(bench)
        except (common.UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # a broken section must not cost the others' figures
            traceback.print_exc()
            bench.add(section.__name__, "error", None, "", error=f"{type(e).__name__}: {e}"[:300])
    seconds = time.perf_counter() - bench.start
    for note in bench.notes:
        print("note:", note)
    print(f"{len(bench.rows)} figures in {seconds:.0f} s")
    bench.save()
    return 1 if any(row["name"] == "error" for row in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(common.cli(main, parse_args))
