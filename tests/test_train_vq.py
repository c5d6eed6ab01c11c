"""Tests for train_vq.py: LPIPS (layout, gradients, download), PatchGAN, GAN losses, a few-step run,
exact resume (bare: the saved run's flags), the log after a resume, --no-flip, bad images, the
offline error and the one-line errors.

    python -m pytest tests/test_train_vq.py -q
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import data
import train_vq
from common import UserError
from train_vq import LPIPS, LPIPS_CHANNELS, PatchGANDiscriminator, main, parse_args
from vq import VQModel


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
ROOT = Path(__file__).resolve().parents[1]


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


def random_lpips():
    """LPIPS with random trunk weights and positive heads (as the real ones)."""
    lpips = LPIPS(pretrained=False)
    lpips.load_state_dict({**fake_vgg(classifier=False), **heads()})
    return lpips


def test_lpips_zero_for_identical_positive_otherwise_and_differentiable():
    torch.manual_seed(0)
    lpips = random_lpips()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0  # reaches the input
    assert not any(p.requires_grad for p in lpips.parameters())  # trunk and heads frozen
    assert not any(m.training for m in lpips.modules())  # built in eval: no dropout noise
    assert torch.equal(lpips(x, y.detach()), lpips(x, y.detach()))


def heads(channels=LPIPS_CHANNELS, conv=1):
    return {f"lin{k}.model.{conv}.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(channels)}


def fake_vgg(classifier=True):
    """A torchvision-style VGG16 state dict (features.{i}.*) of random numbers."""
    trunk = LPIPS(pretrained=False).features.state_dict()  # "5.weight" is features.5.weight
    vgg = {"features." + k: torch.randn(v.shape) * 0.1 for k, v in trunk.items()}
    return {**vgg, "classifier.0.weight": torch.randn(8, 8)} if classifier else vgg


def test_lpips_keys_are_the_official_files_keys():
    lpips = LPIPS(pretrained=False)
    vgg, lin = fake_vgg(classifier=False), heads()
    # the 13 convs of torchvision's vgg16().features and the five official heads, nothing else
    assert set(lpips.state_dict()) == set(vgg) | set(lin) and len(vgg) == 26
    convs = [i for i, m in enumerate(lpips.features) if isinstance(m, torch.nn.Conv2d)]
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's indices
    lpips.load_state_dict({**vgg, **lin})  # strict
    assert torch.equal(lpips.lin3.model[1].weight, lin["lin3.model.1.weight"])
    assert torch.equal(lpips.features[17].bias, vgg["features.17.bias"])


def test_lpips_rejects_wrong_files(monkeypatch):
    vgg = fake_vgg(classifier=False)
    for weights, words in (
        ({**vgg, **heads(conv=0)}, "lin0.model.1.weight"),  # no dropout: the conv is model.0
        ({**vgg, **heads(LPIPS_CHANNELS[:4])}, "lin4.model.1.weight"),  # a head missing
        (heads(), "VGG16.*features.0.weight"),  # the lin file alone, no trunk
        ({**fake_vgg(), **heads()}, "classifier.0.weight"),  # the whole VGG file: only features
        (
            {**vgg, "features.28.weight": torch.zeros(512, 512, 1, 1), **heads()},
            "size mismatch for features.28.weight",
        ),
    ):
        monkeypatch.setattr(train_vq, "fetch_lpips_weights", lambda: weights)
        with pytest.raises(UserError, match=words) as e:
            LPIPS()
        assert "--perceptual-weight 0" in str(e.value) and "\n" not in str(e.value)


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
    monkeypatch.setattr(train_vq, "LIN_URL", f"{http_server.url}/vgg.pth")
    monkeypatch.setattr(train_vq, "LIN_SHA256", hashlib.sha256(lin_bytes).hexdigest())
    lpips = LPIPS()
    cache = common.cache_dir()
    assert sorted(p.name for p in cache.iterdir()) == [
        "lpips_vgg_v0.1.pth",
        train_vq.VGG16_FEATURES_FILE,
    ]  # the full VGG file is gone
    kept = common.load_checkpoint(cache / train_vq.VGG16_FEATURES_FILE)
    assert set(kept) == {k for k in vgg if k.startswith("features.")} and len(kept) == 26
    assert torch.equal(lpips.features[5].weight, vgg["features.5.weight"])
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


@pytest.fixture
def fake_lpips_files():
    """LPIPS weights of random numbers (positive heads) where the download puts them: in the
    cache, so nothing is downloaded."""
    cache = common.cache_dir()
    common.save_checkpoint(fake_vgg(classifier=False), cache / train_vq.VGG16_FEATURES_FILE)
    common.save_checkpoint(heads(), cache / train_vq.LIN_FILE)


def test_few_step_run_writes_checkpoint_log_grid(toy_folder, tmp_path, fake_lpips_files, capsys):
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
    # the start-up line names the run folder and where it runs, before the first step
    first_line = capsys.readouterr().out.splitlines()[0]
    assert str(run_dir) in first_line and "process(es)" in first_line and "thread" in first_line
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


def test_bare_resume_matches_uninterrupted_run(toy_folder, tmp_path, capsys):
    # non-default flags that a bare --resume must take from the checkpoint
    flags = ("--disc-start", "1", "--ema", "--perceptual-weight", "0", "--sample-every", "0")
    flags += ("--lr", "3e-4", "--global-seed", "5", "--no-flip", "--ckpt-every", "2")
    straight = main(run_args(toy_folder, tmp_path / "a", "--max-steps", "4", *flags))
    first = main(run_args(toy_folder, tmp_path / "b", "--max-steps", "3", *flags))
    capsys.readouterr()
    # killed after step 3, resumed from step 2: only the step budget given again
    resume = ["--resume", str(first / "checkpoints" / "0000002.pt"), "--max-steps", "4"]
    resumed = main(parse_args(["--data-path", str(toy_folder), *resume]))
    assert resumed == first  # continues in the same run directory
    assert "max_steps 3 -> 4" in capsys.readouterr().out  # the start-up line says what changed
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert b["step"] == a["step"] == 4 and b["ema"] is not None  # the EMA survives
    assert {k: v for k, v in b["args"].items() if k not in ("resume", "results_dir")} == {
        k: v for k, v in a["args"].items() if k not in ("resume", "results_dir")
    }  # the saved run's flags: preset, lr, seed, EMA, no flip, workers
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
    # each step once in the log: the killed run's step 3 was dropped, then logged again
    assert losses(read_log(resumed)) == losses(read_log(straight))


def test_two_processes_resume_exactly(toy_folder, tmp_path):
    """torchrun --nproc_per_node=2 (DDP, gloo on the CPU): a bare resume of a killed run ends
    where the uninterrupted one does, bit for bit."""

    def torchrun(*flags):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
        cmd += ["train_vq.py", "--data-path", str(toy_folder), "--num-workers", "0", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]

    flags = ("--model", "tiny", "--image-size", "32", "--global-batch-size", "4", "--ema")
    flags += ("--perceptual-weight", "0", "--disc-start", "1", "--sample-every", "0")
    torchrun(*flags, "--max-steps", "3", "--results-dir", str(tmp_path / "a"))
    torchrun(*flags, "--max-steps", "2", "--results-dir", str(tmp_path / "b"))
    torchrun("--resume", str(tmp_path / "b/000-VQ-tiny/checkpoints/last.pt"), "--max-steps", "3")
    a, b = (common.load_checkpoint(tmp_path / f"{r}/000-VQ-tiny/checkpoints/last.pt") for r in "ab")
    assert b["step"] == 3 and len(b["rng"]) == 2  # every rank's RNG
    for key in ("model", "ema", "discriminator"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def run_cli(argv, capsys):
    """train_vq.py as from the shell -> (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        common.cli(main, lambda: parse_args(argv))
    return e.value.code, capsys.readouterr().err


def test_resume_refuses_changed_flags_and_other_checkpoints(toy_folder, tmp_path, capsys):
    run = main(run_args(toy_folder, tmp_path, "--max-steps", "1", "--perceptual-weight", "0"))
    ckpt = str(run / "checkpoints" / "last.pt")
    capsys.readouterr()  # the run's progress bar
    for extra, words in (
        (["--global-batch-size", "8"], "--global-batch-size 8 differs"),
        (["--lr", "1e-3"], "--lr 0.001 differs"),
        (["--finetune", ckpt], "--finetune"),
    ):
        code, err = run_cli(["--data-path", str(toy_folder), "--resume", ckpt, *extra], capsys)
        assert code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1
    vq_only = common.save_checkpoint({"model": torch.load(ckpt)["model"]}, tmp_path / "vq.pt")
    code, err = run_cli(["--data-path", str(toy_folder), "--resume", str(vq_only)], capsys)
    assert code == 2 and "was not written by train_vq.py" in err and err.count("\n") == 1
    assert [r["step"] for r in read_log(run)] == [1]  # nothing run, nothing lost


def test_no_flip_crops_without_mirroring(toy_folder, tmp_path, monkeypatch):
    flipped = data.ImageFolder(toy_folder, 16, "random", seed=3)
    crops = data.ImageFolder(toy_folder, 16, "crop", seed=3)
    mirrored = 0
    for key in [(epoch, i) for epoch in range(2) for i in range(len(crops))]:
        a, b = crops[key][0], flipped[key][0]  # the same crop; "random" mirrors half of them
        mirrored += not torch.equal(a, b)
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    assert 0 < mirrored < 2 * len(crops)
    seen = []
    monkeypatch.setattr(data, "ImageFolder", lambda *a: seen.append(a[2]) or flipped)
    args = ("--max-steps", "1", "--perceptual-weight", "0")
    run = main(run_args(toy_folder, tmp_path / "a", *args, "--no-flip"))
    main(run_args(toy_folder, tmp_path / "b", *args))
    assert seen == ["crop", "random"]
    assert common.load_checkpoint(run / "checkpoints" / "last.pt")["args"]["no_flip"] is True


def test_help_shows_defaults_and_workers_follow_the_machine(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 256)" in out and "(default: VQ-16)" in out and "(default: hinge)" in out
    assert parse_args(["--data-path", "x"]).num_workers == common.NUM_WORKERS


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
