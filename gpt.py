"""LlamaGen's GPT: a Llama-style decoder over VQ image tokens, conditioned on a class label (c2i)
or on T5 caption features (t2i), with 2D RoPE, a static KV cache and classifier-free guidance.

Follows `autoregressive/models/gpt.py` and `generate.py` of FoundationVision/LlamaGen
(arXiv 2406.06525, sections 2.2-2.3); module names match the released checkpoints, so they load
with one strict `load_state_dict`.

    python -m pytest tests/test_gpt.py -q     # CPU, tiny configs, official reference outputs

In Python, a released c2i_B_384.pt (official files do not record the image size, so the caller
passes block_size = (image_size // VQ downsample) ** 2); compiling the decode step is the
caller's choice, as in gpt-fast's `generate.py`:

    model = GPT.from_checkpoint(torch.load("c2i_B_384.pt", weights_only=True), (384 // 16) ** 2)
    tokens = generate(model, torch.tensor([207, 360]), cfg_scale=4.0, top_k=2000)  # (2, 576)
    step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    tokens = generate(model, torch.tensor([207, 360]), cfg_scale=4.0, decode_fn=step)  # CUDA graphs
"""

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

UNCOND_TOKENS = 120  # t2i null-caption rows, hard-coded (`token_num=120`) in the CaptionEmbedder
CE_CHUNK_ELEMENTS = 2**24  # logits per chunk of the memory-friendly loss (64 MB in fp32)

# -----------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    """Official ModelArgs (same names and defaults); presets in GPT_CONFIGS."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None = multi-head attention; fewer = grouped-query
    multiple_of: int = 256  # FFN hidden size rounds up to this
    ffn_dim_multiplier: float | None = None
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
    def head_dim(self):
        return self.dim // self.n_head

    @property
    def ffn_hidden(self):
        # Llama's SwiGLU width: 2/3 of 4 * dim, optionally scaled, rounded UP to multiple_of
        hidden = int((self.ffn_dim_multiplier or 1) * int(8 * self.dim / 3))
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def grid_size(self):
        return math.isqrt(self.block_size)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """Preset by its exact name ("GPT-XL"; scripts resolve "XL" with common.preset)."""
        return cls(**GPT_CONFIGS[name] | overrides)


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


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times a learned scale."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.dim))

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_freqs_cis_2d(config: GPTConfig):
    """2D RoPE table (cls_token_num + grid*grid, head_dim//2, 2) of (cos, sin), fp32 on the CPU."""
    # head_dim/4 frequencies with the exponent over half = head_dim/2 (not head_dim), as official.
    # On the CPU explicitly: the model may be built under torch.device("meta") by the loader.
    with torch.device("cpu"):
        grid, half = config.grid_size, config.head_dim // 2
        freqs = 1.0 / config.rope_base ** (torch.arange(0, half, 2.0) / half)  # fp32
        t = torch.outer(torch.arange(grid).float(), freqs)  # (grid, hd/4)
        # cell p = (row i, col j), row-major like the VQ indices: the first half of the pairs turns
        # with i = p // grid (rows repeated), the second half with j = p % grid (the table tiled)
        angles = torch.cat([t.repeat_interleave(grid, 0), t.repeat(grid, 1)], -1)  # (grid^2, hd/2)
        table = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (grid^2, hd/2, 2)
        # Condition rows are all ZERO (cos = sin = 0), not the identity rotation: q and k at
        # condition positions are wiped in every layer. A quirk, but the released weights were
        # trained with it.
        return torch.cat([torch.zeros(config.cls_token_num, half, 2), table])


def apply_rotary_emb(x, freqs):
    """Rotate interleaved pairs (x[2m], x[2m+1]) of x (B, S, H, hd) by freqs (S, hd/2, 2) of
    (cos, sin), in fp32: (a cos - b sin, b cos + a sin)."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, hd/2) each
    cos, sin = freqs[:, None].unbind(-1)  # (S, 1, hd/2) each, broadcast over batch and heads
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(3).type_as(x)


def drop_path(x, p):
    """Stochastic depth per sample (timm DropPath, scale by keep); p = 0 outside training."""
    if p == 0.0:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p)  # x (B, S, dim): one draw per sample
    return x * keep / (1 - p)


class Attention(nn.Module):
    """Causal self-attention with a fused wqkv projection, 2D RoPE and grouped-query heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.hd = config.n_head, config.head_dim
        self.n_kv = config.n_kv_head or config.n_head  # fewer: grouped-query attention
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv) * self.hd, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)  # n_head * hd = dim
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        # generation's keys and values (2, B, n_kv, max_seq, hd), from GPT.setup_caches: a buffer,
        # so a compiled decode replays CUDA graphs on its fixed address; non-persistent, so never
        # in state_dict() (the gpt-fast KVCache in one tensor)
        self.register_buffer("kv_cache", None, persistent=False)

    def forward(self, x, freqs, mask=None, input_pos=None, kv_len=None):
        qkv = self.wqkv(x).unflatten(-1, (-1, self.hd))  # (B, S, n_head + 2 n_kv, hd)
        q, k, v = qkv.split([self.n_head, self.n_kv, self.n_kv], dim=2)  # (B, S, heads, hd)
        q, k = apply_rotary_emb(q, freqs), apply_rotary_emb(k, freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, hd)
        if kv_len is not None:  # generation: write k, v at input_pos, attend over kv_len positions
            self.kv_cache.index_copy_(3, input_pos, torch.stack([k, v]).to(self.kv_cache.dtype))
            k, v = self.kv_cache[..., :kv_len, :]  # (B, n_kv, kv_len, hd) each
            q = q.to(k.dtype)
        if self.n_kv != self.n_head:  # each kv head serves n_head / n_kv consecutive query heads
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
        p = self.attn_dropout_p * self.training  # attention dropout: 0 in eval mode
        y = F.scaled_dot_product_attention(
            q, k, v, mask, p, is_causal=mask is None
        )  # (B, nh, S, hd)
        return self.resid_dropout(self.wo(y.transpose(1, 2).flatten(2)))  # (B, S, dim)


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
        self.attention_norm = RMSNorm(config)
        self.ffn_norm = RMSNorm(config)
        self.drop_path_p = drop_path_p

    def forward(self, x, freqs, mask=None, input_pos=None, kv_len=None):
        p = self.drop_path_p * self.training  # 0 in eval mode
        h = x + drop_path(self.attention(self.attention_norm(x), freqs, mask, input_pos, kv_len), p)
        return h + drop_path(self.feed_forward(self.ffn_norm(h)), p)


class LabelEmbedder(nn.Module):
    """Class label (B,) -> (B, 1, dim); dropped rows get the null class num_classes (CFG)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_classes = config.num_classes  # the null row exists iff class dropout is on
        rows = config.num_classes + (config.class_dropout_prob > 0)
        self.embedding_table = nn.Embedding(rows, config.dim)

    def forward(self, labels, drop=None):
        if drop is not None:  # (B,) bool: official force_drop_ids / training's random drop
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class CaptionEmbedder(nn.Module):
    """T5 features (B, n_cond, caption_dim) -> (B, n_cond, dim); dropped rows get the null
    caption, a fixed random buffer (padding mask unchanged, as official)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        # never trained (a buffer), but stored in the checkpoints: CFG needs these exact values
        uncond = torch.randn(UNCOND_TOKENS, config.caption_dim) / config.caption_dim**0.5
        self.register_buffer("uncond_embedding", uncond)
        self.cap_proj = nn.Sequential(  # the official Mlp: keys cap_proj.fc1 / cap_proj.fc2
            OrderedDict(
                fc1=nn.Linear(config.caption_dim, config.dim, bias=False),
                act=nn.GELU(approximate="tanh"),
                fc2=nn.Linear(config.dim, config.dim, bias=False),
            )
        )

    def forward(self, caption, drop=None):
        if drop is not None:  # the projection comes after the replacement (official)
            null = self.uncond_embedding[: caption.shape[1]]  # (n_cond, caption_dim)
            caption = torch.where(drop[:, None, None], null, caption)
        return self.cap_proj(caption.to(self.cap_proj.fc1.weight.dtype))


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Condition tokens + image tokens -> next-image-token logits (official `Transformer`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.grid_size**2 != config.block_size:  # the tokens fill a square grid
            raise ValueError(f"block_size {config.block_size} must be a square")
        self.config = config
        c2i = config.model_type == "c2i"  # else "t2i"
        self.cls_embedding = (LabelEmbedder if c2i else CaptionEmbedder)(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        # drop-path rate grows linearly with depth, 0 at the first block (official linspace;
        # on the CPU, as the loader builds the model under torch.device("meta"))
        rates = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = RMSNorm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # A plain fp32 attribute, as official: absent from state_dict(), untouched when the model
        # is cast to bf16 (a buffer would be rounded), moved to the input's device by `transform`.
        self.freqs_cis = precompute_freqs_cis_2d(config)
        # official _init_weights: N(0, 0.02) for every matrix and table (no biases), drawn in the
        # same order as its self.apply (both visit the leaves in the same depth-first order)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=config.initializer_range)
        nn.init.zeros_(self.output.weight)  # initial loss is exactly ln(vocab_size)

    def transform(self, x, pos, emb_mask=None, kv_len=None):
        """Embeddings x (B, S, dim) at positions pos (S,) -> final-norm hidden states (B, S, dim).
        Training passes the whole sequence; generation passes kv_len: the layers then write their
        KV caches at pos and attend over the first kv_len cache positions."""
        mask = None  # None: SDPA's is_causal path (training without captions)
        if emb_mask is not None or kv_len:  # kv_len: generation (never 0)
            k_pos = torch.arange(kv_len or len(pos), device=pos.device)
            mask = (k_pos <= pos[:, None])[None, None]  # (1, 1, S, kv_len): causal
            if emb_mask is not None:  # (B, n_cond): hide padded caption keys, but a position
                # always sees itself (official: the diagonal is forced on, no row fully masked)
                keys = F.pad(emb_mask.bool(), (0, len(k_pos) - emb_mask.shape[1]), value=True)
                mask = mask & (keys[:, None, None] | (k_pos == pos[:, None]))  # (B, 1, S, kv)
        self.freqs_cis = self.freqs_cis.to(x.device)  # the one place the table moves (official)
        freqs = self.freqs_cis[pos]
        for layer in self.layers:
            x = layer(x, freqs, mask, pos, kv_len)
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        cond: torch.Tensor,
        targets=None,
        emb_mask=None,
        valid=None,
        return_logits=True,
    ):
        """idx (B, S) with S < block_size -> (logits (B, S+1, V) fp32 | None, loss | None).

        cond: labels (B,) or caption features (B, n_cond, caption_dim) with emb_mask (B, n_cond)
        (1 = a real caption token); valid (B,) zeroes the loss of bad t2i records; without
        return_logits the loss is computed in checkpointed chunks (no full fp32 logits)."""
        c = self.config
        B, S = idx.shape
        if S >= c.block_size:
            raise ValueError(f"idx has {S} tokens; at most block_size - 1 = {c.block_size - 1} fit")
        drop = None  # class dropout for CFG training: a label or caption becomes the null one
        if self.training and c.class_dropout_prob > 0:
            drop = torch.rand(B, device=idx.device) < c.class_dropout_prob  # (B,) bool
        cond_emb = self.cls_embedding(cond, drop)[:, : c.cls_token_num]
        # token dropout acts on the whole sequence, condition included (official)
        h = self.tok_dropout(torch.cat([cond_emb, self.tok_embeddings(idx)], 1))  # (B, n+S, dim)
        h = self.transform(h, torch.arange(h.shape[1], device=h.device), emb_mask)
        # the last condition position predicts image token 0: exactly S+1 outputs
        h = h[:, c.cls_token_num - 1 :]  # (B, S+1, dim)
        logits = self.output(h).float() if return_logits else None  # (B, S+1, V)
        if targets is None:
            return logits, None
        # Memory: fp32 logits of B x 256 x 16384 are 4 GB for B = 256. Past CE_CHUNK_ELEMENTS
        # the loss is summed over chunks of rows, each recomputed in the backward pass
        # (checkpoint), so at most one chunk of logits is alive; with return_logits=False the
        # full logits are never made. Below it, one plain pass: no recomputation, no slower.
        rows = CE_CHUNK_ELEMENTS // c.vocab_size  # >= 1024 for any vocabulary up to 16384
        # per-token weight: 1, or the record's valid flag (t2i: bad records count 0)
        weight = torch.ones(B, device=h.device) if valid is None else valid.float()  # (B,)
        weight = weight.repeat_interleave(S + 1)  # (B*(S+1),) like the flattened targets

        def ce(h, targets, weight):  # weighted cross-entropy sum of rows h (N, dim)
            losses = F.cross_entropy(self.output(h).float(), targets, reduction="none")  # (N,)
            return (losses * weight).sum()

        if B * (S + 1) > rows:  # several chunks (one has nothing to save by recomputing it)
            ce = partial(checkpoint, ce, use_reentrant=False)
        chunks = [t.split(rows) for t in (h.flatten(0, 1), targets.flatten(), weight)]
        # mean over the weighted tokens (official: divided by max(number of valid tokens, 1))
        return logits, sum(map(ce, *chunks)) / weight.sum().clamp(min=1)

    # ---- cached inference -------------------------------------------------------------------

    def setup_caches(self, batch: int, max_seq: int):
        """Give every layer a static KV cache in the weights' dtype and on their device (official:
        bf16 when the model is cast to bf16); ones of the same shape are kept (a compiled decode
        replays CUDA graphs on the same buffers). Buffers follow the model's .to(), so a kept
        cache already has the weights' dtype and device."""
        shape = (2, batch, self.layers[0].attention.n_kv, max_seq, self.config.head_dim)
        for layer in self.layers:
            if getattr(layer.attention.kv_cache, "shape", None) != shape:
                layer.attention.kv_cache = self.tok_embeddings.weight.new_zeros(shape)

    def teardown_caches(self):
        """Free the KV caches."""
        for layer in self.layers:
            layer.attention.kv_cache = None

    # ---- checkpoints ------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, ckpt: dict, block_size: int | None = None) -> "GPT":
        """A loaded checkpoint -> GPT in eval mode. Ours carries its config and prefers "ema";
        an official file ("model" / "module" / "state_dict" / a raw state dict, FSDP prefixes)
        gets its config from the tensor shapes, and block_size = (image_size // downsample)**2
        from the caller, since the file does not record its image size."""
        # the first container present (ours keep "ema": None without EMA), else a raw state dict
        sd = next(filter(None, map(ckpt.get, ("ema", "model", "module", "state_dict"))), ckpt)
        # drop wrappers' prefixes (torch.compile, DDP) and non-weights some official files carry
        sd = {
            k.removeprefix("_orig_mod.").removeprefix("module."): v
            for k, v in sd.items()
            if "freqs_cis" not in k and ".kv_cache." not in k
        }
        if "tok_embeddings.weight" not in sd:  # e.g. a VQ tokenizer's (encoder., quantize.): say so
            raise ValueError(f"not a GPT checkpoint: keys {sorted(sd)[:4]}...")
        if "config" in ckpt:  # ours
            config = GPTConfig(**ckpt["config"])
        else:  # official: vocab, dim, depth and c2i/t2i from the tensor shapes; n_head from the
            # preset of that dim and depth (shapes cannot tell heads apart); block_size from the
            # caller, who knows the image size and the tokenizer
            if block_size is None:
                raise ValueError(
                    "an official GPT file does not record its image size: pass block_size"
                )
            vocab, dim = sd["tok_embeddings.weight"].shape
            n_layer = sum(k.endswith(".attention.wqkv.weight") for k in sd)
            presets = [
                p for p in GPT_CONFIGS.values() if (p["dim"], p["n_layer"]) == (dim, n_layer)
            ]
            if not presets:
                raise ValueError(f"no GPT preset has dim {dim} and {n_layer} layers")
            caption = sd.get("cls_embedding.cap_proj.fc1.weight")  # (dim, caption_dim): t2i only
            cond = (  # c2i: the label table has the classes plus the null class
                dict(num_classes=len(sd["cls_embedding.embedding_table.weight"]) - 1)
                if caption is None
                else dict(
                    model_type="t2i", cls_token_num=UNCOND_TOKENS, caption_dim=caption.shape[1]
                )
            )
            config = GPTConfig(**presets[0], **cond, vocab_size=vocab, block_size=block_size)
        with torch.device("meta"):  # no init cost: every tensor comes from the file
            model = cls(config)
        try:  # strict: every tensor present, none extra, all shapes equal
            model.load_state_dict(sd, assign=True)
        except RuntimeError as e:  # torch lists every problem: missing, unexpected, shapes
            raise ValueError(
                f"checkpoint does not fit a {config.model_type} GPT with dim {config.dim}, "
                f"{config.n_layer} layers: {' '.join(str(e).split())[:300]}"
            ) from None
        return model.eval()


# -----------------------------------------------------------------------------
# Sampling (official generate.py)


def probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Logits (..., V) -> the distribution a token is drawn from: temperature, then top-k (keeps
    ties), then top-p (keeps the first token past p: the HF filter the official code uses)."""
    logits = logits / max(temperature, 1e-5)
    if 0 < top_k < logits.size(-1):  # top-k of all V tokens keeps all of them
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) > top_p
        drop = F.pad(drop[..., :-1], (1, 0))  # shift right: keep the first token past top_p
        # back to vocabulary order (order is a permutation: every entry is overwritten)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits.softmax(-1)


def draw(p, generator=None):
    """One token from each distribution p (..., V) -> (...) int64."""
    return torch.multinomial(p.flatten(0, -2), 1, generator=generator).view(p.shape[:-1])


def decode_one_token(model: GPT, x, pos, kv_len: int, emb_mask, cfg_scale, cfg_interval, last=1):
    """Embeddings x (N, S, dim) at positions pos (S,) -> logits (B, last, V) of the last `last`
    positions, guided: rows [cond; uncond] -> uncond + s * (cond - uncond) (paper Sec. 2.4), or
    cond alone once the fed token's index passes cfg_interval (both halves are still computed,
    as official). Safe to torch.compile(fullgraph=True)."""
    logits = model.output(model.transform(x, pos, emb_mask, kv_len)[:, -last:]).float()
    if cfg_scale <= 1.0:
        return logits
    cond, uncond = logits.chunk(2)
    fed = pos[-last:] - model.config.cls_token_num  # index of the image token fed at each position
    use_cfg = (fed <= cfg_interval) | (cfg_interval <= -1)  # official float compare
    return torch.where(use_cfg[:, None], uncond + (cond - uncond) * cfg_scale, cond)


@torch.no_grad()
def generate(
    model: GPT,
    cond: torch.Tensor,
    cfg_scale=1.0,
    cfg_interval=-1,
    emb_mask=None,
    decode_fn=None,
    jacobi_window=0,
    prefix=None,
    stats=None,
    generator=None,
    **filters,
) -> torch.Tensor:
    """Sample (B, block_size) int64 image tokens for labels (B,) or captions (B, n_cond,
    caption_dim) with emb_mask (B, n_cond) (t2i; ignored for c2i); **filters: temperature,
    top_k, top_p. cfg_scale > 1 guides (paper Sec. 2.4) up to image token cfg_interval (-1: all).

    prefix (B, K) int64: image tokens kept as given; sampling continues at token K. decode_fn: a
    torch.compile'd `decode_one_token` (gpt-fast); it then attends over the whole (masked) cache
    so shapes stay static for CUDA graphs, and the caches stay for the next call.
    jacobi_window W > 0: speculative Jacobi decoding (`_jacobi`), the same distribution in fewer
    forward passes; W = 0 is ordinary sampling. stats: a dict that receives "forward_passes"
    (the prefill counts one) and, with a Jacobi window, "accepted": per pass after the prefill,
    each row's count of accepted tokens (bench/jacobi_map.py draws it). generator: a
    torch.Generator for every random draw (same seed, same tokens)."""
    c, device = model.config, cond.device
    n_cond, L, t2i = c.cls_token_num, c.block_size, c.model_type == "t2i"
    if cfg_scale > 1.0 and not t2i and c.class_dropout_prob <= 0:
        raise ValueError("cfg_scale > 1 needs the null class (class_dropout_prob > 0)")
    B, copies = len(cond), 1 + (cfg_scale > 1.0)
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)  # (B, L)
    K = 0 if prefix is None else prefix.shape[1]
    if K >= L:
        raise ValueError(f"a prefix of {K} tokens leaves nothing to sample (block_size {L})")
    if K:
        tokens[:, :K] = prefix
    # guidance doubles the batch to [cond; null]: the null class, or the stored null caption;
    # a t2i uncond row keeps the cond row's padding mask (official)
    cond = torch.cat([cond] * copies)
    emb_mask = emb_mask.repeat(copies, 1) if t2i and emb_mask is not None else None
    max_seq = n_cond + L - 1  # the last token is never fed back
    passes = 0

    def feed(start, end, last=1, compiled=None):
        """Feed tokens start..end-1 (to both halves) -> the distributions (B, last, V) of tokens
        end-last+1..end, each given the tokens before it. The condition sits at positions
        0..n_cond-1, as tokens -n_cond..-1: start = -n_cond is the prefill, the condition and
        the prefix in one pass. Eager, this attends over the filled cache; `compiled`
        (decode_fn) attends over the whole (masked) cache: fixed shapes, so CUDA graphs can
        replay."""
        nonlocal passes
        passes += 1
        x = model.tok_embeddings(tokens[:, max(start, 0) : end].repeat(copies, 1))
        if start < 0:  # the second half gets the null class or caption
            null = torch.arange(len(cond), device=device) >= B
            x = torch.cat([model.cls_embedding(cond, null), x], 1)
        at = torch.arange(n_cond + start, n_cond + end, device=device)  # their positions
        kv_len = max_seq if compiled else n_cond + end
        step = compiled or decode_one_token
        return probs(step(model, x, at, kv_len, emb_mask, cfg_scale, cfg_interval, last), **filters)

    was_training = model.training
    model.eval()  # no dropout; train() again at the end (the trainer samples mid-run)
    model.setup_caches(len(cond), max_seq)
    try:  # prefill, always eager -> token K
        tokens[:, K] = draw(feed(-n_cond, K)[:, -1], generator)
        if jacobi_window > 0:
            _jacobi(feed, tokens, K + 1, jacobi_window, c.grid_size, generator, stats)
        else:
            for i in range(K + 1, L):  # feed token i - 1 -> token i
                tokens[:, i] = draw(feed(i - 1, i, 1, decode_fn)[:, -1], generator)
    finally:
        if decode_fn is None:  # compiled graphs keep the same cache buffers for the next call
            model.teardown_caches()
        model.train(was_training)
    if stats is not None:
        stats["forward_passes"] = passes
    return tokens


def _jacobi(feed, tokens, n0, window, grid, generator, stats=None):
    """Speculative Jacobi decoding (Teng et al., ICLR 2025, arXiv 2410.01699) with coupled draft
    updates (So et al., arXiv 2510.24211): fill tokens (B, L) in place from n0 accepted tokens
    per row; each forward pass (`feed`) feeds up to `window` drafts past the furthest row and
    checks every row's drafts, plus one more draft whose p the pass gives but which is not fed.

    Why the distribution stays exact: a draft x_i was drawn from a known q_i. Given the tokens
    before it, the pass gives the true next-token distribution p_i (guided and filtered exactly
    as ordinary sampling). Keeping x_i with probability min(1, p_i(x_i) / q_i(x_i)), and else
    drawing from normalize(max(0, p_i - q_i)), yields x_i ~ p_i: P(x) = min(q(x), p(x)) +
    (1 - sum_y min(q(y), p(y))) * (p(x) - min(q(x), p(x))) / (1 - sum_y min(q(y), p(y))) = p(x).
    A row accepts its drafts up to and including the first one that was not kept (never the
    batch minimum, which would bias it), and accepted tokens are never checked again.

    The drafts after that one are updated by the same rule, with this pass's p, although the
    tokens before them are not final: the rule makes the new draft exactly ~ p (its q for the
    next pass) given those tokens, and p_i depends only on tokens before i. Drawing the new
    drafts from p independently would be exact too (SJD), but would change almost every draft of
    a flat distribution, and with it the context of every later draft; the rule keeps a draft
    whenever p allows (a maximal coupling of q and p), so the drafts settle like a Jacobi fixed
    point, and once the tokens before a draft stop changing, p = q (up to rounding) and it is
    accepted. A fresh draft is the token one grid row above (the token to its left in the top
    row), a point mass, q = one-hot: kept with probability p(x) (the spatial prior of the SJD
    paper). The KV cache holds only accepted tokens: each pass re-feeds every row from the
    earliest token whose keys and values are not final, overwriting what a draft left there, and
    attends over the fed window causally."""
    (B, L), device = tokens.shape, tokens.device
    n = tokens.new_full((B, 1), n0)  # accepted tokens per row
    q = q_start = None  # the last pass's p (B, S', V), of tokens q_start+1..q_start+S'
    drafted = n0  # tokens < drafted hold an accepted token or a draft, in every row
    while (n < L).any():
        # feed tokens start..end-1: from the earliest row's newest (uncached) accepted token to W
        # drafts past the furthest row; fed token j gives p of token j + 1; token `end` is checked
        # but not fed
        start, end = int(n.min()) - 1, min(L - 1, int(n.max()) + window)
        for t in range(drafted, end + 1):  # fresh drafts, point masses
            tokens[:, t] = tokens[:, t - grid if t >= grid else t - 1]
        p = feed(start, end, end - start)  # (B, S, V), S = end - start
        # what each draft was drawn from: the last pass's p (end only grows, so it covers
        # tokens start+1..drafted-1), a point mass for the fresh ones -> (B, S, V) like p
        fresh = F.one_hot(tokens[:, drafted : end + 1], p.shape[-1]).float()
        q = fresh if q is None else torch.cat([q[:, start - q_start :], fresh], 1)
        x = tokens[:, start + 1 : end + 1]  # (B, S): accepted tokens (before n), then drafts
        t = torch.arange(start + 1, end + 1, device=device)  # (S,) the tokens p and q are for
        p_x, q_x = (dist.gather(2, x[..., None])[..., 0] for dist in (p, q))  # (B, S)
        u = torch.rand(p_x.shape, generator=generator, device=device)
        # kept with probability min(1, p/q); tokens before n (all, in a finished row) stand. A
        # draft not kept has p(x) < q(x), so p > q somewhere: its residual is never empty
        redo = (t >= n) & (u * q_x >= p_x)
        x[redo] = draw((p[redo] - q[redo]).clamp(min=0), generator)  # in place: x views tokens
        # (B, 1) accepted through the first redrawn token (or through `end`; a finished row: L)
        n = start + 1 + (~redo).cumprod(1).sum(1, keepdim=True)
        n, q, q_start, drafted = n.clamp(max=end) + 1, p, start, end + 1
        if stats is not None:  # each row's accepted tokens after each pass
            stats.setdefault("accepted", []).append(n[:, 0].tolist())
