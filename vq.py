"""VQ image tokenizer of LlamaGen (arXiv 2406.06525): images <-> grids of codebook indices.

A from-scratch re-implementation of the official `tokenizer/tokenizer_image/vq_model.py`: a
convolutional encoder, an l2-normalised codebook (cosine lookup, straight-through gradients) and a
convolutional decoder. Module names and shapes equal the official ones, so the released files
vq_ds16_c2i.pt, vq_ds16_t2i.pt and vq_ds8_c2i.pt load with one strict `load_state_dict`.

    python -c "import torch, vq; m = vq.VQModel(vq.VQConfig.from_name('tiny')); print(m.encode(torch.randn(2, 3, 64, 64))[2].shape)"
    python -c "import vq; m = vq.VQModel(vq.VQConfig.from_name('VQ-16')); print(sum(p.numel() for p in m.parameters()))"
    python -c "import vq; from PIL import Image; m = vq.VQModel.from_checkpoint('vq_ds16_c2i.pt'); c = m.images_to_codes([Image.open('in.png').resize((256, 256))]); m.codes_to_images(c)[0].save('out.png')"
    python -m pytest tests/test_vq.py -q

vq_ds16_c2i.pt: https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

USAGE_RING = 65536  # official size of the `codebook_used` buffer (recent assignments)
ENTROPY_TEMPERATURE = 0.01  # official tau of the entropy loss


# ----------------------------------------------------------------------------- config


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128  # base channels (official Encoder/Decoder default)
    num_res_blocks: int = 2  # per encoder level; the decoder uses num_res_blocks + 1

    @property
    def downsample(self) -> int:
        """Image pixels per token along each side: 2 ** (levels - 1)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "VQConfig":
        """Preset by name ("VQ-16" or "16"), with field overrides."""
        key = name if name in VQ_CONFIGS else f"VQ-{name}"
        if key not in VQ_CONFIGS:
            raise ValueError(f"unknown VQ model {name!r}; choose one of {', '.join(VQ_CONFIGS)}")
        return cls(**{**VQ_CONFIGS[key], **overrides})


VQ_CONFIGS = {
    "VQ-16": dict(
        encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4]
    ),  # 71.9M, 16x16 @256
    "VQ-8": dict(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4]),  # 70.1M, 32x32 @256
    # ours: small presets for CPU runs and tests (GroupNorm's 32 groups need channels % 32 == 0)
    "VQ-small": dict(
        ch=64,
        encoder_ch_mult=[1, 1, 2, 4],
        decoder_ch_mult=[1, 1, 2, 4],
        z_channels=128,
        codebook_size=4096,
    ),  # 16.2M, ds 8
    "VQ-tiny": dict(
        ch=32,
        encoder_ch_mult=[1, 1, 2, 2],
        decoder_ch_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        z_channels=64,
        codebook_size=1024,
    ),  # 1.2M, ds 8
}


# ----------------------------------------------------------------------------- building blocks


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, as the official tokenizer."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN, swish, conv3x3, GN, swish, dropout, conv3x3 plus a (1x1 conv when in != out) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 conv projections, residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = Normalize(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (
            conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v)
        )
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C ** -0.5
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one pixel, then a stride-2 conv3x3: (H, W) -> (H/2, W/2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # one-sided, as official: 256 -> 257 -> 128


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a conv3x3."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def make_level(in_ch: int, out_ch: int, n_res: int, attn: bool, dropout: float) -> nn.Module:
    """One resolution level: `res` blocks, an AttnBlock after each of them when `attn`."""
    level = nn.Module()
    level.res = nn.ModuleList(
        ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(n_res)
    )
    level.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n_res if attn else 0))
    return level


def run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """res0, attn0, res1, attn1, ... then the level's down/upsample if it has one."""
    for i, res in enumerate(level.res):
        h = res(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    resample = getattr(level, "downsample", None) or getattr(level, "upsample", None)
    return resample(h) if resample is not None else h


# ----------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/ds, W/ds); attention only at the lowest resolution."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.encoder_ch_mult, len(cfg.encoder_ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for i in range(n):
            level = make_level(
                ch * ([1] + mult)[i], ch * mult[i], cfg.num_res_blocks, i == n - 1, cfg.dropout_p
            )
            if i != n - 1:
                level.downsample = Downsample(ch * mult[i])
            self.conv_blocks.append(level)
        c = ch * mult[-1]
        self.mid = nn.ModuleList(
            [ResnetBlock(c, c, cfg.dropout_p), AttnBlock(c), ResnetBlock(c, c, cfg.dropout_p)]
        )
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = run_level(level, h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*ds, w*ds); conv_blocks.0 is the LOWEST resolution (official order)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.decoder_ch_mult, len(cfg.decoder_ch_mult)
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(c, c, cfg.dropout_p), AttnBlock(c), ResnetBlock(c, c, cfg.dropout_p)]
        )
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):  # j = n-1-i: lowest resolution first
            level = make_level(c, ch * mult[i], cfg.num_res_blocks + 1, i == n - 1, cfg.dropout_p)
            c = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(c)
            self.conv_blocks.append(level)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv (used by the optional adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = run_level(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))  # no tanh: nominally [-1, 1]


# ----------------------------------------------------------------------------- quantizer


class VectorQuantizer(nn.Module):
    """Nearest codebook row under l2 normalisation (cosine), straight-through, official loss terms."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if cfg.codebook_l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        # ring of the latest assignments (official name/size/dtype); -1 = empty slot, never counted
        self.register_buffer("codebook_used", torch.full((USAGE_RING,), -1.0))

    def codebook(self) -> torch.Tensor:
        """(K, C) codebook rows as used for lookup (l2-normalised by default)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.cfg.codebook_l2_norm else w

    def update_usage(self, indices: torch.Tensor) -> float:
        """Push the newest indices (at most the ring size) into the ring; unique seen codes / K."""
        new = indices[-USAGE_RING:].to(self.codebook_used.dtype)
        self.codebook_used.copy_(torch.cat([self.codebook_used[len(new) :], new]))
        seen = self.codebook_used[self.codebook_used >= 0]
        return torch.unique(seen).numel() / self.cfg.codebook_size

    def forward(self, z: torch.Tensor):
        """z (B, C, h, w) -> (z_q (B, C, h, w), (vq, commit, entropy, usage), indices (B*h*w,))."""
        cfg = self.cfg
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, C): raster order once flattened
        if cfg.codebook_l2_norm:
            z = F.normalize(z, dim=-1)
        z_flat = z.view(-1, cfg.codebook_embed_dim)  # (N, C)
        e = self.codebook()  # (K, C)
        d = z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z_flat @ e.t()  # (N, K)
        indices = d.argmin(dim=1)  # (N,)
        z_q = e[indices].view(z.shape)

        losses = (None, None, None, None)  # eval: no losses, no usage update
        if self.training:
            vq_loss = torch.mean((z_q - z.detach()) ** 2)
            commit_loss = cfg.commit_loss_beta * torch.mean((z_q.detach() - z) ** 2)
            entropy_loss = (
                cfg.entropy_loss_ratio * entropy_loss_fn(-d)
                if cfg.entropy_loss_ratio > 0
                else z.new_zeros(())
            )  # skip the (N, K) softmax when it is off
            usage = self.update_usage(indices) if cfg.codebook_show_usage else 0.0
            losses = (vq_loss, commit_loss, entropy_loss, usage)
        z_q = z + (z_q - z).detach()  # straight-through: gradients flow to the encoder
        return z_q.permute(0, 3, 1, 2), losses, indices


def entropy_loss_fn(
    affinity: torch.Tensor, temperature: float = ENTROPY_TEMPERATURE
) -> torch.Tensor:
    """Mean per-token entropy minus entropy of the mean assignment (official, softmax type)."""
    logits = affinity / temperature  # (N, K)
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(
        logits, dim=-1
    )  # official adds 1e-5 inside: a constant shift, no effect
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    avg_probs = probs.mean(dim=0)  # (K,)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    return sample_entropy - avg_entropy


# ----------------------------------------------------------------------------- the model


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantize -> post_quant_conv -> decoder, official key names."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def encode(self, x: torch.Tensor):
        """x (B, 3, H, W) in [-1, 1] -> (quant (B, C, h, w), losses, indices (B*h*w,) raster order)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"expected images of shape (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}"
            )
        ds, (H, W) = self.config.downsample, x.shape[-2:]
        if H % ds or W % ds:
            fix = "x".join(str(max(ds, round(s / ds) * ds)) for s in ((H,) if H == W else (H, W)))
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the VQ-{ds} downsampling factor "
                f"{ds}; resize or crop to e.g. {fix}"
            )
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """quant (B, C, h, w) -> images (B, 3, h*ds, w*ds), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """indices (B*h*w,), (B, h*w) or (B, h, w) -> images; shape = (B, C, h, w) (inferred if None)."""
        C = self.config.codebook_embed_dim
        if shape is None:  # (B, h, w) as given, (B, h*w) as a square grid
            B, *grid = indices.shape
            grid = (
                [math.isqrt(grid[0])] * 2
                if len(grid) == 1 and math.isqrt(grid[0]) ** 2 == grid[0]
                else grid
            )
            if len(grid) != 2:
                raise ValueError(
                    f"cannot infer the token grid of indices {tuple(indices.shape)}; pass shape=(B, C, h, w)"
                )
            shape = (B, C, *grid)
        B, _, h, w = shape
        if indices.numel() != B * h * w:
            raise ValueError(f"{indices.numel()} indices do not fill the token grid {tuple(shape)}")
        if (
            indices.numel()
            and not 0 <= int(indices.min()) <= int(indices.max()) < self.config.codebook_size
        ):
            raise ValueError(
                f"indices must lie in [0, {self.config.codebook_size}), got "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        z_q = self.quantize.codebook()[indices.reshape(-1).long()]  # (B*h*w, C)
        return self.decode(z_q.view(B, h, w, C).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor):
        """x (B, 3, H, W) -> (reconstruction (B, 3, H, W), (vq, commit, entropy, usage))."""
        quant, losses, _ = self.encode(x)
        return self.decode(quant), losses

    # --------------------------------------------------------------------- PIL helpers

    @torch.no_grad()
    def images_to_codes(self, images) -> torch.Tensor:
        """List of same-size PIL images -> codes (B, h*w) long, raster order."""
        device = self.quant_conv.weight.device
        x = torch.stack(
            [
                torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8).view(
                    im.height, im.width, 3
                )
                for im in images
            ]
        )  # (B, H, W, 3) uint8
        x = x.permute(0, 3, 1, 2).to(device, torch.float32) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        return self.encode(x)[2].view(len(images), -1)

    @torch.no_grad()
    def codes_to_images(self, codes: torch.Tensor, grid=None) -> list:
        """Codes (B, h*w) or (B, h, w) -> list of PIL images; grid = (h, w), square if None."""
        from PIL import Image

        if grid is not None:
            codes = codes.reshape(codes.shape[0], *grid)
        x = self.decode_code(codes.to(self.quant_conv.weight.device))
        x = (
            (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        )  # official quantisation
        return [Image.fromarray(im.numpy(), "RGB") for im in x]

    # --------------------------------------------------------------------- checkpoints

    @classmethod
    def from_checkpoint(cls, path_or_dict, prefer_ema: bool = True) -> "VQModel":
        """Official {"model": sd} file or ours {"model", "ema", "config"} -> VQModel in eval mode."""
        ckpt = path_or_dict
        if not isinstance(ckpt, dict):
            ckpt = torch.load(path_or_dict, map_location="cpu", weights_only=True)
        sd = next(
            (
                ckpt[k]
                for k in (("ema", "model") if prefer_ema else ("model", "ema")) + ("state_dict",)
                if isinstance(ckpt.get(k), dict)
            ),
            ckpt,
        )  # else: the file is the state dict itself
        if "vq_config" in ckpt or any(
            k.startswith(("tok_embeddings.", "layers.", "cls_embedding.")) for k in sd
        ):
            raise ValueError("this is a GPT checkpoint, not a VQ tokenizer")
        if "encoder.conv_in.weight" not in sd or "quantize.embedding.weight" not in sd:
            raise ValueError(
                f"not a VQ tokenizer checkpoint: top-level keys {sorted(ckpt)[:8]}, "
                f"no 'encoder.conv_in.weight' / 'quantize.embedding.weight'"
            )
        config = (
            VQConfig(
                **{k: v for k, v in ckpt["config"].items() if k in VQConfig.__dataclass_fields__}
            )
            if isinstance(ckpt.get("config"), dict)
            else infer_config(sd)
        )
        model = cls(config)
        sd = {"quantize.codebook_used": model.quantize.codebook_used, **sd}  # a metric buffer only
        want = model.state_dict()
        missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
        wrong = [
            f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}"
            for k in want
            if k in sd and sd[k].shape != want[k].shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"checkpoint does not match {config}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}"
            )
        model.load_state_dict(sd, strict=True)
        return model.eval()


def infer_config(sd: dict) -> VQConfig:
    """Rebuild the VQConfig of an official state dict from its keys and shapes."""

    def count(prefix):
        return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

    n, ch = count("encoder.conv_blocks."), sd["encoder.conv_in.weight"].shape[0]
    enc = [sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(n)]
    dec = [sd[f"decoder.conv_blocks.{j}.res.0.conv1.weight"].shape[0] // ch for j in range(n)][::-1]
    K, C = sd["quantize.embedding.weight"].shape
    return VQConfig(
        codebook_size=K,
        codebook_embed_dim=C,
        encoder_ch_mult=enc,
        decoder_ch_mult=dec,
        z_channels=sd["encoder.conv_out.weight"].shape[0],
        ch=ch,
        num_res_blocks=count("encoder.conv_blocks.0.res."),
    )
