"""Tests for vq.py: official key manifests, shapes, straight-through gradients, codebook usage,
checkpoint loading, a PIL round trip, and the official reference outputs.

    python -m pytest tests/test_vq.py -q
"""

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import data
from vq import VQ_CONFIGS, VQConfig, VQModel

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = Path(__file__).resolve().parent / "data" / "checkpoints"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "reference"


def meta_model(name: str) -> VQModel:
    with torch.device("meta"):
        return VQModel(VQConfig.from_name(name))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return VQModel(VQConfig.from_name("VQ-tiny"))


def read_manifest(path: Path):
    lines = path.read_text().splitlines()
    entries = [line.split("\t") for line in lines[1:]]
    return lines[0], [(name, tuple(int(s) for s in shape.split(","))) for name, shape, _ in entries]


# ----------------------------------------------------------------------------- config and keys


def test_preset_names():
    assert VQConfig.from_name("VQ-16") == VQConfig()
    assert (
        VQConfig.from_name("VQ-tiny").downsample == 8 and VQConfig.from_name("VQ-8").downsample == 8
    )
    assert VQConfig.from_name("VQ-16").downsample == 16
    assert VQConfig.from_name("VQ-16", codebook_size=4096).codebook_size == 4096
    # None: the decoder mirrors the encoder (test_official_manifest checks VQ-8's layers); a given
    # decoder_ch_mult is used: this decoder starts at 128 * 2 channels, the encoder ends at 128
    assert VQConfig.from_name("VQ-8").decoder_ch_mult is None
    with torch.device("meta"):
        asymmetric = VQModel(VQConfig(encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 2]))
    assert asymmetric.decoder.conv_in.out_channels == 256
    assert asymmetric.encoder.conv_out.in_channels == 128
    with pytest.raises(KeyError):  # exact names only: "16" -> "VQ-16" is common.preset's job
        VQConfig.from_name("16")
    assert common.preset(VQ_CONFIGS, "16") == "VQ-16"


@pytest.mark.parametrize("name,manifest", [("VQ-16", "vq_ds16.txt"), ("VQ-8", "vq_ds8.txt")])
def test_official_manifest(name, manifest):
    header, want = read_manifest(MANIFESTS / manifest)
    model = meta_model(name)
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == want  # same keys, shapes and order
    assert f"entries={len(want)}" in header
    assert f"parameter elements={sum(p.numel() for p in model.parameters())}" in header
    assert [k for k, _ in model.named_buffers()] == ["quantize.codebook_used"]
    official = {k: torch.empty(shape, device="meta") for k, shape in want}
    model.load_state_dict(official, strict=True)


def test_parameter_counts():
    counts = {
        name: sum(p.numel() for p in meta_model(name).parameters()) for name in ("VQ-16", "VQ-8")
    }
    assert counts == {"VQ-16": 71_883_403, "VQ-8": 70_109_835}
    m16 = meta_model("VQ-16")  # encoder / decoder split from the spec (a.9)
    assert sum(p.numel() for p in m16.encoder.parameters()) == 29_298_176
    assert sum(p.numel() for p in m16.decoder.parameters()) == 42_449_795


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", list(VQ_CONFIGS))
@pytest.mark.parametrize("size", [256, 384, 512])
def test_shapes_meta(name, size):
    model, ds = meta_model(name).eval(), VQConfig.from_name(name).downsample
    quant, losses, indices = model.encode(torch.empty(2, 3, size, size, device="meta"))
    h = size // ds
    assert (
        quant.shape == (2, 8, h, h)
        and indices.shape == (2 * h * h,)
        and indices.dtype == torch.long
    )
    assert losses == (None, None, None, None)  # eval: no losses
    assert model.decode(quant).shape == (2, 3, size, size)


@pytest.mark.parametrize("size", [256, 384, 512])
def test_tiny_real_forward(tiny, size):
    tiny.eval()
    with torch.no_grad():
        quant, _, indices = tiny.encode(torch.rand(1, 3, size, size) * 2 - 1)
        h = size // 8
        assert quant.shape == (1, 8, h, h) and indices.shape == (h * h,)
        assert 0 <= indices.min() and indices.max() < tiny.config.codebook_size
        assert tiny.decode(quant).shape == (1, 3, size, size)


def test_non_square_and_raster_order(tiny):
    tiny.eval()
    x = torch.rand(2, 3, 32, 64) * 2 - 1
    with torch.no_grad():
        quant, _, indices = tiny.encode(x)  # (2, 8, 4, 8)
        z = torch.nn.functional.normalize(tiny.quant_conv(tiny.encoder(x)), dim=1)
        sims = torch.einsum("bchw,kc->bhwk", z, tiny.quantize.codebook())
        assert torch.equal(indices, sims.argmax(-1).reshape(-1))  # (b, h, w) raster order
        ref = tiny.decode(quant)
        for codes in (indices, indices.view(2, 32), indices.view(2, 4, 8)):
            shape = (2, 8, 4, 8) if codes.ndim < 3 else None
            assert torch.allclose(tiny.decode_code(codes, shape), ref, atol=1e-5)


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="not a multiple of 16"):  # would come back as 256
        meta_model("VQ-16").encode(torch.empty(1, 3, 250, 250, device="meta"))
    with pytest.raises(RuntimeError, match="channels"):  # torch names the 4 channels
        tiny.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="must lie in"):
        tiny.decode_code(torch.full((1, 16), 1024))
    with pytest.raises(ValueError, match="must lie in"):
        tiny.decode_code(torch.full((1, 16), -1))
    with pytest.raises(RuntimeError, match="invalid for input of size"):  # 15 do not fill 4x4
        tiny.decode_code(torch.zeros(15, dtype=torch.long), (1, 8, 4, 4))
    with pytest.raises(RuntimeError):  # 15 tokens are no square grid
        tiny.decode_code(torch.zeros(1, 15, dtype=torch.long))


# ----------------------------------------------------------------------------- training behaviour


def test_straight_through_gradients(tiny, monkeypatch):
    monkeypatch.setattr("vq.entropy_loss_fn", lambda *a: pytest.fail("entropy computed at ratio 0"))
    tiny.train()
    rec, (vq_loss, commit_loss, entropy_loss, usage) = tiny(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert entropy_loss.item() == 0.0  # entropy_loss_ratio 0: skipped
    rec.pow(2).mean().backward(
        retain_graph=True
    )  # reconstruction alone reaches the encoder via the STE
    assert tiny.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tiny.quantize.embedding.weight.grad is None  # ... but not the codebook
    (vq_loss + commit_loss).backward()
    assert tiny.quantize.embedding.weight.grad.abs().sum() > 0
    assert 0 < usage <= 1


def test_entropy_loss_when_on():
    torch.manual_seed(0)
    model = VQModel(VQConfig.from_name("VQ-tiny", entropy_loss_ratio=0.1)).train()
    entropy_loss = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)[1][2]
    assert entropy_loss.requires_grad and entropy_loss.item() != 0.0


def assigned(quantizer, codes: torch.Tensor) -> torch.Tensor:
    """Encoder outputs (1, C, 1, N) that quantize exactly to `codes`."""
    return quantizer.codebook()[codes].t().reshape(1, -1, 1, len(codes)).detach()


def test_codebook_usage():
    torch.manual_seed(0)
    q = VQModel(VQConfig.from_name("VQ-tiny", codebook_size=16, ch=32)).quantize.train()
    assert (q.codebook_used == -1).all()  # nothing seen yet
    _, losses, idx = q(assigned(q, torch.tensor([3, 5, 5, 7])))
    assert idx.tolist() == [3, 5, 5, 7] and losses[3] == 3 / 16  # code 0 not counted
    _, losses, _ = q(assigned(q, torch.tensor([1] * 100)))
    assert losses[3] == 4 / 16
    # more tokens than the ring holds: only the last 65,536 count
    codes = torch.cat([torch.full((4464,), 9), torch.tensor([2, 4]).repeat(32768)])
    _, losses, _ = q(assigned(q, codes))
    assert losses[3] == 2 / 16 and set(q.codebook_used.tolist()) == {2.0, 4.0}
    q.eval()
    assert q(assigned(q, codes[:4]))[1] == (None, None, None, None)


# ----------------------------------------------------------------------------- checkpoints and PIL


def test_checkpoint_round_trip(tiny, tmp_path):
    torch.manual_seed(1)
    ema = VQModel(tiny.config)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    ours = {"model": tiny.state_dict(), "ema": ema.state_dict(), "config": asdict(tiny.config)}
    path = common.save_checkpoint({**ours, "step": 3}, tmp_path / "ours.pt")
    with torch.no_grad():
        want_model, want_ema = tiny.eval()(x)[0], ema.eval()(x)[0]
        loaded = VQModel.from_checkpoint(common.load_checkpoint(path))
        assert not loaded.training and torch.equal(loaded(x)[0], want_ema)  # ema preferred
        trained = VQModel.from_checkpoint(common.load_checkpoint(path), prefer_ema=False)
        assert torch.equal(trained(x)[0], want_model)
        no_ema = VQModel.from_checkpoint({**ours, "ema": None})  # a run without --ema
        assert torch.equal(no_ema(x)[0], want_model)
        for official in ({"model": tiny.state_dict()}, {"state_dict": tiny.state_dict()}):
            loaded = VQModel.from_checkpoint(official)  # config read off the keys and shapes
            assert loaded.config == tiny.config and torch.equal(loaded(x)[0], want_model)


def test_infer_official_presets():
    wider = VQConfig.from_name("VQ-8", codebook_size=4096, codebook_embed_dim=16)
    for config in (VQConfig.from_name("VQ-16"), VQConfig.from_name("VQ-8"), wider):
        with torch.device("meta"):
            sd = VQModel(config).state_dict()
            assert VQModel.from_checkpoint({"model": sd}).config == config


def test_checkpoint_errors(tiny):
    sd = tiny.state_dict()
    gpt = {"model": {"tok_embeddings.weight": torch.zeros(4, 4)}, "vq_config": {}}
    for wrong_kind in (gpt, {"foo": 1}):
        with pytest.raises(ValueError, match="not a VQ tokenizer"):
            VQModel.from_checkpoint(wrong_kind)
    broken = {k: v for k, v in sd.items() if k != "post_quant_conv.bias"}
    with pytest.raises(ValueError, match="Missing key.*post_quant_conv.bias"):
        VQModel.from_checkpoint({"model": broken})
    with pytest.raises(ValueError, match="Unexpected key.*extra"):
        VQModel.from_checkpoint({"model": {**sd, "extra": torch.zeros(1)}})
    config = asdict(VQConfig.from_name("VQ-tiny", codebook_size=512))
    with pytest.raises(ValueError, match="size mismatch for quantize.embedding.weight") as e:
        VQModel.from_checkpoint({"model": sd, "config": config})
    assert "\n" not in str(e.value)  # one line


def images_to_codes(model, images) -> torch.Tensor:
    """List of same-size PIL images -> codes (B, h*w) long, raster order."""
    x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))) for im in images])
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
    return model.encode(x)[2].view(len(images), -1)


def codes_to_images(model, codes, grid) -> list:
    """Codes (B, h*w) -> PIL images, quantised as the official samplers (data.to_uint8)."""
    from PIL import Image

    x = data.to_uint8(model.decode_code(codes.reshape(len(codes), *grid)))  # (B, H, W, 3)
    return [Image.fromarray(im.numpy(), "RGB") for im in x]


@torch.no_grad()
def test_pil_round_trip(tiny):
    Image = pytest.importorskip("PIL.Image")
    tiny.eval()
    images = [Image.new("RGB", (64, 32), color) for color in ("red", "navy")]
    codes = images_to_codes(tiny, images)
    assert codes.shape == (2, 32) and codes.dtype == torch.long
    out = codes_to_images(tiny, codes, grid=(4, 8))
    assert [im.size for im in out] == [(64, 32)] * 2 and out[0].mode == "RGB"
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 32, 64)
    assert torch.equal(codes[:1], tiny.encode(red)[2].view(1, -1))


# --------------------------------------------------------------------- official reference outputs


@pytest.mark.skipif(
    not (REFERENCE / "check.py").exists(), reason="shared/spec/reference not present"
)
def test_official_reference_outputs(tmp_path):
    (tmp_path / "vq.py").symlink_to(
        ROOT / "vq.py"
    )  # only vq.py on the path: the gpt part fails fast
    out = subprocess.run(
        [sys.executable, str(REFERENCE / "check.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    lines = [
        line
        for line in out.splitlines()
        if line.split()[1:2] and line.split()[1] in ("vq", "check_vq")
    ]
    assert len(lines) == 7 and all(line.startswith("PASS") for line in lines), out
