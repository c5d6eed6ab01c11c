"""Tests for data.py's shared runtime and image datasets.

python -m pytest tests/test_data.py -q
"""

import hashlib
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data

# ----------------------------------------------------------------------------------------------
# downloads against a local server


def _serve(server, name, payload):
    (server.directory / name).write_bytes(payload)
    return f"{server.url}/{name}"


def test_download_fetches_then_uses_cache(http_server):
    payload = bytes(range(256)) * 500
    url = _serve(http_server, "w.bin", payload)
    path = data.download(url, sha256=hashlib.sha256(payload).hexdigest())
    assert path.read_bytes() == payload and path.parent == data.cache_dir()
    assert len(http_server.requests) == 1
    assert data.download(url) == path and len(http_server.requests) == 1  # second call: no request


def test_download_resumes_after_dropped_connection(http_server):
    payload = np.random.default_rng(0).bytes(300_000)
    url = _serve(http_server, "big.bin", payload)
    http_server.fail_after_bytes = 100_000
    path = data.download(url)
    assert path.read_bytes() == payload
    ranges = [r for _, r in http_server.requests]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1].split("=")[1].rstrip("-")) > 0  # the retry asked only for the rest


def test_download_resumes_from_partial_file_of_earlier_run(http_server):
    payload = np.random.default_rng(1).bytes(50_000)
    url = _serve(http_server, "p.bin", payload)
    (data.cache_dir()).mkdir(parents=True, exist_ok=True)
    (data.cache_dir() / "p.bin.part").write_bytes(payload[:20_000])
    assert data.download(url).read_bytes() == payload
    assert http_server.requests[0][1] == "bytes=20000-"


def test_download_rejects_corrupt_file(http_server):
    payload = b"not the weights you were looking for" * 100
    url = _serve(http_server, "c.bin", payload)
    with pytest.raises(data.UserError, match="sha256 check failed"):
        data.download(url, sha256="0" * 64)
    assert (
        not (data.cache_dir() / "c.bin").exists() and not (data.cache_dir() / "c.bin.part").exists()
    )
    # the hub's ETag carries the sha256: a mismatch there is caught too
    http_server.extra_headers["c.bin"] = {"ETag": '"' + "a" * 64 + '"'}
    with pytest.raises(data.UserError, match="sha256 check failed"):
        data.download(url)


def test_download_offline_error_names_url_and_destination(monkeypatch):
    url = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt"
    with pytest.raises(data.UserError) as e:
        data.download(url)
    assert url in str(e.value) and str(data.cache_dir() / "c2i_B_256.pt") in str(e.value)
    assert "\n" not in str(e.value)


def test_hf_url_honours_hf_endpoint(monkeypatch):
    assert data.hf_url("a/b", "f.pt") == "https://huggingface.co/a/b/resolve/main/f.pt"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert data.hf_url("a/b", "f.pt") == "http://127.0.0.1:9/a/b/resolve/main/f.pt"


# ----------------------------------------------------------------------------------------------
# checkpoints, RNG, EMA, precision


def test_checkpoint_roundtrip_is_atomic_and_plain(tmp_path):
    obj = {
        "model": {"w": torch.randn(3)},
        "step": 7,
        "args": {"lr": 1e-4},
        "rng": data.get_rng_state(),
    }
    path = data.save_checkpoint(obj, tmp_path / "a" / "ckpt.pt")
    got = data.load_checkpoint(path)
    assert torch.equal(got["model"]["w"], obj["model"]["w"]) and got["step"] == 7
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "stats.json"
    data.write_json({"v": 1}, path)
    with pytest.raises(KeyboardInterrupt):
        with data.atomic_write(path, "w") as f:
            f.write('{"v": 2, "trunc')
            raise KeyboardInterrupt  # a crash half-way through the write
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == [
        "stats.json"
    ]


def test_load_tokenizer_errors_are_one_line(tmp_path, vq_ckpt):
    assert data.load_tokenizer(vq_ckpt).config.codebook_size == 1024
    data.save_checkpoint(
        {"model": {"tok_embeddings.weight": torch.zeros(4, 2)}}, tmp_path / "gpt.pt"
    )
    with pytest.raises(
        data.UserError, match=r"cannot load the tokenizer .*gpt\.pt: this is a GPT checkpoint"
    ) as e:
        data.load_tokenizer(tmp_path / "gpt.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(data.UserError, match="checkpoint not found"):
        data.load_tokenizer(tmp_path / "missing.pt")


def test_load_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(data.UserError, match="checkpoint not found"):
        data.load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(data.UserError, match="bad.pt"):
        data.load_checkpoint(bad)
    torch.save(
        {"args": __import__("argparse").Namespace(a=1)}, tmp_path / "ns.pt"
    )  # not plain types
    with pytest.raises(data.UserError, match="weights_only"):
        data.load_checkpoint(tmp_path / "ns.pt")


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    state = data.get_rng_state()
    data.save_checkpoint({"rng": state}, tmp_path / "r.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    data.set_rng_state(data.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_update_ema_matches_formula():
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    data.update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.equal(ema.running_mean, model.running_mean)


def test_autocast_ctx():
    with data.autocast_ctx("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with data.autocast_ctx("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(data.UserError, match="needs a GPU"):
        data.autocast_ctx("cpu", "fp16")


def test_results_dir_and_jsonl(tmp_path):
    a, b = data.make_results_dir(tmp_path, "VQ-tiny"), data.make_results_dir(tmp_path, "VQ-tiny")
    assert (a.name, b.name) == ("000-VQ-tiny", "001-VQ-tiny")
    log = data.JsonlLogger(a / "log.jsonl")
    log.log({"step": 1, "loss": 0.5})
    log.log({"step": 2, "loss": 0.25})
    assert [json.loads(line)["loss"] for line in (a / "log.jsonl").read_text().splitlines()] == [
        0.5,
        0.25,
    ]


def test_cli_prints_one_line_error(tmp_path):
    code = (
        "import data\n"
        "def main(a): raise data.UserError('Caught UserError in DataLoader worker process 0.\\n"
        "Traceback ...\\ndata.UserError: cannot read image x.png')\n"
        "data.cli(main, lambda: None)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=data.__file__.rsplit("/", 1)[0],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: cannot read image x.png"


# ----------------------------------------------------------------------------------------------
# images


def test_quantisation_and_grid(tmp_path):
    x = torch.tensor([-1.0, -0.99, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    # 127.5 * x + 128, clamped, truncated: the official samplers' rule (round-half-up of 127.5(x+1))
    assert data.to_uint8(x)[0, 0, :, 0].tolist() == [0, 1, 128, 255, 255, 255]
    path = data.save_image_grid(torch.zeros(5, 3, 8, 8), tmp_path / "g.png", nrow=3, pad=2)
    assert Image.open(path).size == (3 * 10 + 2, 2 * 10 + 2)


def test_adm_crops_shapes_and_content():
    img = Image.fromarray(
        np.tile((np.arange(300) % 256).astype(np.uint8)[None, :, None], (200, 1, 3))
    )
    c = data.center_crop_arr(img, 64)
    assert c.size == (64, 64)
    arr = np.asarray(c)[..., 0].astype(int)
    assert (np.diff(arr[0, :50]) >= 0).all()  # the horizontal ramp survives the resize
    for seed in range(5):
        r = data.random_crop_arr(img, 64, rng=random.Random(seed))
        assert r.size == (64, 64)


def test_image_folder_classes_sorted_and_augmentation_deterministic(toy_folder):
    ds = data.ImageFolder(toy_folder, 32, augment="random", seed=3)
    assert ds.classes == sorted(ds.classes) and len(ds.classes) == 4 and len(ds) == 32
    assert [label for _, label in ds.samples] == sorted(label for _, label in ds.samples)
    x1, y1 = ds[5]
    x2, _ = ds[5]
    assert x1.shape == (3, 32, 32) and x1.min() >= -1 and x1.max() <= 1 and torch.equal(x1, x2)
    ds.set_epoch(1)
    assert any(
        not torch.equal(ds[i][0], data.ImageFolder(toy_folder, 32, "random", seed=3)[i][0])
        for i in range(8)
    )  # a new epoch draws new crops


def test_tiny_imagenet_val_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("n02\nn01\n")
    lines = []
    for i, wnid in enumerate(["n02", "n01", "n02"]):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    ds = data.ImageFolder(root / "val", 16)
    assert ds.classes == ["n01", "n02"]
    assert [(p.name, y) for p, y in ds.samples] == [
        ("val_0.JPEG", 1),
        ("val_1.JPEG", 0),
        ("val_2.JPEG", 1),
    ]


def test_corrupt_image_is_named_or_skipped(tmp_path):
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "cls" / "good.png")
    (tmp_path / "cls" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = data.ImageFolder(tmp_path, 16)
    with pytest.raises(data.UserError, match="broken.png"):
        [ds[i] for i in range(len(ds))]
    ds = data.ImageFolder(tmp_path, 16, skip_bad=True)
    assert sorted(ds[i][1] for i in range(len(ds))) == [data.BAD_LABEL, 0]


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(data.UserError, match="not found"):
        data.ImageFolder(tmp_path / "nope", 16)
    with pytest.raises(data.UserError, match="no images"):
        data.ImageFolder(tmp_path, 16)


def test_toy_dataset_classes_differ_visibly(tmp_path):
    root = data.make_toy_dataset(tmp_path, num_classes=4, per_class=6, size=32)
    ds = data.ImageFolder(root, 32)
    colour = torch.stack(
        [ds[i][0].flatten(1).max(1).values for i in range(len(ds))]
    )  # (N, 3) brightest
    labels = torch.tensor([y for _, y in ds.samples])
    centroids = torch.stack([colour[labels == k].mean(0) for k in range(4)])  # (4, 3)
    nearest = torch.cdist(colour, centroids).argmin(1)
    assert (nearest == labels).all()  # each class is recognisable from its colour alone
    assert len({Image.open(p).tobytes() for p, _ in ds.samples}) == len(ds)  # no duplicates
