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

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import UserError
from vq import VQ_CONFIGS, VQConfig, VQModel


# ----------------------------------------------------------------------------- LPIPS (VGG16, v0.1)

# torchvision's IMAGENET1K_V1 file (~528 MB); its name carries the first hex digits of its sha256,
# which torchvision checks, and so do we
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256 = "397923af"
VGG16_FEATURES_FILE = "vgg16_features.pt"  # what we keep of it: the 13 convs of `features` (~59 MB)
# the official heads (the spec gives md5 d507d7349b931f0638a25a48a722f98a), cached under LIN_FILE
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
LIN_FILE = "lpips_vgg_v0.1.pth"
LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
# VGG16's five stages: conv3x3 + ReLU pairs of these widths (two pairs up to 128 channels, three
# after), a 2x2 max pool before each stage but the first. LPIPS taps each stage's last ReLU
# (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3): vgg16().features[:4], [4:9], ... [23:30] end at
# them.
LPIPS_CHANNELS = [64, 128, 256, 512, 512]
LPIPS_TAPS = [4, 9, 16, 23, 30]
# shift and scale: ImageNet mean/std re-expressed for inputs in [-1, 1] (the official ScalingLayer)
LPIPS_SCALING = [(-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)]


def fetch_lpips_weights():
    """LPIPS's state dict: the VGG16 conv weights and the lin heads, downloaded on first use (a
    UserError when that fails), then read from the cache."""
    features = common.cache_dir() / VGG16_FEATURES_FILE
    lin = common.download(LIN_URL, LIN_FILE, LIN_SHA256, desc="LPIPS heads")
    if not features.is_file():
        full = common.download(VGG16_URL, sha256=VGG16_SHA256, desc="VGG16 ImageNet weights")
        vgg = common.load_checkpoint(full)
        common.save_checkpoint({k: vgg[k] for k in vgg if k.startswith("features.")}, features)
        full.unlink()  # keep the 59 MB of convolutions, not the 528 MB with the classifier
    return {**common.load_checkpoint(features), **common.load_checkpoint(lin)}


class LPIPS(nn.Module):
    """LPIPS-VGG16 v0.1 distance, images (B, 3, H, W) in [-1, 1] -> (B,); frozen, built in eval
    mode (the official trainer's .train() call turns the p=0.5 dropout of the lin heads back on
    and adds noise to the perceptual loss: nothing here calls it).

    Keys as the two official files, so that each loads as it is: features.{i}.* of torchvision's
    VGG16 file (vgg16().features, without the last pool) and lin{k}.model.1.weight of the LPIPS
    heads file (the official module keeps the trunk as net.slice{1..5}.{i}). pretrained=False:
    random weights of the same shapes (tests, benchmarks).
    """

    def __init__(self, pretrained=True):
        super().__init__()
        layers, c = [], 3
        for k, width in enumerate(LPIPS_CHANNELS):
            layers += [nn.MaxPool2d(2)] * (k > 0)
            for _ in range(2 if width < 256 else 3):
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
                c = width
            # the official head: a Dropout (inert in eval) before the conv, so the conv is model.1
            head = nn.Sequential(nn.Dropout(), nn.Conv2d(width, 1, 1, bias=False))
            self.add_module(f"lin{k}", nn.Sequential(OrderedDict(model=head)))
        self.features = nn.Sequential(*layers)
        if pretrained:
            # the features of torchvision's VGG16 file and the five official lin heads, strictly:
            # the official loads the heads non-strictly and would keep random ones
            try:
                self.load_state_dict(fetch_lpips_weights())
            except RuntimeError as e:  # offline (a UserError), or wrong files: torch names the keys
                raise UserError(
                    f"the perceptual loss needs torchvision's VGG16 file {VGG16_URL} and the LPIPS "
                    f"v0.1 VGG lin file {LIN_URL} (saved as {LIN_FILE}) in {common.cache_dir()} "
                    "(set by LLAMAGEN_CACHE): put them there, or train without it: "
                    "--perceptual-weight 0 (" + " ".join(str(e).split())[:400] + ")"
                ) from None
        self.requires_grad_(False).eval()

    def forward(self, x, y):  # (B, 3, H, W) each -> (B,)
        shift, scale = x.new_tensor(LPIPS_SCALING)[..., None, None]  # (3, 1, 1) each
        h = (torch.cat([x, y]) - shift) / scale  # (2B, 3, H, W): one trunk pass for both
        distance, start = 0.0, 0
        for k, end in enumerate(LPIPS_TAPS):
            h, start = self.features[start:end](h), end  # from the last tap up to the next
            # unit length over channels; F.normalize divides by max(norm, eps) where the official
            # adds eps: equal to 1e-10, but with a finite gradient where a feature vector is 0
            fx, fy = F.normalize(h, dim=1, eps=1e-10).chunk(2)
            distance += getattr(self, f"lin{k}")((fx - fy) ** 2).mean(dim=(2, 3))  # (B, 1)
        return distance.flatten()  # (B,)


# ------------------------------------------------------------------------ PatchGAN and GAN losses


class PatchGANDiscriminator(nn.Sequential):
    """pix2pix NLayerDiscriminator as official (ndf 64, 3 layers): (B, 3, H, W) -> logits
    (B, 1, H/8-2, W/8-2), one per 70x70 patch (30x30 at 256). A Sequential of one, `main`, so
    that the keys are the official main.{i}.*"""

    def __init__(self):
        layers, c = [], 3
        for out in 64, 128, 256, 512:  # x2 channels; stride 2 but the last, as official
            # conv 4x4, BatchNorm, LeakyReLU(0.2); the first layer has no BatchNorm, so its conv
            # keeps a bias (elsewhere BatchNorm brings it). BatchNorm's init draws no random
            # numbers, so building it before the conv leaves the official init as it is.
            norm = [nn.BatchNorm2d(out)] if layers else []
            layers += [
                nn.Conv2d(c, out, 4, 2 if out < 512 else 1, 1, bias=not layers),
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
    if max_grad_norm:  # one param group: the optimizers are built on net.parameters()
        nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], max_grad_norm)
    scaler.step(opt)
    scaler.update()


# ----------------------------------------------------------------------------- CLI

# Every flag with a value and its default (its type is the default's), the numbers of the official
# vq_train.py. 0 for --max-steps, --codebook-size, --codebook-embed-dim: --epochs' and the preset's
# instead. A flag of TABLES chooses a key of its table.
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
    "--log-every": 100,
    "--ckpt-every": 5000,
    "--sample-every": 1000,  # a PNG of inputs above their reconstructions; 0 = never
    "--global-seed": 0,
    "--num-workers": common.NUM_WORKERS,  # DataLoader processes per rank
    "--results-dir": "results",
    "--reconstruction-loss": "l2",
    "--disc-loss": "hinge",
    "--gen-loss": "hinge",
}
# SWITCHES (off by default):
#   --disc-adaptive-weight  VQGAN's adaptive GAN weight (the official leaves it off)
#   --ema                   keep an EMA of the weights (decay 0.9999)
#   --no-flip               random crops, never mirrored: for data where left and right matter
#                           (handwriting, digits, text, maps)
#   --skip-bad-images       drop unreadable images (counted in the log) instead of stopping
#   --compile               torch.compile the VQ
TABLES = {
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
    for flag, default in FLAGS.items():  # a loss table's keys, or any value of the type
        p.add_argument(
            flag, type=type(default), default=default, choices=TABLES.get(flag), help="%(type)s"
        )
    for flag in "--disc-adaptive-weight --ema --no-flip --skip-bad-images --compile".split():
        p.add_argument(flag, action="store_true", help="a switch")  # SWITCHES, above
    p.add_argument("--mixed-precision", choices="fp32 bf16 fp16".split(), help="None: bf16 on GPUs")
    # --resume: a checkpoint of a run to continue exactly, its flags too; --finetune: a checkpoint
    # to take the weights from, steps start at 0. Both: refused, since --finetune differs from the
    # resumed run's (common.resume_args).
    for flag in "--resume", "--finetune":
        p.add_argument(flag, help="a checkpoint path")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- training

# what a checkpoint holds besides step, config, args and rng: Trainer attributes of these names
PARTS = "model ema discriminator optimizer optimizer_disc scaler scaler_disc".split()
# what train_step returns, in order; a log line has their means since the last one
LOG_TERMS = """gen_loss rec_loss perceptual_loss gen_adv_loss adaptive_weight vq_loss commit_loss
    entropy_loss disc_loss logits_real logits_fake""".split()  # then the unreadable images


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
        except ValueError as e:  # e.g. a GPT checkpoint given to --finetune
            raise UserError(f"{args.finetune}: {e}") from None
        # --codebook-size / --codebook-embed-dim 0: the preset's
        sizes = {k: v for k in ("codebook_size", "codebook_embed_dim") if (v := getattr(args, k))}
        vq = vq or VQModel(VQConfig.from_name(args.model, **sizes))
        # the quantizer reads its config at every step; a resumed run's are the saved ones
        vars(vq.config).update(
            commit_loss_beta=args.commit_loss_beta, entropy_loss_ratio=args.entropy_loss_ratio
        )
        self.model = vq = vq.train().to(env.device)
        if args.image_size % vq.config.downsample:
            raise UserError(f"--image-size must be a multiple of {vq.config.downsample}")
        # LPIPS (or False) before anything is written: a failed download stops the run. Rank 0
        # downloads, the others then read its cache.
        self.lpips = args.perceptual_weight and common.rank0_first(env, LPIPS).to(env.device)
        self.discriminator = disc = PatchGANDiscriminator().to(env.device)
        self.ema = copy.deepcopy(vq) if args.ema else None  # never in a backward pass
        # each net its optimizer, plain Adam as official (its --weight-decay is unused), and its
        # loss scaler (only for fp16)
        (self.optimizer, self.scaler), (self.optimizer_disc, self.scaler_disc) = (
            (
                torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.95)),
                torch.amp.GradScaler(enabled=env.precision == "fp16"),
            )
            for net in (vq, disc)
        )
        # resume: every part; finetune: the discriminator too when the file has one (ours). A
        # scaler saved disabled is {} and the EMA of a run without --ema None: both stay as built
        # (an EMA then starts from the loaded weights).
        for key in PARTS if ckpt else ["discriminator"] * bool(source):
            if source.get(key) and (part := getattr(self, key)):
                part.load_state_dict(source[key])
        if ckpt:
            common.restore_rng(ckpt["rng"], env)
        # DDP under torchrun, each net on its one device already; the discriminator's BatchNorm
        # stays plain, unsynced, as official
        wrap = nn.parallel.DistributedDataParallel if env.distributed else lambda net: net
        self.vq, self.disc = wrap(torch.compile(vq) if args.compile else vq), wrap(disc)

    def train_step(self, images, labels, step):
        """One generator step, then one discriminator step from --disc-start on (Sec. 2.2).

        images (B, 3, S, S) in [-1, 1] -> (a preview: up to 8 readable images above their
        reconstructions (2k, 3, S, S), codebook usage, LOG_TERMS (12,))."""
        args = self.args
        x = images[labels >= 0].to(self.env.device, non_blocking=True)  # unreadable rows dropped
        if not len(x):
            raise UserError(f"every image of a batch was unreadable; check {args.data_path}")
        # step counts from 1 as the official global step; weight 0 = no GAN at all (the official
        # scales its discriminator loss by it)
        disc_on = args.disc_weight and step >= args.disc_start
        zero = x.new_zeros(())
        with self.env.ctx:  # generator: reconstruction + perceptual + adversarial + codebook terms
            recon, (vq_loss, commit_loss, entropy_loss, usage) = self.vq(x)
            rec = RECONSTRUCTION_LOSSES[args.reconstruction_loss](recon, x)
            perceptual = self.lpips(x, recon).mean() if self.lpips else zero
            nll = args.reconstruction_weight * rec + args.perceptual_weight * perceptual
            gen_adv = disc_loss = real = fake = zero  # no GAN terms (yet)
            weight = zero + 1
            if disc_on:  # through the unwrapped D: its gradients here are dropped by the D step
                gen_adv = GEN_LOSSES[args.gen_loss](self.discriminator(recon))
                if args.disc_adaptive_weight:
                    weight = adaptive_weight(nll, gen_adv, self.model.decoder.conv_out.weight)
            loss = nll + weight * args.disc_weight * gen_adv + vq_loss + commit_loss + entropy_loss
        backward_and_step(loss, self.optimizer, self.scaler, args.max_grad_norm)
        if self.ema:
            common.update_ema(self.ema, self.model, 0.9999)  # the official decay

        if disc_on:  # the discriminator, on the detached reconstructions
            with self.env.ctx:  # two passes (BatchNorm statistics), as official
                real, fake = self.disc(x), self.disc(recon.detach())
                disc_loss = args.disc_weight * DISC_LOSSES[args.disc_loss](real, fake)
            backward_and_step(disc_loss, self.optimizer_disc, self.scaler_disc, args.max_grad_norm)
        # LOG_TERMS and the count of unreadable images (12,), in fp32: stack promotes the bf16 /
        # fp16 logits
        terms = [loss, rec, perceptual, gen_adv, weight, vq_loss, commit_loss, entropy_loss]
        terms += [disc_loss, real.mean(), fake.mean(), x.new_tensor(len(images) - len(x))]
        return torch.cat([x[:8], recon[:8]]).detach(), usage, torch.stack(terms).detach()


def main(args):
    # a bare --resume continues the saved run with its flags; released weights: --finetune
    env, ckpt, changed = common.Run.setup(
        args, build_parser(), RESUMABLE, "discriminator", "train_vq.py (weights: --finetune)"
    )
    if args.global_batch_size % env.world_size:
        raise UserError(f"--global-batch-size must be divisible by {env.world_size} processes")
    torch.manual_seed(args.global_seed * env.world_size + env.rank)
    trainer = Trainer(args, env, ckpt)

    # data: the ADM random crop, mirrored at random ("random") or never (--no-flip: "crop"),
    # seeded by (seed, epoch, index); one DataLoader for the run from the checkpoint's step on, one
    # micro-batch per step (no accumulation); then the run folder
    dataset = data.ImageFolder(
        args.data_path,
        args.image_size,
        "crop" if args.no_flip else "random",
        args.skip_bad_images,
        args.global_seed,
    )
    micro_batch = args.global_batch_size // env.world_size
    run = common.Run(args, env, dataset, micro_batch, start=ckpt.get("step", 0))
    common.print0(
        f"{args.model}, {len(dataset)} images, {env}; steps {run.start} -> {run.total}; "
        f"{run.folder}",
        *changed,  # the flags a resumed run overrides, "max_steps 300 -> 600"
        sep="; ",
    )
    sums, since = 0, run.start  # LOG_TERMS summed since the last log line
    for step in run:  # under rank 0's bar; `step`: the optimizer steps done after this one
        preview, usage, terms = trainer.train_step(*next(run.batches), step)
        sums = sums + terms
        if run.due(step, args.log_every):  # LOG_TERMS averaged over steps and ranks (bad_images
            if env.distributed:  # summed): the one all-reduce, so a step costs no communication
                torch.distributed.all_reduce(sums)
            means = dict(zip(LOG_TERMS, (sums / ((step - since) * env.world_size)).tolist()))
            # epoch: of the step's samples; bad_images summed; codebook_usage of the step; time:
            # as train_gpt, the throughput between two lines
            run.log(
                dict(
                    step=step,
                    epoch=(step - 1) // run.steps_per_epoch,
                    **means,
                    bad_images=int(sums[-1]),
                    codebook_usage=usage,
                    time=time.time(),
                )
            )
            run.bar.set_postfix_str(f"rec {means['rec_loss']:.4f}, usage {usage:.3f}")
            sums, since = 0, step
        if run.due(step, args.sample_every) and not env.rank:
            # up to 8 inputs above their reconstructions
            data.save_image_grid(
                preview, run.folder / f"samples/{step:07d}.png", nrow=len(preview) // 2
            )
        if run.due(step, args.ckpt_every):  # all a resumed run needs to go on bit for bit
            state = {k: getattr(trainer, k) and getattr(trainer, k).state_dict() for k in PARTS}
            state |= dict(
                step=step,
                config=vars(trainer.model.config),
                args=vars(args),
                rng=common.gather_rng(env),  # every rank's (collective): each its own stream
            )
            common.save_checkpoints(state, run.folder, step, env)  # {step}.pt and last.pt
    common.print0(f"done: {run.total} steps, checkpoints in {run.folder / 'checkpoints'}")
    if env.distributed:
        torch.distributed.destroy_process_group()
    return run.folder


if __name__ == "__main__":
    common.cli(main, parse_args)
