"""FID, sFID, Inception Score, precision/recall and tokenizer rFID, with torch + numpy only.

    python fid.py data/toy samples/ --device cpu --batch-size 16             # two folders, on the CPU
    python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz                # LlamaGen's gFID protocol
    python fid.py --rfid --vq-ckpt vq_ds16_c2i.pt imagenet/val --image-size 256   # rFID, PSNR, usage
    python fid.py imagenet/val --image-size 256 --save-stats val256_stats.npz     # statistics only

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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub naming: the first hex digits of the file's sha256
MODES = ("adm", "pytorch-fid")
IS_SPLIT = 5000  # ADM: Inception Score over consecutive splits of 5000 samples
PR_K = 3  # improved precision/recall: radius = distance to the 3rd nearest neighbour


# ----------------------------------------------------------------------------------------------
# Inception-v3, FID variant (pytorch-fid's port of the 2015 TF graph; EVAL.md §2)


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):  # TF averages over real pixels only: padded zeros are not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b..5d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = (
            BasicConv2d(cin, 48, 1),
            BasicConv2d(48, 64, 5, padding=2),
        )
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = (
            BasicConv2d(cin, 192, 1),
            BasicConv2d(192, 320, 3, stride=2),
        )
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1
        )


class InceptionE(
    nn.Module
):  # Mixed_7b (avg pool branch), Mixed_7c (max pool branch: a TF graph quirk)
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """Inception-v3 as in the FID graph: uint8-valued images in, (pool3, spatial, logits) out."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
            InceptionA(192, 32),
            InceptionA(256, 64),
            InceptionA(288, 64),
        )
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(
            2048, 1008
        )  # 1000 ImageNet classes + 8 unused outputs of the 2015 graph

    def forward(self, images: torch.Tensor, mode: str = "adm"):
        x = preprocess(images, mode)  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # (B, 192, 71, 71)
        x = self.Mixed_5d(
            self.Mixed_5c(self.Mixed_5b(F.max_pool2d(x, 3, stride=2)))
        )  # (B, 288, 35, 35)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x))))  # (B, 768, 17, 17)
        # sFID: TF mixed_6/conv = Mixed_6d.branch1x1 = the first 192 channels; keep 7, flatten as NHWC
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # (B, 17*17*7 = 2023)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (B, 2048, 8, 8)
        pool3 = x.mean((2, 3))  # (B, 2048)
        logits = pool3 @ self.fc.weight.T  # (B, 1008); IS uses the graph's MatMul, without the bias
        return pool3, spatial, logits


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ResizeBilinear (legacy: no half-pixel centres) of x (B, C, H, W) float32 to size x size."""

    def taps(n_in):
        scale = torch.tensor(n_in / size, dtype=torch.float32)  # TF: in / (float)out, in float32
        src = torch.arange(size, dtype=torch.float32) * scale  # source coordinate = dst * scale
        lo = src.floor()
        lo_i = lo.long()
        return (
            lo_i.to(x.device),
            (lo_i + 1).clamp(max=n_in - 1).to(x.device),
            (src - lo).to(x.device),
        )

    ylo, yhi, fy = taps(x.shape[2])
    xlo, xhi, fx = taps(x.shape[3])
    top, bottom = x[:, :, ylo], x[:, :, yhi]  # (B, C, size, W)
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * fx  # lerp along x first, as TF
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * fx
    return top + (bottom - top) * fy[:, None]  # (B, C, size, size)


def preprocess(images: torch.Tensor, mode: str = "adm") -> torch.Tensor:
    """(B, 3, H, W) uint8-valued images -> (B, 3, 299, 299) network input for `mode`."""
    x = images.float()
    if mode == "adm":  # TF graph: float 0..255, resize, then (v - 128) / 128
        return (resize_tf1_bilinear(x, 299) - 128) / 128
    if mode == "pytorch-fid":  # ToTensor to [0, 1], half-pixel bilinear, then 2x - 1
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def random_inception_weights(shapes: dict, seed: int = 0) -> dict:
    """Seeded random weights in the official layout (keys in sorted order, one draw each, He-init convs)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("running_var"):  # positive BN variances
            sd[name] = torch.rand(shape, generator=g) + 0.5
            continue
        r = torch.randn(shape, generator=g)
        if name.endswith("conv.weight"):  # He init keeps activations O(1) through 94 conv layers
            sd[name] = r * math.sqrt(2 / math.prod(shape[1:]))
        elif name.endswith("bn.weight"):
            sd[name] = 1 + 0.1 * r
        elif name == "fc.weight":
            sd[name] = 0.05 * r
        else:  # bn.bias, bn.running_mean, fc.bias
            sd[name] = 0.1 * r
    return sd


def load_inception(weights=None) -> InceptionV3:
    """The FID Inception in eval mode, from `weights`, pytorch-fid's release (cached), or "random"."""
    if weights == "random":  # offline smoke runs: numbers comparable only with other "random" runs
        model = InceptionV3()
        shapes = {
            k: v.shape
            for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }
        model.load_state_dict(random_inception_weights(shapes), strict=False)
        return model.eval()
    if weights is None:
        try:
            weights = data.download(WEIGHTS_URL, desc="FID Inception weights")
        except data.UserError as e:
            raise data.UserError(f"{e} (or pass --inception-weights PATH)") from None
    if not os.path.isfile(weights):
        raise data.UserError(
            f"Inception weights {weights} not found; pass the path of "
            f"pt_inception-2015-12-05-6726825d.pth ({WEIGHTS_URL})"
        )
    sha = data.file_digest(weights, "sha256")
    if not sha.startswith(WEIGHTS_SHA256_PREFIX):
        warnings.warn(
            f"{weights}: sha256 {sha[:8]}... does not start with {WEIGHTS_SHA256_PREFIX}; "
            f"FIDs may not be comparable with published ones"
        )
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    sd = {
        k: v
        for k, v in sd.items()
        if not (k.endswith("num_batches_tracked") or k.startswith("AuxLogits."))
    }
    model = InceptionV3()
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise data.UserError(
            f"{weights} is not the FID Inception weights file: {str(e).splitlines()[-1]}"
        )
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise data.UserError(
            f"{weights} is not the FID Inception weights file: missing keys {missing[:3]}, "
            f"unexpected keys {unexpected[:3]}"
        )
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Metrics (float64 numpy; EVAL.md §3-4)


def compute_statistics(features: np.ndarray):
    """Mean and unbiased covariance of (N, D) features, in float64."""
    n, d = features.shape
    if n < 2:
        raise data.UserError(f"need at least 2 images for statistics, got {n}")
    if n <= d:
        warnings.warn(
            f"only {n} images for {d}-dim features: the covariance is singular and the "
            f"Frechet distance is biased high; use many more (50 000 for published numbers)"
        )
    features = features.astype(np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, by two symmetric eigendecompositions."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise data.UserError("statistics contain NaN or inf; check the images and the weights file")
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
    """ADM's IS: softmax over all 1008 outputs, exp(mean KL(p || mean p)) per split, mean of splits."""
    probs = torch.softmax(logits.float(), dim=1).double()  # float32 softmax as the TF graph
    scores = []
    for part in probs.split(split_size):  # consecutive splits; a partial last one counts
        # plain logs as ADM; xlogy makes 0 log 0 = 0 where ADM would return NaN
        kl = torch.special.xlogy(part, part) - part * part.mean(0, keepdim=True).log()
        scores.append(kl.sum(1).mean().exp().item())
    return float(np.mean(scores))


def _sq_dists(
    a, b
):  # (n, m) squared Euclidean distances, as ADM: |a|^2 - 2ab + |b|^2, clamped at 0
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp_min(0)


def _knn_radii(
    x, k=PR_K, block=1000
):  # squared distance to the k-th neighbour (position 0 is itself)
    return torch.cat(
        [
            _sq_dists(x[i : i + block], x).kthvalue(k + 1, dim=1).values
            for i in range(0, len(x), block)
        ]
    )


def _covered(
    points, centres, radii, block=1000
):  # which points lie within (<=) some centre's radius
    return torch.cat(
        [
            (_sq_dists(points[i : i + block], centres) <= radii).any(1)
            for i in range(0, len(points), block)
        ]
    )


def precision_recall(ref_feats: torch.Tensor, sample_feats: torch.Tensor, k: int = PR_K):
    """Improved precision/recall (Kynkaanniemi et al. 2019) on pool3 features, as ADM but in float32."""
    ref, sam = ref_feats.float(), sample_feats.float()
    if min(len(ref), len(sam)) <= k:
        warnings.warn(f"precision/recall need more than k={k} images per set; skipped")
        return float("nan"), float("nan")
    precision = _covered(sam, ref, _knn_radii(ref, k)).double().mean().item()
    recall = _covered(ref, sam, _knn_radii(sam, k)).double().mean().item()
    return precision, recall


# ----------------------------------------------------------------------------------------------
# Inputs: ADM .npz (arr_0 streamed in batches), statistics .npz, image folders

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # the ADM reference batch's precomputed statistics


def _npz_images(path, batch_size):
    """(count, iterator of (B, 3, H, W) uint8 batches) over arr_0 without loading it whole, as ADM."""
    zf = zipfile.ZipFile(path)
    f = zf.open("arr_0.npy")
    read_header = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    shape, _, dtype = read_header[np.lib.format.read_magic(f)](f)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise data.UserError(
            f"{path}: arr_0 must be uint8 N x H x W x 3 images, got {dtype} {shape}"
        )

    def batches():
        with zf, f:
            for i in range(0, shape[0], batch_size):
                b = min(batch_size, shape[0] - i)
                arr = np.frombuffer(f.read(b * int(np.prod(shape[1:]))), np.uint8).reshape(
                    b, *shape[1:]
                )
                yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2)

    return shape[0], batches()


class ImageFiles(torch.utils.data.Dataset):
    """Every image under a folder (recursive), optionally ADM center-cropped, as (3, H, W) uint8."""

    def __init__(self, root, image_size=None):
        self.files, self.image_size = data.list_images(root), image_size
        if not self.files:
            raise data.UserError(f"no images (png, jpg, jpeg, webp) found under {root}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = data.load_image(self.files[i])
        img = data.center_crop_arr(img, self.image_size) if self.image_size else img
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _stack(batch):
    if len({x.shape for x in batch}) > 1:
        raise data.UserError(
            "images differ in size; pass --image-size N to center-crop them all to N x N"
        )
    return torch.stack(batch)


def open_images(path, args):
    """(count, iterator of (B, 3, H, W) uint8 batches) from an image folder or an ADM .npz."""
    if not os.path.isdir(path):
        return _npz_images(path, args.batch_size)
    ds = ImageFiles(path, args.image_size)
    return len(ds), iter(
        torch.utils.data.DataLoader(
            ds, args.batch_size, num_workers=args.num_workers, collate_fn=_stack
        )
    )


@torch.no_grad()
def extract(model, count, batches, args, desc):
    """Images through the network -> dict of pool3 (N, 2048), spatial (N, 2023), logits (N, 1008)."""
    out = {"pool3": [], "spatial": [], "logits": []}
    with tqdm(total=count, desc=f"{desc} ({args.mode})", unit="img", disable=None) as bar:
        for x in batches:
            for key, feats in zip(out, model(x.to(args.device), args.mode)):
                out[key].append(feats.float().cpu())
            bar.update(len(x))
    return {k: torch.cat(v) for k, v in out.items()}


def statistics(feats, mode):
    """What a statistics file holds: the ADM keys, pool3 (for P/R and IS), mode and count."""
    (mu, sigma), (mu_s, sigma_s) = (
        compute_statistics(feats["pool3"].numpy()),
        compute_statistics(feats["spatial"].numpy()),
    )
    return dict(
        mu=mu,
        sigma=sigma,
        mu_s=mu_s,
        sigma_s=sigma_s,
        pool3=feats["pool3"].numpy(),
        mode=mode,
        n=len(feats["pool3"]),
    )


def load_set(path, model, args):
    """Statistics of a folder or .npz of images, or read from a statistics .npz (ADM's or ours)."""
    if not os.path.exists(path):
        raise data.UserError(f"{path} does not exist (expected an .npz file or an image folder)")
    keys = []
    if not os.path.isdir(path):
        try:
            with np.load(path) as f:
                keys = f.files
                stats = {k: f[k] for k in f.files if k in STAT_KEYS + ("pool3", "mode", "n")}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise data.UserError(
                f"cannot read {path} as .npz ({type(e).__name__}); expected .npz or a folder"
            )
        if "arr_0" not in keys and not set(STAT_KEYS) <= set(keys):
            raise data.UserError(f"{path} holds neither arr_0 images nor {', '.join(STAT_KEYS)}")
    if "mu" not in keys:  # images: run them through the network
        return statistics(
            extract(model, *open_images(path, args), args, desc=os.path.basename(path)), args.mode
        )
    stats = {
        "pool3": None,
        "n": None,
        "mode": "adm",
        **stats,
    }  # the ADM batch came from the TF graph
    stats["mode"], stats["n"] = str(stats["mode"]), stats["n"] and int(stats["n"])
    if (
        stats["pool3"] is None and "arr_0" in keys
    ):  # ADM reference: its 10k images serve precision/recall
        stats["pool3"] = extract(
            model, *_npz_images(path, args.batch_size), args, desc="reference arr_0"
        )["pool3"].numpy()
    if stats["mode"] != args.mode:
        warnings.warn(
            f"{path} holds statistics for mode {stats['mode']}, not {args.mode}: FIDs will be biased"
        )
    return stats


def save_stats(stats, path):
    """Write a statistics .npz atomically."""
    with data.atomic_write(path) as f:
        np.savez(f, **stats)
    print(f"saved statistics of {stats['n']} images to {path}")


# ----------------------------------------------------------------------------------------------
# Tokenizer rFID and the script


@torch.no_grad()
def reconstruct(model, args):
    """rFID: a folder and its VQ reconstructions through the Inception; PSNR and codebook usage."""
    if args.vq_ckpt is None or len(args.paths) != 1 or not os.path.isdir(args.paths[0]):
        raise data.UserError("--rfid needs --vq-ckpt CKPT and one image folder")
    tokenizer = data.load_tokenizer(args.vq_ckpt, args.device)
    args.image_size = args.image_size or 256
    count, batches = open_images(args.paths[0], args)
    used = torch.zeros(tokenizer.config.codebook_size, dtype=torch.bool, device=args.device)
    psnrs, is_recon = [], []

    def both():  # each batch: B originals then their B reconstructions, in one Inception pass
        for x in batches:
            x = x.to(args.device)
            quant, _, indices = tokenizer.encode(x.float() / 127.5 - 1)
            rec = data.to_uint8(tokenizer.decode(quant)).permute(
                0, 3, 1, 2
            )  # official rounding, on the cpu
            used[indices] = True
            mse = (rec.float() - x.float().cpu()).pow(2).mean((1, 2, 3))  # per image, uint8 values
            psnrs.append(10 * torch.log10(255**2 / mse))
            is_recon.append(torch.arange(2 * len(x)) >= len(x))
            yield torch.cat([x, rec.to(args.device)])

    feats = extract(model, 2 * count, both(), args, desc="originals + reconstructions")
    mask = torch.cat(is_recon)
    originals, recon = ({k: v[m] for k, v in feats.items()} for m in (~mask, mask))
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
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="center-crop folder images to N x N (rFID: 256)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="local pt_inception-2015-12-05-6726825d.pth, or "
        "'random' (seeded random weights, no download: only for comparing runs made the same way)",
    )
    p.add_argument(
        "--save-stats", default=None, help="write the last path's statistics (rFID: the originals')"
    )
    p.add_argument(
        "--rfid",
        action="store_true",
        help="tokenizer rFID: reconstruct one folder through --vq-ckpt",
    )
    p.add_argument("--vq-ckpt", default=None)
    return p.parse_args(argv)


def main(args):
    if len(args.paths) > 2 or (len(args.paths) == 1 and not (args.save_stats or args.rfid)):
        raise data.UserError(
            "give REFERENCE SAMPLES, or one path with --save-stats PATH (or --rfid)"
        )
    for path in args.paths:  # before the weights download, so a typo costs nothing
        if not os.path.exists(path):
            raise data.UserError(
                f"{path} not found (expected an .npz batch, a statistics .npz or an image folder)"
            )
    if args.device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, as the reference graph
    model = load_inception(args.inception_weights).to(args.device)
    # the label printed beside every number; random weights are never comparable with published FIDs
    label = args.mode + ("/random-weights" if args.inception_weights == "random" else "")
    results = {"mode": label}
    if args.rfid:
        originals, recon, results["psnr"], results["codebook_usage"] = reconstruct(model, args)
        ref, sam = statistics(originals, args.mode), statistics(recon, args.mode)
    else:
        sets = [load_set(p, model, args) for p in args.paths]
        ref, sam = sets[0], sets[-1]
    if args.save_stats:
        save_stats(ref if args.rfid else sam, args.save_stats)
    if len(args.paths) == 1 and not args.rfid:
        return results
    results["fid"] = frechet_distance(ref["mu"], ref["sigma"], sam["mu"], sam["sigma"])
    results["sfid"] = frechet_distance(ref["mu_s"], ref["sigma_s"], sam["mu_s"], sam["sigma_s"])
    if not args.rfid and sam["pool3"] is not None:  # logits = pool3 @ fc.weight.T: pool3 is enough
        results["inception_score"] = inception_score(
            torch.from_numpy(sam["pool3"]) @ model.fc.weight.detach().cpu().T
        )
    if ref["pool3"] is not None and sam["pool3"] is not None:
        results["precision"], results["recall"] = precision_recall(
            torch.from_numpy(ref["pool3"]), torch.from_numpy(sam["pool3"])
        )
    ref_n = f"{ref['n']} images" if ref["n"] else "precomputed statistics"
    what = f"tokenizer {args.vq_ckpt}: originals" if args.rfid else "reference"
    print(
        f"{what} {ref_n} | {'reconstructions' if args.rfid else 'samples'} {sam['n']} images | mode {label}"
    )
    names = dict(
        fid="rFID" if args.rfid else "FID",
        sfid="sFID",
        inception_score="Inception Score",
        precision="Precision",
        recall="Recall",
        psnr="PSNR (dB)",
        codebook_usage="Codebook usage",
    )
    for key, name in names.items():
        if key in results:
            print(f"{name + ' (' + label + ')':<28} {results[key]:.4f}")
    return results


if __name__ == "__main__":
    data.cli(main, parse_args)
