"""Tests for gpt.py: official key layout and sizes, KV cache vs full forward, CFG, losses, loading.

python -m pytest tests/test_gpt.py -q
"""

import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gpt
from gpt import GPT, GPTConfig, generate

MANIFESTS = sorted((Path(__file__).parent / "data" / "checkpoints").glob("[ct]2i_*.txt"))
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "reference"
NO_DROPOUT = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
# spec b.1: exact official parameter counts (vocab 16384, 1000 classes; t2i caption_dim 2048)
PARAM_COUNTS = {
    "GPT-B": (110_888_448, 112_282_368),
    "GPT-L": (342_910_976, 345_031_680),
    "GPT-XL": (774_699_520, 777_678_080),
    "GPT-XXL": (1_410_972_672, 1_414_940_160),
    "GPT-XXXL": (3_893_027_840, 3_902_261_760),
    "GPT-1B": (1_199_616_000, 1_205_954_560),
    "GPT-3B": (3_096_659_200, 3_110_249_600),
    "GPT-7B": (6_614_589_440, 6_635_655_168),
}


def tiny(model_type="c2i", **kw):
    """A random tiny model with a non-zero output head (so sampling is not uniform)."""
    torch.manual_seed(0)
    t2i = dict(model_type="t2i", cls_token_num=6, caption_dim=24) if model_type == "t2i" else {}
    cfg = GPTConfig.from_name(
        "GPT-tiny", vocab_size=32, block_size=16, num_classes=10, **{**t2i, **kw}
    )
    model = GPT(cfg)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


def make_cond(model, B=2):
    """Labels (B,) for c2i; left-padded captions (B, T, C) and their emb_mask for t2i."""
    c = model.config
    if c.model_type == "c2i":
        return torch.arange(B) % c.num_classes, None
    mask = torch.ones(B, c.cls_token_num, dtype=torch.long)
    mask[0, :3] = 0  # first caption has 3 padded slots on the left
    return torch.randn(B, c.cls_token_num, c.caption_dim) * mask[..., None], mask


def guided_logits(model, idx, cond, emb_mask, cfg_scale):
    """Teacher-forced logits with CFG, computed without the KV cache."""
    c = model.config
    null = (
        torch.full_like(cond, c.num_classes)
        if c.model_type == "c2i"
        else model.cls_embedding.uncond_embedding[: c.cls_token_num].expand_as(cond)
    )
    mask = None if emb_mask is None else torch.cat([emb_mask, emb_mask])
    logits, _ = model(torch.cat([idx, idx]), torch.cat([cond, null]), emb_mask=mask)
    cond_l, uncond_l = logits.chunk(2)
    return uncond_l + (cond_l - uncond_l) * cfg_scale


# ---- official layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_keys_shapes_and_strict_load(manifest):
    lines = manifest.read_text().splitlines()
    preset = re.search(r"GPT_models\['(GPT-\w+)'\]", lines[0]).group(1)
    block = int(re.search(r"block_size=(\d+)", lines[0]).group(1))
    kw = dict(model_type="t2i", cls_token_num=120) if manifest.stem.startswith("t2i") else {}
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(preset, block_size=block, **kw))
    want = [
        (n, tuple(int(s) for s in shape.split(",")))
        for n, shape, _ in (l.split("\t") for l in lines[1:])
    ]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == want
    buffers = {n for n, _ in model.named_buffers()}
    assert buffers == ({"cls_embedding.uncond_embedding"} if kw else set())
    with torch.device("meta"):
        sd = {n: torch.empty(s) for n, s in want}
        sd["freqs_cis"] = torch.empty(3)  # harmless extra that some official files carry
    loaded = GPT.from_checkpoint({"model": sd}, block_size=block)  # config from the shapes
    assert loaded.config == model.config


@pytest.mark.parametrize("name", PARAM_COUNTS)
def test_official_parameter_counts(name):
    for model_type, want in zip(("c2i", "t2i"), PARAM_COUNTS[name]):
        kw = dict(model_type="t2i", cls_token_num=120) if model_type == "t2i" else {}
        with torch.device("meta"):
            model = GPT(GPTConfig.from_name(name, **kw))
        assert sum(p.numel() for p in model.parameters()) == want, (name, model_type)


def test_config_names_and_sizes():
    three_b = GPTConfig.from_name("GPT-3B")
    assert three_b.head_dim == 100 and three_b.ffn_hidden == 8704
    assert GPTConfig.from_name("GPT-tiny", block_size=576).grid_size == 24
    with pytest.raises(KeyError):  # exact names here; scripts resolve "XL" with common.preset
        GPTConfig.from_name("XL")
    with pytest.raises(ValueError, match="square"):
        GPT(GPTConfig.from_name("GPT-tiny", block_size=20))
    model = GPT(GPTConfig.from_name("GPT-tiny", vocab_size=8, block_size=4))
    assert "freqs_cis" not in model.state_dict()
    model.to(torch.bfloat16)  # the RoPE table stays fp32 when the weights are cast (official)
    model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]))
    assert model.freqs_cis.dtype == torch.float32


def test_rope_table_is_official():
    config = GPTConfig(dim=200, n_head=2, block_size=9, cls_token_num=2)  # grid 3, head_dim 100
    f = gpt.precompute_freqs_cis_2d(config)
    assert f.shape == (2 + 9, 50, 2) and f[:2].abs().sum() == 0  # condition rows: cos = sin = 0
    row, col = divmod(5, 3)  # token 5 sits at (1, 2)
    angles = torch.tensor(
        [row * 10000 ** (-2 * k / 50) for k in range(25)]
        + [col * 10000 ** (-2 * k / 50) for k in range(25)]
    )
    torch.testing.assert_close(f[2 + 5], torch.stack([angles.cos(), angles.sin()], -1))


# ---- forward and losses ------------------------------------------------------------------------


def test_fresh_model_loss_is_ln_vocab():
    model = GPT(GPTConfig.from_name("GPT-tiny", vocab_size=64, block_size=16, num_classes=10))
    z = torch.randint(0, 64, (3, 16))
    for train in (True, False):
        model.train(train)
        logits, loss = model(z[:, :-1], torch.tensor([1, 2, 3]), targets=z)
        assert logits.shape == (3, 16, 64) and logits.dtype == torch.float32
        assert abs(loss.item() - math.log(64)) < 1e-6


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_partial_sequences_train_and_eval_are_causal(model_type):
    model = tiny(model_type, **NO_DROPOUT, class_dropout_prob=0.0)
    cond, emb_mask = make_cond(model)
    z = torch.randint(0, 32, (2, 15))
    full, _ = model(z, cond, emb_mask=emb_mask)
    assert full.shape == (2, 16, 32)
    for train in (False, True):
        model.train(train)
        for S in (0, 1, 7):
            part, _ = model(z[:, :S], cond, emb_mask=emb_mask)
            assert part.shape == (2, S + 1, 32)
            torch.testing.assert_close(part, full[:, : S + 1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(2, 16, dtype=torch.long), cond, emb_mask=emb_mask)


def test_label_dropout_in_training_uses_null_class():
    model = tiny(**NO_DROPOUT, class_dropout_prob=1.0)
    z = torch.randint(0, 32, (2, 15))
    null, _ = model(z, torch.full((2,), 10))
    dropped, _ = model.train()(z, torch.tensor([3, 4]))
    torch.testing.assert_close(dropped, null)


def test_t2i_padded_caption_slots_do_not_matter():
    model = tiny("t2i")
    cond, emb_mask = make_cond(model)
    z = torch.randint(0, 32, (2, 15))
    logits, _ = model(z, cond, emb_mask=emb_mask)
    noisy = cond + torch.randn_like(cond) * (1 - emb_mask[..., None])  # only padded slots change
    torch.testing.assert_close(model(z, noisy, emb_mask=emb_mask)[0], logits)
    assert not torch.allclose(model(z, noisy)[0], logits)  # without the mask they would leak


def test_valid_excludes_samples():
    model = tiny()
    z = torch.randint(0, 32, (2, 16))
    labels = torch.tensor([1, 2])
    _, loss0 = model(z[:1, :-1], labels[:1], targets=z[:1])
    _, loss = model(z[:, :-1], labels, targets=z, valid=torch.tensor([1, 0]))
    torch.testing.assert_close(loss, loss0)
    _, none = model(z[:, :-1], labels, targets=z, valid=torch.tensor([0, 0]))
    assert none.item() == 0.0


@pytest.mark.parametrize("use_valid", [False, True])
def test_chunked_loss_matches_plain_loss_and_grads(monkeypatch, use_valid):
    monkeypatch.setattr(gpt, "CE_CHUNK_ELEMENTS", 32 * 5)  # 5 rows per chunk: several chunks
    model = tiny("t2i").train()
    cond, emb_mask = make_cond(model)
    z = torch.randint(0, 32, (2, 16))
    valid = torch.tensor([1.0, 0.0]) if use_valid else None
    weight = (torch.ones(2) if valid is None else valid)[:, None].expand(2, 16)
    results = []
    for chunked in (False, True):
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks in both runs
        if chunked:  # the trainer's call: no full logits, checkpointed chunks
            logits, loss = model(
                z[:, :-1], cond, targets=z, emb_mask=emb_mask, valid=valid, return_logits=False
            )
            assert logits is None
        else:  # plain weighted mean cross-entropy over the full logits
            logits, _ = model(z[:, :-1], cond, emb_mask=emb_mask)
            ce = F.cross_entropy(logits.flatten(0, 1), z.flatten(), reduction="none")
            loss = (ce * weight.flatten()).sum() / weight.sum().clamp(min=1)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, loss)
    for n in grads:
        torch.testing.assert_close(chunked_grads[n], grads[n], msg=n)
    torch.manual_seed(1)
    _, with_logits = model(z[:, :-1], cond, targets=z, emb_mask=emb_mask, valid=valid)
    torch.testing.assert_close(with_logits, loss)  # the default call returns both


# ---- KV cache and sampling ---------------------------------------------------------------------

VARIANTS = {
    "c2i": dict(),
    "t2i": dict(model_type="t2i"),
    "gqa": dict(n_kv_head=2),
    "head_dim_100": dict(dim=200, n_head=2),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    c = model.config
    cond, emb_mask = make_cond(model)
    z = torch.randint(0, 32, (2, 15))
    full, _ = model(z, cond, emb_mask=emb_mask)  # (B, 16, V)
    model.setup_caches(2, c.cls_token_num + 15)
    n = c.cls_token_num
    with torch.no_grad():
        x = model.cls_embedding(cond)
        steps = [gpt.decode_one_token(model, x, torch.arange(n), n, emb_mask, 1.0, -1)]
        for i in range(15):
            x, pos = model.tok_embeddings(z[:, i : i + 1]), torch.tensor([n + i])
            steps.append(gpt.decode_one_token(model, x, pos, n + i + 1, emb_mask, 1.0, -1))
        # several tokens in one cached pass (speculative decoding feeds windows like this)
        model.setup_caches(2, c.cls_token_num + 15)
        gpt.decode_one_token(
            model, model.cls_embedding(cond), torch.arange(n), n, emb_mask, 1.0, -1
        )
        x, pos = model.tok_embeddings(z), torch.arange(n, n + 15)
        window = gpt.decode_one_token(model, x, pos, n + 15, emb_mask, 1.0, -1, last=15)
    model.teardown_caches()
    # 1e-4: head_dim 100 differs by ~1e-5 with one thread (summation order, not a bug)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(window, full[:, 1:], atol=1e-4, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa, mha = tiny(n_kv_head=2), tiny()
    sd, hd, dim = gqa.state_dict(), 16, 64
    for i in range(2):  # kv head j serves query heads 2j and 2j+1 (official repeat_interleave)
        q, k, v = sd[f"layers.{i}.attention.wqkv.weight"].split([dim, 2 * hd, 2 * hd])
        k, v = (w.view(2, hd, dim).repeat_interleave(2, dim=0).reshape(dim, dim) for w in (k, v))
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(sd)
    z, labels = torch.randint(0, 32, (2, 15)), torch.tensor([1, 2])
    torch.testing.assert_close(mha(z, labels)[0], gqa(z, labels)[0])


@pytest.mark.parametrize("variant", ["c2i", "t2i", "gqa"])
def test_greedy_cfg_generate_matches_teacher_forcing(variant):
    model = tiny(**VARIANTS[variant])
    cond, emb_mask = make_cond(model)
    keys = list(model.state_dict())
    tokens = generate(model, cond, cfg_scale=3.0, top_k=1, emb_mask=emb_mask)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.int64
    with torch.no_grad():
        want = guided_logits(model, tokens[:, :-1], cond, emb_mask, 3.0).argmax(-1)
    assert torch.equal(tokens, want)
    assert list(model.state_dict()) == keys and all(
        l.attention.kv_cache is None for l in model.layers
    )


def test_cfg_interval_switches_to_conditional_logits():
    model = tiny()
    cond, _ = make_cond(model)
    tokens = generate(model, cond, cfg_scale=3.0, cfg_interval=4, top_k=1)
    with torch.no_grad():
        guided = guided_logits(model, tokens[:, :-1], cond, None, 3.0).argmax(-1)
        plain = model(tokens[:, :-1], cond)[0].argmax(-1)
    assert torch.equal(tokens[:, :6], guided[:, :6]) and torch.equal(tokens[:, 6:], plain[:, 6:])


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_cfg_scale_one_equals_plain_conditional_sampling(model_type):
    model = tiny(model_type)
    cond, emb_mask = make_cond(model)
    kw = dict(temperature=1.3, top_k=20, top_p=0.9)
    tokens = generate(
        model,
        cond,
        cfg_scale=1.0,
        emb_mask=emb_mask,
        generator=torch.Generator().manual_seed(7),
        **kw,
    )
    g = torch.Generator().manual_seed(7)
    seq = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(16):  # naive sampler: full forward every step, no cache
            logits, _ = model(seq, cond, emb_mask=emb_mask)
            seq = torch.cat([seq, gpt.draw(gpt.probs(logits[:, -1:], **kw), g)], 1)
    assert torch.equal(tokens, seq)


def test_sample_filters_like_hf():
    p = gpt.probs(torch.tensor([2.0, 2.0, 0.0, -1.0]), top_k=1)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.5, 0.0, 0.0]))  # top-k keeps ties
    p = gpt.probs(torch.tensor([0.5, 0.3, 0.2]).log(), top_p=0.6)
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0]))  # keeps the first past p
    p = gpt.probs(torch.tensor([0.0, 1.0, 0.5]), temperature=0.0)
    assert p.argmax() == 1 and p.max() > 0.999  # temperature 0: greedy


# ---- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_round_trip_our_format(tmp_path):
    model, ema = tiny(), tiny(n_layer=2)
    torch.nn.init.normal_(ema.output.weight)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "config": asdict(model.config)}
    torch.save({**ckpt, "args": {"lr": 1e-4}, "step": 3}, tmp_path / "last.pt")
    z, labels = torch.randint(0, 32, (2, 15)), torch.tensor([1, 2])
    on_disk = torch.load(tmp_path / "last.pt", weights_only=True)
    for ckpt, want in ((on_disk, ema), ({**ckpt, "ema": None}, model)):  # EMA when saved
        loaded = GPT.from_checkpoint(ckpt)
        assert loaded.config == model.config and not loaded.training
        torch.testing.assert_close(loaded(z, labels)[0], want(z, labels)[0])


@pytest.mark.parametrize("container", ["model", "module", "state_dict", "raw", "prefixed"])
def test_checkpoint_official_containers(container):
    model = tiny()
    sd = dict(
        model.state_dict(),
        freqs_cis=model.freqs_cis,
        **{"layers.0.attention.kv_cache.k_cache": torch.zeros(1)},
    )
    if container == "prefixed":  # FSDP / torch.compile wrappers' key prefixes
        sd = {f"_orig_mod.module.{k}": v for k, v in sd.items()}
    loaded = GPT.from_checkpoint(sd if container in ("raw", "prefixed") else {container: sd}, 16)
    assert loaded.config.block_size == 16 and loaded.config.num_classes == 10
    z, labels = torch.randint(0, 32, (2, 15)), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(z, labels)[0], model(z, labels)[0])
    with pytest.raises(ValueError, match="block_size"):  # the caller owns the image size
        GPT.from_checkpoint(sd)


def test_loader_errors_are_clear():
    with torch.device("meta"):
        sd = GPT(GPTConfig.from_name("GPT-B")).state_dict()
    large = asdict(GPTConfig.from_name("GPT-L"))
    with pytest.raises(ValueError, match=r"does not fit a c2i GPT with dim 1024.*Missing key"):
        GPT.from_checkpoint({"model": sd, "config": large})
    with pytest.raises(ValueError, match="no GPT preset has dim 768 and 11 layers"):
        GPT.from_checkpoint({k: v for k, v in sd.items() if ".11." not in k}, 256)
    vq_file = {
        "model": {
            "encoder.conv_in.weight": torch.zeros(1),
            "quantize.codebook_used": torch.zeros(1),
        }
    }
    our_vq = {**vq_file, "config": {"codebook_size": 1024, "z_channels": 64}}
    for ckpt in (vq_file, our_vq):
        with pytest.raises(ValueError, match=r"not a GPT checkpoint: keys \['encoder.conv_in"):
            GPT.from_checkpoint(ckpt, 256)


# ---- official reference outputs ----------------------------------------------------------------


@pytest.mark.skipif(
    not (REFERENCE / "check.py").exists(), reason="spec/reference not beside the checkout"
)
def test_official_reference_check(capsys):
    """The GPT half of spec/reference/check.py (the VQ half belongs to tests/test_vq.py)."""
    source = (REFERENCE / "check.py").read_text()
    assert "\nfor part in" in source, "check.py changed shape; run it directly"
    ns = {"__file__": str(REFERENCE / "check.py"), "__name__": "reference_check"}
    exec(compile(source.split("\nfor part in")[0], str(REFERENCE / "check.py"), "exec"), ns)
    ns["check_gpt"]()
    out = capsys.readouterr().out
    assert len(ns["results"]) == 5 and all(ns["results"]), out


def test_static_shape_decode_keeps_caches_and_matches_eager():
    """With a decode_fn (normally a torch.compile'd decode_one_token) every step attends over the
    whole masked cache, fixed shapes for CUDA graphs, and the caches stay for the next call."""
    model = tiny("t2i")
    cond, emb_mask = make_cond(model)
    eager = generate(model, cond, cfg_scale=2.0, top_k=1, emb_mask=emb_mask)
    assert model.layers[0].attention.kv_cache is None  # eager frees them
    for _ in range(2):
        static = generate(
            model, cond, cfg_scale=2.0, top_k=1, emb_mask=emb_mask, decode_fn=gpt.decode_one_token
        )
        assert torch.equal(static, eager)
    cache = model.layers[0].attention.kv_cache  # (k and v, 2B, n_kv, n_cond + L - 1, hd)
    assert cache.shape == (2, 4, 4, model.config.cls_token_num + 15, 16)
    model.teardown_caches()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_decode_matches_eager_on_gpu():
    model = tiny().cuda()
    cond = torch.tensor([1, 2], device="cuda")
    eager = generate(model, cond, cfg_scale=2.0, top_k=1)
    step = torch.compile(gpt.decode_one_token, mode="reduce-overhead", fullgraph=True)
    for _ in range(2):  # the second call reuses the caches and the captured graphs
        assert torch.equal(generate(model, cond, cfg_scale=2.0, top_k=1, decode_fn=step), eager)
    model.teardown_caches()
