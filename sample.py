"""Draw images from a LlamaGen GPT + VQ tokenizer: a PNG grid, or an .npz batch for FID.

    python sample.py                                    # released GPT-B 256 + VQ-16, 8 demo classes
    python sample.py --labels "golden retriever" 88 --cfg-scale 4 --seed 1 --out dogs.png
    python sample.py --model XL --image-size 384        # any released c2i_{B,L,XL,XXL,3B}_{256,384}
    python sample.py --gpt-ckpt results/001-GPT-tiny/checkpoints/last.pt \\
        --vq-ckpt results/000-VQ-tiny/checkpoints/last.pt
    torchrun --standalone --nproc_per_node=8 sample.py --model XL --image-size 384 \\
        --num-samples 50000 --compile
    python sample.py --prompt "a photo of a cat on a red sofa" "a watercolor lighthouse"
    python sample.py --image-size 512 --prompt-file prompts.txt --seed 1   # t2i_XL_stage2_512.pt

Follows the official `sample_c2i.py` (grid), `sample_c2i_ddp.py` (FID .npz) and `sample_t2i.py`.
Released files come from the Hugging Face repos FoundationVision/LlamaGen (class-conditional) and
peizesun/llamagen_t2i (text-to-image) into $LLAMAGEN_CACHE (default ~/.cache/llamagen; $HF_ENDPOINT
picks a mirror), verified against the hub's sha256. A grid uses the demo settings (cfg 4.0, top-k
2000); --num-samples uses the FID settings (the model's cfg from the paper, top-k 0), class-balanced
labels, images resized to 256 (--resize-filter antialias, or official = bicubic without antialias),
and resumable per-batch shards. Text-to-image: --prompt / --prompt-file go through google/flan-t5-xl
(the optional transformers package, see text.py), or --caption-features gives precomputed T5
features; the defaults are the official cfg 7.5, top-k 1000.

The image size has one source per case: a released file's row of RELEASED, our checkpoint's own
config (block_size x the tokenizer's downsampling), or --image-size (default 256) for an official
file on disk, which does not record it.
"""

import argparse
import functools
import json
import shutil
import sys
from dataclasses import asdict
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

# Released weights: kind -> (Hugging Face repo, the VQ-16 tokenizer of its GPTs,
# {(preset, image size): GPT file}); the first row of a kind is its default
RELEASED = {
    "c2i": (
        "FoundationVision/LlamaGen",
        "vq_ds16_c2i.pt",
        {
            ("GPT-B", 256): "c2i_B_256.pt",
            ("GPT-B", 384): "c2i_B_384.pt",
            ("GPT-L", 256): "c2i_L_256.pt",
            ("GPT-L", 384): "c2i_L_384.pt",
            ("GPT-XL", 384): "c2i_XL_384.pt",
            ("GPT-XXL", 384): "c2i_XXL_384.pt",
            ("GPT-3B", 384): "c2i_3B_384.pt",
        },
    ),
    "t2i": (
        "peizesun/llamagen_t2i",
        "vq_ds16_t2i.pt",
        {("GPT-XL", 256): "t2i_XL_stage1_256.pt", ("GPT-XL", 512): "t2i_XL_stage2_512.pt"},
    ),
}
# classifier-free guidance for FID, per model (official GETTING_STARTED; paper Table 6)
FID_CFG = {"GPT-B": 2.0, "GPT-L": 2.0, "GPT-XL": 1.75, "GPT-XXL": 1.75, "GPT-3B": 1.65}
DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # official sample_c2i.py
CLASS_NAMES = Path(__file__).with_name("imagenet_classes.txt")  # ILSVRC-2012 order, synonyms


def wants_text(args) -> bool:
    return bool(args.prompt or args.prompt_file or args.caption_features)


def fetch(repo: str, filename: str, env) -> Path:
    """A released file, downloaded once: rank 0 first, then the other ranks find it cached."""
    if env.rank == 0:
        common.download(common.hf_url(repo, filename))
    if env.distributed:
        dist.barrier()
    return common.download(common.hf_url(repo, filename))


def load_models(args, env):
    """-> (GPT, tokenizer, image size, name for output files) from --gpt-ckpt (ours or an official
    file) or the released file of --model and --image-size, and --vq-ckpt or the released VQ."""
    kind = "t2i" if wants_text(args) else "c2i"  # prompts pick the text-to-image releases
    repo, vq_file, files = RELEASED[kind]
    if not args.gpt_ckpt:  # the first release of a kind is its default: GPT-B, GPT-XL
        args.model = args.model or next(iter(files))[0]
    key = (args.model, args.image_size or 256)
    gpt_file = args.gpt_ckpt or files.get(key)
    if gpt_file is None:  # before any download
        have = ", ".join(f"{preset} {size}" for preset, size in files)
        raise UserError(
            f"no released {kind} {key[0]} at --image-size {key[1]}; released: {have}; "
            "or pass --gpt-ckpt"
        )
    ckpt = common.load_checkpoint(args.gpt_ckpt or fetch(repo, gpt_file, env))
    ours = isinstance(ckpt.get("config"), dict)  # ours carry their config; official files don't
    if ours and not args.vq_ckpt and ckpt.get("vq_config"):  # trained on which codes?
        if ckpt["vq_config"] != asdict(vq.VQConfig.from_name("VQ-16")):
            raise UserError(
                f"{gpt_file} was trained on codes of its own tokenizer; pass its --vq-ckpt"
            )
        common.print0(f"no --vq-ckpt: {gpt_file} was trained on VQ-16 codes; using {vq_file}")
    tokenizer = data.load_tokenizer(args.vq_ckpt or fetch(repo, vq_file, env), env.device)
    downsample = tokenizer.config.downsample
    try:  # an official file gets its block size from the image size and the tokenizer
        model = gpt.GPT.from_checkpoint(ckpt, None if ours else (key[1] // downsample) ** 2)
    except ValueError as e:  # wrong kind of file, keys or shapes: the loader says which
        raise UserError(f"cannot load the GPT {gpt_file}: {e}") from None
    name, image_size = Path(gpt_file).stem, model.config.grid_size * downsample
    if model.config.model_type != kind:
        raise UserError(
            f"{name} is a {model.config.model_type} GPT: text-to-image takes --prompt, "
            "--prompt-file or --caption-features; class-conditional takes --labels"
        )
    if args.image_size not in (None, image_size):  # ours, or not a multiple of the downsampling
        raise UserError(
            f"--image-size {args.image_size} does not match {gpt_file} ({image_size} px)"
        )
    if model.config.vocab_size != tokenizer.config.codebook_size:
        raise UserError(
            f"GPT vocabulary {model.config.vocab_size} != VQ codebook "
            f"{tokenizer.config.codebook_size}: the GPT was trained on another tokenizer"
        )
    return model, tokenizer, image_size, name


def parse_labels(items, num_classes):
    """Class ids or ImageNet class names ("golden retriever", any synonym) -> list of ids."""
    names = [line.lower().split(", ") for line in CLASS_NAMES.read_text().splitlines()]
    labels = []
    for item in items:
        key = item.strip().lower()
        hits = [i for i, synonyms in enumerate(names) if key in synonyms]
        if key.lstrip("-").isdigit():
            hits = [int(key)]
        elif num_classes != len(names):
            raise UserError(f"class names need a {len(names)}-class ImageNet model: pass ids")
        elif len(hits) != 1:
            near = [f"{i}: {n[0]}" for i, n in enumerate(names) if any(key in s for s in n)][:6]
            what = "is ambiguous" if hits else "is not an ImageNet class name"
            hint = "; ".join(near) or "see imagenet_classes.txt"
            raise UserError(f"--labels {item!r} {what}; pass an id ({hint})")
        labels += hits
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise UserError(f"--labels {bad} out of range: this model has classes 0..{num_classes - 1}")
    return labels


@torch.no_grad()
def draw_images(args, model, tokenizer, env, decode_fn, cond, generator, emb_mask=None):
    """cond: labels (B,) or caption features (B, 120, D) with emb_mask (B, 120) -> images
    (B, 3, S, S) in [-1, 1], S = args.image_size_eval."""
    with env.ctx:
        tokens = gpt.generate(
            model,
            cond,
            args.cfg_scale,
            args.cfg_interval,
            emb_mask,
            decode_fn,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
        )  # (B, block_size)
    images = tokenizer.decode_code(tokens)  # the VQ decodes in fp32, as the official
    size = args.image_size_eval
    if images.shape[-1] != size:
        antialias = args.resize_filter == "antialias"
        images = F.interpolate(images, (size, size), mode="bicubic", antialias=antialias)
    return images


def write_npz(args, draw, classes, env, name, image_size) -> Path:
    """args.num_samples images for FID in one .npz, the ADM evaluator's format: arr_0 uint8
    (N, H, W, 3), arr_1 labels (N,), meta (JSON). Labels are class-balanced (N / K each) in a
    seeded shuffle. Shard i, images [i*B, (i+1)*B), draws from its own seed straight into a
    memmap, then leaves a .done file: a restart (or another GPU count) draws exactly the missing
    shards, and the result does not depend on the number of ranks. Under torchrun across nodes,
    --out must be on a filesystem that all of them share."""
    n, batch, size = args.num_samples, args.batch_size, args.image_size_eval
    tag = f"size{size}-cfg{args.cfg_scale}-topk{args.top_k}-seed{args.seed}-n{n}"
    out = Path(args.out or f"samples/{name}-{tag}.npz")
    if out.exists():
        common.print0(f"{out} already exists; delete it to draw again")
        return out
    # what the images depend on: a restart must match it (--out and --compile do not count)
    meta = {**vars(args), "out": None, "compile": None, "image_size": image_size}
    meta.update(
        precision=env.precision, resize_filter=args.resize_filter if size != image_size else "none"
    )
    labels = np.random.default_rng(args.seed).permutation(np.resize(classes, n))  # (N,)
    num_shards, folder = -(-n // batch), out.with_name(out.stem + "-shards")
    done = [folder / f"{i:05d}.done" for i in range(num_shards)]
    meta_file = folder / "meta.json"
    if env.rank == 0 and not meta_file.exists():  # a fresh start: the image file, then meta.json
        folder.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(folder / "images.npy", "w+", np.uint8, (n, size, size, 3))
        common.write_json(meta, meta_file)
    if env.distributed:
        dist.barrier()
    if json.loads(meta_file.read_text()) != meta:  # every rank checks: a refusal stops them all
        raise UserError(
            f"{folder} holds images drawn with other settings; delete it or change --out"
        )
    images = np.load(folder / "images.npy", mmap_mode="r+")  # (N, S, S, 3)
    todo = [i for i in range(env.rank, num_shards, env.world_size) if not done[i].exists()]
    common.print0(f"{n} images in {num_shards} shards under {folder}; rank 0 has {len(todo)}")
    for i in tqdm(todo, desc="shards", disable=env.rank != 0):
        rows = slice(i * batch, (i + 1) * batch)
        y = torch.from_numpy(labels[rows]).to(env.device)
        gen = torch.Generator(env.device).manual_seed(args.seed * num_shards + i)
        images[rows] = data.to_uint8(draw(y, gen)).numpy()
        images.flush()  # on disk before the shard counts as done
        done[i].touch()
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    if env.rank == 0:  # np.savez streams the memmap in chunks: not all N images in memory
        with common.atomic_write(out) as f:
            np.savez(f, images, labels, meta=np.array(json.dumps(meta)))
        shutil.rmtree(folder)
        print(out)
    return out


def main(args):
    if wants_text(args) and (args.labels is not None or args.num_samples is not None):
        raise UserError(
            "prompts draw a grid: --labels and --num-samples are class-conditional only"
        )
    if not 0 < args.top_p <= 1 or (args.top_k or 0) < 0 or args.temperature < 0:
        raise UserError(
            f"want 0 < --top-p <= 1, --top-k >= 0, --temperature >= 0; got {args.top_p}, "
            f"{args.top_k}, {args.temperature}"
        )
    if (args.cfg_scale or 1) < 1:
        print(f"warning: --cfg-scale {args.cfg_scale} < 1 turns guidance off", file=sys.stderr)
    env = common.setup(args.mixed_precision)
    model, tokenizer, image_size, name = load_models(args, env)
    t2i, fid, K = (
        model.config.model_type == "t2i",
        args.num_samples is not None,
        model.config.num_classes,
    )
    # a grid: strong guidance, top-k 2000 (sample_c2i.py); FID: the paper's cfg per released
    # model (else sample_c2i_ddp.py's 1.5), no top-k; text: sample_t2i.py's cfg 7.5, top-k 1000
    if args.cfg_scale is None:
        fid_cfg = 1.5 if args.gpt_ckpt else FID_CFG[args.model]
        args.cfg_scale = 7.5 if t2i else fid_cfg if fid else 4.0
    if args.top_k is None:
        args.top_k = 1000 if t2i else 0 if fid else 2000
    size = args.image_size_eval = args.image_size_eval or min(
        image_size, 256 if fid else image_size
    )
    # the official casts the whole GPT (h.11); RMSNorm, RoPE and the logits stay fp32 inside
    model.to(env.device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(env.precision))
    decode_fn = None
    if args.compile:  # the script, not the library, decides to compile (gpt-fast generate.py)
        decode_fn = torch.compile(gpt.decode_one_token, mode="reduce-overhead", fullgraph=True)
    draw = functools.partial(draw_images, args, model, tokenizer, env, decode_fn)
    common.print0(
        f"{name}: {image_size}px -> {size}px, cfg {args.cfg_scale}, top-k {args.top_k}, top-p "
        f"{args.top_p}, temperature {args.temperature}, {env.precision} on {env.device}"
    )
    labels = parse_labels(args.labels, K) if args.labels else None
    if fid:
        return write_npz(args, draw, labels or range(K), env, name, image_size)
    if t2i:
        cond, mask = text.caption_condition(args, model.config, env.device)
    else:  # the demo classes of sample_c2i.py, or a small model's first ones; no padding mask
        cond = (
            torch.tensor(labels or (DEMO_LABELS if K == 1000 else range(8)), device=env.device) % K
        )
        mask = torch.zeros_like(cond)  # a c2i GPT ignores emb_mask
    gen = torch.Generator(env.device).manual_seed(args.seed)
    batches = zip(cond.split(args.batch_size), mask.split(args.batch_size))
    images = torch.cat([draw(c, gen, m) for c, m in batches])
    out = args.out or f"samples/{name}-seed{args.seed}.png"
    out = data.save_image_grid(images, out, nrow=min(4, len(cond)))
    print(out)
    return out


def positive(value: str) -> int:
    """argparse type: an int >= 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return int(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="draw images from LlamaGen: a PNG grid or an FID .npz")
    preset = functools.partial(common.preset, gpt.GPT_CONFIGS)
    p.add_argument("--model", type=preset, default=None, help="released GPT: B (default), L, XL...")
    p.add_argument(
        "--image-size", type=positive, help="released 256/384 (t2i 256/512); default 256"
    )
    p.add_argument("--gpt-ckpt", help="local GPT file, ours or official (then no --model)")
    p.add_argument("--vq-ckpt", help="local VQ file; default: the released VQ-16")
    p.add_argument(
        "--labels", nargs="+", help="class ids or ImageNet names (default: demo classes)"
    )
    p.add_argument("--prompt", nargs="+", action="extend", help="text-to-image prompts")
    p.add_argument("--prompt-file", help="text-to-image prompts, one per line")
    p.add_argument("--caption-features", help=".pt/.npz with emb (B, 120, 2048) + mask")
    p.add_argument("--t5-path", help="local google/flan-t5-xl folder (default: HF cache)")
    p.add_argument("--cfg-scale", type=float, help="default 4.0 (grid), the model's FID cfg (.npz)")
    p.add_argument("--cfg-interval", type=float, default=-1, help="guide steps <= this (-1: all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, help="default 2000 (grid), 0 = off (.npz)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=["fp32", "bf16", "fp16"], help="default bf16 (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    p.add_argument("--batch-size", type=positive, default=32, help="images per generate call")
    p.add_argument("--num-samples", type=positive, help="write an FID .npz of this many images")
    p.add_argument("--image-size-eval", type=positive, help="resize to this (default .npz: 256)")
    p.add_argument("--resize-filter", choices=["antialias", "official"], default="antialias")
    p.add_argument("--out", help="output .png (grid) or .npz (with --num-samples)")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.cli(main, parse_args)
