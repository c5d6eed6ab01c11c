"""Images and token codes: what turns files on disk into tensors for the trainers.

Images: class-per-folder datasets (ImageNet, tiny-ImageNet, your own), the ADM crops, a toy data
generator, PNG grids. Codes: a frozen tokenizer turns an image folder into token grids once (paper
Sec. 3.1 trains the GPT on pre-extracted codes), and CodeDataset serves them to train_gpt.py.

    python data.py toy data/toy --num-classes 4 --per-class 64 --size 64   # + captions.jsonl
    python data.py extract --vq-ckpt vq.pt --data-path data/toy \\
        --code-path data/toy-codes --image-size 64
    torchrun --nproc_per_node=8 data.py extract --vq-ckpt vq_ds16_c2i.pt \\
        --data-path imagenet/train --code-path codes/in256-tencrop --image-size 256 \\
        --ten-crop --crop-range 1.1   # then again with --crop-range 1.05
"""

import functools
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from common import UserError, print0, setup, write_json

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
BAD_LABEL = -1  # label of an unreadable image when skip_bad is set; trainers drop such rows
STORE_FILES = ("codes", "labels", "done")  # the .npy memmaps of a code store (see below)

# ----------------------------------------------------------------------------------------------
# Images: decoding, the ADM crops, grids


def load_image(path, skip_bad: bool = False):
    """Open an image as RGB; an unreadable file raises a UserError naming it, or with skip_bad
    gives None (and a warning on stderr)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if skip_bad:
            print(f"skipping unreadable image {path}", file=sys.stderr)
            return None
        raise UserError(
            f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace it "
            "(the trainers and extractors also take --skip-bad-images)"
        ) from None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, quantised as the official samplers do."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_image_grid(x: torch.Tensor, path, nrow=None, pad=2) -> Path:
    """Save (B, 3, H, W) images in [-1, 1] as one PNG grid, `nrow` images per row, white gaps."""
    imgs = to_uint8(x).numpy()  # (B, H, W, 3)
    b, h, w, _ = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    cells = np.full((rows * nrow, h + pad, w + pad, 3), 255, np.uint8)  # image + gap above/left
    cells[:b, pad:, pad:] = imgs
    grid = cells.reshape(rows, nrow, h + pad, w + pad, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * (h + pad), nrow * (w + pad), 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.pad(grid, ((0, pad), (0, pad), (0, 0)), constant_values=255)).save(path)
    return path


def _resize_short_side(img: Image.Image, short: int) -> Image.Image:
    """ADM resize: halve with BOX while the image is >= 2x too big, then BICUBIC to `short`."""
    while min(img.size) >= 2 * short:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = short / min(img.size)
    return img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)


def center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    """ADM center crop: resize the short side to `size`, crop the centre size x size."""
    img = _resize_short_side(img, size)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crop_arr(img: Image.Image, size: int, min_frac=0.8, max_frac=1.0, rng=random):
    """ADM random crop: short side to a random length in [size/max_frac, size/min_frac], then a
    random size x size window (the official tokenizer training augmentation)."""
    short = rng.randrange(math.ceil(size / max_frac), math.ceil(size / min_frac) + 1)
    img = _resize_short_side(img, short)
    left, top = rng.randrange(img.width - size + 1), rng.randrange(img.height - size + 1)
    return img.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------------
# Class-per-folder image datasets


def list_images(folder):
    """Every image file below `folder`, sorted, recursive."""
    files = Path(folder).rglob("*")
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolder(torch.utils.data.Dataset):
    """Images under root/<class>/**; class index = position of the folder name in sorted order.

    Also reads tiny-ImageNet's val/ layout (images/ + val_annotations.txt) and a flat folder (one
    class). augment="random" is the ADM random crop + horizontal flip of tokenizer training,
    "crop" the crop alone, "center" the ADM center crop, None the image as it is. Training keys
    are (epoch, i) pairs (common.TrainSampler): the augmentation is seeded by (seed, epoch, i), so
    a resumed run sees the same crops in any DataLoader worker.
    """

    def __init__(self, root, image_size=None, augment="center", skip_bad=False, seed=0):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder not found: {root}")
        annotations = root / "val_annotations.txt"
        if annotations.is_file():  # tiny-ImageNet val: one flat images/ folder + a label file
            pairs = [line.split("\t")[:2] for line in annotations.read_text().splitlines() if line]
            wnids = root.parent / "wnids.txt"
            names = wnids.read_text().split() if wnids.is_file() else {c for _, c in pairs}
            self.classes = sorted(names)
            index = {c: i for i, c in enumerate(self.classes)}
            self.samples = sorted((root / "images" / f, index[c]) for f, c in pairs)
        else:
            self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
            self.samples = [
                (p, i) for i, c in enumerate(self.classes) for p in list_images(root / c)
            ]
            if not self.classes:  # a flat folder of images: one class
                self.classes, self.samples = [root.name], [(p, 0) for p in list_images(root)]
        if not self.samples:
            raise UserError(f"no images found under {root} (expected root/<class>/<image>.png|jpg)")
        self.image_size, self.augment, self.skip_bad, self.seed = (
            image_size,
            augment,
            skip_bad,
            seed,
        )

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        """(epoch, i) or i -> (image (3, S, S) in [-1, 1], label); BAD_LABEL if unreadable."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        path, label = self.samples[i]
        img = load_image(path, self.skip_bad)
        if img is None:
            return torch.zeros(3, self.image_size, self.image_size), BAD_LABEL
        if self.augment in ("random", "crop"):  # "crop": never mirrored (train_vq.py --no-flip)
            rng = random.Random(f"{self.seed}-{epoch}-{i}")
            img = random_crop_arr(img, self.image_size, rng=rng)
            if self.augment == "random" and rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        elif self.augment == "center":
            img = center_crop_arr(img, self.image_size)
        return pil_to_tensor(img), label


TOY_CLASSES = [  # (name, colour): past these, the shapes repeat, each round darker
    ("red-disc", (220, 40, 40)),
    ("green-stripes", (40, 200, 60)),
    ("blue-checker", (50, 80, 230)),
    ("yellow-ring", (240, 220, 40)),
]


def make_toy_dataset(root, num_classes=4, per_class=32, size=64, seed=0) -> Path:
    """Write procedural images to root/<class>/NNNN.png; each class has its own shape and colour.

    Small enough for a tiny tokenizer and GPT to learn on a CPU in minutes, and different enough
    that a grid of samples shows at a glance whether the class condition works. Also writes
    root/captions.jsonl for text-to-image (`text.py extract`): for each image the official caption
    list [blip, llava, llava_first], from its class name ("a red disc", ...).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size  # (S, S) coordinates in [0, 1)
    captions = []  # lines of captions.jsonl
    for k in range(num_classes):
        shape, darker = k % len(TOY_CLASSES), k // len(TOY_CLASSES)
        name, colour = TOY_CLASSES[shape]
        folder = Path(root) / f"{k:03d}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        what = name.replace("-", " ")
        texts = [
            f"a {what}",
            f"a picture of a {what} on a dark background",
            f"a picture of a {what}",
        ]
        for i in range(per_class):
            cx, cy = rng.uniform(0.3, 0.7, 2)
            r, phase, freq = rng.uniform(0.15, 0.3), rng.uniform(0, 1), rng.uniform(3, 5)
            d2 = (xx - cx) ** 2 + (yy - cy) ** 2  # squared distance to the centre
            mask = [
                d2 < r**2,  # disc
                np.sin(2 * np.pi * (freq * yy + phase)) > 0,  # horizontal stripes
                ((xx * freq + phase).astype(int) + (yy * freq).astype(int)) % 2 == 0,  # checker
                np.abs(np.sqrt(d2) - r) < 0.06,  # ring
            ][shape]
            background = rng.uniform(10, 60, 3)
            fill = np.array(colour) * (1 - 0.25 * darker) * rng.uniform(0.8, 1.0)
            img = np.where(mask[..., None], fill, background)
            img = img + rng.normal(0, 6, img.shape)  # a little texture: no two images are equal
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
            captions.append(json.dumps(dict(image_path=f"{folder.name}/{i:04d}.png", text=texts)))
    (Path(root) / "captions.jsonl").write_text("".join(line + "\n" for line in captions))
    return Path(root)


# ----------------------------------------------------------------------------------------------
# Token codes: a frozen tokenizer turns an image folder into token grids; the GPT trains on those
#
# code_path/ holds codes.npy (N, n_aug, h*w) uint16 (int32 past 65536 codes), labels.npy (N,) int64
# (BAD_LABEL for unreadable images), done.npy (N,) bool (what a resumed run skips) and meta.json.
# Row i is ImageFolder sample i. All three are .npy memmaps that every rank writes in place, so
# under torchrun keep code_path on the node's own disk (or a filesystem with coherent shared mmap).


def load_tokenizer(path, device="cpu", vocab_size=None):
    """A VQ tokenizer checkpoint (official or ours) in fp32 eval mode, with one-line errors; with
    vocab_size, also checks that its codebook is the vocabulary of the GPT it serves."""
    from common import load_checkpoint
    from vq import VQModel

    try:
        vq = VQModel.from_checkpoint(load_checkpoint(path)).to(device).float().eval()
    except ValueError as e:  # wrong kind of file, keys or shapes: the loader says which
        raise UserError(f"cannot load the tokenizer {path}: {str(e).splitlines()[0]}") from None
    if vocab_size not in (None, vq.config.codebook_size):
        raise UserError(
            f"the tokenizer {path} has {vq.config.codebook_size} codes but the GPT's vocabulary "
            f"is {vocab_size}: pass the tokenizer its codes were made with"
        )
    return vq


def crops(img: Image.Image, size: int, ten: bool = False, crop_range=1.1, flip=True) -> list:
    """The n_aug crops stored per image. Default: the ADM centre crop and its mirror (2). ten:
    the official --ten-crop, torchvision's TenCrop(size) of the ADM centre crop to
    int(size * crop_range): 4 corners + centre, then the same of the mirror image (10).
    flip=False keeps only the unmirrored crops, for data where left and right matter."""
    img = center_crop_arr(img, int(size * crop_range) if ten else size)
    out = []
    for im in (img, img.transpose(Image.FLIP_LEFT_RIGHT))[: 2 if flip else 1]:
        m = im.width - size  # corner offsets; the centre is rounded as torchvision's center_crop
        boxes = [(0, 0), (m, 0), (0, m), (m, m), (round(m / 2), round(m / 2))] if ten else [(0, 0)]
        out += [im.crop((x, y, x + size, y + size)) for x, y in boxes]
    return out


def _load_crops(folder, n_aug, args, rows):
    """DataLoader collate_fn (it runs in the workers): store rows of an ImageFolder ->
    (crops (B, n_aug, 3, S, S), labels (B,) with BAD_LABEL for unreadable images, rows (B,))."""
    size, out = args.image_size, []
    for i in rows:
        path, label = folder.samples[i]
        img = load_image(path, args.skip_bad_images)
        views = crops(img, size, args.ten_crop, args.crop_range, not args.no_flip) if img else []
        x = (
            torch.stack([pil_to_tensor(c) for c in views])
            if img
            else torch.zeros(n_aug, 3, size, size)
        )
        out.append((x, label if img else BAD_LABEL))
    return torch.stack([x for x, _ in out]), torch.tensor([y for _, y in out]), np.array(rows)


def open_store(path, meta: dict, arrays: dict) -> dict:
    """A code store folder: meta.json plus zero-filled .npy memmaps {name: (shape, dtype)}, made
    here when new; an existing one must have been made with the same `meta` (but data_path, which
    may move), so a resumed extraction cannot mix settings. -> the meta.json on disk. Used by
    `data.py extract`, `text.py extract` and sample.py's .npz shards; meta.json is written last,
    so it means the arrays exist, and "complete" stays false until the extraction finishes
    (CodeDataset refuses it)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        old = read_code_meta(path)
        changed = [k for k in meta if k != "data_path" and old.get(k) != meta[k]]
        if changed:
            raise UserError(
                f"{path} was made with a different {', '.join(changed)}; delete that folder "
                "or choose another output path"
            )
        return old
    path.mkdir(parents=True, exist_ok=True)
    for name, (shape, dtype) in arrays.items():
        np.lib.format.open_memmap(path / f"{name}.npy", "w+", dtype, shape).flush()
    write_json({**meta, "complete": False}, path / "meta.json")
    return meta


def store_meta(args, device) -> tuple:
    """-> (the tokenizer args.vq_ckpt in fp32, as the official extraction; what every code store's
    meta.json says of it): the sizes at --image-size (which its downsampling must divide), where
    the images and the tokenizer are, and its config and sha256 (train_gpt.py copies these into
    its checkpoints, so sample.py can tell a GPT's own tokenizer). data.py and text.py extract."""
    from dataclasses import asdict

    from common import file_digest

    vq = load_tokenizer(args.vq_ckpt, device)
    grid, rest = divmod(args.image_size, vq.config.downsample)
    if rest:
        raise UserError(
            f"--image-size {args.image_size} is not a multiple of the tokenizer's downsampling "
            f"{vq.config.downsample}"
        )
    return vq, dict(
        vocab_size=vq.config.codebook_size,
        grid_size=grid,
        block_size=grid * grid,
        image_size=args.image_size,
        data_path=str(Path(args.data_path).resolve()),
        tokenizer=dict(
            path=str(Path(args.vq_ckpt).resolve()),
            config=asdict(vq.config),
            sha256=file_digest(args.vq_ckpt),
        ),
    )


def _open_store(args, meta, folder, env) -> dict:
    """Rank 0 creates code_path (or checks that an existing one was made the same way); then
    every rank opens the memmaps. Returns the store's meta.json dict."""
    grid, path = meta["grid_size"], Path(args.code_path)
    n_aug = (5 if args.ten_crop else 1) * (1 if args.no_flip else 2)
    dtype = np.uint16 if meta["vocab_size"] <= 2**16 else np.int32
    meta = dict(
        meta,
        num_classes=len(folder.classes),
        classes=folder.classes,
        num_images=len(folder),
        n_aug=n_aug,
        ten_crop=args.ten_crop,
        crop_range=args.crop_range if args.ten_crop else 1.0,
        flip=not args.no_flip,
        dtype=np.dtype(dtype).name,
    )
    if env.rank == 0:
        rows = (len(folder),)  # labels are read only where done is set
        arrays = dict(codes=(rows + (n_aug, grid * grid), dtype), labels=(rows, np.int64))
        open_store(path, meta, dict(arrays, done=(rows, bool)))
    if env.distributed:
        dist.barrier()
    return meta


@torch.inference_mode()
def extract_codes(args, flush_every=20) -> dict:
    """Encode args.data_path into args.code_path with the frozen tokenizer (fp32, eval):
    resumable (rows already marked done are skipped) and shared out over torchrun ranks."""
    from tqdm import tqdm

    env = setup("fp32")
    vq, meta = store_meta(args, env.device)
    folder, path = ImageFolder(args.data_path, augment=None), Path(args.code_path)
    meta = _open_store(args, meta, folder, env)
    codes, labels, done = (np.load(path / f"{k}.npy", mmap_mode="r+") for k in STORE_FILES)
    todo = np.flatnonzero(~done)[env.rank :: env.world_size]  # what is left, shared out
    collate = functools.partial(_load_crops, folder, meta["n_aug"], args)
    loader = torch.utils.data.DataLoader(
        todo.tolist(), args.batch_size, num_workers=args.num_workers, collate_fn=collate
    )
    finished = []
    bar = tqdm(loader, desc=f"encoding {len(todo)} images", disable=env.rank != 0)
    for b, (x, y, rows) in enumerate(bar):
        _, _, ind = vq.encode(x.flatten(0, 1).to(env.device))  # (B * n_aug * h * w,)
        codes[rows] = ind.view(len(rows), meta["n_aug"], -1).cpu().numpy()
        labels[rows], finished = y.numpy(), finished + [rows]
        if (b + 1) % flush_every == 0 or b == len(loader) - 1:  # codes reach the disk before done
            codes.flush(), labels.flush()
            done[np.concatenate(finished)], finished = True, []
            done.flush()
    if env.distributed:
        dist.barrier()
    if env.rank == 0:
        bad = np.flatnonzero(done & (labels < 0))
        meta.update(
            num_done=int(done.sum()),
            num_valid=int((done & (labels >= 0)).sum()),
            num_bad=len(bad),
            bad_files=[str(folder.samples[i][0]) for i in bad],
            complete=bool(done.all()),
        )
        write_json(meta, path / "meta.json")
    if env.distributed:
        dist.barrier()
    return read_code_meta(path)


def read_code_meta(code_path) -> dict:
    """meta.json of a code folder, with a one-line error when it is not one."""
    path = Path(code_path) / "meta.json"
    if not path.is_file():
        raise UserError(
            f"no token codes in {code_path} (meta.json missing); make them with "
            f"`python data.py extract --vq-ckpt ... --data-path ... --code-path {code_path}`"
        )
    return json.loads(path.read_text())


class CodeDataset(torch.utils.data.Dataset):
    """(epoch, i) -> (codes (block_size,) int64, label int64), one random stored crop each.

    As the official imagenet_code dataset: a random crop index per sample, and with
    `extra_code_path` (e.g. the crop-range 1.05 set) that set instead with probability
    `extra_prob`. The draw is seeded by (seed, epoch, row), so a resumed run sees the same tokens.
    Unreadable images are left out. `meta` is the store's meta.json.
    """

    def __init__(self, code_path, extra_code_path=None, extra_prob=0.5, seed=0):
        self.paths = [Path(p) for p in (code_path, extra_code_path) if p is not None]
        self.meta = read_code_meta(code_path)
        for p in self.paths:
            meta = read_code_meta(p)
            if not meta.get("complete"):
                raise UserError(
                    f"the extraction into {p} did not finish; run the same `python data.py "
                    "extract` command again to resume it"
                )
            same = ("vocab_size", "block_size", "classes", "num_images")
            if diff := [k for k in same if meta[k] != self.meta[k]]:
                raise UserError(
                    f"{p} does not match {code_path} ({', '.join(diff)} differ); "
                    "both must come from the same images and tokenizer"
                )
        self.labels = np.load(self.paths[0] / "labels.npy")
        self.rows = np.flatnonzero(self.labels >= 0)  # dataset index -> row; unreadable left out
        self.extra_prob, self.seed = extra_prob, seed
        self._codes = None  # memmaps, opened lazily in each DataLoader worker

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        epoch, i = key
        if self._codes is None:
            self._codes = [np.load(p / "codes.npy", mmap_mode="r") for p in self.paths]
        row = int(self.rows[i])
        rng = np.random.default_rng([self.seed, epoch, row])
        extra = len(self._codes) > 1 and rng.random() < self.extra_prob
        store = self._codes[1 if extra else 0]
        crop = int(rng.integers(store.shape[1]))
        return torch.from_numpy(store[row, crop].astype(np.int64)), int(self.labels[row])


# ----------------------------------------------------------------------------------------------
# Command line: toy images, code extraction


def parse_args(argv=None):
    import argparse

    from common import NUM_WORKERS

    fmt = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows defaults
    parser = argparse.ArgumentParser(description="toy images, token-code extraction", **fmt)
    sub = parser.add_subparsers(dest="cmd", required=True)
    toy = sub.add_parser("toy", help="write a toy class-per-folder image dataset", **fmt)
    toy.add_argument("root")
    for flag, default in (("--num-classes", 4), ("--per-class", 64), ("--size", 64), ("--seed", 0)):
        toy.add_argument(flag, type=int, default=default)
    ex = sub.add_parser("extract", help="encode an image folder into token codes", **fmt)
    for flag in ("--vq-ckpt", "--data-path", "--code-path"):
        ex.add_argument(flag, required=True)
    for flag, default, about in (
        ("--image-size", 256, "crop size; a multiple of the tokenizer's downsampling"),
        ("--crop-range", 1.1, "ten-crop source = size x this"),
        ("--batch-size", 32, "images per rank per batch"),
        ("--num-workers", NUM_WORKERS, "DataLoader workers per rank"),
    ):
        ex.add_argument(flag, type=type(default), default=default, help=about)
    for flag, about in (
        ("--ten-crop", "official 10 crops, else the centre crop"),
        ("--no-flip", "no mirrored crops: for text, digits, maps"),
        ("--skip-bad-images", "mark unreadable images, go on"),
    ):
        ex.add_argument(flag, action="store_true", help=about)
    return parser.parse_args(argv)


def main(args):
    if args.cmd == "toy":
        print(make_toy_dataset(args.root, args.num_classes, args.per_class, args.size, args.seed))
        return
    m = extract_codes(args)
    print0(
        f"{m['num_valid']} images x {m['n_aug']} crops of {m['block_size']} tokens in "
        f"{args.code_path} ({m['num_bad']} unreadable skipped)"
    )


if __name__ == "__main__":
    from common import cli

    cli(main, parse_args)
