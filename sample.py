"""Sample ImageNet classes from a LlamaGen GPT + VQ tokenizer: a PNG grid, or an .npz batch for FID.

    python sample.py                                       # released GPT-B 256 + VQ-16, 8 demo classes
    python sample.py --labels "golden retriever" 88 --cfg-scale 4 --seed 1 --out dogs.png
    python sample.py --model XL --image-size 384           # any released c2i_{B,L,XL,XXL,3B}_{256,384}.pt
    python sample.py --gpt-ckpt results/001-GPT-tiny/checkpoints/last.pt --vq-ckpt results/000-VQ-tiny/checkpoints/last.pt
    torchrun --standalone --nproc_per_node=8 sample.py --model XL --image-size 384 --num-samples 50000 --compile
    python sample.py --prompt "a photo of a cat on a red sofa" "a watercolor lighthouse"   # t2i_XL_stage1_256.pt
    python sample.py --image-size 512 --prompt-file prompts.txt --seed 1                    # t2i_XL_stage2_512.pt

Follows the official `sample_c2i.py` (grid) and `sample_c2i_ddp.py` (FID .npz). Released files come from
the Hugging Face repo FoundationVision/LlamaGen into $LLAMAGEN_CACHE (default ~/.cache/llamagen; $HF_ENDPOINT
picks a mirror). Defaults: a grid uses the demo settings (cfg 4.0, top-k 2000); --num-samples uses the
FID settings (the model's recommended cfg, top-k 0), class-balanced labels, images resized to 256
(--resize-filter antialias, or official = bicubic without antialias), and writes resumable per-batch shards.
Text-to-image (official sample_t2i.py): --prompt/--prompt-file go through google/flan-t5-xl (the optional
transformers package, see text.py), or --caption-features gives precomputed T5 features; the released files
come from peizesun/llamagen_t2i with vq_ds16_t2i.pt, and the defaults are cfg 7.5, top-k 1000.
"""

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import gpt
import text
import vq

HF_REPO = "FoundationVision/LlamaGen"
RELEASED_GPT = {
    "GPT-B": {256: "c2i_B_256.pt", 384: "c2i_B_384.pt"},  # preset -> {image size: file}
    "GPT-L": {256: "c2i_L_256.pt", 384: "c2i_L_384.pt"},
    "GPT-XL": {384: "c2i_XL_384.pt"},
    "GPT-XXL": {384: "c2i_XXL_384.pt"},
    "GPT-3B": {384: "c2i_3B_384.pt"},
}
RELEASED_VQ = "vq_ds16_c2i.pt"  # VQ-16, the tokenizer of every released c2i GPT
T2I_REPO, T2I_VQ = (
    "peizesun/llamagen_t2i",
    "vq_ds16_t2i.pt",
)  # text-to-image: GPT-XL only, own VQ-16
RELEASED_T2I = {"GPT-XL": {256: "t2i_XL_stage1_256.pt", 512: "t2i_XL_stage2_512.pt"}}
FID_CFG = {
    "GPT-B": 2.0,
    "GPT-L": 2.0,
    "GPT-XL": 1.75,
    "GPT-XXL": 1.75,
    "GPT-3B": 1.65,
}  # GETTING_STARTED
DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # official sample_c2i.py
CLASS_NAMES = Path(__file__).with_name(
    "imagenet_classes.txt"
)  # ILSVRC-2012 order, synonyms per line


def fetch(filename: str, rank: int, repo: str = HF_REPO) -> Path:
    """Download a released file once: rank 0 first, then the other ranks find it in the cache."""
    if rank == 0:
        data.download(data.hf_url(repo, filename))
    if dist.is_initialized():
        dist.barrier()
    return data.download(data.hf_url(repo, filename))


def wants_text(args) -> bool:
    return bool(args.prompt or args.prompt_file or args.caption_features)


def load_models(args, rank):
    """-> (gpt, vq, image size, tag) from local files (official or ours) or the released ones."""
    own = data.load_checkpoint(args.gpt_ckpt) if args.gpt_ckpt else None
    t2i = wants_text(args)  # prompts pick the released text-to-image files
    released, repo, released_vq = (
        (RELEASED_T2I, T2I_REPO, T2I_VQ) if t2i else (RELEASED_GPT, HF_REPO, RELEASED_VQ)
    )
    if own is None:
        name = (
            "GPT-XL"
            if t2i
            else next((m for m in (args.model, f"GPT-{args.model}") if m in released), None)
        )
        if name is None or (args.image_size or 256) not in released[name]:
            have = ", ".join(f"{m[4:]} {s}" for m in released for s in released[m])
            raise data.UserError(
                f"no released GPT {args.model} at --image-size {args.image_size or 256}; "
                f"released (--model --image-size): {have}; or pass --gpt-ckpt"
            )
    vq_ckpt = args.vq_ckpt
    if vq_ckpt is None and isinstance(
        (own or {}).get("vq_config"), dict
    ):  # ours, trained on which codes?
        arch = (
            "codebook_size",
            "codebook_embed_dim",
            "encoder_ch_mult",
            "decoder_ch_mult",
            "z_channels",
            "ch",
        )
        if any(own["vq_config"].get(k) != getattr(vq.VQConfig.from_name("VQ-16"), k) for k in arch):
            raise data.UserError(
                f"{args.gpt_ckpt} was trained on codes of its own VQ tokenizer; pass its --vq-ckpt"
            )
        data.print0(
            f"no --vq-ckpt: assuming {args.gpt_ckpt} was trained on codes of the released {released_vq}"
        )
    try:
        tokenizer = vq.VQModel.from_checkpoint(
            data.load_checkpoint(vq_ckpt or fetch(released_vq, rank, repo))
        )
        ds = tokenizer.config.downsample
        if own is None:
            image_size, gpt_file = args.image_size or 256, released[name][args.image_size or 256]
            ckpt = data.load_checkpoint(fetch(gpt_file, rank, repo))
            model = gpt.GPT.from_checkpoint(ckpt, block_size=(image_size // ds) ** 2)
        elif isinstance(own.get("config"), dict):  # ours: the file knows its sizes
            model, gpt_file = gpt.GPT.from_checkpoint(own), args.gpt_ckpt
            image_size = model.config.grid_size * ds
        else:  # an official file on disk: the image size is in its name (c2i_L_384.pt) or given by a flag
            m, gpt_file = re.search(r"_(\d{3,4})\.\w+$", args.gpt_ckpt), args.gpt_ckpt
            image_size = args.image_size or (int(m.group(1)) if m else None)
            if image_size is None:
                raise data.UserError(
                    f"cannot tell the image size of {args.gpt_ckpt}; pass --image-size"
                )
            model = gpt.GPT.from_checkpoint(own, block_size=(image_size // ds) ** 2)
    except ValueError as e:  # wrong kind of file, keys or shapes: the loaders say which
        raise data.UserError(str(e)) from None
    if args.image_size and args.image_size != image_size:
        raise data.UserError(
            f"--image-size {args.image_size} does not match {args.gpt_ckpt} ({image_size} px)"
        )
    if model.config.vocab_size != tokenizer.config.codebook_size:
        raise data.UserError(
            f"GPT vocabulary {model.config.vocab_size} != VQ codebook "
            f"{tokenizer.config.codebook_size}: the GPT was trained on another tokenizer"
        )
    return model, tokenizer, image_size, Path(gpt_file).stem


def parse_labels(items, num_classes):
    """Class ids or ImageNet class names ("golden retriever", any synonym) -> list of ids."""
    names = [
        [s.strip().lower() for s in line.split(",")]
        for line in CLASS_NAMES.read_text().splitlines()
    ]
    labels = []
    for item in items:
        if re.fullmatch(r"-?\d+", item.strip()):
            labels.append(int(item))
            continue
        hits = [i for i, syn in enumerate(names) if item.strip().lower() in syn]
        if num_classes != len(names):
            raise data.UserError(
                f"class names need a {len(names)}-class ImageNet model; pass ids < {num_classes}"
            )
        if len(hits) != 1:
            near = [
                f"{i}: {n[0]}" for i, n in enumerate(names) if any(item.lower() in s for s in n)
            ][:6]
            what = "is ambiguous" if hits else "is not an ImageNet class name"
            hint = "; ".join(near) or "see imagenet_classes.txt"
            raise data.UserError(f"--labels {item!r} {what}; pass an id ({hint})")
        labels += hits
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise data.UserError(
            f"--labels {bad} out of range: this model has classes 0..{num_classes - 1}"
        )
    return labels


@torch.no_grad()
def sample_images(args, model, tokenizer, cond, size, generator, ctx, emb_mask=None):
    """cond: labels (B,) or caption features (B, T, D) + emb_mask -> images (B, 3, size, size) in [-1, 1]."""
    with ctx:
        idx = gpt.generate(
            model,
            cond,
            cfg_scale=args.cfg_scale,
            cfg_interval=args.cfg_interval,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            emb_mask=emb_mask,
            generator=generator,
            compile=args.compile,
        )  # (B, block_size)
    g = model.config.grid_size  # the VQ decodes in fp32, as the official
    x = tokenizer.decode_code(idx, (len(cond), tokenizer.config.codebook_embed_dim, g, g))
    if x.shape[-1] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bicubic", antialias=args.resize_filter == "antialias"
        )
    return x


def write_npz(path, shards, meta):
    """Stream shards into one uncompressed .npz: arr_0 uint8 (N, H, W, 3), arr_1 labels (N,), meta (json)."""
    labels, shape = [], None
    for s in shards:
        with np.load(s) as z:
            labels.append(z["labels"])
            shape = z["images"].shape[1:]
    with (
        data.atomic_write(path) as out,
        zipfile.ZipFile(out, "w") as zf,
    ):  # np.savez would need all N images in memory at once
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f,
                {"descr": "|u1", "fortran_order": False, "shape": (sum(map(len, labels)), *shape)},
            )
            for s in shards:
                with np.load(s) as z:
                    f.write(np.ascontiguousarray(z["images"]).tobytes())
        for key, arr in (("arr_1", np.concatenate(labels)), ("meta", np.array(json.dumps(meta)))):
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, arr)


def check_args(args):
    """One clear error for an out-of-range flag."""
    checks = [
        (wants_text(args) and args.labels is not None, "pass either --labels or prompts, not both"),
        (
            wants_text(args) and args.num_samples is not None,
            "--num-samples (FID .npz) is class-conditional only",
        ),
        (not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        ((args.top_k or 0) < 0, f"--top-k must be >= 0 (0 = off), got {args.top_k}"),
        (args.temperature < 0, f"--temperature must be >= 0, got {args.temperature}"),
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.num_samples is not None and args.num_samples < 1, "--num-samples must be >= 1"),
        (
            args.image_size_eval is not None and args.image_size_eval < 1,
            "--image-size-eval must be >= 1",
        ),
    ]
    for bad, msg in checks:
        if bad:
            raise data.UserError(msg)
    if args.cfg_scale is not None and args.cfg_scale < 1:
        print(
            f"warning: --cfg-scale {args.cfg_scale} < 1 turns guidance off (conditional logits only)",
            file=sys.stderr,
        )


def main(args):
    check_args(args)
    env = data.init_dist()
    device, fid = env.device, args.num_samples is not None
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    ctx = data.autocast_ctx(device, precision)  # also rejects fp16 on the CPU
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed * env.world_size + env.rank)
    model, tokenizer, image_size, tag = load_models(args, env.rank)
    if (
        precision != "fp32"
    ):  # the official casts the whole GPT (h.11); RMSNorm, RoPE, logits stay fp32
        model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    model.to(device)
    tokenizer.to(device)
    c = model.config
    t2i = c.model_type == "t2i"
    if t2i != wants_text(args):
        raise data.UserError(
            f"{tag} is a text-to-image GPT: pass --prompt, --prompt-file or --caption-features"
            if t2i
            else f"{tag} is class-conditional: pass --labels, not prompts"
        )
    preset = next(
        (n for n, p in gpt.GPT_CONFIGS.items() if (p["dim"], p["n_layer"]) == (c.dim, c.n_layer)),
        None,
    )
    if (
        args.cfg_scale is None
    ):  # demo: strong guidance for a pretty grid; FID: the paper's per-model value
        args.cfg_scale = (
            7.5 if t2i else FID_CFG.get(preset, 1.5) if fid else 4.0
        )  # 1.5: official ddp default
    if args.top_k is None:
        args.top_k = 1000 if t2i else 0 if fid else 2000  # t2i: official sample_t2i.py
    K = c.num_classes
    labels = (
        parse_labels(args.labels, K)
        if args.labels
        else (DEMO_LABELS if K == 1000 else [i % K for i in range(8)])
    )
    size = args.image_size_eval or (
        min(image_size, 256) if fid else image_size
    )  # ADM reference batches: 256
    data.print0(
        f"{tag} ({preset or 'GPT'}) {image_size}px -> {size}px: cfg {args.cfg_scale}, top-k {args.top_k}, "
        f"top-p {args.top_p}, temperature {args.temperature}, {precision} on {device}"
    )

    if not fid:  # one PNG grid of the given (or demo) classes
        gen = torch.Generator(device).manual_seed(args.seed)
        y, mask = (
            text.caption_condition(args, c, device)
            if t2i
            else (torch.tensor(labels, device=device), None)
        )
        x = torch.cat(
            [
                sample_images(
                    args,
                    model,
                    tokenizer,
                    y[i : i + args.batch_size],
                    size,
                    gen,
                    ctx,
                    None if mask is None else mask[i : i + args.batch_size],
                )
                for i in range(0, len(y), args.batch_size)
            ]
        )
        out = data.save_image_grid(
            x, args.out or f"samples/{tag}-seed{args.seed}.png", nrow=min(4, len(y))
        )
        print(out)
        return out

    # FID: class-balanced labels (N / K each) in a seeded shuffle. Shard i holds samples [i*B, (i+1)*B) and
    # draws from its own seed, so a restart (or another GPU count) regenerates exactly the missing shards.
    N, B = args.num_samples, args.batch_size
    out = Path(
        args.out
        or f"samples/{tag}-size{size}-cfg{args.cfg_scale}-topk{args.top_k}-seed{args.seed}-n{N}.npz"
    )
    if out.exists():
        data.print0(f"{out} already exists; delete it to sample again")
        return out
    pool = np.array(labels if args.labels else range(K))
    all_labels = np.random.default_rng(args.seed).permutation(np.resize(pool, N))  # (N,)
    num_shards, shard_dir = -(-N // B), out.with_name(out.stem + "-shards")
    shards = [shard_dir / f"shard_{i:05d}.npz" for i in range(num_shards)]
    meta = {k: v for k, v in vars(args).items() if k not in ("out", "compile")} | dict(
        image_size=image_size,
        image_size_eval=size,
        precision=precision,
        resize_filter=args.resize_filter if size != image_size else "none",
    )
    meta_file = shard_dir / "meta.json"  # every rank checks, so a refusal stops them all
    if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
        raise data.UserError(
            f"{shard_dir} holds shards sampled with other settings; delete it or change --out"
        )
    if env.distributed:
        dist.barrier()
    shard_dir.mkdir(parents=True, exist_ok=True)
    if env.rank == 0:
        meta_file.write_text(json.dumps(meta))
    todo = [i for i in range(env.rank, num_shards, env.world_size) if not shards[i].exists()]
    data.print0(
        f"{N} samples in {num_shards} shards of {B} under {shard_dir}; rank 0 has {len(todo)} to do"
    )
    for i in tqdm(todo, desc="shards", disable=env.rank != 0):
        y = torch.from_numpy(all_labels[i * B : (i + 1) * B]).to(device)
        gen = torch.Generator(device).manual_seed(args.seed * num_shards + i)
        imgs = data.to_uint8(
            sample_images(args, model, tokenizer, y, size, gen, ctx)
        ).numpy()  # (b, H, W, 3)
        with data.atomic_write(shards[i]) as f:  # a killed run never leaves a half-written shard
            np.savez(f, images=imgs, labels=y.cpu().numpy())
    if env.distributed:
        dist.barrier()
    if env.rank == 0:
        write_npz(out, shards, meta)
        for s in shards:
            s.unlink()
        print(out)
    if env.distributed:
        dist.destroy_process_group()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="sample ImageNet classes from LlamaGen (PNG grid or FID .npz)"
    )
    p.add_argument(
        "--model", default="B", help="released GPT: B, L, XL, XXL or 3B (GPT- prefix optional)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="256 or 384 (released; t2i 256 or 512; default 256)",
    )
    p.add_argument(
        "--gpt-ckpt", default=None, help="local GPT file, official or ours (then no model flags)"
    )
    p.add_argument(
        "--vq-ckpt", default=None, help="local VQ file; default: released vq_ds16_c2i.pt"
    )
    p.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help="class ids or ImageNet names (default: demo classes)",
    )
    p.add_argument(
        "--prompt", nargs="+", action="extend", default=None, help="text-to-image prompts"
    )
    p.add_argument("--prompt-file", default=None, help="text-to-image prompts, one per line")
    p.add_argument(
        "--caption-features",
        default=None,
        help=".pt/.npz with emb (B, 120, 2048) + mask, not prompts",
    )
    p.add_argument(
        "--t5-path",
        default=None,
        help="local google/flan-t5-xl folder (default: Hugging Face cache)",
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="default 4.0 for a grid, model's FID cfg for .npz",
    )
    p.add_argument(
        "--cfg-interval", type=float, default=-1, help="guide only decode steps <= this (-1: all)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--top-k", type=int, default=None, help="default 2000 for a grid, 0 (off) for .npz"
    )
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="default bf16 on GPU, fp32 on CPU",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    p.add_argument("--batch-size", type=int, default=32, help="images per generate call (per GPU)")
    p.add_argument(
        "--num-samples", type=int, default=None, help="write an FID .npz of this many samples"
    )
    p.add_argument(
        "--image-size-eval", type=int, default=None, help="resize to this (default for .npz: 256)"
    )
    p.add_argument(
        "--resize-filter",
        choices=["antialias", "official"],
        default="antialias",
        help="bicubic with antialias, or the official bicubic without",
    )
    p.add_argument("--out", default=None, help="output .png (grid) or .npz (with --num-samples)")
    return p.parse_args(argv)


if __name__ == "__main__":
    data.cli(main, parse_args)
