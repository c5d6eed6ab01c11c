"""Tests for text-to-image: caption cleaning, T5 features (a tiny random T5), the caption/code
store, the official t2i attention masks and null caption of gpt.py, and t2i training and prompt
sampling.

    python -m pytest tests/test_t2i.py -q
"""

import json
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import data
import gpt
import text
import vq

SLOTS = text.MAX_TOKENS  # 120 caption slots, as the released models
D = 32  # tiny T5 width = the tiny GPT's caption_dim
WORDS = (
    "a an of on picture dark background red green blue yellow disc stripes checker ring cat photo"
).split()


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny T5 (random weights, word-level tokenizer, built offline), a tiny VQ, toy data


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory):
    """A folder loadable like flan-t5-xl: T5EncoderModel (d_model 32), a fast tokenizer, </s>."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    torch.manual_seed(0)
    model = T5EncoderModel(
        T5Config(
            vocab_size=len(vocab),
            d_model=D,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        )
    )
    path = tmp_path_factory.mktemp("tiny-t5")
    model.save_pretrained(path)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def encoder(t5_dir):
    return text.TextEncoder(t5_dir)


@pytest.fixture(scope="session")
def toy_jsonl(tmp_path_factory):
    """2 classes x 4 toy images (32 px) with [blip, llava, llava_first] captions, 4 bad records."""
    root = tmp_path_factory.mktemp("toy-t2i")
    jsonl = data.make_toy_dataset(root, num_classes=2, per_class=4, size=32) / "captions.jsonl"
    (root / "corrupt.png").write_bytes(b"not a png")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(
        root / "small.png"
    )  # smaller than the 32 px images
    bad = [
        {"image_path": "missing.png", "text": "a red disc"},
        {"image_path": "corrupt.png", "text": "a red disc"},
        {"image_path": "small.png", "text": "a red disc"},
        {"image_path": "000-red-disc/0000.png", "text": None},
    ]  # no caption -> no features
    with open(jsonl, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in bad)
    return jsonl


@pytest.fixture(scope="session")
def store(toy_jsonl, vq_ckpt, encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "codes"
    return out, text.extract(extract_args(toy_jsonl, out, vq_ckpt), encoder)


def extract_args(data_path, code_path, vq_ckpt, image_size=32):
    """`text.py extract` flags: 3 records a batch, in this process."""
    argv = ["extract", "--data-path", str(data_path), "--code-path", str(code_path)]
    argv += ["--vq-ckpt", str(vq_ckpt), "--image-size", str(image_size)]
    return text.parse_args(argv + ["--batch-size", "3", "--num-workers", "0"])


def caption_args(**flags):
    """sample.py's text flags, as text.caption_condition reads them."""
    return SimpleNamespace(**{**dict.fromkeys(["caption_features", "prompt", "t5_path"]), **flags})


def tiny_t2i(seed=0, **kw):
    """A random tiny t2i GPT: 120 caption slots of width D, a 4x4 grid over VQ-tiny's 1024 codes."""
    torch.manual_seed(seed)
    cfg = gpt.GPTConfig.from_name(
        "GPT-tiny",
        model_type="t2i",
        cls_token_num=SLOTS,
        caption_dim=D,
        vocab_size=1024,
        block_size=16,
        **{**dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0), **kw},
    )
    model = gpt.GPT(cfg)
    torch.nn.init.normal_(
        model.output.weight, std=1.0
    )  # the zero-init head would make every logit equal
    return model.eval()


def left_padded_captions(B=3, lengths=(5, 17, 120)):
    """Right-aligned random captions (B, SLOTS, D), zero-padded, and their 0/1 mask (B, SLOTS)."""
    torch.manual_seed(1)
    mask = torch.zeros(B, SLOTS, dtype=torch.long)
    for b, n in enumerate(lengths[:B]):
        mask[b, SLOTS - n :] = 1
    return torch.randn(B, SLOTS, D) * mask[..., None], mask


# ----------------------------------------------------------------------------------------------
# Reference masks, built by hand from the spec (e.4 training, c.1 generate)


def official_train_mask(emb_mask, L):
    """train_t2i: tril over (SLOTS + L), text columns times emb_mask, diagonal 1; the trainer
    drops the last row and column."""
    B, Tn = emb_mask.shape
    S = Tn + L
    m = torch.tril(torch.ones(B, S, S))
    m[:, :, :Tn] = m[:, :, :Tn] * emb_mask[:, None, :].float()
    m = m * (1 - torch.eye(S)) + torch.eye(S)
    return m.bool()[:, :-1, :-1]  # (B, S-1, S-1)


def official_generate_mask(emb_mask, max_seq, guided):
    """generate(): causal (max_batch, max_seq, max_seq), text columns x [mask; mask], diagonal 1."""
    masks = torch.cat([emb_mask, emb_mask]) if guided else emb_mask
    m = torch.tril(torch.ones(masks.shape[0], max_seq, max_seq))
    m[:, :, : masks.shape[1]] = m[:, :, : masks.shape[1]] * masks[:, None, :].float()
    eye = torch.eye(max_seq)
    return (m * (1 - eye) + eye).bool()


@pytest.fixture
def sdpa_masks(monkeypatch):
    """Records the attn_mask of every scaled_dot_product_attention call (and the query length)."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kw):  # gpt.py may pass dropout positionally
        calls.append((q.shape[-2], k.shape[-2], attn_mask))
        return real(q, k, v, attn_mask, *args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_training_mask_matches_official(sdpa_masks):
    model, (emb, mask) = tiny_t2i(), left_padded_captions()
    z = torch.randint(0, 1024, (3, 16))
    model(z[:, :-1], emb, targets=z, emb_mask=mask)
    want = official_train_mask(mask, 16)  # (B, 135, 135)
    assert len(sdpa_masks) == model.config.n_layer
    for _, _, got in sdpa_masks:
        assert torch.equal(got.expand(3, 1, *want.shape[1:])[:, 0], want)


def test_training_caption_dropout_keeps_the_cond_mask(sdpa_masks):
    """A dropped caption becomes the null caption; its padding mask still applies (spec h.6)."""
    model, (emb, mask) = tiny_t2i(class_dropout_prob=1.0), left_padded_captions()
    seen = []
    model.cls_embedding.cap_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    z = torch.randint(0, 1024, (3, 16))
    model.train()(z[:, :-1], emb, targets=z, emb_mask=mask)
    null = model.cls_embedding.uncond_embedding
    assert torch.equal(seen[0], null[None].expand(3, -1, -1))
    assert torch.equal(sdpa_masks[0][2].expand(3, 1, 135, 135)[:, 0], official_train_mask(mask, 16))


def test_padded_caption_slots_do_not_influence_real_positions():
    model, (emb, mask) = tiny_t2i(), left_padded_captions()
    z = torch.randint(0, 1024, (3, 16))
    logits, _ = model(z[:, :-1], emb, emb_mask=mask)
    noisy = emb + 5 * torch.randn_like(emb) * (1 - mask[..., None])  # garbage only in padded slots
    torch.testing.assert_close(model(z[:, :-1], noisy, emb_mask=mask)[0], logits)
    assert not torch.allclose(model(z[:, :-1], noisy)[0], logits)  # without the mask they do leak


def test_generate_masks_match_official_in_both_guidance_halves(sdpa_masks):
    model, (emb, mask) = tiny_t2i(), left_padded_captions()
    generate_tokens = gpt.generate(model, emb, cfg_scale=7.5, top_k=1, emb_mask=mask)
    assert generate_tokens.shape == (3, 16)
    max_seq = SLOTS + 16
    ref = official_generate_mask(mask, max_seq, guided=True)  # (6, max_seq, max_seq)
    assert len(sdpa_masks) == model.config.n_layer * 16  # prefill + 15 decode steps, per layer
    for s, kv_len, got in sdpa_masks:
        got = got.expand(6, 1, s, kv_len)[:, 0]
        rows = (
            slice(0, SLOTS) if s == SLOTS else slice(kv_len - 1, kv_len)
        )  # prefill, or the one decoded position
        assert torch.equal(got, ref[:, rows, :kv_len])
        assert not ref[:, rows, kv_len:].any()  # nothing visible beyond what we attend over
        assert torch.equal(got[3:], got[:3])  # the uncond half uses the cond mask


def test_generate_ignores_padded_slots_of_both_halves():
    model, (emb, mask) = tiny_t2i(), left_padded_captions(B=1, lengths=(7,))
    want = gpt.generate(model, emb, cfg_scale=4.0, top_k=1, emb_mask=mask)
    noisy = emb + 5 * torch.randn_like(emb) * (1 - mask[..., None])
    assert torch.equal(gpt.generate(model, noisy, cfg_scale=4.0, top_k=1, emb_mask=mask), want)
    null = model.cls_embedding.uncond_embedding
    null[: SLOTS - 7] += 5 * torch.randn(SLOTS - 7, D)  # null-caption rows that the cond mask hides
    assert torch.equal(gpt.generate(model, emb, cfg_scale=4.0, top_k=1, emb_mask=mask), want)
    null[-1] += 5  # a visible row does matter (so the test can fail)
    assert not torch.equal(gpt.generate(model, emb, cfg_scale=4.0, top_k=1, emb_mask=mask), want)


@pytest.mark.parametrize("window", [3, 16])
def test_jacobi_windows_read_captions_like_ordinary_steps(window):
    """Greedy (top-k 1) Jacobi decoding of padded captions, guided, gives ordinary greedy tokens:
    its windows of several tokens see the same caption slots, mask and null caption."""
    model, (emb, mask) = tiny_t2i(), left_padded_captions()
    want = gpt.generate(model, emb, cfg_scale=7.5, top_k=1, emb_mask=mask)
    stats = {}
    got = gpt.generate(model, emb, 7.5, top_k=1, emb_mask=mask, jacobi_window=window, stats=stats)
    assert torch.equal(got, want) and stats["forward_passes"] <= 16


def test_generate_uses_the_checkpoint_null_caption(tmp_path):
    model = tiny_t2i()
    saved = torch.randn(120, D) * 3  # not what a fresh model would draw
    model.cls_embedding.uncond_embedding.copy_(saved)
    path = common.save_checkpoint(
        {"model": model.state_dict(), "config": asdict(model.config)}, tmp_path / "t2i.pt"
    )
    torch.manual_seed(123)  # a different seed: a re-initialised buffer would differ
    loaded = gpt.GPT.from_checkpoint(common.load_checkpoint(path))
    seen = []
    loaded.cls_embedding.cap_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    emb, mask = left_padded_captions(B=2)
    gpt.generate(loaded, emb, cfg_scale=7.5, top_k=1, emb_mask=mask)
    assert torch.equal(seen[0][:2], emb) and torch.equal(seen[0][2:], saved[None].expand(2, -1, -1))


def test_invalid_samples_do_not_count_in_the_loss():
    model, (emb, mask) = tiny_t2i(), left_padded_captions()
    z = torch.randint(0, 1024, (3, 16))
    valid = torch.tensor([True, False, True])
    _, loss = model(z[:, :-1], emb, targets=z, emb_mask=mask, valid=valid)
    keep = valid.nonzero()[:, 0]
    _, want = model(z[keep, :-1], emb[keep], targets=z[keep], emb_mask=mask[keep])
    torch.testing.assert_close(loss, want)


# ----------------------------------------------------------------------------------------------
# Captions and T5 features


@pytest.mark.parametrize(
    "raw, want",
    [
        ("A Photo of a CAT on https://example.com/x.jpg <b>sofa</b>", "a photo of a cat on sofa"),
        (
            "Red&nbsp;Dress \u2014 Free Shipping!!! item JC6640VC 1920x1080 #12345 "
            "\u6771\u4eac tower",
            "red dress item tower",
        ),
        ("<person> standing, @someone 192.168.0.1 photo.png", "person standing"),
        ("hello%20world \U0001f600 wow... great", "hello world wow great"),
        ("  'a red disc.'  ", "a red disc."),
        ("my_file-name_with-parts in the 1990s", "my file name with parts in the 1990s"),
    ],
)
def test_clean_caption(raw, want):
    assert text.clean_caption(raw) == want
    assert text.clean_caption(want) == want  # cleaning twice changes nothing more


def test_left_pad_moves_tokens_right_and_zeroes_padding():
    emb = torch.arange(1, 13).float().view(2, 6, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    out, m = text.left_pad(emb, mask)
    assert out[0, :, 0].tolist() == [0, 0, 0, 1, 2, 3] and m[0].tolist() == [False] * 3 + [True] * 3
    assert torch.equal(out[1], emb[1])
    again, m2 = text.left_pad(out, m)  # already right-aligned: unchanged
    assert torch.equal(again, out) and torch.equal(m2, m)


def test_missing_transformers_names_the_package_and_model(
    monkeypatch, capsys, toy_jsonl, vq_ckpt, tmp_path
):
    monkeypatch.setitem(
        sys.modules, "transformers", None
    )  # `import transformers` now raises ImportError
    with pytest.raises(
        common.UserError, match=r"pip install transformers sentencepiece.*google/flan-t5-xl"
    ):
        text.TextEncoder()
    argv = [
        "extract",
        "--data-path",
        str(toy_jsonl),
        "--code-path",
        str(tmp_path / "c"),
        "--vq-ckpt",
        str(vq_ckpt),
    ]
    with pytest.raises(SystemExit) as exit_info:
        common.cli(text.main, lambda: text.parse_args(argv))
    assert exit_info.value.code == 2
    assert "pip install transformers sentencepiece" in capsys.readouterr().err


def test_offline_without_a_cached_encoder_fails_at_once_in_one_line(
    monkeypatch, capsys, toy_jsonl, vq_ckpt, tmp_path, t5_dir
):
    """Issue 13: the hub client used to retry for ~50 s offline. The conftest refuses the network;
    a model name no cache holds stands in for an uncached google/flan-t5-xl."""
    monkeypatch.setattr(text, "T5_MODEL", "llamagen-tests/never-cached-t5")
    argv = ["extract", "--data-path", str(toy_jsonl), "--code-path", str(tmp_path / "c")]
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        common.cli(text.main, lambda: text.parse_args(argv + ["--vq-ckpt", str(vq_ckpt)]))
    assert exit_info.value.code == 2 and time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load the text encoder llamagen-tests/never-cached-t5")
    assert err.count("\n") == 1 and "--t5-path" in err
    with pytest.raises(SystemExit):  # and --help shows the defaults
        text.parse_args(["extract", "--help"])
    assert "--image-size IMAGE_SIZE default: 256" in " ".join(capsys.readouterr().out.split())


def test_text_module_imports_without_transformers():
    import subprocess

    code = (
        "import sys; sys.modules['transformers'] = None; import text, train_gpt, sample; "
        "assert text.clean_caption('A  Cat') == 'a cat'"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(text.Path(text.__file__).parent)
    )


def test_encoder_features_are_right_aligned_unpadded_t5_outputs(encoder):
    captions = ["a red disc", "A picture of a CAT on a dark background"]
    emb, mask = encoder.encode(captions)
    assert emb.shape == (2, SLOTS, D) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 10]  # words + </s>
    assert (emb[~mask] == 0).all() and mask[:, -1].all()
    for caption, e, m in zip(
        captions, emb, mask
    ):  # equal to encoding the caption alone, without padding
        ids = encoder.tokenizer([text.clean_caption(caption)], return_tensors="pt").input_ids
        alone = encoder.model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(e[m], alone, atol=1e-5, rtol=1e-5)


def test_t5_path_errors(tmp_path, t5_dir):
    pytest.importorskip("transformers")
    with pytest.raises(common.UserError, match="cannot load the text encoder .*nope"):
        text.TextEncoder(tmp_path / "nope")
    with pytest.raises(common.UserError, match="cannot load the text encoder"):
        text.TextEncoder(tmp_path)  # an empty folder


def test_caption_features_files_and_prompt_errors(tmp_path):
    emb = torch.randn(2, 10, D)
    mask = torch.tensor([[1] * 4 + [0] * 6, [1] * 10])  # right-padded, as a tokenizer gives
    torch.save({"emb": emb, "mask": mask}, tmp_path / "c.pt")
    np.savez(tmp_path / "c.npz", emb=emb.numpy(), mask=mask.numpy())
    gpt_config = SimpleNamespace(cls_token_num=SLOTS, caption_dim=D)
    for name in ("c.pt", "c.npz"):  # 10 slots, right-aligned, then padded on the left to 120
        args = caption_args(caption_features=str(tmp_path / name))
        e, m = text.caption_condition(args, gpt_config, "cpu")
        assert e.shape == (2, SLOTS, D) and m.sum().item() == 14 and m[:, -1].all()
        assert torch.equal(e[0, -4:], emb[0, :4]) and (e[0, :-4] == 0).all()
        assert m[0].tolist() == [False] * (SLOTS - 4) + [True] * 4
    torch.save({"emb": emb[1], "mask": mask[1]}, tmp_path / "one.pt")  # one caption (S, D)
    e, m = text.caption_condition(
        caption_args(caption_features=str(tmp_path / "one.pt")), gpt_config, "cpu"
    )
    assert e.shape == (1, SLOTS, D) and torch.equal(e[0, -10:], emb[1]) and m.sum() == 10
    torch.save({"emb": emb}, tmp_path / "bad.pt")
    with pytest.raises(common.UserError, match="'mask'"):
        text.caption_condition(
            caption_args(caption_features=str(tmp_path / "bad.pt")), gpt_config, "cpu"
        )
    args = caption_args(caption_features=str(tmp_path / "c.pt"))
    with pytest.raises(common.UserError, match="caption_dim 2048"):
        text.caption_condition(args, SimpleNamespace(cls_token_num=SLOTS, caption_dim=2048), "cpu")
    with pytest.raises(common.UserError, match="no prompts"):  # an empty --prompt-file
        text.caption_condition(caption_args(prompt=["\n", "  \n"]), gpt_config, "cpu")


# ----------------------------------------------------------------------------------------------
# The JSON-lines store


def test_read_jsonl_and_caption_keys(toy_jsonl, tmp_path):
    records = text.read_jsonl(toy_jsonl.parent)  # a folder of .jsonl files works too
    assert len(records) == 12 and records[0] == (
        toy_jsonl.parent / "000-red-disc/0000.png",
        "a red disc",
    )
    assert records[-1][1] == ""  # no caption
    first = {key: text.read_jsonl(toy_jsonl, key)[0][1] for key in ("llava", "llava_first", "2")}
    assert first["llava"] == "a picture of a red disc on a dark background"
    assert first["2"] == first["llava_first"] == "a picture of a red disc"
    lines = [
        {"image_path": "a.png", "text": "One. Two."},
        {"image_path": "b.png", "text": {"llava": "A cat. On a mat"}},
        {"image_path": "c.png", "text": ["blip only"]},  # no llava entry
        {"image_path": "d.png", "text": 7},
    ]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    captions = [c for _, c in text.read_jsonl(tmp_path / "x.jsonl", "llava", trunc=True)]
    assert captions == ["One", "A cat", "", ""]
    with pytest.raises(common.UserError, match="x.jsonl: ValueError"):  # not a key, not an index
        text.read_jsonl(tmp_path / "x.jsonl", "gpt4")
    (tmp_path / "x.jsonl").write_text('{"text": "no image path"}\n')
    with pytest.raises(common.UserError, match="x.jsonl: KeyError 'image_path'"):
        text.read_jsonl(tmp_path)
    with pytest.raises(common.UserError, match="IsADirectoryError"):  # a folder without .jsonl
        text.read_jsonl(toy_jsonl.parent / "000-red-disc")


def test_store_counts_bad_records_and_matches_the_encoders(store, toy_jsonl, vq_ckpt, encoder):
    path, meta = store
    assert (
        meta["num_images"],
        meta["num_valid"],
        meta["bad_images"],
        meta["missing_captions"],
    ) == (12, 8, 3, 1)
    assert meta["model_type"] == "t2i" and meta["block_size"] == 16 and meta["vocab_size"] == 1024
    feats = (path / "caption_features.f16").stat().st_size
    assert feats == meta["num_tokens"] * D * 2 < 12 * SLOTS * D * 2  # only valid tokens are stored
    ds = text.CaptionCodeDataset(path)
    items = [ds[0, i] for i in range(len(ds))]  # (epoch, index) keys, as common.TrainSampler's
    assert [bool(v) for *_, v in items] == [True] * 8 + [False] * 4
    codes, emb, mask, ok = items[1]
    assert (
        codes.shape == (16,)
        and codes.dtype == torch.int64
        and emb.shape == (SLOTS, D)
        and mask.shape == (SLOTS,)
    )
    want_emb, want_mask = encoder.encode(["a red disc"])
    assert torch.equal(mask, want_mask[0])
    torch.testing.assert_close(emb, want_emb[0], atol=2e-3, rtol=2e-3)  # stored as float16
    image_path = text.read_jsonl(toy_jsonl)[1][0]
    tok = vq.VQModel.from_checkpoint(common.load_checkpoint(vq_ckpt))
    x = data.pil_to_tensor(data.center_crop_arr(data.load_image(image_path), 32))[None]
    assert torch.equal(codes, tok.encode(x)[2])
    bad = items[8]
    assert not bad[3] and (bad[1] == 0).all() and not bad[2].any()
    e, m = ds.captions(3)
    assert e.shape == (3, SLOTS, D) and m.all(0)[-1]


def test_extract_resumes_after_an_interruption(toy_jsonl, vq_ckpt, encoder, store, tmp_path):
    class Flaky:
        """Fails on the third batch, as a killed job would."""

        dim, calls = encoder.dim, 0

        def encode(self, captions):
            Flaky.calls += 1
            if Flaky.calls == 3:
                raise KeyboardInterrupt
            return encoder.encode(captions)

    out = tmp_path / "codes"
    with pytest.raises(KeyboardInterrupt):
        text.extract(extract_args(toy_jsonl, out, vq_ckpt), Flaky())
    assert json.loads((out / "meta.json").read_text())["num_done"] == 6
    with pytest.raises(common.UserError, match="did not finish; rerun it to resume"):
        text.CaptionCodeDataset(out)
    meta = text.extract(extract_args(toy_jsonl, out, vq_ckpt), encoder)
    assert meta["num_tokens"] == store[1]["num_tokens"]
    for name in ("codes.npy", "valid.npy", "caption_lengths.npy", "caption_features.f16"):
        assert (out / name).read_bytes() == (store[0] / name).read_bytes()
    with pytest.raises(common.UserError, match="different.*image_size"):
        text.extract(extract_args(toy_jsonl, out, vq_ckpt, image_size=64), encoder)


# ----------------------------------------------------------------------------------------------
# Training (train_gpt.py on a text.py store) and prompt sampling (sample.py --prompt)


@pytest.fixture(scope="session")
def t2i_run(store, vq_ckpt, tmp_path_factory):
    """5 steps of GPT-tiny on the toy store: 12 records, 4 of them bad, all in every batch of 12."""
    import train_gpt

    root = tmp_path_factory.mktemp("runs")
    argv = [
        "--model",
        "tiny",
        "--code-path",
        str(store[0]),
        "--results-dir",
        str(root),
        "--num-workers",
        "0",
        "--global-batch-size",
        "12",
        "--max-steps",
        "5",
        "--lr",
        "3e-3",
        "--log-every",
        "1",
        "--vq-ckpt",
        str(vq_ckpt),
        "--sample-every",
        "5",
    ]
    return train_gpt.main(train_gpt.parse_args(argv))


def test_train_t2i_skips_and_counts_bad_records(t2i_run):
    logs = [json.loads(line) for line in (t2i_run / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in logs] == [4] * 5
    assert (
        logs[-1]["loss"] < logs[0]["loss"] and abs(logs[0]["loss"] - np.log(1024)) < 1e-3
    )  # zero-init head
    assert (t2i_run / "samples" / "0000005.png").is_file()  # sampled from the data's first captions
    ckpt = common.load_checkpoint(t2i_run / "checkpoints" / "last.pt")
    model = gpt.GPT.from_checkpoint(ckpt)
    assert (model.config.model_type, model.config.cls_token_num, model.config.caption_dim) == (
        "t2i",
        SLOTS,
        D,
    )
    assert torch.equal(
        model.cls_embedding.uncond_embedding, ckpt["model"]["cls_embedding.uncond_embedding"]
    )


def test_prompt_to_image_end_to_end(t2i_run, t5_dir, vq_ckpt):
    """Prompt -> cleaned -> tiny T5 features -> trained tiny t2i GPT (guided) -> tokens -> image."""
    model = gpt.GPT.from_checkpoint(common.load_checkpoint(t2i_run / "checkpoints" / "last.pt"))
    args = caption_args(prompt=["A RED disc!", "a picture of green stripes"], t5_path=t5_dir)
    emb, mask = text.caption_condition(args, model.config, "cpu")
    tokens = gpt.generate(
        model,
        emb,
        cfg_scale=7.5,
        top_k=1000,
        emb_mask=mask,
        generator=torch.Generator().manual_seed(0),
    )
    assert tokens.shape == (2, 16) and 0 <= tokens.min() and tokens.max() < 1024
    images = vq.VQModel.from_checkpoint(common.load_checkpoint(vq_ckpt)).decode_code(tokens)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_sample_py_prompts_and_caption_features(t2i_run, t5_dir, vq_ckpt, tmp_path):
    import sample

    (tmp_path / "prompts.txt").write_text("a picture of green stripes\n\n")
    ckpts = ["--gpt-ckpt", str(t2i_run / "checkpoints" / "last.pt"), "--vq-ckpt", str(vq_ckpt)]
    out = sample.main(
        sample.parse_args(
            [
                *ckpts,
                "--prompt",
                "a red disc",
                "a blue checker",
                "--prompt-file",
                str(tmp_path / "prompts.txt"),
                "--t5-path",
                str(t5_dir),
                "--out",
                str(tmp_path / "p.png"),
            ]
        )
    )
    assert Image.open(out).size == (2 + 3 * 34, 2 + 34)  # 3 images of 32 px in one row
    emb, mask = text.TextEncoder(t5_dir).encode(["a red disc"])
    torch.save({"emb": emb, "mask": mask}, tmp_path / "c.pt")
    args = sample.parse_args(
        [*ckpts, "--caption-features", str(tmp_path / "c.pt"), "--out", str(tmp_path / "c.png")]
    )
    assert Image.open(sample.main(args)).size == (36, 36)
    assert (args.cfg_scale, args.top_k, args.top_p, args.temperature) == (
        7.5,
        1000,
        1.0,
        1.0,
    )  # official t2i
    with pytest.raises(common.UserError, match="is a t2i GPT: text-to-image takes --prompt"):
        sample.main(sample.parse_args([*ckpts, "--labels", "1"]))
    (tmp_path / "empty.txt").write_text("\n")  # a prompt file without prompts: no silent c2i
    with pytest.raises(common.UserError, match="no prompts"):
        sample.main(sample.parse_args([*ckpts, "--prompt-file", str(tmp_path / "empty.txt")]))


def test_sample_py_fetches_the_released_t2i_files(http_server, monkeypatch, tmp_path):
    """No checkpoint + prompts -> peizesun/llamagen_t2i files (served locally, tiny stand-ins)."""
    import sample

    torch.manual_seed(0)
    ds16 = vq.VQConfig.from_name(
        "VQ-tiny", encoder_ch_mult=[1] * 5, decoder_ch_mult=[1] * 5
    )  # downsample 16
    repo = http_server.directory / "peizesun" / "llamagen_t2i" / "resolve" / "main"
    repo.mkdir(parents=True)
    # the GPT in the official container; the VQ in ours (official VQ files are vq.py's presets)
    torch.save(
        {"model": vq.VQModel(ds16).state_dict(), "config": asdict(ds16)}, repo / "vq_ds16_t2i.pt"
    )
    torch.save({"model": tiny_t2i().state_dict()}, repo / "t2i_XL_stage1_256.pt")
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    emb, mask = left_padded_captions(B=1, lengths=(9,))
    torch.save(
        {"emb": emb[:, -20:], "mask": mask[:, -20:]}, tmp_path / "c.pt"
    )  # 20 slots: padded to 120
    out = sample.main(
        sample.parse_args(
            ["--caption-features", str(tmp_path / "c.pt"), "--out", str(tmp_path / "r.png")]
        )
    )
    assert Image.open(out).size == (260, 260)
    assert {p for p, _ in http_server.requests} >= {
        "/peizesun/llamagen_t2i/resolve/main/vq_ds16_t2i.pt",
        "/peizesun/llamagen_t2i/resolve/main/t2i_XL_stage1_256.pt",
    }


def test_sample_py_without_transformers(monkeypatch, capsys, t2i_run, vq_ckpt):
    import sample

    monkeypatch.setitem(sys.modules, "transformers", None)
    argv = [
        "--gpt-ckpt",
        str(t2i_run / "checkpoints" / "last.pt"),
        "--vq-ckpt",
        str(vq_ckpt),
        "--prompt",
        "a cat",
    ]
    with pytest.raises(SystemExit) as exit_info:
        common.cli(sample.main, lambda: sample.parse_args(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install transformers sentencepiece" in err and "google/flan-t5-xl" in err
