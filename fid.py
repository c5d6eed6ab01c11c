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
for precision/recall and IS, plus the preprocessing mode). A mistake on the command line (a
path of another kind, an unwritable or non-.npz --save-stats, a file that is not the Inception
weights) stops with one line before the feature extraction; `python fid.py --help` shows the
defaults. main() returns {metric: value} as printed ("FID", "sFID", "Inception Score", ...).
"""

import argparse
import functools
import os
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import common
import data
from common import UserError

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
MODES = ("adm", "pytorch-fid")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # the ADM reference batch's precomputed statistics


# ----------------------------------------------------------------------------------------------
# Inception-v3, FID variant (pytorch-fid's port of the 2015 TF graph; EVAL.md §2). Module names
# are pytorch-fid's (EVAL.md §1.1), so its weights file is one strict load_state_dict away.


def basic_conv2d(cin, cout, *kernel_stride_padding):
    """pytorch-fid's BasicConv2d: conv (no bias) -> BatchNorm (eps 0.001, the TF graph's) -> ReLU,
    weights under conv.* and bn.* (the ReLU holds none)."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, *kernel_stride_padding, bias=False),
            bn=nn.BatchNorm2d(cout, eps=0.001),
            relu=nn.ReLU(),
        )
    )


class Mixed(nn.Module):
    """One Inception block: parallel branches from the same input, concatenated on channels.

    `branches` maps a name prefix to its layers, run in order: `cout` alone is a 1x1 conv,
    (cout, kernel) a conv with that kernel (k: k x k), and (cout, kernel_a, kernel_b) two
    convolutions side by side on the same input, concatenated (Mixed_7b/7c). Names are
    pytorch-fid's: a one-layer branch is the prefix itself (branch1x1), longer ones prefix_1,
    prefix_2, ... and side-by-side pairs prefix_2a, prefix_2b. The pool
    branch comes last: `pool` (TF's 3x3 average by default), then a 1x1 conv to `pool_features`
    channels named branch_pool. Without pool_features the block halves the grid (Mixed_6a, 7a):
    the pool is a stride-2 max pool alone and each branch's last conv has stride 2, no padding.
    Modules are created in pytorch-fid's order (the seeded "random" weights depend on it).
    """

    def __init__(self, cin, branches, pool_features=0, pool=None):
        super().__init__()
        self.branches = []  # [branch][step] -> the modules run side by side at that step
        for prefix, layers in branches.items():
            c, branch = cin, []
            for i, layer in enumerate(layers, 1):
                cout, *kernels = (layer, 1) if isinstance(layer, int) else layer
                halve = i == len(layers) and not pool_features
                step = [
                    basic_conv2d(c, cout, k, 1 + halve, 0 if halve else "same") for k in kernels
                ]
                for suffix, conv in zip("ab" if kernels[1:] else [""], step):
                    self.add_module(f"{prefix}_{i}{suffix}" if layers[1:] else prefix, conv)
                branch.append(step)
                c = cout * len(kernels)
            self.branches.append(branch)
        pool_branch = [[nn.MaxPool2d(3, 2)]]  # halving: a stride-2 max pool alone
        if pool_features:  # TF averages over real pixels only: the padded zeros are not counted
            self.branch_pool = basic_conv2d(cin, pool_features, 1)
            pool_branch = [
                [pool or nn.AvgPool2d(3, 1, 1, count_include_pad=False)],
                [self.branch_pool],
            ]
        self.branches.append(pool_branch)

    def forward(self, x):
        # a step: one module, or a side-by-side pair, concatenated either way; each branch runs
        # its steps in order from x, and the block concatenates the branches' outputs
        step = lambda y, modules: torch.cat([m(y) for m in modules], 1)
        return torch.cat([functools.reduce(step, branch, x) for branch in self.branches], 1)


# The five block types of Inception-v3 (Szegedy et al. 2016, Fig. 5-7 and 10), as branch tables
BRANCHES_A = dict(  # Mixed_5b..5d, 35x35
    branch1x1=[64], branch5x5=[48, (64, 5)], branch3x3dbl=[64, (96, 3), (96, 3)]
)
# Mixed_6a, 35x35 -> 17x17 (halving: the last conv of each branch has stride 2)
BRANCHES_B = dict(branch3x3=[(384, 3)], branch3x3dbl=BRANCHES_A["branch3x3dbl"])
K1x7, K7x1 = (1, 7), (7, 1)  # the two halves of a factorised 7x7 kernel


def branches_c(c7):  # Mixed_6b..6e, 17x17: 7x7 convolutions factorised into 1x7 and 7x1
    return dict(
        branch1x1=[192],
        branch7x7=[c7, (c7, K1x7), (192, K7x1)],
        branch7x7dbl=[c7, (c7, K7x1), (c7, K1x7), (c7, K7x1), (192, K1x7)],
    )


BRANCHES_D = dict(  # Mixed_7a, 17x17 -> 8x8 (halving)
    branch3x3=[192, (320, 3)],
    branch7x7x3=[192, (192, K1x7), (192, K7x1), (192, 3)],
)
SPLIT = [(1, 3), (3, 1)]  # a 1x3 and a 3x1 conv side by side in place of one 3x3
BRANCHES_E = dict(  # Mixed_7b, 7c, 8x8
    branch1x1=[320],
    branch3x3=[384, (384, *SPLIT)],
    branch3x3dbl=[448, (384, 3), (384, *SPLIT)],
)


class InceptionV3(nn.Module):
    """Inception-v3 as in the FID graph: uint8-valued images (B, H, W, 3), as the graph, arr_0
    and PIL hold them, in; (pool3, spatial) features out.
    The logits for the Inception Score are pool3 @ fc.weight.T (the graph's MatMul, without the
    bias): main() computes them from stored pool3 features, so fc is a weights holder here."""

    def __init__(self):
        super().__init__()
        # run in this order by forward; the max pools hold no weights, so add no keys
        self.Conv2d_1a_3x3 = basic_conv2d(3, 32, 3, 2)  # (B, 32, 149, 149)
        self.Conv2d_2a_3x3 = basic_conv2d(32, 32, 3)  # (B, 32, 147, 147)
        self.Conv2d_2b_3x3 = basic_conv2d(32, 64, 3, 1, 1)  # (B, 64, 147, 147)
        self.maxpool1 = nn.MaxPool2d(3, 2)  # (B, 64, 73, 73)
        self.Conv2d_3b_1x1 = basic_conv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = basic_conv2d(80, 192, 3)  # (B, 192, 71, 71)
        self.maxpool2 = nn.MaxPool2d(3, 2)  # (B, 192, 35, 35)
        self.Mixed_5b = Mixed(192, BRANCHES_A, 32)  # (B, 256, 35, 35)
        self.Mixed_5c = Mixed(256, BRANCHES_A, 64)  # (B, 288, 35, 35)
        self.Mixed_5d = Mixed(288, BRANCHES_A, 64)  # (B, 288, 35, 35)
        self.Mixed_6a = Mixed(288, BRANCHES_B)  # (B, 768, 17, 17)
        for block, c7 in zip("bcde", (128, 160, 160, 192)):  # Mixed_6b..6e: (B, 768, 17, 17)
            self.add_module(f"Mixed_6{block}", Mixed(768, branches_c(c7), 192))
        self.Mixed_7a = Mixed(768, BRANCHES_D)  # (B, 1280, 8, 8)
        self.Mixed_7b = Mixed(1280, BRANCHES_E, 192)  # (B, 2048, 8, 8)
        # Mixed_7c pools by max, not average: a quirk of the TF graph that pytorch-fid patches in
        self.Mixed_7c = Mixed(2048, BRANCHES_E, 192, nn.MaxPool2d(3, 1, 1))
        self.fc = nn.Linear(2048, 1008)  # 1000 ImageNet classes + 8 unused outputs of the graph

    def forward(self, images, mode):
        x = preprocess(images, mode)  # (B, 3, 299, 299)
        for name, layer in self.named_children():
            if name == "fc":
                break
            x = layer(x)
            if name == "Mixed_6d":  # sFID: TF mixed_6/conv = Mixed_6d.branch1x1 = first 192
                spatial = x[:, :7].movedim(1, -1).flatten(1)  # keep 7, NHWC: (B, 2023)
        return x.mean((2, 3)), spatial  # pool3 (B, 2048), spatial (B, 2023)


def resize_tf1_bilinear(x, size):
    """TF1 ResizeBilinear (legacy, no half-pixel centres): x (B, C, H, W) float32 -> size x size."""

    def along_width(x):  # (..., W) -> (..., size)
        n_in = x.shape[-1]
        # source coordinate = dst * scale, with TF's scale = in / (float)out: the Python float
        # is rounded to float32 for the float32 product, as in TF
        src = torch.arange(size, device=x.device) * (n_in / size)  # (size,) float32
        lo = src.long()  # floor: src >= 0
        left, right = x[..., lo], x[..., (lo + 1).clamp(max=n_in - 1)]
        return left + (right - left) * (src - lo)

    # along x first, then y (.mT swaps H and W), as TF: the same float32 operations in the same
    # order
    return along_width(along_width(x).mT).mT  # (B, C, size, size)


def preprocess(images, mode):
    """(B, H, W, 3) uint8-valued images -> (B, 3, 299, 299) network input for `mode` (MODES)."""
    x = images.movedim(-1, 1).float()  # (B, 3, H, W)
    if mode == "pytorch-fid":  # ToTensor to [0, 1], half-pixel bilinear, then 2x - 1
        return 2 * nn.functional.interpolate(x / 255, 299, mode="bilinear") - 1
    return (resize_tf1_bilinear(x, 299) - 128) / 128  # adm, the TF graph: resize 0..255 floats


def load_inception(weights=None):
    """The FID Inception in eval mode: `weights`, else pytorch-fid's release (downloaded once
    into the cache); "random" gives seeded random weights for offline smoke runs."""
    # seeded, for "random"; loaded weights overwrite every value, the seed then changes nothing
    torch.manual_seed(0)
    model = InceptionV3().eval()
    if weights == "random":  # offline smoke runs: numbers comparable only with other "random" runs
        for w in model.parameters():  # He init keeps activations O(1) through 94 conv + ReLU
            if w.ndim == 4:  # layers: the conv weights (BN's are 1-d, fc's 2-d)
                nn.init.kaiming_normal_(w)
        return model
    # offline, the download's error says where to put the file by hand
    weights = weights or common.download(WEIGHTS_URL, desc="FID Inception weights")
    state = common.load_checkpoint(weights)  # one line for a missing file or one of another kind
    try:  # the AuxLogits head is training-only; torch fills in BN num_batches_tracked if absent
        model.load_state_dict({k: v for k, v in state.items() if "AuxLogits" not in k})
    except Exception as e:  # another checkpoint (not a flat dict of tensors; missing, unexpected
        # or misshapen keys): torch's last line says which
        why = str(e).split("\t")[-1][:200]  # torch's problems follow "\n\t": the last one
        raise UserError(f"{weights} is not the FID Inception weights file: {why}") from None
    # torch.hub naming: the file name holds the first hex digits of its sha256. pytorch-fid
    # never checks it: warn, not fail
    if not common.file_digest(weights).startswith("6726825d"):
        warnings.warn(
            f"{weights}: its sha256 does not start with 6726825d; "
            "FIDs may not be comparable with published ones"
        )
    return model


# ----------------------------------------------------------------------------------------------
# Metrics (float64 numpy; EVAL.md §3-4)


def compute_statistics(features):
    """Mean and unbiased covariance of (N, D) features, in float64."""
    n, dim = features.shape
    # (n = 1: NaN covariances, which frechet_distance refuses with one line)
    if n <= dim:
        warnings.warn(
            f"only {n} images for {dim}-dim features: the covariance is singular and the "
            f"Frechet distance is biased high; use many more (50 000 for published numbers)"
        )
    # the mean accumulated in float64 (numpy's float); np.cov computes in float64 by itself, of
    # the D rows of features.T
    return features.mean(0, float), np.cov(features.T)


def frechet_distance(*stats):
    """stats = mu1, sigma1, mu2, sigma2 -> |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64,
    by two symmetric eigensolves."""
    mu1, sigma1, mu2, sigma2 = stats = [np.asarray(a, float) for a in stats]  # float64
    if not all(np.isfinite(a).all() for a in stats):
        raise UserError("statistics contain NaN or inf; check the images and the weights file")
    # S1 = F F^T with F = V sqrt(W) (eigenvectors V, eigenvalues W); the nonzero eigenvalues of
    # S1 S2 are those of the symmetric PSD F^T S2 F, so tr (S1 S2)^1/2 = sum of their square roots.
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    # eigenvalues below max * float64 eps are round-off (N <= D leaves ~D - N of them)
    keep = w > w.max() * 2.220446049250313e-16
    f = v[:, keep] * np.sqrt(w[keep])  # (D, r), r < D when N <= D
    m = f.T @ sigma2 @ f  # (r, r)
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(0)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2) - 2 * tr_covmean  # np.float64


def inception_score(logits, split_size=5000):
    """ADM's IS: softmax over all 1008 outputs, exp(mean KL(p || mean p)) per split of 5000
    consecutive samples (a partial last one counts); the mean over splits."""
    probs = torch.softmax(logits, 1).double()  # float32 logits: a float32 softmax as the TF graph
    # KL(p || mean p) per sample, summed over classes: plain logs as ADM; xlogy makes 0 log 0 = 0
    # where ADM would return NaN. The mean over splits is a float (np.float64)
    return np.mean(
        [
            (torch.special.xlogy(p, p) - p * p.mean(0).log()).sum(1).mean().exp().item()
            for p in probs.split(split_size)
        ]
    )


def precision_recall(ref, sam, k=3):
    """Improved precision/recall (Kynkaanniemi et al. 2019) of pool3 features, as ADM's: a point
    is covered when it lies within some other set's point's radius, the distance to that point's
    k = 3rd nearest neighbour (float32 distances where ADM uses float16, EVAL.md §4)."""
    ref, sam = map(torch.as_tensor, (ref, sam))  # (N, 2048) float32, from numpy or torch
    if len(ref) <= k or len(sam) <= k:
        warnings.warn(f"precision/recall need more than k={k} images per set; skipped")
        return np.nan, np.nan

    def covered(points, centres):  # fraction of points within (<=) some centre's k-NN radius
        # radius: distance to the k-th neighbour (position 0 is the centre itself); rows in
        # blocks of 1000 bound the (block, N) distance matrices in memory. cdist computes
        # |a|^2 - 2ab + |b|^2 by a matrix product for large sets, as ADM does
        radii = torch.cat(
            [torch.cdist(c, centres).kthvalue(k + 1, 1).values for c in centres.split(1000)]
        )
        inside = [(torch.cdist(p, centres) <= radii).any(1) for p in points.split(1000)]
        return torch.cat(inside).double().mean().item()

    return covered(sam, ref), covered(ref, sam)  # precision, recall


# ----------------------------------------------------------------------------------------------
# Inputs: ADM .npz (arr_0 streamed in batches), statistics .npz, image folders


def load_images(image_size, files):
    """Image files -> (B, H, W, 3) uint8, center-cropped as ADM to image_size when it is given
    (the collate function: each batch is decoded in a DataLoader worker)."""
    images = list(map(data.load_image, files))
    if image_size:
        images = [data.center_crop_arr(i, image_size) for i in images]
    try:
        return torch.from_numpy(np.stack(images))
    except ValueError:  # np.stack: the shapes differ
        raise UserError("images differ in size; pass --image-size N to center-crop them to N x N")


def open_images(path, args):
    """(count, iterable of (B, H, W, 3) uint8 batches) from an image folder (recursive) or from
    the arr_0 of an ADM .npz, streamed: never loaded whole (as ADM)."""
    if os.path.isdir(path):
        files = data.list_images(path)
        if not files:
            raise UserError(f"no images (png, jpg, jpeg, webp) found under {path}")
        # the file list is the dataset; the collate function decodes each batch in the workers
        return len(files), torch.utils.data.DataLoader(
            files,
            args.batch_size,
            num_workers=args.num_workers,
            collate_fn=functools.partial(load_images, args.image_size),
        )
    f = zipfile.ZipFile(path).open("arr_0.npy")
    # the magic string and the version: np.savez writes format 1.0 (2.0 only for headers over
    # 64 KiB: never for an image array)
    f.read(8)
    (count, *image), _, dtype = np.lib.format.read_array_header_1_0(f)  # image: H, W, 3
    if dtype != np.uint8 or image[2:] != [3]:
        raise UserError(f"{path}: arr_0 must be uint8 N x H x W x 3 images, got {dtype} {image}")
    # batch_size images a read (the last read returns what is left; then b"": the end)
    chunks = iter(lambda: f.read(args.batch_size * np.prod(image)), b"")
    return count, (torch.tensor(np.frombuffer(c, np.uint8).reshape(-1, *image)) for c in chunks)


def statistics(pool3, spatial, mode):
    """What a statistics file holds: the ADM keys (FID on pool3, sFID on the spatial features),
    pool3 itself for precision/recall and IS, the count and the preprocessing mode."""
    moments = *compute_statistics(pool3), *compute_statistics(spatial)  # mu, sigma, mu_s, sigma_s
    return dict(zip(STAT_KEYS, moments), pool3=pool3, n=len(pool3), mode=mode)


@torch.no_grad()
def extract(model, count, batches, args, desc, sets=1):
    """`count` images in batches through the network -> [statistics] of `sets` interleaved sets:
    rows i, i + sets, i + 2 sets, ... of the stream belong to set i."""
    outputs = []  # [batch] -> pool3 (B, 2048), spatial (B, 2023) on the CPU
    with tqdm(total=count, desc=f"{desc} ({args.mode})", unit="img", disable=None) as bar:
        for x in batches:
            outputs.append([f.cpu() for f in model(x.to(args.device), args.mode)])
            bar.update(len(x))
    pool3, spatial = (torch.cat(f).numpy() for f in zip(*outputs))  # (N, 2048), (N, 2023)
    return [statistics(pool3[i::sets], spatial[i::sets], args.mode) for i in range(sets)]


def load_set(path, model, args):
    """Statistics of a folder or .npz of images, or read from a statistics .npz (ADM's or ours)."""
    images = lambda: extract(model, *open_images(path, args), args, path)[0]
    if os.path.isdir(path):
        return images()
    try:
        with np.load(path) as f:
            stats = {k: f[k] for k in f.files if k != "arr_0"}
            has_images = "arr_0" in f.files
    except Exception as e:  # not a zip: a renamed .npy (np.load gives an array), text, ...
        raise UserError(f"cannot read {path} as .npz ({type(e).__name__})") from None
    if set(STAT_KEYS) <= set(stats):  # precomputed: ADM's reference batch, or --save-stats
        if "pool3" not in stats and has_images:  # ADM's: its 10k images serve for P/R
            stats["pool3"] = images()["pool3"]
        mode = stats.get("mode", "adm")  # the ADM batch came from the TF graph
        if mode != args.mode:
            warnings.warn(
                f"{path} holds statistics for mode {mode}, not {args.mode}: FIDs will be biased"
            )
        return stats
    if not has_images:
        raise UserError(f"{path} holds neither arr_0 images nor {', '.join(STAT_KEYS)}")
    return images()


# ----------------------------------------------------------------------------------------------
# Tokenizer rFID and the script


@torch.no_grad()
def reconstruct(model, args):
    """rFID: statistics of a folder (or .npz) of images and of their VQ reconstructions, and
    {metric: value} of the PSNR and of the share of the codebook used."""
    tokenizer = data.load_tokenizer(args.vq_ckpt, args.device)
    args.image_size = args.image_size or 256
    count, batches = open_images(args.paths[0], args)
    codes, psnrs = set(), []

    def pairs():  # each image, then its reconstruction: one Inception pass for both sets
        for x in batches:  # (B, H, W, 3) uint8 on the CPU
            try:  # the tokenizer takes (B, 3, H, W) in [-1, 1]
                quant, _, indices = tokenizer.encode(x.to(args.device).movedim(-1, 1) / 127.5 - 1)
            except ValueError as e:  # a size that is no multiple of the tokenizer's downsampling
                raise UserError(f"{e} (--image-size)") from None
            codes.update(indices.tolist())
            rec = data.to_uint8(tokenizer.decode(quant))  # (B, H, W, 3) uint8, as x
            mse = (rec.float() - x).square().mean((1, 2, 3))  # per image, on uint8 values
            psnrs.extend((10 * torch.log10(255**2 / mse)).tolist())
            yield torch.stack([x, rec], 1).flatten(0, 1)  # (2B, H, W, 3)

    originals, recon = extract(model, 2 * count, pairs(), args, "originals + reconstructions", 2)
    return (
        originals,
        recon,
        {
            "PSNR (dB)": np.mean(psnrs),
            "Codebook usage": len(codes) / tokenizer.config.codebook_size,
        },
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="FID, sFID, IS, precision/recall of image sets; rFID of a tokenizer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    arg = p.add_argument
    arg("paths", nargs="+", help="REFERENCE SAMPLES: image folders or .npz files")
    arg("--mode", choices=MODES, default="adm", help="adm (TF1 resize) or pytorch-fid")
    arg("--batch-size", type=int, default=64, help="images per Inception pass")
    arg(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda if there is a GPU",
    )
    arg("--num-workers", type=int, default=common.NUM_WORKERS, help="image decoders")
    arg("--image-size", type=int, help="center-crop folder images to N x N (rFID: 256)")
    arg(
        "--inception-weights",
        help="pt_inception-2015-12-05-6726825d.pth (none: downloaded), or 'random' (seeded "
        "random weights, offline: only for comparing runs made the same way)",
    )
    arg("--save-stats", help=".npz for the last path's (rFID: originals') statistics")
    arg("--rfid", action="store_true", help="reconstruct one path through --vq-ckpt")
    arg("--vq-ckpt", help="the tokenizer for --rfid")
    args = p.parse_args(argv)
    # every mistake on the command line is found here, before the weights download and the
    # long feature extraction rather than after them (issue 13)
    # two sets to compare, or one whose statistics are saved; --rfid: one set to reconstruct
    n = len(args.paths)
    if n > 2 - args.rfid or not (args.vq_ckpt if args.rfid else n == 2 or args.save_stats):
        raise UserError(
            "give REFERENCE SAMPLES, one path with --save-stats PATH, "
            "or one path with --rfid --vq-ckpt CKPT"
        )
    for path in args.paths:
        if not (os.path.isdir(path) or os.path.isfile(path) and path.endswith(".npz")):
            raise UserError(
                f"{path} is not an existing image folder or .npz file (ADM arr_0 images and/or "
                "statistics, or --save-stats output)"
            )
    if args.save_stats:
        # its nearest existing folder must be writable: atomic_write creates the ones below it
        folder = Path(args.save_stats).resolve().parent
        while not folder.exists():  # "/" exists: the walk ends
            folder = folder.parent
        if not (
            args.save_stats.endswith(".npz") and folder.is_dir() and os.access(folder, os.W_OK)
        ):
            raise UserError(f"--save-stats {args.save_stats}: not a writable .npz file path")
    return args


def main(args):
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions, as the reference graph
    model = load_inception(args.inception_weights).to(args.device)
    # the label printed beside every number; random weights are never comparable with published FIDs
    label = args.mode + "/random-weights" * (args.inception_weights == "random")
    if args.rfid:  # the reference is the originals, the samples their reconstructions
        *sets, extra = reconstruct(model, args)
    else:
        sets, extra = [load_set(path, model, args) for path in args.paths], {}
    ref, sam = sets[0], sets[-1]
    if args.save_stats:
        with common.atomic_write(args.save_stats) as f:
            np.savez(f, **(ref if args.rfid else sam))
        print(f"saved the statistics of {args.paths[-1]} to {args.save_stats}")
    if ref is sam:  # one path, no --rfid: its statistics were all there was to do
        return {}
    # FID on the pool3 statistics (mu, sigma), sFID on the spatial ones (mu_s, sigma_s)
    fd = lambda s: frechet_distance(
        ref["mu" + s], ref["sigma" + s], sam["mu" + s], sam["sigma" + s]
    )
    results = {"rFID" if args.rfid else "FID": fd(""), "sFID": fd("_s")}
    # rFID too: LlamaGen's tokenizer evaluation runs the ADM evaluator (IS included) on the
    # reconstructions
    if "pool3" in sam:  # the graph's logits: pool3 @ fc.weight.T, no bias
        logits = torch.as_tensor(sam["pool3"]) @ model.fc.weight.cpu().T  # (N, 1008)
        results["Inception Score"] = inception_score(logits)
    if "pool3" in ref and "pool3" in sam:
        results["Precision"], results["Recall"] = precision_recall(ref["pool3"], sam["pool3"])
    results.update(extra)
    counts = [f"{s['n']} images" if "n" in s else "precomputed statistics" for s in (ref, sam)]
    print(f"reference {counts[0]} | samples {counts[1]} | mode {label}")
    for name, value in results.items():
        print(f"{name + ' (' + label + ')':<28} {value:.4f}")
    return results


if __name__ == "__main__":
    common.cli(main, parse_args)
