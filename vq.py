"""VQ image tokenizer of LlamaGen (arXiv 2406.06525, Sec. 2.1): images <-> grids of code indices.

A from-scratch re-implementation of the official `tokenizer/tokenizer_image/vq_model.py`: a
convolutional encoder, an l2-normalised codebook (cosine lookup, straight-through gradients) and a
convolutional decoder. Module names and shapes equal the official ones, so the released files
vq_ds16_c2i.pt, vq_ds16_t2i.pt and vq_ds8_c2i.pt load with one strict `load_state_dict`.

    python -c "import vq; print(vq.VQModel(vq.VQConfig.from_name('VQ-16')))"    # the module tree
    python -c "import torch, vq; print(vq.VQModel.from_checkpoint(torch.load('vq_ds16_c2i.pt')))"
    python -m pytest tests/test_vq.py -q

vq_ds16_c2i.pt: https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt
"""

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

USAGE_RING = 65536  # official size of the `codebook_used` buffer (recent assignments)


# ----------------------------------------------------------------------------- config


@dataclass
class VQConfig:
    codebook_size: int = 16384  # K: the GPT's vocabulary (paper Table 2: 16384 is best)
    codebook_embed_dim: int = 8  # C: low-dimensional codes raise usage (Sec. 2.1, after ViT-VQGAN)
    codebook_l2_norm: bool = True  # cosine lookup: codes on the unit sphere
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list = None  # None: the encoder's, mirrored (every preset; Coder reads it)
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128  # base channels (official Encoder/Decoder default)
    num_res_blocks: int = 2  # per encoder level; the decoder uses num_res_blocks + 1

    @property
    def downsample(self):
        """Image pixels per token along each side: one halving per level but the last."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def from_name(cls, name: str, **overrides):
        """Preset by its exact name ("VQ-16"), with field overrides."""
        return cls(**VQ_CONFIGS[name] | overrides)


VQ_CONFIGS = {
    # official (paper Table 1): ds 16 -> 16x16 tokens at 256 px, ds 8 -> 32x32
    "VQ-16": dict(),  # 71.9M: the VQConfig defaults, encoder_ch_mult [1, 1, 2, 2, 4]
    "VQ-8": dict(encoder_ch_mult=[1, 2, 2, 4]),  # 70.1M
    # ours: small presets for CPU runs and tests (GroupNorm's 32 groups need channels % 32 == 0)
    "VQ-small": dict(
        ch=64,
        encoder_ch_mult=[1, 1, 2, 4],
        z_channels=128,
        codebook_size=4096,
    ),  # 16.2M, ds 8
    "VQ-tiny": dict(
        ch=32,
        encoder_ch_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        z_channels=64,
        codebook_size=1024,
    ),  # 1.2M, ds 8
}


# ----------------------------------------------------------------------------- building blocks


# Normalize(channels): GroupNorm with 32 groups and eps 1e-6, as the official tokenizer
Normalize = partial(nn.GroupNorm, 32, eps=1e-6)
# Conv3(in, out): the 3x3 convolution that keeps the size, the tokenizer's workhorse
Conv3 = partial(nn.Conv2d, kernel_size=3, padding=1)


class ResnetBlock(nn.Module):
    """GN, swish, conv3x3, GN, swish, dropout, conv3x3 plus a (1x1 conv when in != out) shortcut."""

    def __init__(self, in_ch, out_ch, dropout):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = Conv3(in_ch, out_ch)
        self.norm2 = Normalize(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv3(out_ch, out_ch)
        # official name; Identity has no weights, so the state dict is unchanged when in == out
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 conv projections, residual."""

    def __init__(self, ch):
        super().__init__()
        self.norm = Normalize(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        # (B, 1, HW, C) each: the H*W positions are the sequence, one head as wide as all C channels
        q, k, v = (conv(h).flatten(2).mT[:, None] for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C); scale C ** -0.5 as official
        return x + self.proj_out(h.mT.reshape(x.shape))


class Resample(nn.Module):
    """Halve or double the resolution. Down: zero-pad right and bottom by one pixel, then a
    stride-2 conv3x3 (one-sided, as official: 256 -> 257 -> 128). Up: nearest x2, then a conv3x3."""

    def __init__(self, ch, down):
        super().__init__()
        self.down = down
        self.conv = Conv3(ch, ch, stride=1 + down, padding=1 - down)

    def forward(self, x):
        return self.conv(
            F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0)
        )


class Level(nn.Module):
    """One resolution level: res0, attn0, res1, attn1, ... (attention only when `attn`), then the
    `downsample` or `upsample` its encoder or decoder gives it."""

    def __init__(self, in_ch, out_ch, n_res, attn, dropout):
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(out_ch if i else in_ch, out_ch, dropout) for i in range(n_res)
        )
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n_res * attn))

    def forward(self, h):
        for i, res in enumerate(self.res):
            h = self.attn[i](res(h)) if self.attn else res(h)
        for resample in list(self.children())[2:]:  # the `downsample` or `upsample`, if any
            h = resample(h)
        return h


def middle(ch, dropout):
    """The `mid` stage at the lowest resolution: res, attention, res."""
    return nn.ModuleList(
        [ResnetBlock(ch, ch, dropout), AttnBlock(ch), ResnetBlock(ch, ch, dropout)]
    )


# ----------------------------------------------------------------------------- encoder / decoder


class Coder(nn.Module):
    """The encoder (up=False) or the decoder (up=True): mirror images built by one constructor
    and run by one forward.

    Encoder (B, 3, H, W) -> (B, z_channels, H/ds, W/ds): conv_in, the levels from the highest
    resolution down (each but the last halves it: `downsample`), mid, norm_out, swish, conv_out.
    Decoder (B, z_channels, h, w) -> (B, 3, h*ds, w*ds): conv_in, mid, the levels from the lowest
    resolution up (each but the last doubles it: `upsample`; conv_blocks.0 is the LOWEST), one
    more ResnetBlock per level, norm_out, swish, conv_out (no tanh after it: nominally [-1, 1]).
    Attention only at the lowest resolution. The modules are created in the official order, which
    fixes both the state-dict key order and the random init, and forward runs them in that order.
    """

    def __init__(self, cfg: VQConfig, up):
        super().__init__()
        # the levels' channel multipliers in the order they run: the decoder's from the lowest
        # resolution up (decoder_ch_mult None: the encoder's)
        mult = (cfg.decoder_ch_mult or cfg.encoder_ch_mult)[::-1] if up else cfg.encoder_ch_mult
        n = len(mult) - 1  # resolution changes; level k has cfg.ch * mult[k] channels
        c = cfg.ch * mult[0] if up else cfg.ch  # the decoder starts at the lowest level's width
        self.conv_in = Conv3(cfg.z_channels if up else 3, c)
        if up:
            self.mid = middle(c, cfg.dropout_p)
        self.conv_blocks = nn.ModuleList()
        for k, m in enumerate(mult):
            # attention at the lowest resolution: the encoder's last level, the decoder's first
            level = Level(c, cfg.ch * m, cfg.num_res_blocks + up, k == n * (not up), cfg.dropout_p)
            c = cfg.ch * m
            if k < n:  # official names: encoder.conv_blocks.k.downsample, decoder's upsample
                setattr(level, "upsample" if up else "downsample", Resample(c, down=not up))
            self.conv_blocks.append(level)
        if not up:
            self.mid = middle(c, cfg.dropout_p)
        self.norm_out = Normalize(c)
        # the decoder's conv_out weight is the "last layer" of the adaptive GAN weight (train_vq.py)
        self.conv_out = Conv3(c, 3 if up else cfg.z_channels)

    def forward(self, x):
        # the block lists are the encoder's levels then mid, the decoder's mid then levels
        conv_in, *block_lists, norm_out, conv_out = self.children()
        h = conv_in(x)
        for blocks in block_lists:
            for block in blocks:
                h = block(h)
        return conv_out(F.silu(norm_out(h)))


# ----------------------------------------------------------------------------- quantizer


class VectorQuantizer(nn.Module):
    """Nearest codebook row under l2 normalisation (cosine), straight-through, official losses."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        w = self.embedding.weight.data  # official init: uniform in +-1/K, then onto the sphere
        w.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        w.copy_(self.normalize(w))
        # ring of the latest assignments (official name/size/dtype; every official file has it, so
        # the strict load needs it); -1 = empty slot, never counted
        self.register_buffer("codebook_used", torch.full((USAGE_RING,), -1.0))

    def normalize(self, vectors):
        """(..., C) -> onto the unit sphere when codebook_l2_norm (the default): then the nearest
        code by distance is the nearest by cosine (Sec. 2.1)."""
        return F.normalize(vectors, dim=-1) if self.cfg.codebook_l2_norm else vectors

    def codebook(self):
        """(K, C) codebook rows as used for lookup."""
        return self.normalize(self.embedding.weight)

    def forward(self, latents):
        """(B, C, h, w) -> (quant (B, C, h, w), (vq, commit, entropy, usage), indices (B*h*w,))."""
        cfg = self.cfg
        # (B, h, w, C): raster order once flat
        latents = self.normalize(latents.permute(0, 2, 3, 1).contiguous())
        flat = latents.flatten(0, 2)  # (N, C), N = B*h*w
        rows = self.codebook()  # (K, C)
        # squared distance |z|^2 + |e|^2 - 2 z.e, written out as official so ties break the same
        distance = flat.pow(2).sum(1, keepdim=True) + rows.pow(2).sum(1) - 2 * flat @ rows.T
        indices = distance.argmin(1)  # (N,)
        quant = rows[indices].view(latents.shape)

        losses = (None,) * 4  # eval: no losses, no usage update
        if self.training:
            # Sec. 2.1: codebook loss pulls the codes, beta-weighted commitment pulls the encoder
            vq_loss = torch.mean((quant - latents.detach()) ** 2)
            commit_loss = cfg.commit_loss_beta * torch.mean((quant.detach() - latents) ** 2)
            entropy_loss = (  # no (N, K) softmax when it is off
                cfg.entropy_loss_ratio * entropy_loss_fn(-distance)
                if cfg.entropy_loss_ratio
                else latents.new_zeros(())
            )
            usage = 0.0
            if cfg.codebook_show_usage:  # push the newest indices into the ring (the last 65,536
                # when more come at once), then report unique seen codes / K
                ring = self.codebook_used
                ring.copy_(torch.cat([ring, indices.float()])[-USAGE_RING:])
                usage = torch.unique(ring[ring >= 0]).numel() / cfg.codebook_size
            losses = (vq_loss, commit_loss, entropy_loss, usage)
        # straight-through estimator: forward is quant, the gradient w.r.t. latents is identity
        quant = latents + (quant - latents).detach()
        return quant.permute(0, 3, 1, 2), losses, indices


def entropy_loss_fn(affinity):
    """Mean per-token entropy minus entropy of the mean assignment (official, softmax type):
    low = each token sure of its code, high = codes used evenly across the batch."""
    logits = affinity / 0.01  # (N, K); the official temperature tau
    # the official adds 1e-5 inside log_softmax's log: a constant shift, no effect
    probs, log_probs = logits.softmax(-1), logits.log_softmax(-1)
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    avg_probs = probs.mean(0)  # (K,)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    return sample_entropy - avg_entropy


# ----------------------------------------------------------------------------- the model


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantize -> post_quant_conv -> decoder, official key names."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Coder(config, up=False)  # (B, 3, H, W) -> (B, z_channels, H/ds, W/ds)
        self.decoder = Coder(config, up=True)  # (B, z_channels, h, w) -> (B, 3, h*ds, w*ds)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def encode(self, x: torch.Tensor):
        """x (B, 3, H, W) in [-1, 1] -> (quant (B, C, h, w), losses, indices (B*h*w,) raster)."""
        ds = self.config.downsample
        # other sizes would run but come back resized: 250 -> 16 tokens -> 256 pixels
        if any(side % ds for side in x.shape[-2:]):
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of {ds}: resize")
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor):
        """quant (B, C, h, w) -> images (B, 3, h*ds, w*ds), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor, shape=None):
        """indices (B, h, w), (B, h*w) of a square grid, or flat with shape=(B, C, h, w)
        -> images (B, 3, h*ds, w*ds)."""
        K = self.config.codebook_size
        if not 0 <= indices.min() <= indices.max() < K:  # negative ones would wrap around
            raise ValueError(f"token indices must lie in [0, {K})")
        if shape:  # the official call: flat indices and the quant shape (B, C, h, w)
            indices = indices.reshape(shape[0], *shape[2:])
        elif indices.ndim == 2:  # (B, h*w): a square grid (raises if h*w is not a square)
            indices = indices.unflatten(1, [math.isqrt(indices.shape[1])] * 2)
        # (B, h, w) -> (B, h, w, C) -> (B, C, h, w); reshape raises if the indices do not fill it
        return self.decode(self.quantize.codebook()[indices.long()].permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor):
        """x (B, 3, H, W) -> (reconstruction (B, 3, H, W), (vq, commit, entropy, usage))."""
        quant, losses, _ = self.encode(x)
        return self.decode(quant), losses

    @classmethod
    def from_checkpoint(cls, obj: dict, prefer_ema: bool = True):
        """A loaded checkpoint -> VQModel in eval mode. Ours {"model", "ema", "config"}; official
        {"model": sd} (its config read off the keys and shapes); or a bare state dict."""
        # the first container present, else obj is the state dict itself: the EMA weights first as
        # DiT's find_model (ours keep "ema": None without --ema), or skip them (train_vq resumes)
        keys = ("ema", "model", "state_dict")[not prefer_ema :]
        sd = next((obj[k] for k in keys if isinstance(obj.get(k), dict)), obj)
        if "quantize.embedding.weight" not in sd:  # e.g. a GPT checkpoint: its keys tell
            raise ValueError(f"not a VQ tokenizer checkpoint: keys {sorted(sd)[:4]}...")
        model = cls(VQConfig(**obj["config"]) if "config" in obj else infer_config(sd))
        try:
            model.load_state_dict(sd)  # strict, torch's default
        except RuntimeError as e:  # missing / unexpected keys, wrong shapes: torch names them
            raise ValueError(" ".join(str(e).split())[:400]) from None
        return model.eval()


def infer_config(sd):
    """The preset that sd's keys and shapes agree with most, at sd's codebook size and width.

    The official trainer makes only VQ-16 and VQ-8 (with --codebook-size / --codebook-embed-dim),
    so the table says what an official file is; the strict load that follows names any key or
    shape that still disagrees."""
    K, C = sd["quantize.embedding.weight"].shape
    with torch.device("meta"):  # shapes only: no memory, no init
        models = [
            VQModel(VQConfig.from_name(n, codebook_size=K, codebook_embed_dim=C))
            for n in VQ_CONFIGS
        ]
    # how many of a model's keys sd has, with the same shape
    agreement = lambda m: sum(k in sd and sd[k].shape == v.shape for k, v in m.state_dict().items())
    return max(models, key=agreement).config
