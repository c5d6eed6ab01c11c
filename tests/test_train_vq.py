"""Tests for train_vq.py: LPIPS (layout, gradients, download), PatchGAN, GAN losses, a few-step run,
exact resume, bad images, and the offline error.

    python -m pytest tests/test_train_vq.py -q
"""

import hashlib
import json
import math
import shutil
from functools import partial

import pytest
import torch

import common
import train_vq
from common import UserError
from train_vq import LPIPS, LPIPS_CHANNELS, PatchGANDiscriminator, main, parse_args
from vq import VQModel


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def softplus(v):
    return math.log1p(math.exp(v))


def run_args(toy_folder, results, *extra):
    return parse_args(
        [
            "--model",
            "tiny",
            "--data-path",
            str(toy_folder),
            "--image-size",
            "32",
            "--global-batch-size",
            "4",
            "--num-workers",
            "0",
            "--results-dir",
            str(results),
            "--log-every",
            "1",
            *extra,
        ]
    )


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- LPIPS


def test_lpips_zero_for_identical_positive_otherwise_and_differentiable():
    torch.manual_seed(0)
    lpips = LPIPS(pretrained=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0  # reaches the input
    assert not any(p.requires_grad for p in lpips.parameters())  # trunk and heads frozen
    lpips.train()  # stays in eval: no dropout noise (the official trainer re-enables it)
    assert not any(m.training for m in lpips.modules())
    assert torch.equal(lpips(x, y.detach()), lpips(x, y.detach()))


def heads(channels=LPIPS_CHANNELS, conv=1):
    return {f"lin{k}.model.{conv}.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(channels)}


def fake_vgg(classifier=True):
    """A torchvision-style VGG16 state dict (features.{i}.*) of random numbers."""
    trunk = LPIPS(pretrained=False).net.state_dict()  # "slice2.5.weight" is features.5.weight
    vgg = {"features." + k.split(".", 1)[1]: torch.randn(v.shape) for k, v in trunk.items()}
    return {**vgg, "classifier.0.weight": torch.randn(8, 8)} if classifier else vgg


def test_lpips_official_key_layout_loads_strictly():
    lpips = LPIPS(pretrained=False)
    keys = set(lpips.state_dict())
    assert {
        "scaling_layer.shift",
        "scaling_layer.scale",
        "net.slice1.0.weight",
        "net.slice2.5.weight",
        "net.slice3.10.weight",
        "net.slice4.17.weight",
        "net.slice5.28.bias",
    } <= keys
    lin = heads()
    assert {k for k in keys if k.startswith("lin")} == set(lin)
    official = {**LPIPS(pretrained=False).state_dict(), **lin}
    lpips.load_state_dict(official, strict=True)
    vgg = fake_vgg(classifier=False)
    lpips.load_weights(vgg, lin)
    assert torch.equal(lpips.lin3.model[1].weight, lin["lin3.model.1.weight"])
    assert torch.equal(lpips.net.slice4.get_submodule("17").bias, vgg["features.17.bias"])


def test_lpips_rejects_wrong_files():
    lpips, vgg = LPIPS(pretrained=False), fake_vgg(classifier=False)
    with pytest.raises(UserError, match="lin0.model.1.weight"):
        lpips.load_weights(vgg, heads(conv=0))  # no dropout: the conv is model.0
    with pytest.raises(UserError, match="lin4.model.1.weight"):
        lpips.load_weights(vgg, heads(LPIPS_CHANNELS[:4]))  # a head missing
    with pytest.raises(UserError, match="VGG16.*net.slice1.0.weight"):
        lpips.load_weights(heads(), heads())  # the lin file passed as the trunk
    wide = {**vgg, "features.28.weight": torch.zeros(512, 512, 1, 1)}
    with pytest.raises(UserError, match="size mismatch for net.slice5.28.weight"):
        lpips.load_weights(wide, heads())


def test_lpips_download_keeps_only_conv_weights(http_server, monkeypatch):
    torch.manual_seed(0)
    vgg = fake_vgg()  # with a classifier, which is dropped
    tmp = common.save_checkpoint(vgg, http_server.directory / "tmp.pth")
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    vgg_name = f"vgg16-{sha[:8]}.pth"  # torchvision style: the name carries the sha256 prefix
    tmp.rename(http_server.directory / vgg_name)
    lin = heads()
    lin_bytes = common.save_checkpoint(lin, http_server.directory / "vgg.pth").read_bytes()
    monkeypatch.setattr(train_vq, "VGG16_URL", f"{http_server.url}/{vgg_name}")
    monkeypatch.setattr(train_vq, "VGG16_SHA256", sha[:8])
    monkeypatch.setattr(
        train_vq,
        "LIN_WEIGHTS",
        dict(
            url=f"{http_server.url}/vgg.pth",
            filename="lpips_vgg_v0.1.pth",
            sha256=hashlib.sha256(lin_bytes).hexdigest(),
            size=len(lin_bytes),
        ),
    )
    lpips = LPIPS()
    cache = common.cache_dir()
    assert sorted(p.name for p in cache.iterdir()) == [
        "lpips_vgg_v0.1.pth",
        train_vq.VGG16_FEATURES_FILE,
    ]  # the full VGG file is gone
    kept = common.load_checkpoint(cache / train_vq.VGG16_FEATURES_FILE)
    assert set(kept) == {k for k in vgg if k.startswith("features.")} and len(kept) == 26
    assert torch.equal(lpips.net.slice2.get_submodule("5").weight, vgg["features.5.weight"])
    assert torch.equal(lpips.lin4.model[1].weight, lin["lin4.model.1.weight"])
    n = len(http_server.requests)
    LPIPS()  # cached: no new request
    assert len(http_server.requests) == n

    # a VGG file whose sha256 does not start with the digits in its name
    (cache / train_vq.VGG16_FEATURES_FILE).unlink()
    (http_server.directory / vgg_name).write_bytes(b"not the weights")
    with pytest.raises(UserError, match="sha256"):
        LPIPS()
    assert not any(cache.glob("vgg16-*"))  # nothing unverified left in the cache


# ------------------------------------------------------------------------ PatchGAN and GAN losses


def test_patchgan_shapes_params_and_init():
    torch.manual_seed(0)
    disc = PatchGANDiscriminator()
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert disc(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    bn = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 3 and all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bn)
    assert abs(disc.main[0].weight.std().item() - 0.02) < 0.002


def test_gan_losses_closed_form():
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.5, -3.0])
    # hinge: relu(1 - real) = [0, 1.5], relu(1 + fake) = [1.5, 0]
    assert train_vq.DISC_LOSSES["hinge"](real, fake).item() == pytest.approx(0.5 * (0.75 + 0.75))
    sp_real = (softplus(-2.0) + softplus(0.5)) / 2  # mean softplus(-real)
    sp_fake = (softplus(0.5) + softplus(-3.0)) / 2  # mean softplus(fake)
    assert train_vq.DISC_LOSSES["vanilla"](real, fake).item() == pytest.approx(
        0.5 * (sp_real + sp_fake), rel=1e-6
    )
    assert train_vq.DISC_LOSSES["non-saturating"](real, fake).item() == pytest.approx(
        sp_real + sp_fake, rel=1e-6
    )
    assert train_vq.GEN_LOSSES["hinge"](fake).item() == pytest.approx(1.25)
    assert train_vq.GEN_LOSSES["non-saturating"](fake).item() == pytest.approx(
        (softplus(-0.5) + softplus(3.0)) / 2, rel=1e-6
    )


def test_adaptive_weight_ratio_and_clamp():
    w = torch.ones(3, requires_grad=True)
    nll, g = (3 * w).sum(), (w * 0.5).sum()  # gradients 3 and 0.5 per element
    assert train_vq.adaptive_weight(nll, g, w).item() == pytest.approx(
        3 / (0.5 + 1e-4 / 3**0.5), rel=1e-5
    )
    assert train_vq.adaptive_weight(nll, 0 * w.sum(), w).item() == 1e4


# ----------------------------------------------------------------------------- training runs


def test_few_step_run_writes_checkpoint_log_grid(toy_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(
        train_vq, "LPIPS", partial(LPIPS, pretrained=False)
    )  # perceptual term on, no download
    run_dir = main(
        run_args(
            toy_folder,
            tmp_path,
            "--max-steps",
            "3",
            "--disc-start",
            "2",
            "--ema",
            "--disc-adaptive-weight",
            "--sample-every",
            "2",
            "--ckpt-every",
            "2",
        )
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "0000002.pt",
        "0000003.pt",
        "last.pt",
    ]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["0000002.png", "0000003.png"]
    log = read_log(run_dir)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[0]["gen_adv_loss"] == 0 and log[0]["disc_loss"] == 0  # before --disc-start
    assert (
        log[2]["disc_loss"] > 0 and log[2]["adaptive_weight"] != 1 and log[2]["perceptual_loss"] > 0
    )
    assert 0 < log[2]["codebook_usage"] <= 1 and log[2]["bad_images"] == 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (
        ckpt["step"] == 3
        and ckpt["config"]["codebook_size"] == 1024
        and ckpt["args"]["image_size"] == 32
    )
    model = VQModel.from_checkpoint(common.load_checkpoint(run_dir / "checkpoints" / "last.pt"))
    assert all(
        torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items()
    )  # prefers the EMA
    assert model.encode(torch.zeros(1, 3, 32, 32))[2].shape == (16,)


def flat(obj, prefix=""):
    """Every tensor / number in a nested checkpoint, keyed by path."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}{i}/").items()}
    return {prefix: obj} if isinstance(obj, (torch.Tensor, int, float)) else {}


def test_resume_matches_uninterrupted_run(toy_folder, tmp_path):
    common = ("--disc-start", "1", "--ema", "--perceptual-weight", "0", "--sample-every", "0")
    straight = main(run_args(toy_folder, tmp_path / "a", "--max-steps", "4", *common))
    first = main(run_args(toy_folder, tmp_path / "b", "--max-steps", "2", *common))
    resumed = main(
        run_args(
            toy_folder,
            tmp_path / "b",
            "--max-steps",
            "4",
            *common,
            "--resume",
            str(first / "checkpoints" / "last.pt"),
        )
    )
    assert resumed == first  # continues in the same run directory
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert b["step"] == a["step"] == 4
    for key in ("model", "ema", "discriminator", "optimizer", "optimizer_disc", "rng"):
        fa, fb = flat(a[key]), flat(b[key])
        assert fa.keys() == fb.keys() and len(fa) > 0
        for k in fa:
            assert torch.equal(torch.as_tensor(fa[k]), torch.as_tensor(fb[k])), f"{key}/{k}"
    mid = torch.load(first / "checkpoints" / "0000002.pt", weights_only=True)
    for net, key in (("discriminator", "main.0.weight"), ("model", "decoder.conv_out.weight")):
        assert not torch.equal(mid[net][key], b[net][key])  # both nets did train after the resume
    losses = lambda log: [
        (r["step"], r["gen_loss"], r["disc_loss"], r["codebook_usage"]) for r in log
    ]
    assert losses(read_log(resumed)) == losses(read_log(straight))


def test_bad_images_are_dropped_and_counted(toy_folder, tmp_path):
    folder = tmp_path / "imgs" / "only"
    folder.mkdir(parents=True)
    for src in sorted(toy_folder.rglob("*.png"))[:3]:
        shutil.copy(src, folder / src.name)
    (folder / "broken.png").write_bytes(b"not a png")
    args = run_args(
        tmp_path / "imgs", tmp_path / "r", "--max-steps", "1", "--perceptual-weight", "0"
    )
    with pytest.raises(UserError, match="broken.png"):
        main(args)
    args.skip_bad_images = True
    log = read_log(main(args))
    assert log[0]["bad_images"] == 1 and math.isfinite(log[0]["gen_loss"])


def test_offline_without_cached_lpips_stops_before_first_step(toy_folder, tmp_path):
    with pytest.raises(UserError) as e:
        main(run_args(toy_folder, tmp_path / "results", "--max-steps", "1"))
    msg = str(e.value)
    assert (
        "--perceptual-weight 0" in msg
        and "vgg16-397923af.pth" in msg
        and "lpips_vgg_v0.1.pth" in msg
    )
    assert str(common.cache_dir()) in msg and "\n" not in msg
    assert not (tmp_path / "results").exists()  # nothing written: no step was taken


def test_model_flag_names_and_errors(toy_folder, tmp_path, capsys):
    args = ["--data-path", str(toy_folder)]
    assert parse_args(["--model", "tiny", *args]).model == "VQ-tiny"
    assert parse_args(["--vq-model", "VQ-8", *args]).model == "VQ-8"  # the official flag name
    with pytest.raises(SystemExit):
        parse_args(["--model", "VQ-99", *args])
    err = capsys.readouterr().err
    assert "unknown preset 'VQ-99'" in err and "VQ-VQ" not in err
    with pytest.raises(UserError, match="multiple of 8"):
        main(run_args(toy_folder, tmp_path, "--image-size", "36", "--perceptual-weight", "0"))
    gpt = common.save_checkpoint(
        {"model": {"tok_embeddings.weight": torch.zeros(2)}}, tmp_path / "g"
    )
    with pytest.raises(UserError, match="not a VQ tokenizer"):
        main(run_args(toy_folder, tmp_path, "--finetune", str(gpt), "--perceptual-weight", "0"))
    assert not list(tmp_path.glob("*/log.jsonl"))  # no run started
