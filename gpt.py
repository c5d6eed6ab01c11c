"""LlamaGen's GPT: a Llama-style decoder over VQ image tokens, conditioned on a class label (c2i)
or on T5 caption features (t2i), with 2D RoPE, a static KV cache and classifier-free guidance.

Follows `autoregressive/models/gpt.py` and `generate.py` of FoundationVision/LlamaGen
(arXiv 2406.06525); module names match the released checkpoints, so they load strictly.

    python -m pytest tests/test_gpt.py -q     # CPU, tiny configs, official reference outputs
    python -c "import gpt, torch; m = gpt.GPT(gpt.GPTConfig.from_name('tiny', block_size=16)); print(gpt.generate(m, torch.tensor([1, 2]), cfg_scale=4.0))"
    python -c "import gpt; print(gpt.GPT.from_checkpoint('c2i_B_384.pt').config)"   # any released GPT

In code: `tokens = generate(model, labels, cfg_scale=2.0, compile=True)` compiles the decode step
(`torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)`, CUDA graphs on a GPU).
"""

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

UNCOND_TOKENS = 120  # t2i null-caption rows, hard-coded in the official CaptionEmbedder
CE_CHUNK_ELEMENTS = 2**24  # logits per chunk of the memory-friendly loss (64 MB in fp32)

# -----------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    """Official ModelArgs (same names and defaults); presets in GPT_CONFIGS."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: Optional[int] = None  # None = multi-head attention; fewer = grouped-query
    multiple_of: int = 256  # FFN hidden size rounds up to this
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000  # label num_classes is the CFG null class
    caption_dim: int = 2048  # flan-t5-xl width
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"  # "c2i" or "t2i"
    vocab_size: int = 16384  # = VQ codebook size
    cls_token_num: int = 1  # condition positions: 1 (c2i) or 120 (t2i)
    block_size: int = 256  # image tokens = (image_size // downsample) ** 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        h = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return -(-h // self.multiple_of) * self.multiple_of

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """Preset by name ("GPT-XL" or "XL"), with field overrides."""
        return cls(**{**GPT_CONFIGS[resolve_model_name(name)], **overrides})


GPT_CONFIGS = {  # official GPT_models; parameter counts for c2i with vocab 16384
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),  # 3.9B
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),  # 1.2B
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3.1B, head_dim 100
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),  # 6.6B
    "GPT-small": dict(n_layer=4, n_head=4, dim=256),  # CPU toy runs
    "GPT-tiny": dict(n_layer=2, n_head=4, dim=64),  # tests
}


def resolve_model_name(name: str) -> str:
    """'XL' -> 'GPT-XL'; unknown names raise ValueError listing the presets."""
    for key in (name, f"GPT-{name}"):
        if key in GPT_CONFIGS:
            return key
    raise ValueError(f"unknown GPT model {name!r}; choose one of {', '.join(GPT_CONFIGS)}")


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times a learned scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


def precompute_freqs_cis_2d(
    grid: int, head_dim: int, base: float, cls_token_num: int
) -> torch.Tensor:
    """2D RoPE table (cls_token_num + grid*grid, head_dim//2, 2) of (cos, sin), fp32 on the CPU."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half)
    t = torch.outer(torch.arange(grid, device="cpu").float(), freqs)  # (grid, hd/4)
    angles = torch.cat(
        [
            t[:, None, :].expand(-1, grid, -1),  # row drives 1st half
            t[None, :, :].expand(grid, -1, -1),
        ],
        dim=-1,
    )  # col drives 2nd half
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(0, 1)  # (grid^2, hd/2, 2)
    # Condition rows are all ZERO (cos = sin = 0), not the identity rotation: q and k at condition
    # positions are wiped in every layer. A quirk, but the released weights were trained with it.
    return torch.cat([torch.zeros(cls_token_num, half, 2, device="cpu"), table])


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2m], x[2m+1]) of x (B, S, H, hd) by freqs (S, hd/2, 2), in fp32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, H, hd/2, 2)
    f = freqs.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
            xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm DropPath, scale by keep)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class KVCache(nn.Module):
    """Static keys/values (B, n_kv_head, max_seq, hd); non-persistent buffers, never in state_dict()."""

    def __init__(self, batch, n_kv_head, max_seq, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_seq, head_dim)
        self.register_buffer(
            "k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )

    def update(self, input_pos, k, v, kv_len: int):
        """Write k, v (B, nkv, S, hd) at input_pos (S,); return the first kv_len positions."""
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache[:, :, :kv_len], self.v_cache[:, :, :kv_len]


class Attention(nn.Module):
    """Causal self-attention with a fused wqkv projection, 2D RoPE and grouped-query heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = config.n_head, config.kv_heads, config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv) * self.hd, bias=False)
        self.wo = nn.Linear(self.n_head * self.hd, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, freqs, mask=None, input_pos=None, kv_len=None):
        B, S, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1
        )
        q = apply_rotary_emb(q.view(B, S, self.n_head, self.hd), freqs).transpose(
            1, 2
        )  # (B, nh, S, hd)
        k = apply_rotary_emb(k.view(B, S, self.n_kv, self.hd), freqs).transpose(
            1, 2
        )  # (B, nkv, S, hd)
        v = v.view(B, S, self.n_kv, self.hd).transpose(1, 2)
        if input_pos is not None:  # cached inference: keys and values of the filled prefix
            k, v = self.kv_cache.update(input_pos, k, v, kv_len)
            q = q.to(k.dtype)
        if self.n_kv != self.n_head:  # each kv head serves n_head / n_kv consecutive query heads
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, S, -1)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), then dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm transformer block with optional stochastic depth."""

    def __init__(self, config: GPTConfig, drop_path_p: float):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.drop_path_p = drop_path_p

    def forward(self, x, freqs, mask=None, input_pos=None, kv_len=None):
        a = self.attention(self.attention_norm(x), freqs, mask, input_pos, kv_len)
        h = x + drop_path(a, self.drop_path_p, self.training)
        return h + drop_path(self.feed_forward(self.ffn_norm(h)), self.drop_path_p, self.training)


class LabelEmbedder(nn.Module):
    """Class label -> (B, 1, dim); row num_classes is the CFG null class."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_classes, self.dropout_prob = config.num_classes, config.class_dropout_prob
        self.embedding_table = nn.Embedding(
            config.num_classes + int(config.class_dropout_prob > 0), config.dim
        )

    def forward(self, labels, train: bool):
        labels = labels.reshape(-1)
        if train and self.dropout_prob > 0:  # drop to the null class for CFG training
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class CaptionEmbedder(nn.Module):
    """T5 features (B, T, caption_dim) -> (B, T, dim); the null caption is a fixed random buffer."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dropout_prob = config.class_dropout_prob
        # never trained (a buffer), but stored in the checkpoints: CFG needs these exact values
        uncond = torch.randn(UNCOND_TOKENS, config.caption_dim) / config.caption_dim**0.5
        self.register_buffer("uncond_embedding", uncond)
        self.cap_proj = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(config.caption_dim, config.dim, bias=False),
                act=nn.GELU(approximate="tanh"),
                fc2=nn.Linear(config.dim, config.dim, bias=False),
            )
        )

    def forward(self, caption, train: bool):
        if train and self.dropout_prob > 0:  # whole caption -> null caption (its mask is kept)
            drop = torch.rand(caption.shape[0], device=caption.device) < self.dropout_prob
            caption = torch.where(
                drop[:, None, None], self.uncond_embedding[: caption.shape[1]], caption
            )
        return self.cap_proj(caption.to(self.cap_proj.fc1.weight.dtype))


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Condition tokens + image tokens -> next-image-token logits (official `Transformer`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.grid_size**2 != config.block_size or config.dim % config.n_head:
            raise ValueError(
                f"block_size {config.block_size} must be a square and dim {config.dim} "
                f"divisible by n_head {config.n_head}"
            )
        self.config = config
        self.cls_embedding = (
            LabelEmbedder(config) if config.model_type == "c2i" else CaptionEmbedder(config)
        )
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = [
            config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)
        ]
        self.layers = nn.ModuleList(Block(config, p) for p in rates)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # plain fp32 attribute (not a buffer): absent from state_dict(), untouched by .to(bf16)
        self.freqs_cis = precompute_freqs_cis_2d(
            config.grid_size, config.head_dim, config.rope_base, config.cls_token_num
        )
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # initial loss is exactly ln(vocab_size)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # the RoPE table follows the model's device, stays fp32
        self.freqs_cis = self.freqs_cis.to(self.tok_embeddings.weight.device)
        return self

    def _rope(self, device):
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def _mask(self, q_pos, kv_len: int, keep=None):
        """Bool mask (B|1, 1, S, kv_len): causal, text keys gated by keep (N, >=kv_len), diagonal on."""
        k_pos = torch.arange(kv_len, device=q_pos.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # (S, kv_len)
        if keep is not None:
            mask = mask & (
                keep[:, None, :kv_len] | (k_pos[None, :] == q_pos[:, None])
            )  # (B, S, kv)
        return mask.unsqueeze(-3) if mask.ndim == 3 else mask[None, None]

    def forward(
        self,
        idx: torch.Tensor,
        cond: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        emb_mask: Optional[torch.Tensor] = None,
        valid: Optional[torch.Tensor] = None,
        return_logits: bool = True,
    ):
        """idx (B, S) with S < block_size -> (logits (B, S+1, V) fp32 | None, loss | None)."""
        c = self.config
        B, S = idx.shape
        if S >= c.block_size:
            raise ValueError(f"idx has {S} tokens; at most block_size - 1 = {c.block_size - 1} fit")
        cond_emb = self.cls_embedding(cond, train=self.training)[
            :, : c.cls_token_num
        ]  # (B, T, dim)
        h = self.tok_dropout(
            torch.cat([cond_emb, self.tok_embeddings(idx)], dim=1)
        )  # (B, T+S, dim)
        pos = torch.arange(h.shape[1], device=h.device)
        keep = None
        if emb_mask is not None:  # t2i left padding: hide padded text keys (uncond half reuses it)
            keep = torch.cat([emb_mask.bool(), emb_mask.new_ones(B, S, dtype=torch.bool)], dim=1)
        mask = None if keep is None else self._mask(pos, h.shape[1], keep)
        freqs = self._rope(h.device)[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs, mask)
        h = self.norm(h)[:, c.cls_token_num - 1 :]  # (B, S+1, dim)
        if targets is None:
            return self.output(h).float(), None
        weight = (
            torch.ones_like(targets, dtype=torch.float32)
            if valid is None
            else valid.float()[:, None].expand_as(targets)
        )  # (B, S+1)
        denom = weight.sum().clamp(min=1)
        if return_logits:
            logits = self.output(h).float()
            ce = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1).long(), reduction="none")
            return logits, (ce * weight.reshape(-1)).sum() / denom
        return None, self._chunked_ce(
            h.flatten(0, 1), targets.reshape(-1).long(), weight.reshape(-1)
        ) / denom

    def _chunked_ce(self, h, targets, weight):
        """Sum of weighted CE over rows of h (N, dim), never holding more than one fp32 logits chunk."""

        def chunk_loss(h, t, w):
            return (F.cross_entropy(self.output(h).float(), t, reduction="none") * w).sum()

        rows = max(1, CE_CHUNK_ELEMENTS // self.config.vocab_size)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], rows):
            args = (h[i : i + rows], targets[i : i + rows], weight[i : i + rows])
            total = total + (
                checkpoint(chunk_loss, *args, use_reentrant=False)
                if h.requires_grad
                else chunk_loss(*args)
            )
        return total

    # ---- cached inference -------------------------------------------------------------------

    def setup_caches(self, batch: int, max_seq: int, dtype: torch.dtype, device: torch.device):
        """Give every layer a static KVCache; reuses matching ones (compiled decode needs fixed buffers)."""
        for layer in self.layers:
            old = layer.attention.kv_cache
            if (
                old is None
                or old.k_cache.shape[::2] != (batch, max_seq)
                or old.k_cache.dtype != dtype
                or old.k_cache.device != torch.device(device)
            ):
                layer.attention.kv_cache = KVCache(
                    batch, self.config.kv_heads, max_seq, self.config.head_dim, dtype, device
                )

    def teardown_caches(self):
        """Free the KV caches."""
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward_step(self, x, input_pos, kv_len: int, keep=None):
        """Cached forward of embeddings x (B, S, dim) at input_pos (S,) -> last-position logits (B, V)."""
        mask = self._mask(input_pos, kv_len, keep)
        freqs = self._rope(x.device)[input_pos]
        for layer in self.layers:
            x = layer(x, freqs, mask, input_pos, kv_len)
        return self.output(self.norm(x[:, -1])).float()

    # ---- checkpoints ------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path_or_obj,
        image_size: Optional[int] = None,
        block_size: Optional[int] = None,
        prefer_ema: bool = True,
        config: Optional[GPTConfig] = None,
    ) -> "GPT":
        """Load our checkpoint or any official container (model/module/state_dict/raw FSDP) in eval mode."""
        obj, name = path_or_obj, ""
        if not isinstance(obj, dict):
            name = str(obj)
            try:
                obj = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                obj = torch.load(name, map_location="cpu", weights_only=True)
        sd = unwrap_state_dict(obj, prefer_ema)
        if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd):
            raise ValueError(f"{name or 'this checkpoint'} is a VQ tokenizer, not a GPT")
        if config is None and isinstance(obj.get("config"), dict):  # our own file
            known = {f.name for f in fields(GPTConfig)}
            config = GPTConfig(**{k: v for k, v in obj["config"].items() if k in known})
        if config is None:
            config = infer_config(sd)
            m = re.search(r"_(\d+)(?:\.\w+)?$", name)  # c2i_B_384.pt, t2i_XL_stage1_256.pt
            if block_size is None and image_size is None and m is None:
                raise ValueError(
                    f"cannot tell the image size of {name or 'this state dict'}; "
                    "pass image_size= (e.g. 384 for c2i_*_384.pt) or block_size="
                )
            image_size = image_size or (int(m.group(1)) if m else None)
        if block_size is not None or image_size is not None:  # official GPTs use the ds16 VQ
            config = replace(config, block_size=block_size or (image_size // 16) ** 2)
        with torch.device("meta"):  # no init cost: every tensor comes from the file
            model = cls(config)
        load_gpt_state_dict(model, sd, assign=True)
        return model.eval()


# -----------------------------------------------------------------------------
# Checkpoint helpers


def unwrap_state_dict(obj: dict, prefer_ema: bool = True) -> dict:
    """State dict from any container, minus known harmless extras (freqs_cis, kv caches)."""
    order = (
        ("ema", "model", "module", "state_dict")
        if prefer_ema
        else ("model", "module", "state_dict", "ema")
    )
    sd = next((obj[k] for k in order if isinstance(obj.get(k), dict)), obj)
    return {
        k.removeprefix("_orig_mod.").removeprefix("module."): v
        for k, v in sd.items()
        if k != "freqs_cis" and ".kv_cache." not in k and torch.is_tensor(v)
    }


def describe_state_dict(sd: dict) -> str:
    """Best guess of what a state dict holds, e.g. 'GPT-L c2i (dim 1024, 24 layers, vocab 16384)'."""
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd):
        return "a VQ tokenizer, not a GPT"
    try:
        c = infer_config(sd)
    except ValueError as e:
        return str(e)
    name = next(
        (n for n, p in GPT_CONFIGS.items() if (p["dim"], p["n_layer"]) == (c.dim, c.n_layer)), "GPT"
    )
    cond = f"{c.num_classes} classes" if c.model_type == "c2i" else f"caption_dim {c.caption_dim}"
    return f"{name} {c.model_type} (dim {c.dim}, {c.n_layer} layers, vocab {c.vocab_size}, {cond})"


def infer_config(sd: dict) -> GPTConfig:
    """GPTConfig from tensor shapes (dim, layers, vocab, c2i/t2i); n_head from the matching preset."""
    if "tok_embeddings.weight" not in sd:
        raise ValueError("not a GPT state dict (no tok_embeddings.weight)")
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    preset = next(
        (p for p in GPT_CONFIGS.values() if (p["dim"], p["n_layer"]) == (dim, n_layer)),
        dict(dim=dim, n_layer=n_layer, n_head=max(1, dim // 64)),
    )
    if "cls_embedding.cap_proj.fc1.weight" in sd:
        return GPTConfig(
            **preset,
            vocab_size=vocab,
            model_type="t2i",
            cls_token_num=UNCOND_TOKENS,
            caption_dim=sd["cls_embedding.cap_proj.fc1.weight"].shape[1],
        )
    rows = sd["cls_embedding.embedding_table.weight"].shape[0]
    return GPTConfig(**preset, vocab_size=vocab, num_classes=rows - 1)


def load_gpt_state_dict(model: GPT, sd: dict, assign: bool = False) -> None:
    """Strict load; on mismatch one ValueError naming missing/unexpected/mis-shaped keys and a guess."""
    sd = unwrap_state_dict(sd)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in want.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        c = model.config
        parts = [
            f"{len(x)} {what} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
            for what, x in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("mis-shaped", shapes),
            )
            if x
        ]
        raise ValueError(
            f"checkpoint does not fit the {c.model_type} GPT (dim {c.dim}, {c.n_layer} layers, "
            f"vocab {c.vocab_size}): {'; '.join(parts)}; this looks like {describe_state_dict(sd)}"
        )
    model.load_state_dict(sd, strict=True, assign=assign)


# -----------------------------------------------------------------------------
# Sampling


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B, 1); top-k keeps ties, top-p keeps the first token past p (HF)."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) > top_p
        drop = torch.cat([torch.zeros_like(drop[..., :1]), drop[..., :-1]], dim=-1)  # shift right
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def guide(logits: torch.Tensor, cfg_scale: float, use_cfg: bool) -> torch.Tensor:
    """Rows [cond; uncond] (2B, V) -> uncond + s * (cond - uncond), or cond alone (B, V)."""
    cond, uncond = logits.chunk(2)
    return uncond + (cond - uncond) * cfg_scale if use_cfg else cond


def decode_one_token(model: GPT, x, input_pos, kv_len: int, keep, cfg_scale: float, use_cfg: bool):
    """One decode step: token x (B, 1) at input_pos (1,) -> guided logits (B, V). Safe to torch.compile."""
    guided = cfg_scale > 1.0
    logits = model.forward_step(
        model.tok_embeddings(torch.cat([x, x]) if guided else x), input_pos, kv_len, keep
    )
    return guide(logits, cfg_scale, use_cfg) if guided else logits


_compiled_decode = None


@torch.no_grad()
def generate(
    model: GPT,
    cond: torch.Tensor,
    cfg_scale: float = 1.0,
    cfg_interval: float = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    emb_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    compile: bool = False,
) -> torch.Tensor:
    """Sample (B, block_size) int64 image tokens for labels (B,) or captions (B, T, caption_dim)."""
    global _compiled_decode
    c, B, device = model.config, cond.shape[0], cond.device
    T, L = c.cls_token_num, c.block_size
    if c.model_type == "t2i" and tuple(cond.shape[1:]) != (T, c.caption_dim):
        raise ValueError(f"t2i cond must be (B, {T}, {c.caption_dim}), got {tuple(cond.shape)}")
    guided = cfg_scale > 1.0
    if guided and c.model_type == "c2i" and c.class_dropout_prob <= 0:
        raise ValueError(
            "cfg_scale > 1 needs the null class, which only exists when class_dropout_prob > 0"
        )
    if guided:  # batch [cond; null]: null class, or the stored null caption
        null = (
            torch.full_like(cond, c.num_classes)
            if c.model_type == "c2i"
            else model.cls_embedding.uncond_embedding[:T].to(cond.dtype).expand_as(cond)
        )
        cond = torch.cat([cond, null])
    keep = None  # (N, T + L - 1) visible keys; the uncond half reuses the cond padding mask
    if emb_mask is not None and c.model_type == "t2i":
        keep = torch.cat(
            [emb_mask.bool(), torch.ones(B, L - 1, dtype=torch.bool, device=device)], dim=1
        )
        keep = torch.cat([keep, keep]) if guided else keep
    dtype = (
        torch.get_autocast_dtype(device.type)
        if torch.is_autocast_enabled(device.type)
        else model.tok_embeddings.weight.dtype
    )
    max_seq = T + L - 1  # the last token is never fed back
    was_training = model.training
    model.eval()
    model.setup_caches(cond.shape[0], max_seq, dtype, device)
    step = decode_one_token
    if compile:  # static shapes (attend over the whole masked buffer) so CUDA graphs can replay
        _compiled_decode = _compiled_decode or torch.compile(
            decode_one_token, mode="reduce-overhead", fullgraph=True
        )
        step = _compiled_decode
    try:
        prefill_pos = torch.arange(T, device=device)
        logits = model.forward_step(
            model.cls_embedding(cond, train=False)[:, :T], prefill_pos, T, keep
        )
        tok = sample(
            guide(logits, cfg_scale, True) if guided else logits,
            temperature,
            top_k,
            top_p,
            generator,
        )
        tokens = [tok]
        positions = torch.arange(T, max_seq, device=device)
        for i in range(L - 1):
            use_cfg = not (
                cfg_interval > -1 and i > cfg_interval
            )  # official: float compare, prefill always guided
            kv_len = max_seq if compile else T + i + 1  # eager: only the filled prefix
            logits = step(model, tok, positions[i : i + 1], kv_len, keep, cfg_scale, use_cfg)
            tok = sample(logits, temperature, top_k, top_p, generator)
            tokens.append(tok)
    finally:
        if not compile:  # compiled graphs keep the same cache buffers for the next call
            model.teardown_caches()
        model.train(was_training)
    return torch.cat(tokens, dim=1).long()
