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
arXiv 2410.01699, with coupled draft updates, arXiv 2510.24211): exactly the distribution of
ordinary sampling, in fewer sequential forward passes; the run prints the passes each image took
(W = 0: one per token).

--complete shows what raster-order generation means: each image is centre-cropped to the GPT's size
and encoded by the tokenizer; its first --keep-rows token rows are kept as a prefix and the GPT
writes the rest, once per label (or prompt). The grid has one row per image: the original, the kept
rows (decoded, the rest grey), then the completions.

The image size has one source per case: a released file's row of RELEASED, our checkpoint's own
config (block_size x the tokenizer's downsampling), or --image-size (default 256) for an official
file on disk, which does not record it. A GPT checkpoint of ours records the sha256 of the tokenizer
file its codes were made with: another tokenizer is refused (--any-tokenizer skips the check), as
its codes would mean other things to the GPT and the samples would be noise. This is also what
stops our GPT given without its --vq-ckpt: the released VQ-16 it then gets is not its tokenizer.

Everything that can be checked from the flags is checked before any download or sampling:
conflicting flags, --out of the kind the run writes (a .png grid, an .npz with --num-samples) in a
writable folder, the pictures to complete, a readable --prompt-file (argparse reads it).

A grid is one gpt.generate call (every label or prompt, times every picture to complete);
--batch-size only cuts an .npz into shards. The .npz shard folder is a store as data.py's code
stores (data.open_store): a restart with other settings is refused in one line that names them.

For a web page (demo.py) the steps are plain functions: `models = load_models(args)` once, then
`draw_grid(args, models, pictures)` per request, where `args` is a parse_args namespace whose
labels, prompts and settings may change between calls. `models` holds gpt (from --gpt-ckpt, ours
or an official file, or the released file of --model and --image-size), vq (the tokenizer, from
--vq-ckpt or the released VQ-16), env (common.Env), name (the GPT file's stem, for output names),
decode_fn (the compiled decode step with --compile, else None) and passes (the forward passes of
each gpt.generate call). A released file is downloaded by rank 0 while the other ranks wait (then
they find it cached), and must load as a checkpoint before it enters the cache.

Flags (their defaults follow below, with --help):
  --model, --image-size a released GPT: B, L, XL, XXL or 3B (or GPT-B, ...) at 256 or 384 px
                        (text-to-image: XL at 256 or 512); none given: B (t2i XL) at 256
  --gpt-ckpt            a GPT file on disk, ours or official, instead (then no --model; an
                        official file takes its --image-size, default 256)
  --vq-ckpt             a tokenizer file on disk; none: the released VQ-16 of the GPT's kind
  --any-tokenizer       skip the check of the tokenizer's sha256 against the GPT's record
  --labels              class ids or ImageNet names ("golden retriever", any synonym); none:
                        the 8 demo classes of sample_c2i.py (a small model: its first classes)
  --prompt, --prompt-file
                        text-to-image prompts, and a file of them, one per line
  --caption-features    a .pt or .npz of precomputed T5 features: emb (B, 120, 2048) + mask
  --t5-path             a local copy of google/flan-t5-xl; none: the Hugging Face cache
  --cfg-scale           classifier-free guidance (<= 1: none); none given: 4.0 for a grid, 7.5
                        for text, the model's FID cfg for an .npz (1.5 for our checkpoints)
  --cfg-interval        guide only the first steps up to this fraction (-1: all of them)
  --temperature, --top-k, --top-p
                        the sampling filters; top-k none given: 2000 (grid), 1000 (text), 0 =
                        off (.npz); top-p 1: off
  --jacobi-window       draft tokens per forward pass (0: plain sampling, one pass per token);
                        a latency tool: a batch waits for its slowest image, so it saves few
                        passes on .npz shards or big grids (README, Jacobi decoding)
  --seed                the same seed draws the same images
  --batch-size          images per .npz shard (one gpt.generate call each)
  --nrow                images per grid row
  --complete, --keep-rows
                        pictures whose first token rows the GPT keeps and completes
  --num-samples         write an FID .npz of this many images
  --image-size-eval     resize the images to this; none given: the GPT's size (an .npz: 256)
  --resize-filter       antialias (bicubic), or official (bicubic without antialiasing)
  --mixed-precision     fp32, bf16 or fp16; none given: bf16 on GPUs, fp32 on the CPU
  --compile             torch.compile the decode step (a GPU: CUDA graphs)
  --out                 the .png grid or, with --num-samples, the .npz; none:
                        samples/<GPT file>-seed<seed>.png (.npz: its meta has the settings)
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
from common import UserError

# Released weights: kind -> (Hugging Face repo, the VQ-16 tokenizer of its GPTs, the default
# preset, {"preset image-size": GPT file}, and a grid's cfg and top-k: c2i as the official
# sample_c2i.py, strong guidance and top-k 2000; t2i as sample_t2i.py)
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
        4.0,
        2000,
    ),
    "t2i": (
        "peizesun/llamagen_t2i",
        "vq_ds16_t2i.pt",
        "GPT-XL",
        {"GPT-XL 256": "t2i_XL_stage1_256.pt", "GPT-XL 512": "t2i_XL_stage2_512.pt"},
        7.5,
        1000,
    ),
}
# classifier-free guidance for FID, per model (official GETTING_STARTED; paper Table 6); own
# checkpoints get sample_c2i_ddp.py's default 1.5
FID_CFG = {"GPT-B": 2.0, "GPT-L": 2.0, "GPT-XL": 1.75, "GPT-XXL": 1.75, "GPT-3B": 1.65}
DEMO_LABELS = "207 360 387 974 88 979 417 279".split()  # official sample_c2i.py
CLASS_NAMES = Path(__file__).with_name("imagenet_classes.txt")  # ILSVRC-2012 order, synonyms


def load_models(args):
    """sample.py's flags (a parse_args namespace) -> models (see the module docstring), the GPT
    on its device and in its precision. Fills in what depends on the model: image_size (the
    GPT's own), cfg_scale, top_k, image_size_eval, mixed_precision. Prompts pick the
    text-to-image releases (--prompt-file extends args.prompt: an empty file gives [], then
    "no prompts", never a silent class-conditional run); --num-samples is class-conditional."""
    kind = "t2i" if args.prompt is not None or args.caption_features else "c2i"
    if kind == "t2i" and args.labels or args.num_samples and (kind == "t2i" or args.complete):
        raise UserError("prompts take no --labels; --num-samples takes no prompts, no --complete")
    env = common.setup(args.mixed_precision)
    repo, vq_file, default, files, cfg_scale, top_k = RELEASED[kind]
    if not args.gpt_ckpt:  # own checkpoints have no preset name
        args.model = args.model or default
    size = args.image_size or 256
    gpt_file = args.gpt_ckpt or files.get(f"{args.model} {size}")
    if not gpt_file:  # before any download
        raise UserError(
            f"no released {kind} {args.model} {size} (released: {', '.join(files)}); or pass "
            "--gpt-ckpt"
        )
    # rank 0 downloads, the others then find the file cached; it must load as a checkpoint
    fetch = lambda name: common.rank0_first(
        env, common.download, common.hf_url(repo, name), check=common.load_checkpoint
    )
    ckpt = common.load_checkpoint(args.gpt_ckpt or fetch(gpt_file))
    # an own GPT without its --vq-ckpt gets VQ-16 here, then the sha256 check refuses it
    vq_path = args.vq_ckpt or fetch(vq_file)
    tokenizer = data.load_tokenizer(vq_path, env.device)
    downsample = tokenizer.config.downsample
    try:  # an official file's block size: from the image size and the tokenizer (ours: config)
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
    # the tokenizer's sha256 (train_gpt.py, since issue 13) tells; another vocabulary size: never
    made_with = not args.any_tokenizer and ckpt.get("tokenizer_sha256")  # else no hashing
    if c.vocab_size != tokenizer.config.codebook_size or (
        made_with and made_with != common.file_digest(vq_path)
    ):
        raise UserError(
            f"{name} was trained on the codes of another tokenizer than {vq_path}; pass its "
            "--vq-ckpt (--any-tokenizer skips the sha256 check)"
        )
    # a grid: the release table's cfg and top-k; FID: the paper's cfg per released model, no
    # top-k, 256 px for the ADM evaluator. Flags given on the command line win (default=SUPPRESS)
    fid = args.num_samples
    vars(args).update(
        {
            "cfg_scale": FID_CFG.get(args.model, 1.5) if fid else cfg_scale,
            "top_k": 0 if fid else top_k,
            "image_size_eval": min(image_size, 256) if fid else image_size,
            **vars(args),
        },
        image_size=image_size,  # the resolved size and precision: part of the .npz meta
        mixed_precision=env.precision,
    )
    # the whole GPT in the autocast dtype, as the official (h.11); RMSNorm, RoPE, logits: fp32
    model.to(env.device, getattr(env.ctx, "fast_dtype", None))
    common.print0(
        f"{name}: {image_size}px -> {args.image_size_eval}px, cfg {args.cfg_scale}, top-k "
        f"{args.top_k}, top-p {args.top_p}, temperature {args.temperature}, Jacobi window "
        f"{args.jacobi_window}; {env}"
    )
    # the script, not the library, decides to compile (gpt-fast generate.py)
    step = (
        torch.compile(gpt.decode_one_token, mode="reduce-overhead", fullgraph=True)
        if args.compile
        else None
    )
    return argparse.Namespace(
        gpt=model, vq=tokenizer, env=env, name=name, decode_fn=step, passes=[]
    )


def parse_labels(items, num_classes):
    """Class ids or ImageNet class names ("golden retriever", any synonym) -> list of ids."""
    lines = CLASS_NAMES.read_text().lower().splitlines()  # "name, synonym, ..." per class
    labels = []
    for item in map(str.lower, items):
        # an id, or the one class that has it as a name or synonym
        hits = (
            [int(item)]
            if item.isdigit()
            else [i for i, s in enumerate(lines) if item in s.split(", ")]
        )
        if len(hits) != 1 or hits[0] >= num_classes:  # no class, several, or not this model's
            # the classes whose names contain it, to choose from
            near = [f"{i}: {s.split(', ')[0]}" for i, s in enumerate(lines) if item in s][:6]
            raise UserError(
                f"--labels {item!r} is not one class of this model (ids 0..{num_classes - 1}"
                f"; ImageNet names: {'; '.join(near) or 'see imagenet_classes.txt'})"
            )
        labels += hits
    return labels


@torch.no_grad()
def draw(args, models, seed, cond, mask=None, prefix=None, stats=None):
    """One gpt.generate call: cond = labels (B,) or caption features (B, 120, D) with their mask
    (B, 120); prefix (B, K) image tokens to keep -> images (B, 3, S, S) in [-1, 1], S the GPT's
    own size. Every random draw comes from one generator seeded with `seed`: the same seed, the
    same images. Adds the call's forward passes to models.passes; stats: gpt.generate's."""
    stats = {} if stats is None else stats
    with models.env.ctx:
        tokens = gpt.generate(
            models.gpt,
            cond,
            args.cfg_scale,
            args.cfg_interval,
            mask,
            models.decode_fn,
            args.jacobi_window,
            prefix,
            stats,
            torch.Generator(cond.device).manual_seed(seed),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
        )  # (B, block_size)
    models.passes.append(stats["forward_passes"])
    return models.vq.decode_code(tokens)  # the VQ decodes in fp32, as the official


def resize(args, images):
    """(B, 3, S, S) -> (B, 3, E, E), E = --image-size-eval: bicubic, antialiased or as the
    official (without); the identity when E = S."""
    return F.interpolate(
        images, args.image_size_eval, mode="bicubic", antialias=args.resize_filter == "antialias"
    )


@torch.no_grad()
def draw_grid(args, models, pictures=None):
    """The images of a grid -> (images (N, 3, S, S) in [-1, 1] at the GPT's size, images per row).
    One image per --labels entry (default: the demo classes) or prompt, all in one gpt.generate
    call from --seed. With pictures (PIL images): per picture a row of the picture, its first
    --keep-rows token rows (decoded, the rest grey), and one completion per label/prompt."""
    c, device = models.gpt.config, models.env.device
    if c.model_type == "t2i":
        cond, mask = text.caption_condition(args, c, device)
    else:  # the demo classes of sample_c2i.py, or a small model's first ones
        k = c.num_classes
        ids = parse_labels(args.labels or DEMO_LABELS, k) if args.labels or k == 1000 else range(8)
        cond = mask = torch.tensor(ids, device=device) % k  # a c2i GPT ignores the mask
    n = len(cond)  # labels or prompts
    if not pictures:
        return draw(args, models, args.seed, cond, mask), min(args.nrow, n)
    g, count = c.grid_size, len(pictures)
    if args.keep_rows >= g:
        raise UserError(f"--keep-rows must be below {g}, the GPT's token rows")
    originals = torch.stack(
        [data.pil_to_tensor(data.center_crop_arr(p, args.image_size)) for p in pictures]
    ).to(device)  # (P, 3, S, S)
    codes = models.vq.encode(originals)[-1].view(count, g, g)[:, : args.keep_rows]  # (P, K, g)
    # every condition with every picture, condition-major: (n * P, ...)
    images = draw(
        args,
        models,
        args.seed,
        cond.repeat_interleave(count, 0),
        mask.repeat_interleave(count, 0),
        codes.flatten(1).repeat(n, 1),
    )
    kept = models.vq.decode_code(codes)  # (P, 3, K * ds, S), then grey (0) below
    kept = F.pad(kept, (0, 0, 0, args.image_size - kept.shape[2]))
    # a grid row per picture: its original, its kept part, then its n completions
    return torch.stack([originals, kept, *images.unflatten(0, (n, count))], 1).flatten(0, 1), n + 2


def write_npz(args, models, out):
    """args.num_samples images for FID in one .npz, the ADM evaluator's format: arr_0 uint8
    (N, H, W, 3), arr_1 labels (N,), meta (JSON). Labels are class-balanced (N / K each) in a
    seeded shuffle. Shard i, images [i*B, (i+1)*B) with B = --batch-size, draws from its own seed
    straight into a memmap, then leaves a .done file: a restart (or another GPU count) draws
    exactly the missing shards, and the result does not depend on the number of ranks; the shard
    folder goes once merged. Under torchrun across nodes, --out must be on a filesystem that all
    of them share."""
    n, batch, size, env = args.num_samples, args.batch_size, args.image_size_eval, models.env
    if out.exists():
        return common.print0(f"{out} already exists; delete it to draw again")
    # what the images depend on: a restart must match it (--out and --compile do not count); the
    # GPT's own config, not the --model flag, says which model drew them
    meta = {
        **vars(args),
        "out": None,
        "compile": None,
        "complete": False,  # never set with --num-samples; the store's own flag (see open_store)
        "model": vars(models.gpt.config),
        "resize_filter": args.resize_filter if size != args.image_size else "none",
    }
    k = models.gpt.config.num_classes
    classes = parse_labels(args.labels, k) if args.labels else range(k)  # or every class
    labels = np.random.default_rng(args.seed).permutation(np.resize(classes, n))  # (N,)
    shards, folder = -(-n // batch), out.with_name(f"{out.stem}-shards")
    # the shard folder is a store like the code stores: rank 0 makes it (or finds it made with
    # this meta, else a one-line refusal), then every rank checks it and opens the memmap
    common.rank0_first(
        env, data.open_store, folder, meta, {"images": ((n, size, size, 3), np.uint8)}
    )
    images = np.load(folder / "images.npy", mmap_mode="r+")  # (N, S, S, 3)
    # this rank's shards; a progress bar on rank 0 only (disable=rank)
    for i in tqdm(range(env.rank, shards, env.world_size), folder.name, disable=env.rank):
        done = folder / f"{i:05d}.done"
        if done.exists():  # drawn before a restart
            continue
        rows = slice(i * batch, (i + 1) * batch)
        # each shard its own seed: the same images whichever rank draws it
        drawn = draw(
            args, models, args.seed * shards + i, torch.tensor(labels[rows], device=env.device)
        )  # (B, 3, S, S)
        images[rows] = data.to_uint8(resize(args, drawn))
        images.flush()  # on disk before the shard counts as done
        done.touch()
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    if env.rank == 0:  # np.savez streams the memmap in chunks: not all N images in memory
        with common.atomic_write(out) as f:
            np.savez(f, images, labels, meta=json.dumps(meta))  # a 0-d str array
        shutil.rmtree(folder)  # merged: the shards are no longer needed


def main(args):
    kind = ".npz" if args.num_samples else ".png"  # an .npz for FID, else a .png grid
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
    models = load_models(args)
    if args.cfg_scale < 1:  # now filled in
        print(f"warning: --cfg-scale {args.cfg_scale} < 1 turns guidance off", file=sys.stderr)
    # the default name: the GPT file and the seed (an .npz records its settings in its meta)
    out = Path(args.out or f"samples/{models.name}-seed{args.seed}{kind}")
    if args.num_samples:
        write_npz(args, models, out)
    else:
        images, nrow = draw_grid(args, models, args.complete)  # PIL images
        data.save_image_grid(resize(args, images), out, nrow)
    # sequential forward passes per image: block_size without a Jacobi window (none drawn when
    # the .npz was there)
    common.print0(out, f"({np.mean(models.passes or [0]):g} forward passes per image)")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    positive, count = common.number(int, 1), common.number(int, 0)
    by_model = argparse.SUPPRESS  # no default here: load_models fills in the model's
    for flag, (kind, default) in {  # flag: (type, default); what each means: the docstring
        "--model": (functools.partial(common.preset, gpt.GPT_CONFIGS), None),
        "--image-size": (positive, None),
        "--cfg-scale": (float, by_model),
        "--cfg-interval": (float, -1.0),
        "--temperature": (common.number(float, 0), 1.0),
        "--top-k": (count, by_model),
        "--top-p": (common.number(float, 0, 1), 1.0),
        "--jacobi-window": (count, 0),
        "--seed": (int, 0),
        "--batch-size": (positive, 32),
        "--nrow": (positive, 4),
        "--keep-rows": (positive, 8),
        "--num-samples": (positive, None),
        "--image-size-eval": (positive, by_model),
    }.items():
        shown = "default: set by the model" if default is by_model else "default: %(default)s"
        p.add_argument(flag, type=kind, default=default, help=shown)
    for flag in "--gpt-ckpt --vq-ckpt --caption-features --t5-path --out".split():
        p.add_argument(flag)  # a path, none by default
    for flag in "--any-tokenizer --compile".split():
        p.add_argument(flag, action="store_true")
    p.add_argument("--labels", nargs="+")
    p.add_argument("--prompt", nargs="+", action="extend")
    # argparse opens the file (one line for one it cannot); its lines join --prompt
    p.add_argument("--prompt-file", type=argparse.FileType(), dest="prompt", action="extend")
    # read here, before any download: a file that is not an image stops the run in one line
    p.add_argument("--complete", type=data.load_image, nargs="+")
    p.add_argument("--mixed-precision", choices="fp32 bf16 fp16".split())
    p.add_argument("--resize-filter", choices="antialias official".split(), default="antialias")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.cli(main, parse_args)
