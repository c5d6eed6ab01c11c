"""Draw images from a LlamaGen GPT + VQ tokenizer: a PNG grid, an .npz batch for FID, completions.

    python sample.py                                    # released GPT-B 256 + VQ-16, 8 demo classes
    python sample.py --labels "golden retriever" 88 --cfg-scale 4 --seed 1 --out dogs.png
    python sample.py --model XL --image-size 384        # any released c2i_{B,L,XL,XXL,3B}_{256,384}
    python sample.py --gpt-ckpt results/001-GPT-tiny/checkpoints/last.pt \\
        --vq-ckpt results/000-VQ-tiny/checkpoints/last.pt --nrow 8
    torchrun --standalone --nproc_per_node=8 sample.py --model XL --image-size 384 \\
        --num-samples 50000 --compile
    python sample.py --prompt "a photo of a cat on a red sofa" "a watercolor lighthouse"
    python sample.py --image-size 512 --prompt-file prompts.txt --seed 1   # t2i_XL_stage2_512.pt
    python sample.py --jacobi-window 16                 # same distribution, fewer forward passes
    python sample.py --complete dog.jpg cat.png --keep-rows 6 --labels 207 207 281 281

Follows the official `sample_c2i.py` (grid), `sample_c2i_ddp.py` (FID .npz) and `sample_t2i.py`.
Released files come from the Hugging Face repos FoundationVision/LlamaGen (class-conditional) and
peizesun/llamagen_t2i (text-to-image) into $LLAMAGEN_CACHE (default ~/.cache/llamagen; $HF_ENDPOINT
picks a mirror), verified against the hub's sha256 and loaded once before they enter the cache (an
HTML error page is never cached). A grid uses the demo settings (cfg 4.0, top-k 2000, 4 images per
row as sample_c2i.py; --nrow); --num-samples uses the FID settings (the model's cfg from the paper,
top-k 0), class-balanced labels, images resized to 256 (--resize-filter antialias, or official =
bicubic without antialias), and resumable per-batch shards. Text-to-image: --prompt / --prompt-file
go through google/flan-t5-xl (the optional transformers package, see text.py), or
--caption-features gives precomputed T5 features; the defaults are the official cfg 7.5, top-k 1000.

--jacobi-window W > 0 samples with speculative Jacobi decoding (gpt.generate; Teng et al. 2024,
arXiv 2410.01699): exactly the distribution of ordinary sampling, in fewer sequential forward
passes; the run prints the passes each image took (W = 0: one per token).

--complete shows what raster-order generation means: each image is centre-cropped to the GPT's size
and encoded by the tokenizer; its first --keep-rows token rows are kept as a prefix and the GPT
writes the rest, once per label (or prompt). The grid has one row per image: the original, the kept
rows (decoded, the rest grey), then the completions.

The image size has one source per case: a released file's row of RELEASED, our checkpoint's own
config (block_size x the tokenizer's downsampling), or --image-size (default 256) for an official
file on disk, which does not record it. A GPT checkpoint of ours records the sha256 of the tokenizer
file its codes were made with: another tokenizer is refused (--any-tokenizer skips the check), as
its codes would mean other things to the GPT and the samples would be noise.

Everything that can be checked is checked before any download or sampling: conflicting flags, --out
of the kind the run writes (a .png grid, an .npz with --num-samples) in a writable folder, the
pictures to complete.

For a web page (demo.py) the steps are plain functions: `load_models(args)` once, then
`draw_grid(args, model, tokenizer, info, pictures)` per request, where `args` is a parse_args
namespace whose labels, prompts and settings may change between calls.
"""

import argparse
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import gpt
import text
import vq
from common import UserError

# Released weights: kind -> (Hugging Face repo, the VQ-16 tokenizer of its GPTs, the default
# preset, {"preset image-size": GPT file})
RELEASED = {
    "c2i": (
        "FoundationVision/LlamaGen",
        "vq_ds16_c2i.pt",
        "GPT-B",
        {
            "GPT-B 256": "c2i_B_256.pt",
            "GPT-B 384": "c2i_B_384.pt",
            "GPT-L 256": "c2i_L_256.pt",
            "GPT-L 384": "c2i_L_384.pt",
            "GPT-XL 384": "c2i_XL_384.pt",
            "GPT-XXL 384": "c2i_XXL_384.pt",
            "GPT-3B 384": "c2i_3B_384.pt",
        },
    ),
    "t2i": (
        "peizesun/llamagen_t2i",
        "vq_ds16_t2i.pt",
        "GPT-XL",
        {"GPT-XL 256": "t2i_XL_stage1_256.pt", "GPT-XL 512": "t2i_XL_stage2_512.pt"},
    ),
}
# classifier-free guidance for FID, per model (official GETTING_STARTED; paper Table 6); own
# checkpoints get sample_c2i_ddp.py's default 1.5
FID_CFG = {"GPT-B": 2.0, "GPT-L": 2.0, "GPT-XL": 1.75, "GPT-XXL": 1.75, "GPT-3B": 1.65}
DEMO_LABELS = "207 360 387 974 88 979 417 279".split()  # official sample_c2i.py
CLASS_NAMES = Path(__file__).with_name("imagenet_classes.txt")  # ILSVRC-2012 order, synonyms


def wants_text(args):
    return args.prompt or args.prompt_file or args.caption_features


def fetch(repo, filename, env):
    """A released file, downloaded once: rank 0 first, then the other ranks find it cached. It
    must load as a checkpoint before it enters the cache (a mirror's HTML page would not)."""
    url = common.hf_url(repo, filename)
    if env.rank == 0:
        common.download(url, check=common.load_checkpoint)
    if env.distributed:
        dist.barrier()
    return common.download(url)


def load_models(args):
    """sample.py's flags (a parse_args namespace) -> (GPT, tokenizer, info), the GPT on its device
    and precision: --gpt-ckpt (ours or an official file) or the released file of --model and
    --image-size, and --vq-ckpt or the released VQ. Fills in the defaults that depend on the model
    (cfg_scale, top_k, image_size_eval). info: env (common.Env), name (the GPT file's stem, for
    output names), image_size (the GPT's own, in pixels), decode_fn (the compiled decode step
    with --compile, else None) and passes (forward passes of each gpt.generate call)."""
    env = common.setup(args.mixed_precision)
    kind = "t2i" if wants_text(args) else "c2i"  # prompts pick the text-to-image releases
    repo, vq_file, default, files = RELEASED[kind]
    if not args.gpt_ckpt:  # own checkpoints have no preset name
        args.model = args.model or default
    size = args.image_size or 256
    gpt_file = args.gpt_ckpt or files.get(f"{args.model} {size}")
    if not gpt_file:  # before any download
        raise UserError(
            f"no released {kind} {args.model} {size}; released: {', '.join(files)}; "
            "or pass --gpt-ckpt"
        )
    ckpt = common.load_checkpoint(args.gpt_ckpt or fetch(repo, gpt_file, env))
    # trained on the codes of which tokenizer? The config of ours says so before any download
    # (official files carry none); VQConfig() is VQ-16, the released tokenizer
    if not args.vq_ckpt and ckpt.get("vq_config") not in (None, vars(vq.VQConfig())):
        raise UserError(f"{gpt_file} was trained on codes of its own tokenizer; pass its --vq-ckpt")
    vq_path = args.vq_ckpt or fetch(repo, vq_file, env)
    tokenizer = data.load_tokenizer(vq_path, env.device)
    downsample = tokenizer.config.downsample
    try:  # an official file gets its block size from the image size and the tokenizer (ours
        # carry their config, and the loader ignores it)
        model = gpt.GPT.from_checkpoint(ckpt, (size // downsample) ** 2)
    except ValueError as e:  # wrong kind of file, keys or shapes: the loader says which
        raise UserError(f"cannot load the GPT {gpt_file}: {e}") from None
    c, name = model.config, Path(gpt_file).stem
    image_size = c.grid_size * downsample
    if c.model_type != kind:
        raise UserError(
            f"{name} is a {c.model_type} GPT: text-to-image takes --prompt, --prompt-file or "
            "--caption-features; class-conditional takes --labels"
        )
    if args.image_size not in (None, image_size):  # ours, or not a multiple of the downsampling
        raise UserError(f"--image-size {args.image_size} does not match {gpt_file} ({image_size})")
    # the sha256 of the tokenizer file (in checkpoints of train_gpt.py since issue 13) is sure
    # to tell; another vocabulary size cannot be sampled at all, whatever the flags
    made_with = not args.any_tokenizer and ckpt.get("tokenizer_sha256")  # else no hashing
    if c.vocab_size != tokenizer.config.codebook_size or (
        made_with and made_with != common.file_digest(vq_path)
    ):
        raise UserError(
            f"{name} was trained on the codes of another tokenizer than {vq_path}; pass its "
            "--vq-ckpt (--any-tokenizer skips the sha256 check)"
        )
    # a grid: strong guidance, top-k 2000 (sample_c2i.py); FID: the paper's cfg per released
    # model, no top-k, 256 px for the ADM evaluator; text: sample_t2i.py's cfg 7.5, top-k 1000
    t2i, fid = kind == "t2i", args.num_samples is not None
    defaults = dict(
        cfg_scale=7.5 if t2i else FID_CFG.get(args.model, 1.5) if fid else 4.0,
        top_k=1000 if t2i else 0 if fid else 2000,
        image_size_eval=min(image_size, 256) if fid else image_size,
    )
    vars(args).update({k: v for k, v in defaults.items() if vars(args)[k] is None})
    args.image_size, args.mixed_precision = image_size, env.precision  # as resolved
    # the official casts the whole GPT (h.11) to the autocast dtype; RMSNorm, RoPE and the
    # logits stay fp32 inside
    model.to(env.device, getattr(env.ctx, "fast_dtype", None))
    common.print0(
        f"{name}: {image_size}px -> {args.image_size_eval}px, cfg {args.cfg_scale}, top-k "
        f"{args.top_k}, top-p {args.top_p}, temperature {args.temperature}, Jacobi window "
        f"{args.jacobi_window}; {env}"
    )
    info = argparse.Namespace(env=env, name=name, image_size=image_size, passes=[], decode_fn=None)
    if args.compile:  # the script, not the library, decides to compile (gpt-fast generate.py)
        info.decode_fn = torch.compile(gpt.decode_one_token, mode="reduce-overhead", fullgraph=True)
    return model, tokenizer, info


def parse_labels(items, num_classes):
    """Class ids or ImageNet class names ("golden retriever", any synonym) -> list of ids."""
    names = [line.split(", ") for line in CLASS_NAMES.read_text().lower().splitlines()]
    labels = []
    for item in items:
        key = item.lower()
        hits = [int(key)] if key.isdigit() else [i for i, n in enumerate(names) if key in n]
        if len(hits) != 1 or hits[0] >= num_classes:  # no class, several, or not this model's
            near = [f"{i}: {n[0]}" for i, n in enumerate(names) if any(key in s for s in n)][:6]
            raise UserError(
                f"--labels {item!r} is not one class of this model (ids 0..{num_classes - 1}"
                f"; ImageNet names: {'; '.join(near) or 'see imagenet_classes.txt'})"
            )
        labels += hits
    return labels


@torch.no_grad()
def draw(args, model, tokenizer, info, generator, cond, mask=None, prefix=None):
    """One gpt.generate call: cond = labels (B,) or caption features (B, 120, D) with their mask
    (B, 120); prefix (B, K) image tokens to keep -> images (B, 3, S, S) in [-1, 1], S the GPT's
    own size. Adds the call's forward passes to info.passes."""
    stats = {}
    with info.env.ctx:
        tokens = gpt.generate(
            model,
            cond,
            args.cfg_scale,
            args.cfg_interval,
            mask,
            info.decode_fn,
            args.jacobi_window,
            prefix,
            stats,
            generator,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
        )  # (B, block_size)
    info.passes.append(stats["forward_passes"])
    return tokenizer.decode_code(tokens)  # the VQ decodes in fp32, as the official


def resize(args, images):
    """(B, 3, S, S) -> (B, 3, E, E), E = --image-size-eval: bicubic, antialiased or as the
    official (without); the identity when E = S."""
    size = (args.image_size_eval,) * 2
    return F.interpolate(images, size, mode="bicubic", antialias=args.resize_filter == "antialias")


@torch.no_grad()
def draw_grid(args, model, tokenizer, info, pictures=()):
    """The images of a grid -> (images (N, 3, S, S) in [-1, 1] at the GPT's size, images per row).
    One image per --labels entry (default: the demo classes) or prompt, in batches of
    --batch-size from --seed. With pictures (PIL images): per picture a row of the picture, its
    first --keep-rows token rows (decoded, the rest grey), and one completion per label/prompt."""
    c, device, g = model.config, info.env.device, model.config.grid_size
    if wants_text(args):
        cond, mask = text.caption_condition(args, c, device)
    else:  # the demo classes of sample_c2i.py, or a small model's first ones
        n = c.num_classes
        ids = parse_labels(args.labels or DEMO_LABELS, n) if args.labels or n == 1000 else range(8)
        cond = mask = torch.tensor(ids, device=device) % n  # a c2i GPT ignores the mask
    codes = cond.new_zeros(1, 0, 0)  # (P, K, g) kept tokens: none
    if pictures:
        if args.keep_rows >= g:
            raise UserError(f"--keep-rows must be below {g}, the GPT's token rows")
        originals = torch.stack(
            [data.pil_to_tensor(data.center_crop_arr(p, info.image_size)) for p in pictures]
        ).to(device)  # (P, 3, S, S)
        codes = tokenizer.encode(originals)[-1].view(-1, g, g)[:, : args.keep_rows]  # raster
    # every condition with every picture, condition-major: (B * P, ...)
    count, n = len(codes), len(cond)
    parts = cond.repeat_interleave(count, 0), mask.repeat_interleave(count, 0)
    batches = zip(*(x.split(args.batch_size) for x in (*parts, codes.flatten(1).repeat(n, 1))))
    generator = torch.Generator(device).manual_seed(args.seed)
    images = torch.cat([draw(args, model, tokenizer, info, generator, *b) for b in batches])
    if not pictures:
        return images, min(args.nrow, n)
    kept = tokenizer.decode_code(codes)  # (P, 3, K * ds, S), then grey (0) below
    kept = F.pad(kept, (0, 0, 0, info.image_size - kept.shape[2]))
    # rows: originals, kept parts, one row per condition; transposed, a row per picture
    grid = torch.cat([originals, kept, images]).unflatten(0, (-1, count)).transpose(0, 1)
    return grid.flatten(0, 1), n + 2


def write_npz(args, model, tokenizer, info, out):
    """args.num_samples images for FID in one .npz, the ADM evaluator's format: arr_0 uint8
    (N, H, W, 3), arr_1 labels (N,), meta (JSON). Labels are class-balanced (N / K each) in a
    seeded shuffle. Shard i, images [i*B, (i+1)*B), draws from its own seed straight into a
    memmap, then leaves a .done file: a restart (or another GPU count) draws exactly the missing
    shards, and the result does not depend on the number of ranks; the shard folder goes once
    merged. Under torchrun across nodes, --out must be on a filesystem that all of them share."""
    n, batch, size, env = args.num_samples, args.batch_size, args.image_size_eval, info.env
    if out.exists():
        return common.print0(f"{out} already exists; delete it to draw again")
    # what the images depend on: a restart must match it (--out and --compile do not count); the
    # GPT's own config, not the --model flag, says which model drew them
    meta = {**vars(args), "out": None, "compile": None, "model": vars(model.config)}
    meta["resize_filter"] = args.resize_filter if size != info.image_size else "none"
    k = model.config.num_classes
    classes = parse_labels(args.labels, k) if args.labels else range(k)
    labels = np.random.default_rng(args.seed).permutation(np.resize(classes, n))  # (N,)
    shards, folder = -(-n // batch), out.with_name(f"{out.stem}-shards")
    if env.rank == 0 and not (folder / "meta.json").exists():  # a fresh start: images, then meta
        folder.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(folder / "images.npy", "w+", np.uint8, (n, size, size, 3))
        common.write_json(meta, folder / "meta.json")
    if env.distributed:
        dist.barrier()
    # every rank checks: a refusal stops them all
    if json.loads((folder / "meta.json").read_text()) != meta:
        raise UserError(
            f"{folder} holds images drawn with other settings; delete it or change --out"
        )
    images = np.load(folder / "images.npy", mmap_mode="r+")  # (N, S, S, 3)
    todo = [
        i
        for i in range(env.rank, shards, env.world_size)
        if not (folder / f"{i:05d}.done").exists()
    ]
    for i in tqdm(todo, desc=f"{len(todo)} shards of {folder}", disable=env.rank != 0):
        rows = slice(i * batch, (i + 1) * batch)
        gen = torch.Generator(env.device).manual_seed(args.seed * shards + i)
        y = torch.tensor(labels[rows], device=env.device)
        images[rows] = data.to_uint8(resize(args, draw(args, model, tokenizer, info, gen, y)))
        images.flush()  # on disk before the shard counts as done
        (folder / f"{i:05d}.done").touch()
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    if env.rank == 0:  # np.savez streams the memmap in chunks: not all N images in memory
        with common.atomic_write(out) as f:
            np.savez(f, images, labels, meta=np.array(json.dumps(meta)))
        shutil.rmtree(folder)  # merged: the shards are no longer needed


def main(args):
    fid, kind = args.num_samples is not None, ".npz" if args.num_samples else ".png"
    if wants_text(args) and args.labels or fid and (wants_text(args) or args.complete):
        raise UserError(
            "prompts take no --labels, and --num-samples (class-conditional, for FID) takes no "
            "prompts and no --complete"
        )
    if (args.cfg_scale or 1) < 1:
        print(f"warning: --cfg-scale {args.cfg_scale} < 1 turns guidance off", file=sys.stderr)
    # before any download or sampling: --out is of the kind this run writes (a grid is a .png,
    # --num-samples writes an .npz), in a folder it can write to
    out = Path(args.out or f"samples/x{kind}")
    if out.suffix != kind:
        raise UserError(f"--out {out}: a grid is a .png, --num-samples writes an .npz")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()  # a file there, removed on close
    except OSError as e:
        raise UserError(f"cannot write to {out.parent} ({e.strerror})") from None
    pictures = [data.load_image(path) for path in args.complete or []]
    model, tokenizer, info = load_models(args)
    settings = f"size{args.image_size_eval}-cfg{args.cfg_scale}-topk{args.top_k}"
    tag = f"{settings}-seed{args.seed}-n{args.num_samples}" if fid else f"seed{args.seed}"
    out = Path(args.out or f"samples/{info.name}-{tag}{kind}")
    if fid:
        write_npz(args, model, tokenizer, info, out)
    else:
        images, nrow = draw_grid(args, model, tokenizer, info, pictures)
        data.save_image_grid(resize(args, images), out, nrow)
    # sequential forward passes per image: block_size without a Jacobi window (none drawn when
    # the .npz was there)
    common.print0(out, f"({np.mean(info.passes or [0]):g} forward passes per image)")
    return out


def number(cast, low, high=float("inf")):
    """argparse type: a `cast` number in [low, high] (an error says which range); a ValueError
    becomes argparse's "invalid parse value"."""

    def parse(text):
        if not low <= cast(text) <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return cast(text)

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="draw images from LlamaGen: a PNG grid, an FID .npz or image completions",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    positive, count = number(int, 1), number(int, 0)

    def add(flag, kind=None, default=None, text=None, **kwargs):  # type, default, help
        p.add_argument(flag, type=kind, default=default, help=text, **kwargs)

    add(
        "--model",
        functools.partial(common.preset, gpt.GPT_CONFIGS),
        None,
        "released preset: B, L, XL... (else B; t2i XL)",
    )
    add("--image-size", positive, None, "released 256/384 (t2i 256/512); else 256")
    add("--gpt-ckpt", text="local GPT file, ours or official (then no --model)")
    add("--vq-ckpt", text="local VQ file; default: the released VQ-16")
    p.add_argument("--any-tokenizer", action="store_true", help="skip the tokenizer sha256 check")
    add("--labels", text="class ids or ImageNet names (else demo classes)", nargs="+")
    add("--prompt", text="text-to-image prompts", nargs="+", action="extend")
    add("--prompt-file", text="text-to-image prompts, one per line")
    add("--caption-features", text=".pt/.npz with emb (B, 120, 2048) + mask")
    add("--t5-path", text="local google/flan-t5-xl folder (default: HF cache)")
    add("--cfg-scale", float, None, "else 4.0 (grid), 7.5 (t2i), the model's FID cfg (.npz)")
    add("--cfg-interval", float, -1, "guide steps <= this (-1: all)")
    add("--temperature", number(float, 0), 1.0, "softmax temperature")
    add("--top-k", count, None, "else 2000 (grid), 1000 (t2i), 0 = off (.npz)")
    add("--top-p", number(float, 0, 1), 1.0, "nucleus sampling (1: off)")
    add("--jacobi-window", count, 0, "draft tokens per forward pass (0: off)")
    add("--seed", int, 0, "the same seed draws the same images")
    add("--mixed-precision", text="else bf16 (GPU), fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    add("--batch-size", positive, 32, "images per generate call")
    add("--nrow", positive, 4, "images per grid row")
    add("--complete", text="images whose top rows the GPT completes", nargs="+")
    add("--keep-rows", positive, 8, "token rows that --complete keeps")
    add("--num-samples", positive, None, "write an FID .npz of this many images")
    add("--image-size-eval", positive, None, "resize to this (else .npz: 256)")
    add("--resize-filter", None, "antialias", "bicubic", choices=["antialias", "official"])
    add("--out", text="output .png (a grid) or .npz (with --num-samples)")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.cli(main, parse_args)
