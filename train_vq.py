"""Train the LlamaGen VQ tokenizer (arXiv 2406.06525, Sec. 2.1-2.2): reconstruction, codebook,
LPIPS and PatchGAN losses.

Follows the official `tokenizer/tokenizer_image/vq_train.py`, `vq_loss.py` and `lpips.py`. One
script for the CPU, one GPU and `torchrun` (DDP). Checkpoints load with
`vq.VQModel.from_checkpoint(common.load_checkpoint(path))`.

    python data.py toy data/toy --num-classes 4 --per-class 64 --size 64
    python train_vq.py --model tiny --data-path data/toy --image-size 64 --global-batch-size 16 \
        --max-steps 300 --perceptual-weight 0 --disc-weight 0 --log-every 50   # ~3 min on a CPU
    torchrun --standalone --nproc_per_node=8 train_vq.py --model VQ-16 --data-path imagenet/train \
        --image-size 256 --global-batch-size 128 --epochs 40 --disc-start 20000 --disc-weight 0.5
    python train_vq.py --data-path imagenet/train --resume results/000-VQ-16/checkpoints/last.pt
    python train_vq.py ... --finetune vq_ds16_c2i.pt --disc-start 0         # from released weights
    python train_vq.py ... --no-flip     # no mirrored crops: handwriting, digits, text, maps
    python -m pytest tests/test_train_vq.py -q

A bare --resume continues the saved run exactly, with its own flags (preset, lr, batch, EMA, seed,
losses); given again, only the step budget, cadences, workers, results folder, --compile and
--skip-bad-images may change (RESUMABLE), and --ema may start an EMA; anything else is refused.

Differences from the official trainer: LPIPS stays in eval mode (the official `.train()` call
re-enables the dropout of its lin heads); the non-saturating GAN losses are the textbook ones (the
official swaps the BCE arguments); the discriminator is not run before --disc-start (the official
runs it with weight 0, which leaves its weights unchanged); --resume continues mid-epoch instead of
rounding down to an epoch.
"""

import argparse
import copy
import functools
import time
from collections import OrderedDict
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
from common import UserError
from vq import VQ_CONFIGS, VQConfig, VQModel


# ----------------------------------------------------------------------------- LPIPS (VGG16, v0.1)

# torchvision's IMAGENET1K_V1 file (~528 MB); its name carries the first hex digits of its sha256,
# which torchvision checks, and so do we
VGG16_URL, VGG16_SHA256 = "https://download.pytorch.org/models/vgg16-397923af.pth", "397923af"
VGG16_FEATURES_FILE = "vgg16_features.pt"  # what we keep of it: the 13 convs of `features` (~59 MB)
# the official heads (the spec gives md5 d507d7349b931f0638a25a48a722f98a), cached under LIN_FILE
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
LIN_FILE = "lpips_vgg_v0.1.pth"
LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
# VGG16's five stages: conv3x3 + ReLU pairs of these widths, a 2x2 max pool before each stage but
# the first. LPIPS taps each stage's last ReLU (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3): the
# slices [0, 4), [4, 9), ... [23, 30) of vgg16().features end at them.
LPIPS_CHANNELS, VGG16_CONVS = [64, 128, 256, 512, 512], [2, 2, 3, 3, 3]
LPIPS_SLICES = [0, 4, 9, 16, 23, 30]
# shift and scale: ImageNet mean/std re-expressed for inputs in [-1, 1] (the official ScalingLayer)
LPIPS_SCALING = [(-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)]


def fetch_lpips_weights():
    """Cached paths of the VGG16 conv weights and the LPIPS lin heads, downloaded on first use."""
    features = common.cache_dir() / VGG16_FEATURES_FILE
    try:
        lin = common.download(LIN_URL, LIN_FILE, LIN_SHA256, desc="LPIPS heads")
        if not features.is_file():
            full = common.download(VGG16_URL, sha256=VGG16_SHA256, desc="VGG16 ImageNet weights")
            vgg = common.load_checkpoint(full).items()
            common.save_checkpoint({k: v for k, v in vgg if k.startswith("features.")}, features)
            full.unlink()  # keep the 59 MB of convolutions, not the 528 MB with the classifier
    except UserError as e:
        raise UserError(
            f"the perceptual loss needs {VGG16_URL} and {LIN_URL} (saved as "
            f"{LIN_FILE}) in {common.cache_dir()} (set by LLAMAGEN_CACHE) but could "
            f"not get them ({e}); put them there, or train without it: --perceptual-weight 0"
        ) from None
    return [features, lin]


class LPIPS(nn.Module):
    """LPIPS-VGG16 v0.1 distance, images (B, 3, H, W) in [-1, 1] -> (B,); frozen, built in eval
    mode (the official trainer's .train() call turns the p=0.5 dropout of the lin heads back on
    and adds noise to the perceptual loss: nothing here calls it).

    Keys as the two official files, so that each loads as it is: features.{i}.* of torchvision's
    VGG16 file (vgg16().features, without the last pool) and lin{k}.model.1.weight of the LPIPS
    heads file. (The official module keeps the trunk as net.slice{1..5}.{i}.)
    """

    def __init__(self, pretrained=True):
        super().__init__()
        # shift and scale (2, 3): constants, not in the state dict
        self.register_buffer("scaling", torch.tensor(LPIPS_SCALING), persistent=False)
        layers, c = [], 3
        for k, (width, n_convs) in enumerate(zip(LPIPS_CHANNELS, VGG16_CONVS)):
            layers += [nn.MaxPool2d(2, 2)] * (k > 0)
            for _ in range(n_convs):
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
                c = width
            # the official head: a Dropout (inert in eval) before the conv, so the conv is model.1
            head = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(width, 1, 1, bias=False))
            self.add_module(f"lin{k}", nn.Sequential(OrderedDict(model=head)))
        self.features = nn.Sequential(*layers)
        if pretrained:
            self.load_weights(*map(common.load_checkpoint, fetch_lpips_weights()))
        self.requires_grad_(False).eval()

    def load_weights(self, vgg, lin):
        """The features of torchvision's VGG16 file and the five official lin heads, strictly:
        the official loads the heads non-strictly and would keep random ones."""
        try:
            self.load_state_dict({**vgg, **lin})
        except RuntimeError as e:  # names the missing, unexpected or misshapen keys
            raise UserError(
                "expected torchvision's VGG16 file and the LPIPS v0.1 VGG lin file: "
                + " ".join(str(e).split())[:300]
            ) from None

    def forward(self, x, y):  # (B, 3, H, W) each -> (B,)
        shift, scale = self.scaling[..., None, None]  # (3, 1, 1) each
        h = (torch.cat([x, y]) - shift) / scale  # (2B, 3, H, W): one trunk pass for both
        distance = 0.0
        for k, end in enumerate(LPIPS_SLICES[1:]):
            h = self.features[LPIPS_SLICES[k] : end](h)  # up to the next tap
            # unit length over channels; F.normalize divides by max(norm, eps) where the official
            # adds eps: equal to 1e-10, but with a finite gradient where a feature vector is 0
            fx, fy = F.normalize(h, dim=1, eps=1e-10).chunk(2)
            distance = distance + getattr(self, f"lin{k}")((fx - fy) ** 2).mean(dim=(2, 3))
        return distance.flatten()  # (B,)


# ------------------------------------------------------------------------ PatchGAN and GAN losses


class PatchGANDiscriminator(nn.Sequential):
    """pix2pix NLayerDiscriminator as official (ndf 64, 3 layers): (B, 3, H, W) -> logits
    (B, 1, H/8-2, W/8-2), one per 70x70 patch (30x30 at 256). A Sequential of one, `main`, so
    that the keys are the official main.{i}.*"""

    def __init__(self):
        layers, c = [], 3
        for out, stride in (64, 2), (128, 2), (256, 2), (512, 1):  # x2 channels, last stride 1
            # conv 4x4, BatchNorm, LeakyReLU(0.2); the first layer has no BatchNorm, so its conv
            # keeps a bias (elsewhere BatchNorm brings it). BatchNorm's init draws no random
            # numbers, so building it before the conv leaves the official init as it is.
            norm = [nn.BatchNorm2d(out)] if layers else []
            layers += [
                nn.Conv2d(c, out, 4, stride, 1, bias=not layers),
                *norm,
                nn.LeakyReLU(0.2, True),
            ]
            c = out
        main = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        # official init: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02); the biases keep
        # PyTorch's init (BatchNorm's is 0, what the official sets it to)
        for m in main:
            if hasattr(m, "weight"):  # not the LeakyReLUs
                nn.init.normal_(m.weight, float(isinstance(m, nn.BatchNorm2d)), 0.02)
        super().__init__(OrderedDict(main=main))


# discriminator losses of (D(x), D(x_hat)) logits; generator losses of D(x_hat)
DISC_LOSSES = {
    "hinge": lambda real, fake: 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()),
    # half the non-saturating loss below: 0.5 * (softplus(-real) + softplus(fake))
    "vanilla": lambda real, fake: 0.5 * DISC_LOSSES["non-saturating"](real, fake),
    # textbook BCE(D(x), 1) + BCE(D(x_hat), 0), i.e. softplus(-real) + softplus(fake); the official
    # passes the constant as the logits and D's output as the target (arguments swapped), which is
    # not a GAN loss: not copied
    "non-saturating": lambda real, fake: F.softplus(-real).mean() + F.softplus(fake).mean(),
}
GEN_LOSSES = {
    "hinge": lambda fake: -fake.mean(),
    "non-saturating": lambda fake: F.softplus(-fake).mean(),
}
RECONSTRUCTION_LOSSES = {"l2": F.mse_loss, "l1": F.l1_loss}


def adaptive_weight(nll_loss, g_loss, last_layer):
    """||grad nll|| / (||grad G|| + 1e-4) at the decoder's last layer, clamped to [0, 1e4]: VQGAN's
    balance of the GAN term against the reconstruction."""
    nll_norm, g_norm = (
        torch.autograd.grad(loss, last_layer, retain_graph=True)[0].norm()
        for loss in (nll_loss, g_loss)
    )
    return (nll_norm / (g_norm + 1e-4)).clamp(0.0, 1e4).detach()


def backward_and_step(loss, opt, scaler, max_grad_norm):
    """One optimizer step of either net: zero_grad, backward (scaled for fp16), clip the unscaled
    gradient norm (0 = no clipping), step."""
    opt.zero_grad()  # set_to_none, torch's default
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # a no-op unless fp16; step() then knows it was done
    if max_grad_norm > 0:  # one param group: the optimizers are built on net.parameters()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], max_grad_norm)
    scaler.step(opt)
    scaler.update()


# ----------------------------------------------------------------------------- CLI

# Every flag and its default (its type is the default's; False makes a switch; a table offers its
# keys, the first by default), the numbers of the official vq_train.py. 0 for --max-steps,
# --codebook-size, --codebook-embed-dim: --epochs' and the preset's instead.
FLAGS = {
    "--image-size": 256,  # pixels per side: a multiple of the VQ's downsampling factor
    "--global-batch-size": 128,  # images per optimizer step, all processes together
    "--epochs": 40,
    "--max-steps": 0,
    "--codebook-size": 0,
    "--codebook-embed-dim": 0,
    "--lr": 1e-4,  # Adam's, for the VQ and the discriminator alike
    "--max-grad-norm": 1.0,  # 0 = no clipping
    "--commit-loss-beta": 0.25,  # beta of the commitment loss (Sec. 2.1)
    "--entropy-loss-ratio": 0.0,
    "--reconstruction-weight": 1.0,
    "--perceptual-weight": 1.0,  # LPIPS; 0 = no LPIPS and no download
    "--disc-start": 20000,  # the first step with the GAN losses
    "--disc-weight": 0.5,  # 0 = no discriminator at all
    "--disc-adaptive-weight": False,  # VQGAN's adaptive GAN weight (the official leaves it off)
    "--ema": False,  # keep an EMA of the weights (decay 0.9999)
    "--no-flip": False,  # random crops, never mirrored: for data where left and right matter (text)
    "--log-every": 100,
    "--ckpt-every": 5000,
    "--sample-every": 1000,  # a PNG of inputs above their reconstructions; 0 = never
    "--global-seed": 0,
    "--num-workers": common.NUM_WORKERS,  # DataLoader processes per rank
    "--skip-bad-images": False,  # drop unreadable images (counted in the log) instead of stopping
    "--compile": False,  # torch.compile the VQ
    "--results-dir": "results",
    "--reconstruction-loss": RECONSTRUCTION_LOSSES,
    "--disc-loss": DISC_LOSSES,
    "--gen-loss": GEN_LOSSES,
}
# What a resumed run may change. A bare --resume continues the saved run with its own flags
# (common.resume_args); these set only its length, cadence and machinery (and --ema may start an
# EMA from the loaded weights). Another flag changed, e.g. --global-batch-size, stops the run.
RESUMABLE = """max_steps epochs log_every ckpt_every sample_every results_dir num_workers compile
    skip_bad_images ema""".split()


def build_parser():
    p = argparse.ArgumentParser(
        description="Train the LlamaGen VQ tokenizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # --help shows every default
    )
    p.add_argument("--data-path", required=True, help="class-per-folder image tree")
    p.add_argument(
        "--model",
        "--vq-model",  # the official name
        type=functools.partial(common.preset, VQ_CONFIGS),  # "tiny" = "VQ-tiny"
        default="VQ-16",
        help="a VQ_CONFIGS key",
    )
    for flag, default in FLAGS.items():
        if default is False:
            p.add_argument(flag, action="store_true")
        elif isinstance(default, dict):  # a table of losses: its keys, the first by default
            p.add_argument(flag, choices=default, default=next(iter(default)), help="%(choices)s")
        else:
            p.add_argument(flag, type=type(default), default=default, help="%(type)s")
    p.add_argument("--mixed-precision", choices=["fp32", "bf16", "fp16"], help="None: bf16 on GPUs")
    # both: refused, since --finetune differs from the resumed run's (common.resume_args)
    p.add_argument("--resume", help="checkpoint of a run to continue exactly, its flags too")
    p.add_argument("--finetune", help="checkpoint to take weights from; steps start at 0")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- training

# what a checkpoint holds besides step, config, args and rng: Trainer attributes of these names
PARTS = ("model", "ema", "discriminator", "optimizer", "optimizer_disc", "scaler", "scaler_disc")
# what train_step returns, in order; a log line has their means since the last one
LOG_TERMS = """gen_loss rec_loss perceptual_loss gen_adv_loss adaptive_weight vq_loss commit_loss
    entropy_loss disc_loss logits_real logits_fake bad_images""".split()


class Trainer:
    """The VQ and its PatchGAN, their optimizers, LPIPS and the EMA: built, resumed, stepped and
    saved. self.vq / self.disc take the steps (DDP under torchrun); the unwrapped self.model and
    self.discriminator are saved, EMA'd, and give the generator's GAN term."""

    def __init__(self, args, env, ckpt):
        self.args, self.env = args, env
        # the VQ: the trained weights (not the EMA) of the run to resume or the file to finetune,
        # or a fresh one of the preset
        source = ckpt or args.finetune and common.load_checkpoint(args.finetune)
        try:
            vq = source and VQModel.from_checkpoint(source, prefer_ema=False)
        except ValueError as e:  # e.g. a GPT checkpoint
            raise UserError(f"{args.resume or args.finetune}: {e}") from None
        if not source:  # --codebook-size / --codebook-embed-dim 0: the preset's
            sizes = {
                k: v for k in ("codebook_size", "codebook_embed_dim") if (v := getattr(args, k))
            }
            vq = VQModel(VQConfig.from_name(args.model, **sizes))
        # the quantizer reads its config at every step; a resumed run's are the saved ones
        vars(vq.config).update(
            commit_loss_beta=args.commit_loss_beta, entropy_loss_ratio=args.entropy_loss_ratio
        )
        self.model = vq = vq.train().to(env.device)
        if args.image_size % vq.config.downsample:
            raise UserError(f"--image-size must be a multiple of {vq.config.downsample}")
        # LPIPS (or False) before anything is written: a failed download stops the run. Rank 0
        # downloads, the others then read its cache.
        self.lpips = args.perceptual_weight > 0 and common.rank0_first(env, LPIPS).to(env.device)
        self.discriminator = disc = PatchGANDiscriminator().to(env.device)
        self.ema = copy.deepcopy(vq) if args.ema else None  # never in a backward pass
        self.optimizer, self.optimizer_disc = (
            # official: plain Adam (its --weight-decay is unused), the same for both nets
            torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.95))
            for net in (vq, disc)
        )
        self.scaler, self.scaler_disc = (  # loss scaling only for fp16
            torch.amp.GradScaler(enabled=env.precision == "fp16") for _ in range(2)
        )
        # resume: every part; finetune: the discriminator too when the file has one (ours). A
        # scaler saved disabled is {} and the EMA of a run without --ema None: both stay as built
        # (an EMA then starts from the loaded weights).
        for key in PARTS if ckpt else ["discriminator"] * bool(source):
            part = getattr(self, key)
            if part is not None and source.get(key):
                part.load_state_dict(source[key])
        if ckpt:
            common.restore_rng(ckpt["rng"], env)
        # DDP under torchrun, each net on its one device already; the discriminator's BatchNorm
        # stays plain, unsynced, as official
        wrap = DDP if env.distributed else lambda net: net
        self.vq, self.disc = wrap(torch.compile(vq) if args.compile else vq), wrap(disc)

    def train_step(self, images, labels, step):
        """One generator step, then one discriminator step from --disc-start on (Sec. 2.2).

        images (B, 3, S, S) in [-1, 1] -> (the readable ones, their reconstructions, codebook
        usage, LOG_TERMS (12,))."""
        args = self.args
        x = images[labels >= 0].to(self.env.device, non_blocking=True)  # unreadable rows dropped
        if not len(x):
            raise UserError(f"every image of a batch was unreadable; check {args.data_path}")
        # step counts from 1 as the official global step; weight 0 = no GAN at all (the official
        # scales its discriminator loss by it)
        disc_on = args.disc_weight > 0 and step >= args.disc_start
        zero = x.new_zeros(())
        with self.env.ctx:  # generator: reconstruction + perceptual + adversarial + codebook terms
            recon, (vq_loss, commit_loss, entropy_loss, usage) = self.vq(x)
            rec = RECONSTRUCTION_LOSSES[args.reconstruction_loss](recon, x)
            perceptual = self.lpips(x, recon).mean() if self.lpips else zero
            nll = args.reconstruction_weight * rec + args.perceptual_weight * perceptual
            gen_adv, weight = zero, zero + 1
            if disc_on:  # through the unwrapped D: its gradients here are dropped by the D step
                gen_adv = GEN_LOSSES[args.gen_loss](self.discriminator(recon))
                if args.disc_adaptive_weight:
                    weight = adaptive_weight(nll, gen_adv, self.model.decoder.conv_out.weight)
            loss = nll + weight * args.disc_weight * gen_adv + vq_loss + commit_loss + entropy_loss
        backward_and_step(loss, self.optimizer, self.scaler, args.max_grad_norm)
        if self.ema is not None:
            common.update_ema(self.ema, self.model, 0.9999)  # the official decay

        disc_loss = real = fake = zero  # the discriminator, on the detached reconstructions
        if disc_on:
            with self.env.ctx:  # two passes (BatchNorm statistics), as official
                real, fake = self.disc(x), self.disc(recon.detach())
                disc_loss = args.disc_weight * DISC_LOSSES[args.disc_loss](real, fake)
            backward_and_step(disc_loss, self.optimizer_disc, self.scaler_disc, args.max_grad_norm)
        terms = [loss, rec, perceptual, gen_adv, weight, vq_loss, commit_loss, entropy_loss]
        terms += [disc_loss, real.mean(), fake.mean(), (labels < 0).sum().to(x)]
        return x, recon.detach(), usage, torch.stack(terms).detach().float()  # (12,) LOG_TERMS


def main(args):
    # a bare --resume continues the saved run with its flags; released weights: --finetune
    script = "train_vq.py (weights: --finetune)"
    env, ckpt, changed = common.Run.setup(args, build_parser(), RESUMABLE, "discriminator", script)
    if args.global_batch_size % env.world_size:
        raise UserError(f"--global-batch-size must be divisible by {env.world_size} processes")
    torch.manual_seed(args.global_seed * env.world_size + env.rank)
    trainer = Trainer(args, env, ckpt)

    # data: the ADM random crop (+ flip) seeded by (seed, epoch, index), one DataLoader for the
    # run from the checkpoint's step on; then the run folder
    augment = "crop" if args.no_flip else "random"
    dataset = data.ImageFolder(
        args.data_path, args.image_size, augment, args.skip_bad_images, args.global_seed
    )
    rank_batch = args.global_batch_size // env.world_size  # no accumulation: one micro-batch
    run = common.Run(args, env, dataset, rank_batch, start=ckpt.get("step", 0))
    common.print0(
        f"{args.model}, {len(dataset)} images, {env}; steps {run.start} -> {run.total}; "
        f"{run.folder}",
        *changed,  # the flags a resumed run overrides, "max_steps 300 -> 600"
        sep="; ",
    )
    sums, since, t0 = 0, run.start, time.time()  # LOG_TERMS summed since the last log line
    for step in run:  # under rank 0's bar; `step`: the optimizer steps done after this one
        x, recon, usage, terms = trainer.train_step(*next(run.batches), step)
        sums = sums + terms
        if run.due(step, args.log_every):  # LOG_TERMS averaged over steps and ranks (bad_images
            if env.distributed:  # summed): the one all-reduce, so a step costs no communication
                dist.all_reduce(sums)
            values = (sums / ((step - since) * env.world_size)).tolist()
            means = dict(zip(LOG_TERMS, values), bad_images=int(sums[-1]), codebook_usage=usage)
            epoch = (step - 1) // run.steps_per_epoch  # of the step's samples
            # elapsed_s: since the start of this process; the throughput between two lines
            run.log(dict(step=step, epoch=epoch, **means, elapsed_s=time.time() - t0))
            run.bar.set_postfix_str(f"rec {means['rec_loss']:.4f}, usage {usage:.3f}")
            sums, since = 0, step
        if run.due(step, args.sample_every) and not env.rank:
            grid = torch.cat([x[:8], recon[:8]])  # (2k, 3, S, S), k <= 8: inputs above outputs
            data.save_image_grid(grid, run.folder / "samples" / f"{step:07d}.png", nrow=len(x[:8]))
        if run.due(step, args.ckpt_every):  # all a resumed run needs to go on bit for bit
            state = {k: getattr(trainer, k) and getattr(trainer, k).state_dict() for k in PARTS}
            state |= dict(step=step, config=asdict(trainer.model.config), args=vars(args))
            state["rng"] = common.gather_rng(env)  # every rank's: each goes on with its own stream
            common.save_checkpoints(state, run.folder, step, env)  # {step}.pt and last.pt
    common.print0(f"done: {run.total} steps, checkpoints in {run.folder / 'checkpoints'}")
    if env.distributed:
        dist.destroy_process_group()
    return run.folder


if __name__ == "__main__":
    common.cli(main, parse_args)
