"""Train the LlamaGen VQ tokenizer (arXiv 2406.06525): reconstruction, codebook, LPIPS and PatchGAN losses.

Follows the official `tokenizer/tokenizer_image/vq_train.py`, `vq_loss.py` and `lpips.py`. One script for
the CPU, one GPU and `torchrun` (DDP). Checkpoints load with `vq.VQModel.from_checkpoint`.

    python data.py toy data/toy --num-classes 4 --per-class 64 --size 64
    python train_vq.py --vq-model tiny --data-path data/toy --image-size 64 --global-batch-size 16 \
        --max-steps 200 --perceptual-weight 0 --disc-weight 0 --log-every 10 --sample-every 100   # ~6 min
    torchrun --standalone --nproc_per_node=8 train_vq.py --vq-model VQ-16 --data-path imagenet/train \
        --image-size 256 --global-batch-size 128 --lr 1e-4 --epochs 40 --disc-start 20000 --disc-weight 0.5
    python train_vq.py ... --resume results/000-VQ-16/checkpoints/last.pt     # continues exactly
    python train_vq.py ... --finetune vq_ds16_c2i.pt --disc-start 0           # new run from released weights
    python -m pytest tests/test_train_vq.py -q

Differences from the official trainer: LPIPS stays in eval mode (the official `.train()` call re-enables the
dropout of its lin heads); the non-saturating GAN losses are the textbook ones (the official swaps the BCE
arguments); the discriminator is not run before --disc-start (the official runs it with weight 0, which
leaves its weights unchanged); --resume continues mid-epoch instead of rounding down to an epoch.
"""

import argparse
import copy
import re
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from data import UserError
from vq import VQ_CONFIGS, VQConfig, VQModel

EMA_DECAY = 0.9999  # official --ema decay
ADAM_BETAS = (0.9, 0.95)  # official, both nets (plain Adam: its --weight-decay is unused)

# ----------------------------------------------------------------------------- LPIPS (VGG16, v0.1)

# torchvision's IMAGENET1K_V1 file (~528 MB); its name carries the first hex digits of its sha256
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FEATURES_FILE = "vgg16_features.pt"  # what we keep of it: the 13 convs of `features` (~59 MB)
LIN_WEIGHTS = dict(
    url="https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
    filename="lpips_vgg_v0.1.pth",
    md5="d507d7349b931f0638a25a48a722f98a",
    size=7289,
)
VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_SLICES = [
    (0, 4),
    (4, 9),
    (9, 16),
    (16, 23),
    (23, 30),
]  # -> relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = [64, 128, 256, 512, 512]
# ImageNet mean/std re-expressed for inputs in [-1, 1]
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)


def vgg16_features() -> list:
    """torchvision's vgg16().features as a list (indices 0..29): conv3x3 + ReLU, 2x2 max pools."""
    layers, c = [], 3
    for v in VGG16_LAYERS:
        layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
        c = c if v == "M" else v
    return layers


def fetch_lpips_weights():
    """Cached paths of (VGG16 conv weights, LPIPS lin heads), downloaded on first use."""
    cache, lin = data.cache_dir(), LIN_WEIGHTS
    features = cache / VGG16_FEATURES_FILE
    try:
        lin_path = data.download(
            lin["url"], lin["filename"], md5=lin["md5"], size=lin["size"], desc="LPIPS heads"
        )
        if not features.is_file():
            full = data.download(VGG16_URL, desc="VGG16 ImageNet weights")
            prefix = re.search(
                r"-([0-9a-f]{8,})\.", full.name
            )  # torchvision's check: sha256 starts with it
            if prefix and not data.file_digest(full, "sha256").startswith(prefix.group(1)):
                full.unlink()
                raise UserError(
                    f"the sha256 of {full.name} does not start with {prefix.group(1)}; removed it"
                )
            sd = data.load_checkpoint(full)
            data.save_checkpoint(
                {k: v.clone() for k, v in sd.items() if k.startswith("features.")}, features
            )
            full.unlink()  # keep the 59 MB of convolutions, not the 528 MB with the classifier
            full.with_name(full.name + ".json").unlink(missing_ok=True)
    except UserError as e:
        raise UserError(
            f"the perceptual loss needs {VGG16_URL.rsplit('/', 1)[-1]} ({VGG16_URL}) and {lin['filename']} ({lin['url']}) "
            f"in {cache} (set by LLAMAGEN_CACHE) but could not get them ({e}); put them there, or train "
            f"without the perceptual loss: --perceptual-weight 0"
        ) from None
    return features, lin_path


class LPIPS(nn.Module):
    """LPIPS-VGG16 v0.1 distance, images (B, 3, H, W) in [-1, 1] -> (B,); frozen, always in eval mode.

    Keys as the official lpips.py (scaling_layer.*, net.slice{1..5}.{i}.*, lin{0..4}.model.1.weight).
    """

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.scaling_layer.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        layers, self.net = vgg16_features(), nn.Module()
        for k, (a, b) in enumerate(LPIPS_SLICES):  # torchvision's index kept inside each slice
            self.net.add_module(
                f"slice{k + 1}",
                nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(a, b))),
            )
        for k, c in enumerate(LPIPS_CHANNELS):
            lin = nn.Module()
            # index 0 is the official Dropout(0.5): kept so the conv is `model.1`; inert, we never leave eval
            lin.model = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(c, 1, 1, bias=False))
            nn.init.uniform_(
                lin.model[1].weight, 0.0, 2.0 / c
            )  # random stand-in, >= 0 like the real heads
            self.add_module(f"lin{k}", lin)
        if pretrained:
            features, lin_path = fetch_lpips_weights()
            self.load_vgg(data.load_checkpoint(features), features)
            self.load_lin(data.load_checkpoint(lin_path), lin_path)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Always eval. The official trainer calls .train() on the module holding LPIPS, which turns the
        # p=0.5 dropout of the lin heads back on and adds noise to the perceptual loss; we do not.
        return super().train(False)

    def load_vgg(self, sd: dict, source="VGG16 weights"):
        """Load torchvision's `features.{i}.weight/bias` (the 13 convs) into the five slices, strictly."""
        mapped = {}
        for key, t in self.net.state_dict().items():  # "slice2.5.weight" <- "features.5.weight"
            src = "features." + key.split(".", 1)[1]
            if src not in sd or sd[src].shape != t.shape:
                raise UserError(
                    f"{source} has no {src} of shape {tuple(t.shape)}: not torchvision's VGG16 file "
                    f"(the LPIPS lin heads are a separate file)"
                )
            mapped[key] = sd[src]
        self.net.load_state_dict(mapped, strict=True)

    def load_lin(self, sd: dict, source="LPIPS lin weights"):
        """Load the official heads lin{k}.model.1.weight (1, C, 1, 1); any other key layout raises."""
        want = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS)}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if (
            got != want
        ):  # the official loads non-strictly and silently keeps random heads: check all five
            raise UserError(
                f"{source} is not the LPIPS v0.1 VGG lin file: expected keys {list(want)}, got "
                f"{sorted(got)[:5]} (the VGG16 trunk is a separate file)"
            )
        with torch.no_grad():
            for k, v in sd.items():
                self.get_parameter(k).copy_(v)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.scaling_layer
        h = (torch.cat([x, y]) - s.shift) / s.scale  # (2B, 3, H, W): one trunk pass for both
        dist = 0.0
        for k in range(len(LPIPS_SLICES)):
            h = getattr(self.net, f"slice{k + 1}")(h)
            # unit length over channels; F.normalize divides by max(norm, eps) where the official adds eps:
            # equal to 1e-10, but with a finite gradient where a whole feature vector is 0
            fx, fy = F.normalize(h, dim=1, eps=1e-10).chunk(2)
            dist = dist + getattr(self, f"lin{k}").model((fx - fy) ** 2).mean(dim=(2, 3))  # (B, 1)
        return dist.flatten()


# ----------------------------------------------------------------------------- PatchGAN and GAN losses


class PatchGANDiscriminator(nn.Module):
    """pix2pix NLayerDiscriminator as official: (B, 3, H, W) -> logits (B, 1, H/8-2, W/8-2), 30x30 at 256."""

    def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers, c = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
        for n in range(
            1, n_layers + 1
        ):  # x2 channels per layer (at most 8 ndf); the last one at stride 1
            out = ndf * min(2**n, 8)
            layers += [
                nn.Conv2d(c, out, 4, 2 if n < n_layers else 1, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, True),
            ]
            c = out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # official init; conv biases keep PyTorch's default
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def non_saturating_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # textbook BCE(D(x), 1) + BCE(D(x_hat), 0); the official passes the constant as the logits and D's
    # output as the target (arguments swapped), which is not a GAN loss: not copied
    return F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


# discriminator losses of (D(x), D(x_hat)) logits; generator losses of D(x_hat)
DISC_LOSSES = {
    "hinge": lambda real, fake: 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()),
    "vanilla": lambda real, fake: 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean()),
    "non-saturating": non_saturating_d_loss,
}
GEN_LOSSES = {
    "hinge": lambda fake: -fake.mean(),
    "non-saturating": lambda fake: F.softplus(-fake).mean(),
}


def adaptive_weight(nll_loss, g_loss, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad nll|| / (||grad G|| + 1e-4) at the decoder's last layer, clamped to [0, 1e4] (VQGAN)."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def backward_and_step(loss, opt, scaler, params, max_grad_norm: float):
    """zero_grad, backward (scaled for fp16), clip the unscaled gradient norm, step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if max_grad_norm > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(opt)
    scaler.update()


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the LlamaGen VQ tokenizer.")
    p.add_argument("--data-path", required=True, help="class-per-folder image tree")
    p.add_argument(
        "--vq-model",
        type=lambda s: s if s in VQ_CONFIGS else f"VQ-{s}",
        choices=list(VQ_CONFIGS),
        default="VQ-16",
    )
    p.add_argument("--codebook-size", type=int, default=None, help="override the preset's")
    p.add_argument("--codebook-embed-dim", type=int, default=None, help="override the preset's")
    p.add_argument("--commit-loss-beta", type=float, default=0.25)
    p.add_argument("--entropy-loss-ratio", type=float, default=0.0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--global-batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps (overrides --epochs)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="Adam, both the VQ and the discriminator")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping")
    p.add_argument(
        "--mixed-precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="default bf16 on a GPU, fp32 on the CPU (CPU bf16 convolutions are slower, not faster)",
    )
    p.add_argument(
        "--ema", action="store_true", help=f"keep an EMA of the weights (decay {EMA_DECAY})"
    )
    p.add_argument("--reconstruction-loss", choices=["l2", "l1"], default="l2")
    p.add_argument("--reconstruction-weight", type=float, default=1.0)
    p.add_argument(
        "--perceptual-weight",
        type=float,
        default=1.0,
        help="LPIPS weight; 0 = no LPIPS, no download",
    )
    p.add_argument("--disc-start", type=int, default=20000, help="first step with the GAN losses")
    p.add_argument("--disc-weight", type=float, default=0.5, help="0 = no discriminator at all")
    p.add_argument("--disc-loss", choices=list(DISC_LOSSES), default="hinge")
    p.add_argument("--gen-loss", choices=list(GEN_LOSSES), default="hinge")
    p.add_argument(
        "--disc-adaptive-weight", action="store_true", help="VQGAN adaptive weight (official: off)"
    )
    p.add_argument("--results-dir", default="results")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--resume", default=None, help="checkpoint to continue exactly where it stopped"
    )
    src.add_argument(
        "--finetune", default=None, help="checkpoint to take weights from; steps start at 0"
    )
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument(
        "--sample-every",
        type=int,
        default=1000,
        help="PNG of inputs above reconstructions; 0 = never",
    )
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument(
        "--skip-bad-images", action="store_true", help="drop unreadable images (counted in the log)"
    )
    p.add_argument("--compile", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- training


def main(args):
    d = data.init_dist()
    device = d.device
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "fp32")
    ctx = data.autocast_ctx(device, precision)
    if args.global_batch_size % d.world_size:
        raise UserError(
            f"--global-batch-size {args.global_batch_size} is not divisible by {d.world_size} processes"
        )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.global_seed * d.world_size + d.rank)

    # the VQ: fresh, from a checkpoint to finetune, or from the checkpoint to resume
    ckpt = data.load_checkpoint(args.resume) if args.resume else None
    source = ckpt or (data.load_checkpoint(args.finetune) if args.finetune else None)
    if source is not None:
        try:
            vq = VQModel.from_checkpoint(source, prefer_ema=False).train()
        except ValueError as e:  # e.g. a GPT checkpoint
            raise UserError(f"{args.resume or args.finetune}: {e}") from None
        if ckpt is None:  # finetune: the loss settings are this run's
            vq.config.commit_loss_beta, vq.config.entropy_loss_ratio = (
                args.commit_loss_beta,
                args.entropy_loss_ratio,
            )
    else:
        overrides = {
            k: v
            for k, v in (
                ("codebook_size", args.codebook_size),
                ("codebook_embed_dim", args.codebook_embed_dim),
            )
            if v is not None
        }
        vq = VQModel(
            VQConfig.from_name(
                args.vq_model,
                commit_loss_beta=args.commit_loss_beta,
                entropy_loss_ratio=args.entropy_loss_ratio,
                **overrides,
            )
        )
    if args.image_size % vq.config.downsample:
        raise UserError(
            f"--image-size {args.image_size} is not a multiple of the downsampling {vq.config.downsample}"
        )

    # LPIPS before anything is written, so a missing download stops the run before its first step
    lpips = None
    if args.perceptual_weight > 0:
        if d.rank != 0:
            dist.barrier()  # rank 0 downloads first
        lpips = LPIPS().to(device)
        if d.rank == 0 and d.distributed:
            dist.barrier()

    dataset = data.ImageFolder(
        args.data_path,
        args.image_size,
        augment="random",
        skip_bad=args.skip_bad_images,
        seed=args.global_seed,
    )
    local_bs = args.global_batch_size // d.world_size
    sampler = DistributedSampler(
        dataset, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=args.global_seed
    )
    batches_per_epoch = len(sampler) // local_bs  # drop_last, as official
    if batches_per_epoch == 0:
        raise UserError(
            f"{len(dataset)} images in {args.data_path} give less than one batch of {local_bs} per "
            f"process; lower --global-batch-size"
        )
    total_steps = args.max_steps or args.epochs * batches_per_epoch

    vq, disc = vq.to(device), PatchGANDiscriminator().to(device)
    ema = copy.deepcopy(vq).requires_grad_(False) if args.ema else None
    opt = torch.optim.Adam(vq.parameters(), lr=args.lr, betas=ADAM_BETAS)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=ADAM_BETAS)
    scaler, scaler_d = (
        torch.amp.GradScaler(device.type, enabled=precision == "fp16") for _ in range(2)
    )
    step = epoch = batch_idx = 0  # batch_idx: batches of `epoch` already consumed
    if ckpt is not None:
        disc.load_state_dict(ckpt["discriminator"])
        opt.load_state_dict(ckpt["optimizer"])
        opt_d.load_state_dict(ckpt["optimizer_disc"])
        for s, key in ((scaler, "scaler"), (scaler_d, "scaler_disc")):
            if ckpt.get(key):
                s.load_state_dict(ckpt[key])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"] if ckpt.get("ema") else ckpt["model"])
        step, epoch, batch_idx = ckpt["step"], ckpt["epoch"], ckpt["batch"]
        rng = ckpt["rng"]
        data.set_rng_state(rng[d.rank] if len(rng) == d.world_size else rng[0])
    elif isinstance(source, dict) and isinstance(source.get("discriminator"), dict):
        disc.load_state_dict(source["discriminator"])  # finetune from one of our checkpoints

    raw_vq, raw_disc = vq, disc  # unwrapped: saved, EMA'd, and used for the generator's GAN term
    if args.compile:
        vq = torch.compile(vq)
    if d.distributed:  # the discriminator's BatchNorm stays plain, unsynced, as official
        ids = [d.local_rank] if device.type == "cuda" else None
        vq, disc = DDP(vq, device_ids=ids), DDP(disc, device_ids=ids)

    resume_dir = Path(args.resume).resolve().parent if args.resume else None
    run_dir = (
        resume_dir.parent
        if resume_dir is not None and resume_dir.name == "checkpoints"
        else data.make_results_dir(args.results_dir, args.vq_model)
    )
    logger = data.JsonlLogger(run_dir / "log.jsonl")
    data.print0(
        f"{args.vq_model}: {sum(p.numel() for p in raw_vq.parameters()):,} params, discriminator "
        f"{sum(p.numel() for p in raw_disc.parameters()):,}; {len(dataset)} images; {precision}; "
        f"{d.world_size} process(es); steps {step} -> {total_steps}; writing to {run_dir}"
    )

    names = [
        "gen_loss",
        "rec_loss",
        "perceptual_loss",
        "gen_adv_loss",
        "adaptive_weight",
        "vq_loss",
        "commit_loss",
        "entropy_loss",
        "disc_loss",
        "logits_real",
        "logits_fake",
    ]
    running = torch.zeros(
        len(names) + 1, device=device
    )  # sums since the last log; last slot: bad images
    n_acc, t0 = 0, time.time()
    zero, one = torch.zeros((), device=device), torch.ones((), device=device)
    pbar = tqdm(total=total_steps, initial=step, disable=d.rank != 0, desc="train_vq")
    while step < total_steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)  # augmentation is seeded by (seed, epoch, index)
        indices = list(sampler)[batch_idx * local_bs :]  # skip what a resumed run already consumed
        loader = DataLoader(
            dataset,
            batch_size=local_bs,
            sampler=indices,
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
            generator=torch.Generator().manual_seed(args.global_seed + epoch),
        )  # not the global RNG
        for x, y in loader:
            running[-1] += (y < 0).sum()
            x = x[y >= 0].to(
                device, non_blocking=True
            )  # (B, 3, S, S); rows of unreadable images dropped
            if len(x) == 0:
                raise UserError(f"every image of a batch was unreadable; check {args.data_path}")
            # the official global step is train_steps + 1; weight 0 = no GAN (the official D loss is scaled by it)
            disc_on = args.disc_weight > 0 and step + 1 >= args.disc_start

            # generator: rec + perceptual + adversarial + codebook terms
            with ctx:
                recon, (vq_loss, commit_loss, entropy_loss, usage) = vq(x)
                rec = (
                    F.mse_loss(recon, x)
                    if args.reconstruction_loss == "l2"
                    else F.l1_loss(recon, x)
                )
                perc = lpips(x, recon).mean() if lpips is not None else zero
                nll = args.reconstruction_weight * rec + args.perceptual_weight * perc
                g_adv, a = zero, one
                if disc_on:
                    raw_disc.requires_grad_(
                        False
                    )  # gradients flow through D to the VQ, D's own are not needed
                    g_adv = GEN_LOSSES[args.gen_loss](raw_disc(recon))
                    raw_disc.requires_grad_(True)
                    if args.disc_adaptive_weight:
                        a = adaptive_weight(nll, g_adv, raw_vq.decoder.last_layer)
                loss = nll + a * args.disc_weight * g_adv + vq_loss + commit_loss + entropy_loss
            backward_and_step(loss, opt, scaler, raw_vq.parameters(), args.max_grad_norm)
            if ema is not None:
                data.update_ema(ema, raw_vq, EMA_DECAY)

            # discriminator on the detached reconstructions, from --disc-start on
            d_loss = real = fake = zero
            if disc_on:
                with ctx:
                    real, fake = (
                        disc(x),
                        disc(recon.detach()),
                    )  # two passes (BatchNorm stats), as official
                    d_loss = args.disc_weight * DISC_LOSSES[args.disc_loss](real, fake)
                backward_and_step(
                    d_loss, opt_d, scaler_d, raw_disc.parameters(), args.max_grad_norm
                )

            step, batch_idx, n_acc = step + 1, batch_idx + 1, n_acc + 1
            terms = [
                loss,
                rec,
                perc,
                g_adv,
                a,
                vq_loss,
                commit_loss,
                entropy_loss,
                d_loss,
                real.mean(),
                fake.mean(),
            ]
            running[:-1] += torch.stack([t.detach().float() for t in terms])
            pbar.update(1)
            last = step == total_steps

            if step % args.log_every == 0 or last:
                stats = running.clone()
                if d.distributed:
                    dist.all_reduce(stats)
                means = (stats[:-1] / (n_acc * d.world_size)).tolist()
                record = {
                    "step": step,
                    "epoch": epoch,
                    **dict(zip(names, means)),
                    "codebook_usage": usage,
                    "lr": opt.param_groups[0]["lr"],
                    "bad_images": int(stats[-1]),
                    "images_per_sec": n_acc * args.global_batch_size / (time.time() - t0),
                }
                logger.log(record)
                pbar.set_postfix(rec=f"{record['rec_loss']:.4f}", usage=f"{usage:.3f}")
                running.zero_()
                n_acc, t0 = 0, time.time()

            if args.sample_every and (step % args.sample_every == 0 or last) and d.rank == 0:
                k = min(8, len(x))  # top row the inputs, bottom row their reconstructions
                data.save_image_grid(
                    torch.cat([x[:k], recon[:k].detach()]).float(),
                    run_dir / "samples" / f"{step:07d}.png",
                    nrow=k,
                )

            if step % args.ckpt_every == 0 or last:
                rng = [data.get_rng_state()]
                if d.distributed:  # every rank's RNG, so each continues its own stream
                    rng = [None] * d.world_size
                    dist.all_gather_object(rng, data.get_rng_state())
                if d.rank == 0:
                    state = {
                        "model": raw_vq.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "discriminator": raw_disc.state_dict(),
                        "optimizer": opt.state_dict(),
                        "optimizer_disc": opt_d.state_dict(),
                        "scaler": scaler.state_dict(),
                        "scaler_disc": scaler_d.state_dict(),
                        "step": step,
                        "epoch": epoch,
                        "batch": batch_idx,
                        "config": asdict(raw_vq.config),
                        "args": vars(args),
                        "rng": rng,
                    }
                    for name in (f"{step:07d}.pt", "last.pt"):
                        data.save_checkpoint(state, run_dir / "checkpoints" / name)
                if d.distributed:
                    dist.barrier()
            if last:
                break
        else:  # the epoch ran out
            epoch, batch_idx = epoch + 1, 0
    pbar.close()
    data.print0(f"done: {step} steps, checkpoints in {run_dir / 'checkpoints'}")
    if d.distributed:
        dist.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    data.cli(main, parse_args)
