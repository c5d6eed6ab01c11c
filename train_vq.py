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
    python train_vq.py ... --resume results/000-VQ-16/checkpoints/last.pt   # continues exactly
    python train_vq.py ... --finetune vq_ds16_c2i.pt --disc-start 0         # from released weights
    python -m pytest tests/test_train_vq.py -q

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
from tqdm import tqdm

import common
import data
from common import UserError
from vq import VQ_CONFIGS, VQConfig, VQModel

EMA_DECAY = 0.9999  # official --ema decay
ADAM_BETAS = (0.9, 0.95)  # official, both nets (plain Adam: its --weight-decay is unused)

# ----------------------------------------------------------------------------- LPIPS (VGG16, v0.1)

# torchvision's IMAGENET1K_V1 file (~528 MB); its name carries the first hex digits of its sha256,
# which torchvision checks, and so do we
VGG16_URL, VGG16_SHA256 = "https://download.pytorch.org/models/vgg16-397923af.pth", "397923af"
VGG16_FEATURES_FILE = "vgg16_features.pt"  # what we keep of it: the 13 convs of `features` (~59 MB)
LIN_WEIGHTS = dict(  # the official heads; the spec gives md5 d507d7349b931f0638a25a48a722f98a
    url="https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
    filename="lpips_vgg_v0.1.pth",
    sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    size=7289,
)
# VGG16's five stages: conv3x3 + ReLU pairs of these widths, a 2x2 max pool before each stage but
# the first. LPIPS taps each stage's last ReLU (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
LPIPS_CHANNELS, VGG16_CONVS = [64, 128, 256, 512, 512], [2, 2, 3, 3, 3]
# ImageNet mean/std re-expressed for inputs in [-1, 1]
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)


def fetch_lpips_weights() -> list:
    """Cached paths of the VGG16 conv weights and the LPIPS lin heads, downloaded on first use."""
    features = common.cache_dir() / VGG16_FEATURES_FILE
    try:
        lin = common.download(**LIN_WEIGHTS, desc="LPIPS heads")
        if not features.is_file():
            full = common.download(VGG16_URL, sha256=VGG16_SHA256, desc="VGG16 ImageNet weights")
            sd = common.load_checkpoint(full)
            common.save_checkpoint(
                {k: v for k, v in sd.items() if k.startswith("features.")}, features
            )
            full.unlink()  # keep the 59 MB of convolutions, not the 528 MB with the classifier
    except UserError as e:
        raise UserError(
            f"the perceptual loss needs {VGG16_URL} and {LIN_WEIGHTS['url']} (saved as "
            f"{LIN_WEIGHTS['filename']}) in {common.cache_dir()} (set by LLAMAGEN_CACHE) but could "
            f"not get them ({e}); put them there, or train without it: --perceptual-weight 0"
        ) from None
    return [features, lin]


class LPIPS(nn.Module):
    """LPIPS-VGG16 v0.1 distance, images (B, 3, H, W) in [-1, 1] -> (B,); frozen, always eval.

    Keys as the official lpips.py: scaling_layer.{shift,scale}, net.slice{1..5}.{i}.* (i the
    index in torchvision's vgg16().features) and lin{0..4}.model.1.weight.
    """

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.scaling_layer = nn.Module()
        for name, value in ("shift", LPIPS_SHIFT), ("scale", LPIPS_SCALE):
            self.scaling_layer.register_buffer(name, torch.tensor(value).view(1, 3, 1, 1))
        self.net, c, index = nn.Sequential(), 3, 0  # index: the layer's in vgg16().features
        for k, (width, n_convs) in enumerate(zip(LPIPS_CHANNELS, VGG16_CONVS)):
            layers = [nn.MaxPool2d(2, 2)] if k else []
            for _ in range(n_convs):
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
                c = width
            named = OrderedDict((str(index + j), layer) for j, layer in enumerate(layers))
            self.net.add_module(f"slice{k + 1}", nn.Sequential(named))  # slice2.5 = features.5
            index += len(layers)
        for k, c in enumerate(LPIPS_CHANNELS):
            # index 0 is the official Dropout(0.5): kept so the conv is `model.1`; inert in eval
            head = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(c, 1, 1, bias=False))
            nn.init.uniform_(head[1].weight, 0.0, 2.0 / c)  # stand-in, >= 0 as the real ones
            self.add_module(f"lin{k}", nn.Sequential(OrderedDict(model=head)))
        if pretrained:
            self.load_weights(*map(common.load_checkpoint, fetch_lpips_weights()))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Always eval. The official trainer calls .train() on the module holding LPIPS, which turns
        # the p=0.5 dropout of the lin heads back on and adds noise to the perceptual loss.
        return super().train(False)

    def load_weights(self, vgg: dict, lin: dict):
        """torchvision's VGG16 `features.{i}` convs into net.slice*.{i}, and the five official lin
        heads, strictly: the official loads the heads non-strictly and would keep random ones."""
        sd = {"net." + k: vgg.get("features." + k.split(".", 1)[1]) for k in self.net.state_dict()}
        sd.update(lin)
        try:
            self.load_state_dict({**sd, **dict(self.named_buffers())})  # + scaling_layer.*
        except RuntimeError as e:  # names the missing, unexpected or misshapen keys
            raise UserError(
                "expected torchvision's VGG16 file and the LPIPS v0.1 VGG lin file: "
                + " ".join(str(e).split())[:300]
            ) from None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.scaling_layer
        h = (torch.cat([x, y]) - s.shift) / s.scale  # (2B, 3, H, W): one trunk pass for both
        distance = 0.0
        for k, layer_slice in enumerate(self.net):
            h = layer_slice(h)
            # unit length over channels; F.normalize divides by max(norm, eps) where the official
            # adds eps: equal to 1e-10, but with a finite gradient where a feature vector is 0
            fx, fy = F.normalize(h, dim=1, eps=1e-10).chunk(2)
            distance = distance + getattr(self, f"lin{k}")((fx - fy) ** 2).mean(dim=(2, 3))
        return distance.flatten()  # (B,)


# ------------------------------------------------------------------------ PatchGAN and GAN losses


class PatchGANDiscriminator(nn.Module):
    """pix2pix NLayerDiscriminator as official: (B, 3, H, W) -> logits (B, 1, H/8-2, W/8-2), one
    per 70x70 patch (30x30 at 256)."""

    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
        for n in range(1, n_layers + 1):  # x2 channels per layer (at most 8 ndf), last at stride 1
            out = ndf * min(2**n, 8)
            conv = nn.Conv2d(c, out, 4, 2 if n < n_layers else 1, 1, bias=False)
            layers += [conv, nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            c = out
        self.main = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        for m in self.modules():  # official init; conv biases keep PyTorch's default
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# discriminator losses of (D(x), D(x_hat)) logits; generator losses of D(x_hat)
DISC_LOSSES = {
    "hinge": lambda real, fake: 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()),
    "vanilla": lambda real, fake: 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean()),
    # textbook BCE(D(x), 1) + BCE(D(x_hat), 0); the official passes the constant as the logits and
    # D's output as the target (arguments swapped), which is not a GAN loss: not copied
    "non-saturating": lambda real, fake: (
        F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    ),
}
GEN_LOSSES = {
    "hinge": lambda fake: -fake.mean(),
    "non-saturating": lambda fake: F.softplus(-fake).mean(),
}
RECONSTRUCTION_LOSSES = {"l2": F.mse_loss, "l1": F.l1_loss}


def adaptive_weight(nll_loss, g_loss, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad nll|| / (||grad G|| + 1e-4) at the decoder's last layer, clamped to [0, 1e4]: VQGAN's
    balance of the GAN term against the reconstruction."""
    nll_norm, g_norm = (
        torch.autograd.grad(loss, last_layer, retain_graph=True)[0].norm()
        for loss in (nll_loss, g_loss)
    )
    return (nll_norm / (g_norm + 1e-4)).clamp(0.0, 1e4).detach()


def backward_and_step(loss, opt, scaler, max_grad_norm: float):
    """zero_grad, backward (scaled for fp16), clip the unscaled gradient norm, step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # a no-op unless fp16; step() then knows it was done
    if max_grad_norm > 0:
        params = [p for group in opt.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(opt)
    scaler.update()


# ----------------------------------------------------------------------------- CLI

# Every flag and its default (its type is the default's; False makes a switch; a table offers its
# keys), the numbers of
# the official vq_train.py. 0 for --max-steps, --codebook-size, --codebook-embed-dim: --epochs' and
# the preset's instead.
FLAGS = dict(
    image_size=256,  # pixels per side: a multiple of the VQ's downsampling factor
    global_batch_size=128,  # images per optimizer step, all processes together
    epochs=40,
    max_steps=0,
    codebook_size=0,
    codebook_embed_dim=0,
    lr=1e-4,  # Adam's, for the VQ and the discriminator alike
    max_grad_norm=1.0,  # 0 = no clipping
    commit_loss_beta=0.25,  # beta of the commitment loss (Sec. 2.1)
    entropy_loss_ratio=0.0,
    reconstruction_weight=1.0,
    perceptual_weight=1.0,  # LPIPS; 0 = no LPIPS and no download
    disc_start=20000,  # the first step with the GAN losses
    disc_weight=0.5,  # 0 = no discriminator at all
    disc_adaptive_weight=False,  # VQGAN's adaptive GAN weight (the official leaves it off)
    ema=False,  # keep an EMA of the weights (decay EMA_DECAY)
    log_every=100,
    ckpt_every=5000,
    sample_every=1000,  # a PNG of inputs above their reconstructions; 0 = never
    global_seed=0,
    num_workers=common.NUM_WORKERS,  # DataLoader processes per rank
    skip_bad_images=False,  # drop unreadable images (counted in the log) instead of stopping
    compile=False,  # torch.compile the VQ
    results_dir="results",
    reconstruction_loss=RECONSTRUCTION_LOSSES,
    disc_loss=DISC_LOSSES,
    gen_loss=GEN_LOSSES,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the LlamaGen VQ tokenizer.")
    p.add_argument("--data-path", required=True, help="class-per-folder image tree")
    preset = functools.partial(common.preset, VQ_CONFIGS)  # "tiny" = "VQ-tiny"
    p.add_argument(
        "--model", "--vq-model", type=preset, default="VQ-16", help=", ".join(VQ_CONFIGS)
    )
    for name, default in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if default is False:
            p.add_argument(flag, action="store_true")
        elif isinstance(default, dict):  # a table of losses: its keys, the first by default
            p.add_argument(
                flag,
                choices=list(default),
                default=next(iter(default)),
                help="default: %(default)s",
            )
        else:
            p.add_argument(flag, type=type(default), default=default, help="default: %(default)s")
    p.add_argument("--mixed-precision", choices=["fp32", "bf16", "fp16"])  # None: bf16 on a GPU
    source = p.add_mutually_exclusive_group()
    source.add_argument("--resume", help="checkpoint to continue exactly where it stopped")
    source.add_argument("--finetune", help="checkpoint to take weights from; steps start at 0")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- training


def build_vq(args, source) -> VQModel:
    """A fresh VQ of the preset, or the weights of `source` (the checkpoint to resume or tune)."""
    losses = dict(
        commit_loss_beta=args.commit_loss_beta, entropy_loss_ratio=args.entropy_loss_ratio
    )
    if source is None:
        sizes = ("codebook_size", "codebook_embed_dim")
        sizes = {k: getattr(args, k) for k in sizes if getattr(args, k)}
        return VQModel(VQConfig.from_name(args.model, **losses, **sizes))
    try:  # the trained weights, not the EMA: training continues from them
        vq = VQModel.from_checkpoint(source, prefer_ema=False).train()
    except ValueError as e:  # e.g. a GPT checkpoint
        raise UserError(f"{args.resume or args.finetune}: {e}") from None
    if args.finetune:  # the loss settings are this run's
        vars(vq.config).update(losses)
    return vq


# what a checkpoint holds besides step, config, args and rng: Trainer attributes of these names
PARTS = ("model", "ema", "discriminator", "optimizer", "optimizer_disc", "scaler", "scaler_disc")


LOG_TERMS = [  # what train_step returns, in order; a log line has their means since the last one
    *("gen_loss", "rec_loss", "perceptual_loss", "gen_adv_loss", "adaptive_weight", "vq_loss"),
    *("commit_loss", "entropy_loss", "disc_loss", "logits_real", "logits_fake", "bad_images"),
]


class Trainer:
    """The VQ and its PatchGAN, their optimizers, LPIPS and the EMA: built, resumed, stepped and
    saved. self.vq / self.disc take the steps (DDP under torchrun); the unwrapped self.model and
    self.discriminator are saved, EMA'd, and give the generator's GAN term."""

    def __init__(self, args, env, ckpt):
        self.args, self.env, self.step = args, env, ckpt["step"] if ckpt else 0
        source = ckpt or (common.load_checkpoint(args.finetune) if args.finetune else None)
        self.model = vq = build_vq(args, source).to(env.device)
        if args.image_size % vq.config.downsample:
            raise UserError(f"--image-size must be a multiple of {vq.config.downsample}")
        self.lpips = None  # built before anything is written: a failed download stops the run
        if args.perceptual_weight > 0:
            if env.rank > 0:
                dist.barrier()  # rank 0 downloads, the others then read its cache
            self.lpips = LPIPS().to(env.device)
            if env.rank == 0 and env.distributed:
                dist.barrier()
        self.discriminator = disc = PatchGANDiscriminator().to(env.device)
        self.ema = copy.deepcopy(vq).requires_grad_(False) if args.ema else None
        adam = functools.partial(torch.optim.Adam, lr=args.lr, betas=ADAM_BETAS)
        self.optimizer, self.optimizer_disc = adam(vq.parameters()), adam(disc.parameters())
        fp16 = env.precision == "fp16"  # loss scaling only for fp16
        self.scaler, self.scaler_disc = (torch.amp.GradScaler(enabled=fp16) for _ in range(2))
        if ckpt:
            # a scaler saved disabled is {}, the EMA of a run without --ema None: both stay as
            # built (the EMA then starts from the loaded weights)
            for key, part in self.parts().items():
                if part is not None and ckpt[key]:
                    part.load_state_dict(ckpt[key])
            common.restore_rng(ckpt["rng"], env)
        elif isinstance(source and source.get("discriminator"), dict):
            disc.load_state_dict(source["discriminator"])  # finetune from one of our checkpoints
        self.vq, self.disc = torch.compile(vq) if args.compile else vq, disc
        if env.distributed:  # the discriminator's BatchNorm stays plain, unsynced, as official
            self.vq, self.disc = DDP(self.vq), DDP(disc)  # each on its one device already

    def parts(self) -> dict:
        """Checkpoint key -> the attribute saved there (anything with a state_dict)."""
        return {key: getattr(self, key) for key in PARTS}

    def train_step(self, images, labels, step: int):
        """One generator step, then one discriminator step from --disc-start on (Sec. 2.2).

        images (B, 3, S, S) in [-1, 1] -> (the readable ones, their reconstructions, codebook
        usage, LOG_TERMS (12,))."""
        args, ctx = self.args, self.env.ctx
        x = images[labels >= 0].to(self.env.device, non_blocking=True)  # unreadable rows dropped
        if len(x) == 0:
            raise UserError(f"every image of a batch was unreadable; check {args.data_path}")
        # step counts from 1 as the official global step; weight 0 = no GAN at all (the official
        # scales its discriminator loss by it)
        disc_on = args.disc_weight > 0 and step >= args.disc_start
        zero = x.new_zeros(())
        with ctx:  # generator: reconstruction + perceptual + adversarial + codebook terms
            recon, (vq_loss, commit_loss, entropy_loss, usage) = self.vq(x)
            rec = RECONSTRUCTION_LOSSES[args.reconstruction_loss](recon, x)
            perceptual = self.lpips(x, recon).mean() if self.lpips else zero
            nll = args.reconstruction_weight * rec + args.perceptual_weight * perceptual
            gen_adv, weight = zero, zero + 1
            if disc_on:  # gradients flow through D to the VQ; D's own are not needed
                self.discriminator.requires_grad_(False)
                gen_adv = GEN_LOSSES[args.gen_loss](self.discriminator(recon))
                self.discriminator.requires_grad_(True)
                if args.disc_adaptive_weight:
                    weight = adaptive_weight(nll, gen_adv, self.model.decoder.conv_out.weight)
            loss = nll + weight * args.disc_weight * gen_adv + vq_loss + commit_loss + entropy_loss
        backward_and_step(loss, self.optimizer, self.scaler, args.max_grad_norm)
        if self.ema is not None:
            common.update_ema(self.ema, self.model, EMA_DECAY)

        disc_loss = real = fake = zero  # the discriminator, on the detached reconstructions
        if disc_on:
            with ctx:  # two passes (BatchNorm statistics), as official
                real, fake = self.disc(x), self.disc(recon.detach())
                disc_loss = args.disc_weight * DISC_LOSSES[args.disc_loss](real, fake)
            backward_and_step(disc_loss, self.optimizer_disc, self.scaler_disc, args.max_grad_norm)
        terms = [loss, rec, perceptual, gen_adv, weight, vq_loss, commit_loss, entropy_loss]
        terms += [disc_loss, real.mean(), fake.mean(), (labels < 0).sum().to(x)]
        return x, recon.detach(), usage, torch.stack([t.detach().float() for t in terms])

    def save(self, step: int, folder):
        """All a resumed run needs to go on bit for bit, as checkpoints/{step}.pt and last.pt."""
        state = {key: part and part.state_dict() for key, part in self.parts().items()}
        state.update(step=step, config=asdict(self.model.config), args=vars(self.args))
        state["rng"] = common.gather_rng(self.env)  # every rank's: each continues its own stream
        common.save_checkpoints(state, folder, step, self.env)


def log_means(sums, steps: int, env) -> dict:
    """LOG_TERMS averaged over the steps and ranks since the last line (bad_images summed); the
    one all-reduce, so that a step costs no communication (DiT)."""
    if env.distributed:
        dist.all_reduce(sums)
    means = dict(zip(LOG_TERMS, (sums / (steps * env.world_size)).tolist()))
    return {**means, "bad_images": int(sums[-1])}


def main(args):
    env = common.setup(args.mixed_precision)
    if args.global_batch_size % env.world_size:
        raise UserError(f"--global-batch-size must be divisible by {env.world_size} processes")
    torch.manual_seed(args.global_seed * env.world_size + env.rank)
    trainer = Trainer(args, env, args.resume and common.load_checkpoint(args.resume))

    # data: the ADM random crop + flip seeded by (seed, epoch, index), one DataLoader for the run
    dataset = data.ImageFolder(
        args.data_path, args.image_size, "random", args.skip_bad_images, args.global_seed
    )
    rank_batch, first = args.global_batch_size // env.world_size, trainer.step
    sampler = common.TrainSampler(len(dataset), rank_batch, env, args.global_seed, first)
    batches = sampler.batches(dataset, rank_batch, args.num_workers)
    total = args.max_steps or args.epochs * sampler.steps_per_epoch

    folder = common.run_dir(args.results_dir, args.model, args.resume)
    logger = common.JsonlLogger(folder / "log.jsonl")
    common.print0(f"{args.model}, {len(dataset)} images, {env}; steps {first} -> {total}; {folder}")
    bar = tqdm(total=total, initial=first, disable=env.rank != 0, desc="train_vq")
    sums, since, t0 = 0, first, time.time()
    for step in range(first + 1, total + 1):
        x, recon, usage, terms = trainer.train_step(*next(batches), step)
        sums = sums + terms
        bar.update()
        last = step == total

        if step % args.log_every == 0 or last:
            speed = (step - since) * args.global_batch_size / (time.time() - t0)
            epoch = (step - 1) // sampler.steps_per_epoch
            record = dict(step=step, epoch=epoch, **log_means(sums, step - since, env))
            logger.log(dict(record, codebook_usage=usage, lr=args.lr, images_per_sec=speed))
            bar.set_postfix(rec=f"{record['rec_loss']:.4f}", usage=f"{usage:.3f}")
            sums, since, t0 = 0, step, time.time()
        if args.sample_every and (step % args.sample_every == 0 or last) and env.rank == 0:
            k = min(8, len(x))  # top row the inputs, bottom row their reconstructions
            grid = torch.cat([x[:k], recon[:k]])  # (2k, 3, S, S)
            data.save_image_grid(grid, folder / "samples" / f"{step:07d}.png", nrow=k)
        if step % args.ckpt_every == 0 or last:
            trainer.save(step, folder)
    bar.close()
    common.print0(f"done: {total} steps, checkpoints in {folder / 'checkpoints'}")
    if env.distributed:
        dist.destroy_process_group()
    return folder


if __name__ == "__main__":
    common.cli(main, parse_args)
