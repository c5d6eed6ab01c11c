"""Tests for fid.py: the FID Inception, TF1 resize, Frechet distance, IS, precision/recall, CLI.

    python -m pytest tests/test_fid.py -q

Every network here has random weights (no download). tests/data/fid_pytorch_fid_reference.pt holds
pytorch-fid 0.3.0's outputs for the weights of `random_fid_weights(seed=0)`; regenerate it with
pytorch-fid + torchvision installed (a throwaway venv, not a project dependency):

    python tests/test_fid.py --make-reference
"""

import dataclasses
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(__file__).parent / "data" / "fid_pytorch_fid_reference.pt"
pytestmark = __import__("pytest").mark.filterwarnings(
    "ignore:.*sha256"
)  # random weights never match


def random_fid_weights(shapes: dict, seed: int = 0) -> dict:
    """Seeded random weights in the official layout (keys in sorted order, one draw each, He-init
    convs). The reference file records the checksum of the weights it was made with, so a change
    to this recipe fails test_matches_pytorch_fid instead of silently comparing other weights."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("running_var"):  # positive BN variances
            sd[name] = torch.rand(shape, generator=g) + 0.5
            continue
        r = torch.randn(shape, generator=g)
        if name.endswith("conv.weight"):  # He init keeps activations O(1) through 94 conv layers
            sd[name] = r * math.sqrt(2 / math.prod(shape[1:]))
        elif name.endswith("bn.weight"):
            sd[name] = 1 + 0.1 * r
        elif name == "fc.weight":
            sd[name] = 0.05 * r
        else:  # bn.bias, bn.running_mean, fc.bias
            sd[name] = 0.1 * r
    return sd


def reference_inputs():
    """Two 299 x 299 and two 256 x 256 uint8 images (B, 3, H, W) from a fixed seed."""
    g = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8),
        torch.randint(0, 256, (2, 3, 256, 256), generator=g, dtype=torch.uint8),
    )


def weights_checksum(sd):
    return sum(v.double().sum().item() for v in sd.values())


def make_reference():
    """Run pytorch-fid's FID InceptionV3 on `reference_inputs` and save its outputs."""
    from pytorch_fid import inception as pfi

    net = (
        pfi.fid_inception_v3.__globals__
    )  # the module namespace, to feed our weights to its loader
    shapes = {
        k: v.shape
        for k, v in pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        .state_dict()
        .items()
        if not k.endswith("num_batches_tracked")
    }
    sd = random_fid_weights(shapes)
    net["load_state_dict_from_url"] = lambda *args, **kwargs: sd
    out = {"checksum": weights_checksum(sd), "num_keys": len(sd)}
    for name, resize, normalize in [("pytorch-fid", True, True), ("adm-normalised", False, False)]:
        model = pfi.InceptionV3([3], resize_input=resize, normalize_input=normalize).eval()
        mixed_6d = model.blocks[2][6]  # Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e
        spatial = []
        mixed_6d.branch1x1.register_forward_hook(
            lambda m, i, o: spatial.append(o[:, :7].permute(0, 2, 3, 1).flatten(1))
        )
        for x in reference_inputs():
            if name == "adm-normalised" and x.shape[-1] != 299:
                continue
            inp = (
                x.float() / 255 if normalize else (x.float() - 128) / 128
            )  # pytorch-fid feeds [0, 1]
            with torch.no_grad():
                pool3 = model(inp)[0].flatten(1)
            out[f"{name}-{x.shape[-1]}"] = dict(
                pool3=pool3, spatial=spatial.pop(), logits=pool3 @ sd["fc.weight"].T
            )
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.save(out, REFERENCE)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes): {sorted(out)}")


if __name__ == "__main__" and "--make-reference" in sys.argv:
    make_reference()
    sys.exit(0)

# ----------------------------------------------------------------------------------------------

import pytest  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
import fid  # noqa: E402


@pytest.fixture(scope="module")
def net():
    """The FID Inception with the deterministic random weights of the reference file."""
    model = fid.InceptionV3().eval()
    shapes = {
        k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    model.load_state_dict(random_fid_weights(shapes), strict=False)
    return model


@pytest.fixture(scope="module")
def weights_file(net, tmp_path_factory):
    """The same random weights saved as a weights file (plain state dict, ~96 MB)."""
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(
        {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path
    )
    return path


# ----------------------------------------------------------------------------- network


def test_output_shapes(net):
    with torch.no_grad():
        pool3, spatial = net(torch.randint(0, 256, (1, 64, 48, 3), dtype=torch.uint8), "adm")
    assert pool3.shape == (1, 2048) and spatial.shape == (1, 17 * 17 * 7)
    assert torch.isfinite(pool3).all() and pool3.abs().max() > 0


def test_matches_pytorch_fid(net):
    """Same weights, same input -> same pool3, sFID features and logits as pytorch-fid 0.3.0."""
    ref = torch.load(REFERENCE, weights_only=True)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ref["num_keys"] == len(sd) == 472
    assert ref["checksum"] == pytest.approx(
        weights_checksum(sd), rel=1e-12
    )  # same recipe, same RNG
    x299, x256 = reference_inputs()
    cases = [
        ("pytorch-fid-299", x299, "pytorch-fid"),
        ("pytorch-fid-256", x256, "pytorch-fid"),
        ("adm-normalised-299", x299, "adm"),
    ]  # at 299 the ADM resize is the identity
    for key, x, mode in cases:
        with torch.no_grad():
            pool3, spatial = net(x.movedim(1, -1), mode)  # the network takes (B, H, W, 3)
        # the logits of the graph (for IS) are pool3 @ fc.weight.T, as main() computes them
        got = dict(pool3=pool3, spatial=spatial, logits=pool3 @ net.fc.weight.T)
        for name, want in ref[key].items():
            scale = want.abs().max().item()
            assert scale > 1e-3
            torch.testing.assert_close(
                got[name], want, rtol=1e-4, atol=1e-5 * scale, msg=f"{key} {name}"
            )


def test_expected_key_layout_loads_strictly(tmp_path):
    """The 472 keys of EVAL.md §1.1, derived from the architecture text, load; others fail."""
    convs = [
        ("Conv2d_1a_3x3", 3, 32, 3, 3),
        ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 32, 64, 3, 3),
        ("Conv2d_3b_1x1", 64, 80, 1, 1),
        ("Conv2d_4a_3x3", 80, 192, 3, 3),
    ]
    for name, cin, pool in [
        ("Mixed_5b", 192, 32),
        ("Mixed_5c", 256, 64),
        ("Mixed_5d", 288, 64),
    ]:  # type A
        convs += [
            (f"{name}.branch1x1", cin, 64, 1, 1),
            (f"{name}.branch5x5_1", cin, 48, 1, 1),
            (f"{name}.branch5x5_2", 48, 64, 5, 5),
            (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
            (f"{name}.branch3x3dbl_2", 64, 96, 3, 3),
            (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
            (f"{name}.branch_pool", cin, pool, 1, 1),
        ]
    convs += [
        ("Mixed_6a.branch3x3", 288, 384, 3, 3),
        ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),  # type B
        ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
        ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ]
    for name, c7 in [
        ("Mixed_6b", 128),
        ("Mixed_6c", 160),
        ("Mixed_6d", 160),
        ("Mixed_6e", 192),
    ]:  # type C
        convs += [
            (f"{name}.branch1x1", 768, 192, 1, 1),
            (f"{name}.branch7x7_1", 768, c7, 1, 1),
            (f"{name}.branch7x7_2", c7, c7, 1, 7),
            (f"{name}.branch7x7_3", c7, 192, 7, 1),
            (f"{name}.branch7x7dbl_1", 768, c7, 1, 1),
            (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
            (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_5", c7, 192, 1, 7),
            (f"{name}.branch_pool", 768, 192, 1, 1),
        ]
    convs += [
        ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),  # type D
        ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
        ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
        ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ]
    for name, cin in [("Mixed_7b", 1280), ("Mixed_7c", 2048)]:  # type E
        convs += [
            (f"{name}.branch1x1", cin, 320, 1, 1),
            (f"{name}.branch3x3_1", cin, 384, 1, 1),
            (f"{name}.branch3x3_2a", 384, 384, 1, 3),
            (f"{name}.branch3x3_2b", 384, 384, 3, 1),
            (f"{name}.branch3x3dbl_1", cin, 448, 1, 1),
            (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
            (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
            (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{name}.branch_pool", cin, 192, 1, 1),
        ]
    assert len(convs) == 94
    sd = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for name, cin, cout, kh, kw in convs:
        sd[f"{name}.conv.weight"] = torch.zeros(cout, cin, kh, kw)
        sd.update(
            {
                f"{name}.bn.{p}": torch.ones(cout)
                for p in ("weight", "bias", "running_mean", "running_var")
            }
        )
    assert len(sd) == 94 + 94 * 4 + 2 == 472
    assert sum(v.numel() for v in sd.values()) == 23_885_392  # EVAL.md §1
    assert {"Mixed_6d.branch1x1.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.running_var"} <= set(sd)
    extra = {
        "Mixed_5b.branch1x1.bn.num_batches_tracked": torch.tensor(0),
        "AuxLogits.fc.weight": torch.zeros(3),
    }
    path = tmp_path / "w.pth"
    torch.save({**sd, **extra}, path)
    with pytest.warns(UserWarning, match="sha256"):  # not the released file: warn, do not fail
        model = fid.load_inception(path)
    assert not model.training and torch.equal(
        model.Mixed_6d.branch1x1.bn.running_var, torch.ones(192)
    )
    bad = [
        {k: v for k, v in sd.items() if k != "fc.bias"},
        {**sd, "Mixed_8a.conv.weight": torch.zeros(1)},
        {**sd, "fc.weight": torch.zeros(1000, 2048)},
    ]
    for broken in bad:
        torch.save(broken, path)
        # refused before the sha256 check: no warning about a file that is not the weights at all
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(common.UserError, match="not the FID Inception weights"):
                fid.load_inception(path)


# ----------------------------------------------------------------------------- preprocessing


def test_tf1_resize_hand_cases():
    """TF1 legacy bilinear: src = dst * float32(in/out), lo = floor, hi = min(lo + 1, in - 1)."""
    # 2x2 -> 3x3: scale = f32(2/3) = 0.6666667; src = 0, 0.6666667, 1.3333334 -> (lo, hi, frac) =
    # (0,1,0), (0,1,0.6666667), (1,1,0.3333334). Row 0 [0,10]: 0, 0+10*0.6666667 = 6.666667, 10.
    # Row 1 = row 0 + (row 2 - row 0) * 0.6666667
    #       = 0+20*.6666667, 6.666667+20*.6666667, 10+20*.6666667.
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    want = torch.tensor(
        [[0.0, 6.666667, 10.0], [13.333334, 20.0, 23.333334], [20.0, 26.666668, 30.0]]
    )
    torch.testing.assert_close(fid.resize_tf1_bilinear(x, 3)[0, 0], want, rtol=0, atol=2e-6)
    # 4 -> 3 along x (rows identical): scale = f32(4/3) = 1.3333334; src = 0, 1.3333334, 2.6666667;
    # values 10*[0,1,2,3] -> 0, 10 + 10*0.3333334 = 13.333334, 20 + 10*0.6666667 = 26.666667
    x = (10 * torch.arange(4.0)).expand(4, 4)[None, None]
    torch.testing.assert_close(
        fid.resize_tf1_bilinear(x, 3)[0, 0, 1],
        torch.tensor([0.0, 13.333334, 26.666667]),
        rtol=0,
        atol=2e-6,
    )
    # 3 -> 5 along x: scale = f32(3/5) = 0.6; src = 0, 0.6, 1.2, 1.8, 2.4 -> lo 0,0,1,1,2,
    # hi clamps to 2;
    # values [0,10,20] -> 0, 6, 10+2 = 12, 10+8 = 18, 20 (hi = lo = 2)
    x = torch.tensor([0.0, 10.0, 20.0]).expand(3, 3)[None, None]
    torch.testing.assert_close(
        fid.resize_tf1_bilinear(x, 5)[0, 0, 4],
        torch.tensor([0.0, 6.0, 12.0, 18.0, 20.0]),
        rtol=0,
        atol=2e-6,
    )
    # half-pixel resizing (pytorch-fid mode) gives different values for the same case
    assert not torch.allclose(
        torch.nn.functional.interpolate(x, size=(5, 5), mode="bilinear")[0, 0, 4],
        torch.tensor([0.0, 6.0, 12.0, 18.0, 20.0]),
    )


def test_preprocess_normalisation():
    x = torch.randint(0, 256, (1, 299, 299, 3), dtype=torch.uint8)  # (B, H, W, 3) in
    nchw = x.permute(0, 3, 1, 2).float()  # (B, 3, H, W) out
    assert torch.equal(fid.preprocess(x, "adm"), (nchw - 128) / 128)  # resize: identity at 299
    torch.testing.assert_close(fid.preprocess(x, "pytorch-fid"), 2 * (nchw / 255) - 1)
    for mode in fid.MODES:
        image = torch.zeros(2, 32, 40, 3, dtype=torch.uint8)
        assert fid.preprocess(image, mode).shape == (2, 3, 299, 299)


# ----------------------------------------------------------------------------- metrics


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def test_frechet_identical_and_diagonal():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(50), _random_cov(rng, 50)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    low = _random_cov(rng, 50, rank=10)  # singular, as with too few samples
    assert abs(fid.frechet_distance(mu, low, mu, low)) < 1e-6
    a, b = rng.uniform(0.1, 2, 20), rng.uniform(0.1, 2, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    want = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    with pytest.raises(common.UserError):
        fid.frechet_distance(mu, sigma * np.nan, mu, sigma)


def test_frechet_ill_conditioned():
    """tr (S1 S2)^1/2, eigenvalues over 14 decades, vs closed forms from a known Q diag(w) Q^T."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    w, w2 = np.logspace(-12, 2, 64), np.logspace(1, -9, 64)
    s1, s2, zero = (q * w) @ q.T, (q * w2) @ q.T, np.zeros(64)
    # commuting: tr (S1 S2)^1/2 = sum sqrt(w w2)
    want = w.sum() + w2.sum() - 2 * np.sqrt(w * w2).sum()
    assert fid.frechet_distance(zero, s1, zero, s2) == pytest.approx(want, rel=1e-9)
    # S2 = c S1: d = (1 - sqrt c)^2 tr S1 (c = 4: d = tr S1; c = 1: d = 0). Eigenvalues of S1 S2
    # below eps |S1| |S2| ~ 1e-11 are round-off, each worth up to sqrt(1e-11) ~ 3e-6 in the trace
    assert fid.frechet_distance(zero, s1, zero, 4 * s1) == pytest.approx(w.sum(), abs=64 * 3e-6)
    assert abs(fid.frechet_distance(zero, s1, zero, s1)) < 64 * 3e-6
    # a non-commuting pair: against the eigenvalues of S1 S2 computed by numpy's general eigvals
    r = rng.standard_normal((64, 64))
    s3 = r @ np.diag(np.logspace(-8, 1, 64)) @ r.T
    tr = np.sqrt(np.linalg.eigvals(s1 @ s3).real.clip(0)).sum()
    assert fid.frechet_distance(zero, s1, zero, s3) == pytest.approx(
        np.trace(s1) + np.trace(s3) - 2 * tr, rel=1e-6
    )


def test_inception_score():
    assert fid.inception_score(torch.zeros(10, 1008)) == pytest.approx(
        1.0, abs=1e-9
    )  # uniform predictions
    logits = torch.zeros(40, 1008)
    logits[torch.arange(40), torch.arange(40) % 8] = 40.0  # confident, spread over 8 classes
    assert fid.inception_score(logits) == pytest.approx(8.0, rel=1e-6)
    # consecutive splits: 5 splits of 8, each covering the 8 classes once -> 8; sorted by class,
    # 4 splits of 10 each hold 2 classes -> 2 (why val_ddp.py shuffles before writing the npz)
    assert fid.inception_score(logits, split_size=8) == pytest.approx(8.0, rel=1e-6)
    logits_sorted = logits[(torch.arange(40) % 8).argsort(stable=True)]
    assert fid.inception_score(logits_sorted, split_size=10) == pytest.approx(2.0, rel=1e-6)


def test_precision_recall():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    assert fid.precision_recall(x, x) == (1.0, 1.0)
    p, r = fid.precision_recall(x, x + 100)  # far apart: nothing covered
    assert p == 0.0 and r == 0.0
    p, r = fid.precision_recall(
        x, 0.1 * torch.randn(200, 16)
    )  # collapsed samples: precise, no recall
    assert p > 0.9 and r < 0.2


# ----------------------------------------------------------------------------- weights download


def test_download_from_local_server(http_server, weights_file, monkeypatch):
    name = "pt_inception-2015-12-05-6726825d.pth"
    (http_server.directory / name).write_bytes(weights_file.read_bytes())
    monkeypatch.setattr(fid, "WEIGHTS_URL", f"{http_server.url}/{name}")
    with pytest.warns(UserWarning, match="sha256"):
        model = fid.load_inception()
    assert (common.cache_dir() / name).is_file() and http_server.requests
    assert torch.equal(model.fc.weight, torch.load(weights_file, weights_only=True)["fc.weight"])


def test_offline_error_names_url():
    with pytest.raises(common.UserError) as e:
        fid.load_inception()
    # the download's own message: where to put the file by hand
    assert fid.WEIGHTS_URL in str(e.value) and str(common.cache_dir()) in str(e.value)


def test_missing_input_fails_before_any_download(tmp_path):
    with pytest.raises(common.UserError, match="nope.npz is not an existing"):
        fid.main(fid.parse_args([str(tmp_path), str(tmp_path / "nope.npz")]))
    assert not any(common.cache_dir().glob("*"))  # the Inception weights were not even tried


def _cli_error(argv, capsys):
    """Run fid.py's command line in-process: exit code 2 and one line `error: ...` on stderr."""
    with pytest.raises(SystemExit) as e:
        common.cli(fid.main, lambda: fid.parse_args(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if fid.py gets as far as loading the network (a download, then the work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command line was not checked before the work")

    monkeypatch.setattr(fid, "load_inception", refuse)


def test_command_line_mistakes_are_one_line_before_any_work(tmp_path, capsys, no_work):
    """Issue 13: an unknown input kind, a wrong number of paths, --rfid without a tokenizer and
    an unusable --save-stats path each stop with one line, before the weights or any features."""
    images = tmp_path / "A.npz"
    np.savez(images, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.save(tmp_path / "B.npy", np.zeros((2, 8, 8, 3), np.uint8))
    err = _cli_error([str(images), str(tmp_path / "B.npy")], capsys)
    assert "B.npy is not an existing image folder or .npz file" in err
    assert "_cli_error" not in err and ".npz" in err  # names the file and the accepted kinds
    assert "REFERENCE SAMPLES" in _cli_error([str(images)], capsys)  # one path, nothing to do
    assert "REFERENCE SAMPLES" in _cli_error([str(images)] * 3, capsys)
    assert "--vq-ckpt" in _cli_error(["--rfid", str(images)], capsys)
    assert "--rfid" in _cli_error(
        ["--rfid", "--vq-ckpt", "vq.pt", str(images), str(images)], capsys
    )
    (tmp_path / "file").write_text("not a folder")
    for bad in ["stats.npy", "file/stats.npz", "file/sub/stats.npz", "."]:
        out = str(tmp_path / bad)
        err = _cli_error([str(images), "--save-stats", out], capsys)
        assert f"--save-stats {out}: not a writable .npz" in err
    assert not (tmp_path / "stats.npy").exists()


def test_unwritable_save_stats_folder_fails_before_any_work(tmp_path, capsys, no_work, monkeypatch):
    """A folder without write permission (simulated: tests may run as root, who may write
    anywhere): refused up front, not after the feature extraction."""
    images = tmp_path / "A.npz"
    np.savez(images, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and Path(p) != locked)
    for out in [locked / "stats.npz", locked / "new" / "folders" / "stats.npz"]:
        err = _cli_error([str(images), "--save-stats", str(out)], capsys)
        assert "not a writable .npz file path" in err
    assert list(locked.iterdir()) == []  # nothing made there


def test_wrong_inception_weights_are_one_line(tmp_path, capsys):
    """--inception-weights given a text file or another checkpoint (before: KeyError: 101)."""
    images = tmp_path / "A.npz"
    np.savez(images, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "text.pt").write_text("hello\n")
    torch.save({"model": {"w": torch.zeros(2)}, "config": {"codebook_size": 8}}, tmp_path / "vq.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    for name, why in [
        ("text.pt", "cannot load"),
        ("vq.pt", 'not the FID Inception weights file: Unexpected key(s) in state_dict: "model"'),
        ("list.pt", "not the FID Inception weights file"),
        ("missing.pt", "not found"),
    ]:
        argv = [str(images), str(images), "--inception-weights", str(tmp_path / name)]
        assert why in _cli_error(argv, capsys), name


def test_bad_npz_contents_are_one_line(tmp_path, capsys):
    """.npz files of the wrong kind, found when they are read: each stops with one line. A single
    image has no covariance: frechet_distance's NaN check stops it (no check of its own)."""
    np.save(tmp_path / "array.npy", np.zeros((2, 8, 8, 3), np.uint8))
    os.rename(tmp_path / "array.npy", tmp_path / "renamed.npz")  # an .npy under an .npz name
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    for name, why in [
        ("renamed.npz", "cannot read"),
        ("other.npz", "holds neither arr_0 images nor mu, sigma"),
        ("float.npz", "arr_0 must be uint8"),
        ("one.npz", "statistics contain NaN"),
    ]:
        path = str(tmp_path / name)
        with warnings.catch_warnings():  # one image: singular, and no precision/recall
            warnings.simplefilter("ignore")
            argv = [path, path, "--device", "cpu", "--inception-weights", "random"]
            assert why in _cli_error(argv, capsys), name


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        fid.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: 64)" in out and "(default: adm)" in out
    assert f"(default: {common.NUM_WORKERS})" in out
    assert fid.parse_args([".", "."]).num_workers == common.NUM_WORKERS


# ----------------------------------------------------------------------------- end to end


def test_random_weights_are_seeded_and_labelled(tmp_path, capsys):
    """--inception-weights random: the same weights every run, activations of order one, and every
    printed number labelled random-weights."""
    a, b = fid.load_inception("random"), fid.load_inception("random")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with torch.no_grad():
        pool3 = a(torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8), "adm")[0]
    assert 1e-2 < pool3.std() < 1e2  # He init: no vanishing or exploding through 94 convs
    folder = _write_pngs(tmp_path / "a", 4, 24, seed=0)
    args = [str(folder), str(folder), "--device", "cpu", "--num-workers", "0"]
    with pytest.warns(UserWarning, match="only 4 images"):
        res = fid.main(fid.parse_args(args + ["--inception-weights", "random"]))
    assert abs(res["FID"]) < 1e-3
    assert "FID (adm/random-weights)" in capsys.readouterr().out


def _write_pngs(folder, n, size, seed):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png"
        )
    return folder


def test_npz_reference_with_precomputed_stats(net, weights_file, tmp_path, capsys):
    """ADM layout: the reference's mu/sigma/mu_s/sigma_s are used as stored, arr_0 only for P/R."""
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    with torch.no_grad():
        pool3, spatial = net(torch.from_numpy(samples), "adm")  # arr_0's (B, H, W, 3)
    with pytest.warns(UserWarning, match="singular"):
        (mu, sigma), (mu_s, sigma_s) = (
            fid.compute_statistics(pool3.numpy()),
            fid.compute_statistics(spatial.numpy()),
        )
    other = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)  # different images: P/R only
    np.savez(tmp_path / "ref.npz", arr_0=other, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    args = fid.parse_args(
        [
            str(tmp_path / "ref.npz"),
            str(tmp_path / "samples.npz"),
            "--device",
            "cpu",
            "--batch-size",
            "3",
            "--inception-weights",
            str(weights_file),
        ]
    )
    with pytest.warns(UserWarning):
        res = fid.main(args)
    assert abs(res["FID"]) < 1e-3 and abs(res["sFID"]) < 1e-3
    assert 0 <= res["Precision"] <= 1 and 0 <= res["Recall"] <= 1 and res["Inception Score"] >= 1
    out = capsys.readouterr().out
    assert (
        "reference precomputed statistics | samples 5 images | mode adm" in out
        and "FID (adm)" in out
        and "Recall (adm)" in out
    )


def test_folders_end_to_end_and_saved_stats(net, weights_file, tmp_path, capsys):
    a, b = (
        _write_pngs(tmp_path / "a", 4, 24, seed=0),
        _write_pngs(tmp_path / "b" / "sub", 4, 24, seed=1),
    )
    flags = [
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "--num-workers",
        "0",
        "--mode",
        "pytorch-fid",
        "--inception-weights",
        str(weights_file),
    ]
    with pytest.warns(UserWarning, match="only 4 images"):
        res = fid.main(
            fid.parse_args(
                [str(a), str(tmp_path / "b"), "--save-stats", str(tmp_path / "b.npz")] + flags
            )
        )
    assert set(res) == {"FID", "sFID", "Inception Score", "Precision", "Recall"}
    assert res["FID"] > 0 and np.isfinite(res["sFID"])
    assert "FID (pytorch-fid)" in capsys.readouterr().out
    # the statistics file: ADM keys + pool3 of folder b (recursive), reused as is by load_set
    with torch.no_grad():
        pool3 = net(
            torch.stack(
                [torch.from_numpy(np.array(data.load_image(p))) for p in sorted(b.iterdir())]
            ),
            "pytorch-fid",
        )[0]
    stats = fid.load_set(str(tmp_path / "b.npz"), None, fid.parse_args([str(a), str(a)] + flags))
    assert (
        stats["mode"] == "pytorch-fid"
        and stats["n"] == 4
        and stats["sigma_s"].shape == (2023, 2023)
    )
    torch.testing.assert_close(torch.from_numpy(stats["pool3"]), pool3, rtol=1e-4, atol=1e-5)
    assert res["Inception Score"] == pytest.approx(
        fid.inception_score(pool3 @ net.fc.weight.T), rel=1e-4
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no images"), pytest.warns(UserWarning):
        fid.main(fid.parse_args([str(a), str(tmp_path / "empty")] + flags))


def test_rfid_tiny_vq(weights_file, tmp_path, capsys):
    import vq

    tok = vq.VQModel(vq.VQConfig.from_name("VQ-tiny"))
    ckpt = tmp_path / "vq.pt"
    common.save_checkpoint(
        {"model": tok.state_dict(), "config": dataclasses.asdict(tok.config)}, ckpt
    )
    folder = _write_pngs(tmp_path / "val" / "n01", 3, 40, seed=2)
    args = fid.parse_args(
        [
            "--rfid",
            "--vq-ckpt",
            str(ckpt),
            str(folder.parent),
            "--image-size",
            "16",
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--inception-weights",
            str(weights_file),
        ]
    )
    with pytest.warns(UserWarning):
        res = fid.main(args)
    assert res["rFID"] > 0 and 0 < res["PSNR (dB)"] < 60
    assert res["Inception Score"] >= 1  # of the reconstructions, as the official evaluation
    # 3 images x (16/8)^2 tokens at most
    assert 0 < res["Codebook usage"] <= 3 * 2 * 2 / 1024
    assert "rFID (adm)" in capsys.readouterr().out
