"""Bytes in and out, plus the small runtime every script shares.

Images: class-per-folder datasets (ImageNet, tiny-ImageNet, your own), ADM-style crops, a toy
dataset generator, PNG grids. Runtime: downloads into one cache, distributed init, atomic
checkpoints, EMA, autocast, RNG state, JSON-lines logs, one-line user errors.

    python data.py toy data/toy --num-classes 4 --per-class 64 --size 64   # make a toy image folder
    python data.py extract --vq-ckpt vq.pt --data-path data/toy --code-path data/toy-codes --image-size 64
    torchrun --nproc_per_node=8 data.py extract --vq-ckpt vq_ds16_c2i.pt --data-path imagenet/train
        --code-path codes/in256-tencrop --image-size 256 --ten-crop --crop-range 1.1   # (one line); then 1.05
"""

import contextlib
import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
BAD_LABEL = -1  # label returned for an unreadable image when skip_bad=True; trainers drop such rows


class UserError(RuntimeError):
    """A mistake the user can fix; `cli` prints it as one line instead of a traceback."""


def cli(main, parse_args):
    """Run `main(parse_args())`; a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        return main(parse_args())
    except UserError as e:
        # DataLoader workers re-raise with the worker traceback in the message: keep its last line.
        lines = [line for line in str(e).strip().splitlines() if line.strip()] or ["unknown error"]
        msg = lines[-1].split("UserError: ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Downloads: one cache directory, resumable, atomic, verified


def cache_dir() -> Path:
    """Where downloads live: $LLAMAGEN_CACHE, else ~/.cache/llamagen."""
    return Path(os.environ.get("LLAMAGEN_CACHE", Path.home() / ".cache" / "llamagen")).expanduser()


def hf_url(repo: str, filename: str) -> str:
    """URL of a file in a Hugging Face repo; $HF_ENDPOINT overrides the host, as in huggingface_hub."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo}/resolve/main/{filename}"


def file_digest(path, algo="sha256") -> str:
    """Hex digest of a file, read in 1 MB blocks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _server_sha256(response):
    """The Hub sends the LFS sha256 as (X-Linked-)ETag on the redirect; use it when it looks like one."""
    for r in [*response.history, response]:
        for key in ("X-Linked-Etag", "ETag"):
            tag = r.headers.get(key, "").strip('"').removeprefix("W/").strip('"')
            if len(tag) == 64 and all(c in "0123456789abcdef" for c in tag.lower()):
                return tag.lower()
    return None


def download(
    url, filename=None, sha256=None, md5=None, size=None, desc=None, cache=None, retries=3
) -> Path:
    """Return the cached path of `url`, downloading it first if needed (resumes a partial `.part`)."""
    import requests
    from tqdm import tqdm

    dest = Path(cache or cache_dir()) / (filename or url.split("?")[0].rstrip("/").split("/")[-1])
    meta_path = dest.with_name(dest.name + ".json")  # size and sha256 recorded after verification
    if dest.exists():
        known = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        want = size or known.get("size")
        if want is None or dest.stat().st_size == want:
            return dest
        print(
            f"cached {dest} has the wrong size ({dest.stat().st_size} != {want}); downloading again"
        )
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    hint = (
        f"download it by hand from {url} and put it at {dest} "
        f"(the cache directory is set by LLAMAGEN_CACHE)"
    )
    server_sha = None
    for attempt in range(retries):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            r = requests.get(url, stream=True, timeout=30, headers=headers, allow_redirects=True)
        except requests.RequestException as e:
            raise UserError(f"cannot reach {url} ({type(e).__name__}); {hint}") from None
        with r:
            if r.status_code == 416:  # nothing left to fetch: the .part is already complete
                break
            if r.status_code not in (200, 206):
                raise UserError(f"downloading {url} failed with HTTP {r.status_code}; {hint}")
            if r.status_code == 200:
                offset = 0  # the server ignored our Range header: start over
            server_sha = _server_sha256(r) or server_sha
            length = r.headers.get("Content-Length")
            total = offset + int(length) if length is not None else size
            try:
                with (
                    open(part, "ab" if offset else "wb") as f,
                    tqdm(
                        total=total,
                        initial=offset,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=desc or dest.name,
                        disable=None,
                    ) as bar,
                ):
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
            except (requests.RequestException, OSError) as e:
                if attempt == retries - 1:
                    raise UserError(
                        f"download of {url} was interrupted ({type(e).__name__}); "
                        f"run again to resume from {part}"
                    ) from None
                print(f"download interrupted ({type(e).__name__}); resuming")
                continue
            if total is not None and part.stat().st_size < total:
                if attempt == retries - 1:
                    raise UserError(
                        f"download of {url} ended early; run again to resume from {part}"
                    )
                continue
            break
    got_size = part.stat().st_size
    checks = [
        ("size", size, lambda: got_size),
        ("sha256", sha256 or server_sha, lambda: file_digest(part, "sha256")),
        ("md5", md5, lambda: file_digest(part, "md5")),
    ]
    for name, want, compute in checks:
        if want is not None and compute() != want:
            part.unlink()
            raise UserError(
                f"{name} check failed for {url} (expected {want}); the corrupt file was "
                f"removed, run again or {hint}"
            )
    os.replace(part, dest)
    meta_path.write_text(json.dumps({"url": url, "size": got_size, "sha256": sha256 or server_sha}))
    return dest


# ----------------------------------------------------------------------------------------------
# Distributed, precision, RNG, EMA


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def init_dist() -> Dist:
    """DDP iff launched by torchrun (RANK set): nccl on GPUs, gloo on the CPU; else one process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, torch.device("cuda" if cuda else "cpu"), False)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def autocast_ctx(device, precision: str):
    """Mixed-precision context for the forward pass: bf16 anywhere, fp16 on GPUs, fp32 = nothing."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    if precision not in ("bf16", "fp16"):
        raise UserError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
    return torch.autocast(
        device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16
    )


def get_rng_state() -> dict:
    """Python, numpy and torch RNG states as plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    """Inverse of get_rng_state."""
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def update_ema(ema_model, model, decay: float = 0.9999):
    """ema = decay * ema + (1 - decay) * param for parameters; buffers are copied."""
    strip = lambda n: n.replace("_orig_mod.", "").replace("module.", "")  # compile / DDP prefixes
    params = {strip(n): p for n, p in model.named_parameters()}
    for name, ema_p in ema_model.named_parameters():
        ema_p.mul_(decay).add_(params[strip(name)].detach().to(ema_p.dtype), alpha=1 - decay)
    buffers = {strip(n): b for n, b in model.named_buffers()}
    for name, ema_b in ema_model.named_buffers():
        ema_b.copy_(buffers[strip(name)])


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temporary file beside `path`, renamed over it only when the block completes:
    a crash never leaves a half-written file, and never spoils the previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(obj, path):
    """torch.save, atomically."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path)


def load_checkpoint(path, mmap=True) -> dict:
    """torch.load(weights_only=True) onto the CPU, with one-line errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(
            e
        ):  # files in the legacy (pre-zip) format cannot be memory-mapped
            return load_checkpoint(path, mmap=False)
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{str(e).splitlines()[0]}"
        ) from None
    except Exception as e:  # pickle.UnpicklingError for non-plain objects, EOFError, ...
        raise UserError(
            f"cannot load {path} with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_tokenizer(path, device="cpu"):
    """A VQ tokenizer checkpoint (official or ours) in fp32 eval mode, with one-line errors."""
    from vq import VQModel

    try:
        return VQModel.from_checkpoint(load_checkpoint(path)).to(device).float().eval()
    except ValueError as e:  # wrong kind of file, keys or shapes: the loader says which
        raise UserError(f"cannot load the tokenizer {path}: {str(e).splitlines()[0]}") from None


def make_results_dir(root, name) -> Path:
    """root/{idx:03d}-{name} as in DiT; rank 0 picks the index and tells the others."""
    root = Path(root)
    out = [None]
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        out[0] = str(root / f"{len(list(root.glob('[0-9][0-9][0-9]-*'))):03d}-{name}")
        Path(out[0]).mkdir(parents=True)
    if dist.is_initialized():
        dist.broadcast_object_list(out, src=0)
    return Path(out[0])


class JsonlLogger:
    """Appends one JSON object per line (rank 0 only)."""

    def __init__(self, path):
        self.path = Path(path)

    def log(self, record: dict):
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Images: decoding, ADM crops, grids


def load_image(path) -> Image.Image:
    """Open an image as RGB; a corrupt or unreadable file raises a UserError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(
            f"cannot read image {path} ({type(e).__name__}: {e}); "
            f"delete or replace it (the trainers and extractors also take --skip-bad-images)"
        ) from None


def load_image_or_skip(path, skip_bad: bool):
    """load_image, but an unreadable file gives None (and a warning) when skip_bad is set."""
    try:
        return load_image(path)
    except UserError:
        if not skip_bad:
            raise
        print(f"skipping unreadable image {path}", file=sys.stderr)
        return None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, quantised as the official samplers do."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_image_grid(x: torch.Tensor, path, nrow=None, pad=2) -> Path:
    """Save (B, 3, H, W) images in [-1, 1] as one PNG grid with `nrow` images per row."""
    imgs = to_uint8(x).numpy()  # (B, H, W, 3)
    b, h, w, _ = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + c * (w + pad) : pad + c * (w + pad) + w,
        ] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
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


def random_crop_arr(img: Image.Image, size: int, min_crop_frac=0.8, max_crop_frac=1.0, rng=random):
    """ADM random crop: short side to a random length in [size/max_frac, size/min_frac], random crop."""
    short = rng.randrange(math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac) + 1)
    img = _resize_short_side(img, short)
    left, top = rng.randrange(img.width - size + 1), rng.randrange(img.height - size + 1)
    return img.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------------
# Class-per-folder image datasets


def list_images(folder):
    """Every image file below `folder`, sorted, recursive."""
    return sorted(
        p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


class ImageFolder(torch.utils.data.Dataset):
    """Images under root/<class>/**; class index = position of the folder name in sorted order.

    Also reads tiny-ImageNet's val/ layout (images/ + val_annotations.txt). augment="random" is the
    ADM random crop + horizontal flip used for tokenizer training, "center" the ADM center crop.
    Augmentation draws from a RNG seeded by (seed, epoch, index), so a resumed run sees the same crops.
    """

    def __init__(self, root, image_size=None, augment="center", skip_bad=False, seed=0):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"image folder not found: {root}")
        annotations = root / "val_annotations.txt"
        if annotations.is_file():  # tiny-ImageNet val: one flat images/ folder + a label file
            pairs = [
                line.split("\t")[:2]
                for line in annotations.read_text().splitlines()
                if line.strip()
            ]
            wnids = root.parent / "wnids.txt"
            self.classes = sorted(
                wnids.read_text().split() if wnids.is_file() else {c for _, c in pairs}
            )
            index = {c: i for i, c in enumerate(self.classes)}
            self.samples = sorted((root / "images" / f, index[c]) for f, c in pairs)
        else:
            self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
            self.samples = [
                (p, i) for i, c in enumerate(self.classes) for p in list_images(root / c)
            ]
            if not self.classes:  # a flat folder of images: one class
                self.classes, self.samples = [root.name], [(p, 0) for p in list_images(root)]
        if not self.samples:
            raise UserError(f"no images found under {root} (expected root/<class>/<image>.png|jpg)")
        if augment not in ("random", "center", None):
            raise ValueError(f"augment must be 'random', 'center' or None, not {augment!r}")
        self.root, self.image_size, self.augment = root, image_size, augment
        self.skip_bad, self.seed, self.epoch = skip_bad, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        """-> (image (3, S, S) in [-1, 1], label); label BAD_LABEL for an unreadable file if skip_bad."""
        path, label = self.samples[i]
        img = load_image_or_skip(path, self.skip_bad)
        if img is None:
            return torch.zeros(3, self.image_size, self.image_size), BAD_LABEL
        if self.augment == "random":
            rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
            img = random_crop_arr(img, self.image_size, rng=rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        elif self.augment == "center":
            img = center_crop_arr(img, self.image_size)
        return pil_to_tensor(img), label


def make_toy_dataset(root, num_classes=4, per_class=32, size=64, seed=0) -> Path:
    """Write procedural images to root/<class>/NNNN.png; each class has its own shape and colour.

    Small enough for a tiny tokenizer and GPT to learn on a CPU in minutes, and different enough
    that a grid of samples shows at a glance whether the class condition works.
    """
    names = [
        "red-disc",
        "green-stripes",
        "blue-checker",
        "yellow-ring",
        "magenta-square",
        "cyan-cross",
        "orange-diagonal",
        "white-dots",
    ]
    colours = [
        (220, 40, 40),
        (40, 200, 60),
        (50, 80, 230),
        (240, 220, 40),
        (220, 50, 220),
        (40, 220, 230),
        (250, 140, 20),
        (240, 240, 240),
    ]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size  # (S, S) coordinates in [0, 1)
    root = Path(root)
    for k in range(num_classes):
        shape, colour = (
            k % len(names),
            np.array(colours[k % len(colours)]) * (1 - 0.25 * (k // len(names))),
        )
        folder = root / f"{k:03d}-{names[shape]}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cx, cy = rng.uniform(0.3, 0.7, 2)
            r, phase, freq = rng.uniform(0.15, 0.3), rng.uniform(0, 1), rng.uniform(3, 5)
            masks = [
                (xx - cx) ** 2 + (yy - cy) ** 2 < r**2,  # disc
                np.sin(2 * np.pi * (freq * yy + phase)) > 0,  # horizontal stripes
                ((xx * freq + phase).astype(int) + (yy * freq).astype(int)) % 2
                == 0,  # checkerboard
                np.abs(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - r) < 0.06,  # ring
                (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r),  # square
                (np.abs(xx - cx) < r / 3) | (np.abs(yy - cy) < r / 3),  # cross
                np.sin(2 * np.pi * (freq * (xx + yy) / 2 + phase)) > 0,  # diagonal stripes
                (np.sin(2 * np.pi * freq * xx) * np.sin(2 * np.pi * freq * yy)) > 0.5,
            ]  # dots
            background = rng.uniform(10, 60, 3)
            img = np.where(masks[shape][..., None], colour * rng.uniform(0.8, 1.0), background)
            img = img + rng.normal(
                0, 6, img.shape
            )  # a little texture so no two images are identical
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


# ----------------------------------------------------------------------------------------------
# Token codes: a frozen tokenizer turns an image folder into token grids; the GPT trains on those
#
# code_path/ holds codes.npy (N, n_aug, h*w) uint16 (int32 past 65536 codes), labels.npy (N,) int64
# (BAD_LABEL for unreadable images), done.npy (N,) bool (what a resumed run skips) and meta.json.
# N is the image folder's length; row i is ImageFolder sample i. All three are .npy memmaps that
# every rank writes in place, so under torchrun keep code_path on the node's own disk (or a
# filesystem with coherent shared mmap); a rerun skips rows already marked done.


def ten_crop(img: Image.Image, size: int, crop_range: float = 1.1) -> list:
    """Official --ten-crop: ADM centre crop to int(size * crop_range), then torchvision TenCrop(size)."""
    img = center_crop_arr(img, int(size * crop_range))
    crops = []
    for im in (
        img,
        img.transpose(Image.FLIP_LEFT_RIGHT),
    ):  # TenCrop = FiveCrop(img) + FiveCrop(flip(img))
        w, h = im.size
        cx, cy = (
            int(round((w - size) / 2.0)),
            int(round((h - size) / 2.0)),
        )  # torchvision center_crop
        for left, top in ((0, 0), (w - size, 0), (0, h - size), (w - size, h - size), (cx, cy)):
            crops.append(im.crop((left, top, left + size, top + size)))
    return crops


def augment_crops(img: Image.Image, size: int, ten: bool = False, crop_range: float = 1.1) -> list:
    """The n_aug crops stored per image: ten-crop (10), or ADM centre crop and its flip (2)."""
    if ten:
        return ten_crop(img, size, crop_range)
    img = center_crop_arr(img, size)
    return [img, img.transpose(Image.FLIP_LEFT_RIGHT)]


class _Crops(torch.utils.data.Dataset):
    """ImageFolder samples at `indices` -> (crops (n_aug, 3, S, S), label or BAD_LABEL, index)."""

    def __init__(self, samples, indices, size, ten, crop_range, skip_bad):
        self.samples, self.indices, self.size = samples, indices, size
        self.ten, self.crop_range, self.skip_bad = ten, crop_range, skip_bad

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        path, label = self.samples[i]
        img = load_image_or_skip(path, self.skip_bad)
        if img is None:
            return torch.zeros(10 if self.ten else 2, 3, self.size, self.size), BAD_LABEL, i
        return (
            torch.stack(
                [pil_to_tensor(c) for c in augment_crops(img, self.size, self.ten, self.crop_range)]
            ),
            label,
            i,
        )


def write_json(obj, path):
    """json.dump, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


@torch.inference_mode()
def extract_codes(
    vq_ckpt,
    data_path,
    code_path,
    image_size=256,
    ten_crop=False,
    crop_range=1.1,
    batch_size=32,
    num_workers=4,
    skip_bad=False,
    flush_every=20,
) -> dict:
    """Encode an image folder into code_path with the frozen VQ (fp32, eval); resumable, torchrun-parallel."""
    from tqdm import tqdm
    from dataclasses import asdict

    d = init_dist()
    vq_ckpt, code_path = Path(vq_ckpt), Path(code_path)
    vq = load_tokenizer(vq_ckpt, d.device)
    if image_size % vq.config.downsample:
        raise UserError(
            f"--image-size {image_size} is not a multiple of the tokenizer's downsampling "
            f"{vq.config.downsample}"
        )
    folder = ImageFolder(data_path, augment=None)
    grid, n_aug = image_size // vq.config.downsample, 10 if ten_crop else 2
    dtype = np.uint16 if vq.config.codebook_size <= 2**16 else np.int32
    meta = dict(
        vocab_size=vq.config.codebook_size,
        grid_size=grid,
        block_size=grid * grid,
        image_size=image_size,
        num_classes=len(folder.classes),
        classes=folder.classes,
        num_images=len(folder),
        n_aug=n_aug,
        ten_crop=ten_crop,
        crop_range=crop_range if ten_crop else 1.0,
        dtype=np.dtype(dtype).name,
        data_path=str(Path(data_path).resolve()),
        tokenizer=dict(
            path=str(vq_ckpt.resolve()), size=vq_ckpt.stat().st_size, config=asdict(vq.config)
        ),
    )
    files = {k: code_path / f"{k}.npy" for k in ("codes", "labels", "done")}
    if d.rank == 0:  # rank 0 creates (or checks) the store, then everyone opens it
        meta["tokenizer"]["sha256"] = file_digest(vq_ckpt, "sha256")
        old = (
            json.loads((code_path / "meta.json").read_text())
            if (code_path / "meta.json").is_file()
            else None
        )
        if old is not None and all(f.is_file() for f in files.values()):
            changed = [k for k in meta if k != "data_path" and old.get(k) != meta[k]]
            if changed:
                raise UserError(
                    f"{code_path} holds codes made with a different {', '.join(changed)}; "
                    f"pass a new --code-path or delete that folder"
                )
        else:
            code_path.mkdir(parents=True, exist_ok=True)
            shape = (len(folder), n_aug, grid * grid)
            np.lib.format.open_memmap(files["codes"], "w+", dtype, shape).flush()
            np.save(files["labels"], np.full(len(folder), BAD_LABEL, dtype=np.int64))
            np.save(files["done"], np.zeros(len(folder), dtype=bool))
            write_json({**meta, "complete": False}, code_path / "meta.json")
    if d.distributed:
        dist.barrier()
    codes, labels, done = (np.load(f, mmap_mode="r+") for f in files.values())
    mine = np.flatnonzero(~done)[d.rank :: d.world_size]  # what is left, shared out over ranks
    loader = torch.utils.data.DataLoader(
        _Crops(folder.samples, mine, image_size, ten_crop, crop_range, skip_bad),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    finished = []
    for b, (x, y, idx) in enumerate(
        tqdm(loader, desc=f"encoding {len(mine)} images", disable=d.rank != 0)
    ):
        idx = idx.numpy()
        _, _, ind = vq.encode(x.flatten(0, 1).to(d.device))  # (B * n_aug * h * w,)
        codes[idx] = ind.view(len(idx), n_aug, -1).cpu().numpy().astype(dtype)
        labels[idx] = y.numpy()
        finished.append(idx)
        if (b + 1) % flush_every == 0 or b == len(
            loader
        ) - 1:  # codes reach the disk before done does
            codes.flush(), labels.flush()
            done[np.concatenate(finished)] = True
            done.flush()
            finished = []
    if d.distributed:
        dist.barrier()
    if d.rank == 0:
        meta = json.loads((code_path / "meta.json").read_text())
        bad = np.flatnonzero(done & (labels < 0))
        meta.update(
            num_done=int(done.sum()),
            num_valid=int((done & (labels >= 0)).sum()),
            num_bad=len(bad),
            bad_files=[str(folder.samples[i][0]) for i in bad],
            complete=bool(done.all()),
        )
        write_json(meta, code_path / "meta.json")
    if d.distributed:
        dist.barrier()
    return read_code_meta(code_path)


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
    """Token grids -> (codes (block_size,) int64, label int64), one random stored augmentation each.

    As the official imagenet_code dataset: a random crop index per sample, and with `extra_code_path`
    (e.g. the crop-range 1.05 set) that set instead with probability `extra_prob`. The draw is seeded
    by (seed, epoch, index), so a resumed run sees the same tokens. Unreadable images are left out.
    """

    def __init__(self, code_path, extra_code_path=None, extra_prob=0.5, seed=0):
        self.paths = [Path(p) for p in (code_path, extra_code_path) if p is not None]
        metas = [read_code_meta(p) for p in self.paths]
        self.meta = meta = metas[0]
        for p, m in zip(self.paths[1:], metas[1:]):
            diff = [
                k for k in ("vocab_size", "block_size", "num_images", "classes") if m[k] != meta[k]
            ]
            if diff:
                raise UserError(
                    f"{p} does not match {code_path} ({', '.join(diff)} differ); "
                    f"both must come from the same images and tokenizer"
                )
        self.labels = np.load(self.paths[0] / "labels.npy")
        ok = np.ones(len(self.labels), dtype=bool)
        for p in self.paths:
            ok &= np.load(p / "done.npy") & (np.load(p / "labels.npy") >= 0)
        self.valid = np.flatnonzero(ok)  # dataset index -> row of the stores
        if not len(self.valid):
            raise UserError(f"no finished codes in {code_path}; run (or resume) the extraction")
        self.vocab_size, self.block_size, self.num_classes = (
            meta["vocab_size"],
            meta["block_size"],
            meta["num_classes"],
        )
        self.extra_prob, self.seed, self.epoch = extra_prob, seed, 0
        self._codes = None  # memmaps, opened lazily in each DataLoader worker

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.valid)

    def __getitem__(self, i):
        if self._codes is None:
            self._codes = [np.load(p / "codes.npy", mmap_mode="r") for p in self.paths]
        j = int(self.valid[i])
        rng = np.random.default_rng([self.seed, self.epoch, j])
        store = (
            self._codes[1]
            if len(self._codes) > 1 and rng.random() < self.extra_prob
            else self._codes[0]
        )
        aug = int(rng.integers(store.shape[1]))
        return torch.from_numpy(store[j, aug].astype(np.int64)), int(self.labels[j])


# ----------------------------------------------------------------------------------------------
# Command line: toy images, code extraction


def parse_args(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        description="data utilities: toy images, token-code extraction"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    toy = sub.add_parser("toy", help="write a toy class-per-folder image dataset")
    toy.add_argument("root")
    toy.add_argument("--num-classes", type=int, default=4)
    toy.add_argument("--per-class", type=int, default=64)
    toy.add_argument("--size", type=int, default=64)
    toy.add_argument("--seed", type=int, default=0)
    ex = sub.add_parser(
        "extract", help="encode an image folder into token codes (resumable; torchrun ok)"
    )
    ex.add_argument("--vq-ckpt", required=True)
    ex.add_argument("--data-path", required=True)
    ex.add_argument("--code-path", required=True)
    ex.add_argument("--image-size", type=int, default=256)
    ex.add_argument(
        "--ten-crop", action="store_true", help="official 10 crops (else centre crop + flip)"
    )
    ex.add_argument(
        "--crop-range", type=float, default=1.1, help="ten-crop source size = image size x this"
    )
    ex.add_argument("--batch-size", type=int, default=32, help="images per rank per batch")
    ex.add_argument("--num-workers", type=int, default=4)
    ex.add_argument(
        "--skip-bad-images", action="store_true", help="mark unreadable images invalid and go on"
    )
    return parser.parse_args(argv)


def main(args):
    if args.cmd == "toy":
        print(make_toy_dataset(args.root, args.num_classes, args.per_class, args.size, args.seed))
    else:
        m = extract_codes(
            args.vq_ckpt,
            args.data_path,
            args.code_path,
            args.image_size,
            args.ten_crop,
            args.crop_range,
            args.batch_size,
            args.num_workers,
            args.skip_bad_images,
        )
        print0(
            f"{m['num_valid']} images x {m['n_aug']} crops of {m['block_size']} tokens in {args.code_path} "
            f"({m['num_bad']} unreadable skipped)"
        )


if __name__ == "__main__":
    cli(main, parse_args)
