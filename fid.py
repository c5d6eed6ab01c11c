"""FID, sFID, Inception Score, precision/recall and tokenizer rFID, with torch + numpy only.

    python fid.py data/toy toy_samples.npz --inception-weights random   # offline smoke run (CPU)
    python fid.py data/toy samples/ --device cpu --batch-size 16         # two folders, on the CPU
    python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz            # LlamaGen's gFID protocol
    python fid.py --rfid --vq-ckpt vq_ds16_c2i.pt imagenet/val --image-size 256  # rFID, PSNR
    python fid.py imagenet/val --image-size 256 --save-stats val256_stats.npz    # statistics only

Reimplements OpenAI's ADM evaluator (guided-diffusion evaluations/evaluator.py, which LlamaGen
uses) without TensorFlow: the 2015 TF Inception graph as ported by pytorch-fid (same weights
file, pt_inception-2015-12-05-6726825d.pth), TF1 resize arithmetic in the default "adm" mode,
Frechet distances by float64 eigendecompositions instead of scipy.linalg.sqrtm.
A reference may be an ADM .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s), a folder of
images, or a statistics file written by --save-stats (the ADM keys plus pool3 features [N, 2048]
for precision/recall and IS, plus the preprocessing mode).
"""

import argparse
import math
import os
import warnings
import zipfile
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import common
import data
from common import UserError

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub naming: the first hex digits of the file's sha256
MODES = ("adm", "pytorch-fid")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # the ADM reference batch's precomputed statistics
IS_SPLIT = 5000  # ADM: Inception Score over consecutive splits of 5000 samples
PR_K = 3  # improved precision/recall: radius = distance to the 3rd nearest neighbour


# ----------------------------------------------------------------------------------------------
# Inception-v3, FID variant (pytorch-fid's port of the 2015 TF graph; EVAL.md §2). Module names
# are pytorch-fid's (EVAL.md §1.1), so its weights file is one strict load_state_dict away.


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001, the TF graph's) -> ReLU; keys conv.*, bn.*."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Mixed(nn.Module):
    """One Inception block: parallel branches from the same input, concatenated on channels.

    `branches` maps a name prefix to its layers [(cout, kernel), ...], run in order; a layer
    (cout, kernel_a, kernel_b) is two convolutions side by side on the same input, concatenated
    (Mixed_7b/7c). Names are pytorch-fid's: a one-layer branch is the prefix itself (branch1x1),
    longer ones prefix_1, prefix_2, ... and side-by-side pairs prefix_2a, prefix_2b. The pool
    branch comes last: `pool` (TF's 3x3 average by default), then a 1x1 conv to `pool_features`
    channels named branch_pool. Without pool_features the block halves the grid (Mixed_6a, 7a):
    the pool is a stride-2 max pool alone and each branch's last conv has stride 2, no padding.
    """

    def __init__(self, cin, branches: dict, pool_features=0, pool=None):
        super().__init__()
        self.branches = []  # [branch][step] -> the modules run side by side at that step
        for prefix, layers in branches.items():
            c, branch = cin, []
            for i, (cout, *kernels) in enumerate(layers, 1):
                stride = 2 if i == len(layers) and not pool_features else 1
                step = [
                    BasicConv2d(c, cout, k, stride, "same" if stride == 1 else 0) for k in kernels
                ]
                for suffix, conv in zip("ab" if len(step) == 2 else [""], step):
                    self.add_module(f"{prefix}_{i}{suffix}" if len(layers) > 1 else prefix, conv)
                branch.append(step)
                c = cout * len(kernels)
            self.branches.append(branch)
        if pool_features:  # TF averages over real pixels only: the padded zeros are not counted
            pool = pool or nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
            self.branch_pool = BasicConv2d(cin, pool_features, 1)
            self.branches.append([[pool], [self.branch_pool]])
        else:
            self.branches.append([[nn.MaxPool2d(3, stride=2)]])

    def forward(self, x):
        out = []
        for branch in self.branches:
            y = x
            for step in branch:
                y = step[0](y) if len(step) == 1 else torch.cat([m(y) for m in step], 1)
            out.append(y)
        return torch.cat(out, 1)


# The five block types of Inception-v3 (Szegedy et al. 2016, Fig. 5-7 and 10), as branch tables
BRANCHES_A = dict(  # Mixed_5b..5d, 35x35
    branch1x1=[(64, 1)], branch5x5=[(48, 1), (64, 5)], branch3x3dbl=[(64, 1), (96, 3), (96, 3)]
)
# Mixed_6a, 35x35 -> 17x17 (halving: the last conv of each branch has stride 2)
BRANCHES_B = dict(branch3x3=[(384, 3)], branch3x3dbl=BRANCHES_A["branch3x3dbl"])


def branches_c(c7):  # Mixed_6b..6e, 17x17: 7x7 convolutions factorised into 1x7 and 7x1
    return dict(
        branch1x1=[(192, 1)],
        branch7x7=[(c7, 1), (c7, (1, 7)), (192, (7, 1))],
        branch7x7dbl=[(c7, 1), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))],
    )


BRANCHES_D = dict(  # Mixed_7a, 17x17 -> 8x8 (halving)
    branch3x3=[(192, 1), (320, 3)],
    branch7x7x3=[(192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3)],
)
SPLIT = [(1, 3), (3, 1)]  # a 1x3 and a 3x1 conv side by side in place of one 3x3
BRANCHES_E = dict(  # Mixed_7b, 7c, 8x8
    branch1x1=[(320, 1)],
    branch3x3=[(384, 1), (384, *SPLIT)],
    branch3x3dbl=[(448, 1), (384, 3), (384, *SPLIT)],
)


class InceptionV3(nn.Module):
    """Inception-v3 as in the FID graph: uint8-valued images in, (pool3, spatial, logits) out."""

    def __init__(self):
        super().__init__()
        # run in this order by forward; the max pools hold no weights, so add no keys
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)  # (B, 32, 149, 149)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)  # (B, 32, 147, 147)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)  # (B, 64, 147, 147)
        self.maxpool1 = nn.MaxPool2d(3, stride=2)  # (B, 64, 73, 73)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)  # (B, 192, 71, 71)
        self.maxpool2 = nn.MaxPool2d(3, stride=2)  # (B, 192, 35, 35)
        self.Mixed_5b = Mixed(192, BRANCHES_A, 32)  # (B, 256, 35, 35)
        self.Mixed_5c = Mixed(256, BRANCHES_A, 64)  # (B, 288, 35, 35)
        self.Mixed_5d = Mixed(288, BRANCHES_A, 64)  # (B, 288, 35, 35)
        self.Mixed_6a = Mixed(288, BRANCHES_B)  # (B, 768, 17, 17)
        self.Mixed_6b = Mixed(768, branches_c(128), 192)
        self.Mixed_6c = Mixed(768, branches_c(160), 192)
        self.Mixed_6d = Mixed(768, branches_c(160), 192)
        self.Mixed_6e = Mixed(768, branches_c(192), 192)  # (B, 768, 17, 17)
        self.Mixed_7a = Mixed(768, BRANCHES_D)  # (B, 1280, 8, 8)
        self.Mixed_7b = Mixed(1280, BRANCHES_E, 192)  # (B, 2048, 8, 8)
        # Mixed_7c pools by max, not average: a quirk of the TF graph that pytorch-fid patches in
        self.Mixed_7c = Mixed(2048, BRANCHES_E, 192, nn.MaxPool2d(3, stride=1, padding=1))
        self.fc = nn.Linear(2048, 1008)  # 1000 ImageNet classes + 8 unused outputs of the graph

    def forward(self, images: torch.Tensor, mode: str = "adm"):
        x = preprocess(images, mode)  # (B, 3, 299, 299)
        for name, layer in self.named_children():
            if name == "fc":
                break
            x = layer(x)
            if name == "Mixed_6d":  # sFID: TF mixed_6/conv = Mixed_6d.branch1x1 = first 192
                spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # keep 7, NHWC: (B, 2023)
        pool3 = x.mean((2, 3))  # (B, 2048)
        logits = pool3 @ self.fc.weight.T  # (B, 1008); IS uses the graph's MatMul, without the bias
        return pool3, spatial, logits


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ResizeBilinear (legacy, no half-pixel centres): x (B, C, H, W) float32 -> size x size."""

    def along_width(x):  # (..., W) -> (..., size)
        n_in = x.shape[-1]
        # source coordinate = dst * scale, with TF's scale = in / (float)out, all in float32
        src = torch.arange(size, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor()
        left, right = x[..., lo.long()], x[..., (lo.long() + 1).clamp(max=n_in - 1)]
        return left + (right - left) * (src - lo)

    # along x first, then y, as TF: the same float32 operations in the same order
    return along_width(along_width(x).transpose(2, 3)).transpose(2, 3)  # (B, C, size, size)


def preprocess(images: torch.Tensor, mode: str = "adm") -> torch.Tensor:
    """(B, 3, H, W) uint8-valued images -> (B, 3, 299, 299) network input for `mode`."""
    x = images.float()
    if mode == "adm":  # TF graph: float 0..255, resize, then (v - 128) / 128
        return (resize_tf1_bilinear(x, 299) - 128) / 128
    if mode == "pytorch-fid":  # ToTensor to [0, 1], half-pixel bilinear, then 2x - 1
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def load_inception(weights=None) -> InceptionV3:
    """The FID Inception in eval mode: `weights`, else pytorch-fid's release (cached); "random"
    gives seeded random weights for offline smoke runs."""
    if weights == "random":  # offline smoke runs: numbers comparable only with other "random" runs
        torch.manual_seed(0)
        model = InceptionV3()
        for m in model.modules():  # He init keeps activations O(1) through 94 conv + ReLU layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        return model.eval()
    if weights is None:
        try:
            weights = common.download(WEIGHTS_URL, desc="FID Inception weights")
        except UserError as e:
            raise UserError(f"{e} (or pass --inception-weights PATH)") from None
    # the AuxLogits head is training-only; torch fills in BN num_batches_tracked when absent
    state = {k: v for k, v in common.load_checkpoint(weights).items() if "AuxLogits" not in k}
    sha = common.file_digest(weights)
    if not sha.startswith(WEIGHTS_SHA256_PREFIX):  # pytorch-fid never checks it: warn, not fail
        warnings.warn(
            f"{weights}: sha256 {sha[:8]}... does not start with {WEIGHTS_SHA256_PREFIX}; "
            f"FIDs may not be comparable with published ones"
        )
    model = InceptionV3()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or misshapen keys: say the first
        first = str(e).splitlines()[1].strip()[:200]
        raise UserError(f"{weights} is not the FID Inception weights file: {first}") from None
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Metrics (float64 numpy; EVAL.md §3-4)


def compute_statistics(features: np.ndarray):
    """Mean and unbiased covariance of (N, D) features, in float64."""
    n, dim = features.shape
    if n < 2:
        raise UserError(f"need at least 2 images for statistics, got {n}")
    if n <= dim:
        warnings.warn(
            f"only {n} images for {dim}-dim features: the covariance is singular and the "
            f"Frechet distance is biased high; use many more (50 000 for published numbers)"
        )
    features = features.astype(np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, by two symmetric eigensolves."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise UserError("statistics contain NaN or inf; check the images and the weights file")
    # S1 = F F^T with F = V sqrt(W) (eigenvectors V, eigenvalues W); the nonzero eigenvalues of
    # S1 S2 are those of the symmetric PSD F^T S2 F, so tr (S1 S2)^1/2 = sum of their square roots.
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    keep = w > w.max() * np.finfo(np.float64).eps  # below: round-off (N <= D leaves ~D - N of them)
    f = v[:, keep] * np.sqrt(w[keep])  # (D, r), r < D when N <= D
    m = f.T @ sigma2 @ f  # (r, r)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT) -> float:
    """ADM's IS: softmax over all 1008 outputs, exp(mean KL(p || mean p)) per split; their mean."""
    probs = torch.softmax(logits.float(), dim=1).double()  # float32 softmax as the TF graph
    scores = []
    for part in probs.split(split_size):  # consecutive splits; a partial last one counts
        # plain logs as ADM; xlogy makes 0 log 0 = 0 where ADM would return NaN
        kl = torch.special.xlogy(part, part) - part * part.mean(0, keepdim=True).log()
        scores.append(kl.sum(1).mean().exp().item())
    return float(np.mean(scores))


def precision_recall(ref_feats, sample_feats, k: int = PR_K):
    """Improved precision/recall (Kynkaanniemi et al. 2019) of pool3 features, as ADM's (float32
    distances where ADM uses float16, EVAL.md §4)."""
    ref, sam = torch.as_tensor(ref_feats).float(), torch.as_tensor(sample_feats).float()
    if min(len(ref), len(sam)) <= k:
        warnings.warn(f"precision/recall need more than k={k} images per set; skipped")
        return float("nan"), float("nan")

    def sq_dists(a, b):  # (n, m) squared Euclidean distances as ADM: |a|^2 - 2ab + |b|^2, >= 0
        return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp_min(0)

    def covered(points, centres):  # fraction of points within (<=) some centre's k-NN radius
        # radius: squared distance to the k-th neighbour (position 0 is the centre itself);
        # rows in blocks of 1000 bound the (block, N) distance matrices in memory
        radii = torch.cat(
            [sq_dists(c, centres).kthvalue(k + 1, 1).values for c in centres.split(1000)]
        )
        inside = [(sq_dists(p, centres) <= radii).any(1) for p in points.split(1000)]
        return torch.cat(inside).double().mean().item()

    return covered(sam, ref), covered(ref, sam)  # precision, recall


# ----------------------------------------------------------------------------------------------
# Inputs: ADM .npz (arr_0 streamed in batches), statistics .npz, image folders


def npz_images(path, batch_size):
    """(count, iterator of (B, 3, H, W) uint8 batches) over arr_0, never loaded whole (as ADM)."""
    f = zipfile.ZipFile(path).open("arr_0.npy")
    major, _ = np.lib.format.read_magic(f)  # .npy format 1.0 or 2.0 (bigger headers)
    shape, _, dtype = getattr(np.lib.format, f"read_array_header_{major}_0")(f)
    if dtype != np.uint8 or shape[3:] != (3,):  # N x H x W x 3
        raise UserError(f"{path}: arr_0 must be uint8 N x H x W x 3 images, got {dtype} {shape}")

    def batches():
        with f:
            for _ in range(0, shape[0], batch_size):  # the last read returns what is left
                arr = np.frombuffer(f.read(batch_size * math.prod(shape[1:])), np.uint8)
                yield torch.tensor(arr).view(-1, *shape[1:]).permute(0, 3, 1, 2)  # (B, 3, H, W)

    return shape[0], batches()


def load_images(files, image_size=None):
    """Decode image files (in a DataLoader worker), center-cropped as ADM if image_size is set:
    (B, 3, H, W) uint8."""
    images = [data.load_image(f) for f in files]
    images = [np.asarray(data.center_crop_arr(i, image_size) if image_size else i) for i in images]
    if len({i.shape for i in images}) > 1:
        raise UserError(
            "images differ in size; pass --image-size N to center-crop them all to N x N"
        )
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def open_images(path, args):
    """(count, iterator of (B, 3, H, W) uint8 batches) from an image folder (recursive) or an
    ADM .npz."""
    if not os.path.isdir(path):
        return npz_images(path, args.batch_size)
    files = data.list_images(path)
    if not files:
        raise UserError(f"no images (png, jpg, jpeg, webp) found under {path}")
    # the file list is the dataset; the collate function decodes each batch in the workers
    collate = partial(load_images, image_size=args.image_size)
    return len(files), iter(
        DataLoader(files, args.batch_size, num_workers=args.num_workers, collate_fn=collate)
    )


@torch.no_grad()
def extract(model, count, batches, args, desc):
    """Images through the network -> pool3 (N, 2048) and spatial (N, 2023) features, numpy."""
    feats = [], []
    with tqdm(total=count, desc=f"{desc} ({args.mode})", unit="img", disable=None) as bar:
        for x in batches:
            for out, f in zip(feats, model(x.to(args.device), args.mode)):
                out.append(f.float().cpu())
            bar.update(len(x))
    return [torch.cat(f).numpy() for f in feats]


def statistics(pool3, spatial, mode):
    """What a statistics file holds: the ADM keys (FID on pool3, sFID on the spatial features),
    pool3 itself for precision/recall and IS, the count and the preprocessing mode."""
    moments = (*compute_statistics(pool3), *compute_statistics(spatial))  # mu, sigma, mu_s, sigma_s
    return dict(zip(STAT_KEYS, moments), pool3=pool3, n=len(pool3), mode=mode)


def load_set(path, model, args):
    """Statistics of a folder or .npz of images, or read from a statistics .npz (ADM's or ours)."""
    if not os.path.isdir(path):
        try:
            with np.load(path) as f:
                stats = {k: f[k] for k in f.files if k != "arr_0"}
                has_images = "arr_0" in f.files
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(
                f"cannot read {path} as .npz ({type(e).__name__}); expected .npz or a folder"
            )
        if set(STAT_KEYS) <= set(stats):  # precomputed: ADM's reference batch, or --save-stats
            if "pool3" not in stats and has_images:  # ADM's: its 10k images serve for P/R
                batches = npz_images(path, args.batch_size)
                stats["pool3"] = extract(model, *batches, args, "reference arr_0")[0]
            stats["mode"] = str(stats.get("mode", "adm"))  # the ADM batch came from the TF graph
            if stats["mode"] != args.mode:
                warnings.warn(
                    f"{path} holds statistics for mode {stats['mode']}, not {args.mode}: "
                    "FIDs will be biased"
                )
            return stats
        if not has_images:
            raise UserError(f"{path} holds neither arr_0 images nor {', '.join(STAT_KEYS)}")
    pool3, spatial = extract(model, *open_images(path, args), args, os.path.basename(path))
    return statistics(pool3, spatial, args.mode)


# ----------------------------------------------------------------------------------------------
# Tokenizer rFID and the script


@torch.no_grad()
def reconstruct(model, args):
    """rFID: statistics of a folder and of its VQ reconstructions; PSNR and codebook usage."""
    if args.vq_ckpt is None or len(args.paths) != 1 or not os.path.isdir(args.paths[0]):
        raise UserError("--rfid needs --vq-ckpt CKPT and one image folder")
    tokenizer = data.load_tokenizer(args.vq_ckpt, args.device)
    args.image_size = args.image_size or 256
    count, batches = open_images(args.paths[0], args)
    used = torch.zeros(tokenizer.config.codebook_size, dtype=torch.bool, device=args.device)
    psnrs = []

    def pairs():  # each image, then its reconstruction: one Inception pass for both sets
        for x in batches:
            x = x.to(args.device)
            quant, _, indices = tokenizer.encode(x.float() / 127.5 - 1)
            used[indices] = True
            rec = data.to_uint8(tokenizer.decode(quant)).permute(0, 3, 1, 2).to(args.device)
            mse = (rec.float() - x.float()).pow(2).mean((1, 2, 3))  # per image, on uint8 values
            psnrs.append(10 * torch.log10(255**2 / mse))
            yield torch.stack([x, rec], 1).flatten(0, 1)  # (2B, 3, H, W)

    pool3, spatial = extract(model, 2 * count, pairs(), args, "originals + reconstructions")
    originals, recon = (statistics(pool3[i::2], spatial[i::2], args.mode) for i in (0, 1))
    return originals, recon, torch.cat(psnrs).mean().item(), used.float().mean().item()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "paths",
        nargs="+",
        help="REFERENCE SAMPLES: .npz files or image folders (one: --save-stats)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="adm",
        help="preprocessing: adm (TF1, LlamaGen's) or pytorch-fid",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--num-workers", type=int, default=2, help="image decoding processes for folders"
    )
    p.add_argument("--image-size", type=int, help="center-crop folder images to N x N (rFID: 256)")
    p.add_argument(
        "--inception-weights",
        help="local pt_inception-2015-12-05-6726825d.pth, or 'random' (seeded random weights, "
        "no download: only for comparing runs made the same way)",
    )
    p.add_argument("--save-stats", help="write the last path's statistics (rFID: the originals')")
    p.add_argument(
        "--rfid",
        action="store_true",
        help="tokenizer rFID: reconstruct one folder through --vq-ckpt",
    )
    p.add_argument("--vq-ckpt")
    return p.parse_args(argv)


METRIC_NAMES = dict(
    fid="FID",
    sfid="sFID",
    inception_score="Inception Score",
    precision="Precision",
    recall="Recall",
    psnr="PSNR (dB)",
    codebook_usage="Codebook usage",
)


def main(args):
    if len(args.paths) > 2 or (len(args.paths) == 1 and not (args.save_stats or args.rfid)):
        raise UserError("give REFERENCE SAMPLES, or one path with --save-stats PATH (or --rfid)")
    for path in args.paths:  # before the weights download, so a typo costs nothing
        if not os.path.exists(path):
            raise UserError(
                f"{path} not found (expected an .npz batch, a statistics .npz or an image folder)"
            )
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, as the reference graph
    model = load_inception(args.inception_weights).to(args.device)
    # the label printed beside every number; random weights are never comparable with published FIDs
    label = args.mode + ("/random-weights" if args.inception_weights == "random" else "")
    results = {"mode": label}
    if args.rfid:
        ref, sam, results["psnr"], results["codebook_usage"] = reconstruct(model, args)
    else:
        sets = [load_set(path, model, args) for path in args.paths]
        ref, sam = sets[0], sets[-1]
    counts = [f"{s['n']} images" if "n" in s else "precomputed statistics" for s in (ref, sam)]
    if args.save_stats:
        with common.atomic_write(args.save_stats) as f:
            np.savez(f, **(ref if args.rfid else sam))
        print(f"saved statistics of {counts[0 if args.rfid else 1]} to {args.save_stats}")
    if len(args.paths) == 1 and not args.rfid:
        return results
    for key, mu, sigma in [("fid", "mu", "sigma"), ("sfid", "mu_s", "sigma_s")]:
        results[key] = frechet_distance(ref[mu], ref[sigma], sam[mu], sam[sigma])
    if "pool3" in sam and not args.rfid:  # logits = pool3 @ fc.weight.T: pool3 is enough
        results["inception_score"] = inception_score(
            torch.as_tensor(sam["pool3"]) @ model.fc.weight.detach().cpu().T
        )
    if "pool3" in ref and "pool3" in sam:
        results["precision"], results["recall"] = precision_recall(ref["pool3"], sam["pool3"])
    what = f"tokenizer {args.vq_ckpt}: originals" if args.rfid else "reference"
    samples = "reconstructions" if args.rfid else "samples"
    print(f"{what} {counts[0]} | {samples} {counts[1]} | mode {label}")
    for key, name in METRIC_NAMES.items():
        if key in results:
            name = "rFID" if args.rfid and key == "fid" else name
            print(f"{name + ' (' + label + ')':<28} {results[key]:.4f}")
    return results


if __name__ == "__main__":
    common.cli(main, parse_args)
