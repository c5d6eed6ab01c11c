"""sample.py end to end with tiny models; a local HTTP server stands in for the Hugging Face hub.

python -m pytest tests/test_sample.py -q
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import gpt
import sample
import vq

ROOT = Path(__file__).resolve().parents[1]
# ds16 like the released VQ-16, but 32 channels and a 64-entry codebook, so 256 px decode in a second
TINY_VQ = vq.VQConfig(
    ch=32,
    encoder_ch_mult=[1] * 5,
    decoder_ch_mult=[1] * 5,
    num_res_blocks=1,
    z_channels=32,
    codebook_size=64,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_models(block_size=256, num_classes=1000, seed=0):
    torch.manual_seed(seed)
    model = gpt.GPT(
        gpt.GPTConfig.from_name(
            "tiny", vocab_size=64, block_size=block_size, num_classes=num_classes
        )
    )
    torch.nn.init.normal_(
        model.output.weight, std=0.5
    )  # the init zeroes the head: make tokens depend on context
    return model, vq.VQModel(TINY_VQ)


@pytest.fixture
def hub(http_server, monkeypatch):
    """Official-format tiny files served as c2i_B_256.pt and vq_ds16_c2i.pt; HF_ENDPOINT points at them."""
    served = (
        http_server.directory / "FoundationVision" / "LlamaGen" / "resolve" / "main"
    )  # the hub's layout
    served.mkdir(parents=True)
    model, tokenizer = tiny_models()
    torch.save({"model": model.state_dict()}, served / "c2i_B_256.pt")
    torch.save({"model": tokenizer.state_dict()}, served / "vq_ds16_c2i.pt")
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    http_server.served = served
    return http_server


@pytest.fixture
def own_ckpts(tmp_path):
    """Our own checkpoints (config inside): a 4-class GPT on a 4 x 4 grid + the tiny VQ -> 64 px images."""
    model, tokenizer = tiny_models(block_size=16, num_classes=4)
    g = data.save_checkpoint(
        {
            "model": model.state_dict(),
            "ema": None,
            "config": asdict(model.config),
            "vq_config": asdict(TINY_VQ),
            "step": 1,
        },
        tmp_path / "gpt.pt",
    )
    v = data.save_checkpoint(
        {"model": tokenizer.state_dict(), "ema": None, "config": asdict(TINY_VQ)},
        tmp_path / "vq.pt",
    )
    return ["--gpt-ckpt", str(g), "--vq-ckpt", str(v)]


def test_default_run_downloads_then_uses_the_cache(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = sample.main(
        sample.parse_args([])
    )  # `python sample.py`: released B-256 + VQ-16, demo labels
    assert (
        out == Path("samples/c2i_B_256-seed0.png")
        and out.exists()
        and str(out) in capsys.readouterr().out
    )
    assert Image.open(out).size == (4 * 258 + 2, 2 * 258 + 2)  # 8 images of 256 px, 4 per row
    assert sorted(p for p, _ in hub.requests) == [
        "/FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt",
        "/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt",
    ]
    assert (data.cache_dir() / "c2i_B_256.pt").exists()
    sample.main(sample.parse_args(["--labels", "1", "--out", str(tmp_path / "again.png")]))
    assert len(hub.requests) == 2  # second run: all from the cache


def test_interrupted_download_resumes(hub, tmp_path):
    hub.fail_after_bytes = 300_000  # the first response (the VQ file, 1.9 MB) drops after 300 kB
    out = sample.main(sample.parse_args(["--labels", "3", "--out", str(tmp_path / "x.png")]))
    assert out.exists()
    ranges = [r for p, r in hub.requests if p.endswith("vq_ds16_c2i.pt")]
    assert len(ranges) == 2 and ranges[0] is None
    assert (
        0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) <= 300_000
    )  # the retry asked only for the rest
    assert (data.cache_dir() / "vq_ds16_c2i.pt").read_bytes() == (
        hub.served / "vq_ds16_c2i.pt"
    ).read_bytes()


def test_corrupt_download_is_rejected(hub, tmp_path):
    hub.extra_headers["c2i_B_256.pt"] = {
        "ETag": '"' + "0" * 64 + '"'
    }  # the hub's sha256 does not match
    with pytest.raises(data.UserError, match="sha256 check failed.*c2i_B_256.pt"):
        sample.main(sample.parse_args(["--labels", "3", "--out", str(tmp_path / "x.png")]))
    assert not (data.cache_dir() / "c2i_B_256.pt").exists()
    assert not (data.cache_dir() / "c2i_B_256.pt.part").exists()


def test_offline_without_cache_names_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(
        data.UserError, match="127.0.0.1:9/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt"
    ):
        sample.main(sample.parse_args(["--out", str(tmp_path / "x.png")]))


def test_class_names_resolve():
    assert len(sample.CLASS_NAMES.read_text().splitlines()) == 1000
    names = ["golden retriever", "207", "Red Panda", "geyser", "tench"]
    assert sample.parse_labels(names, 1000) == [207, 207, 387, 974, 0]
    with pytest.raises(
        data.UserError, match="ambiguous.*134.*517"
    ):  # crane: the bird and the machine
        sample.parse_labels(["crane"], 1000)
    with pytest.raises(data.UserError, match="not an ImageNet class.*207: golden retriever"):
        sample.parse_labels(["golden"], 1000)
    with pytest.raises(data.UserError, match="out of range"):
        sample.parse_labels(["1000"], 1000)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--top-p", "0"], "top-p"),
        (["--top-p", "1.5"], "top-p"),
        (["--top-k", "-1"], "top-k"),
        (["--temperature", "-0.5"], "temperature"),
        (["--batch-size", "0"], "batch-size"),
        (["--num-samples", "0"], "num-samples"),
        (["--prompt", "a cat", "--num-samples", "8"], "class-conditional only"),
        (["--model", "XL", "--image-size", "256"], "no released GPT XL at --image-size 256"),
        (["--image-size", "512"], "no released GPT B at --image-size 512"),
        (["--model", "7B"], "no released GPT 7B"),
    ],
)
def test_flag_errors_before_any_download(argv, match, tmp_path):
    with pytest.raises(data.UserError, match=match):
        sample.main(sample.parse_args(argv + ["--out", str(tmp_path / "x.png")]))


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--labels", "4"], r"out of range: this model has classes 0..3"),
        (["--labels", "golden retriever"], "ImageNet model"),
        (["--precision", "fp16"], "fp16 needs a GPU"),
        (["--image-size", "256"], "does not match"),
    ],
)
def test_flag_errors_with_own_checkpoints(own_ckpts, argv, match, tmp_path):
    with pytest.raises(data.UserError, match=match):
        sample.main(sample.parse_args(own_ckpts + argv + ["--out", str(tmp_path / "x.png")]))


def test_own_checkpoints_need_their_vq_and_official_files_their_size(own_ckpts, tmp_path):
    with pytest.raises(data.UserError, match="pass its --vq-ckpt"):
        sample.main(sample.parse_args(own_ckpts[:2]))
    model, _ = tiny_models()
    torch.save({"model": model.state_dict()}, tmp_path / "official.pt")
    with pytest.raises(data.UserError, match="pass --image-size"):
        sample.main(
            sample.parse_args(["--gpt-ckpt", str(tmp_path / "official.pt")] + own_ckpts[2:])
        )


def test_own_checkpoints_grid_seed_and_cfg_warning(own_ckpts, tmp_path, capsys):
    out = sample.main(
        sample.parse_args(own_ckpts + ["--cfg-scale", "0.5", "--out", str(tmp_path / "g.png")])
    )
    assert "warning: --cfg-scale 0.5" in capsys.readouterr().err
    assert Image.open(out).size == (4 * 66 + 2, 2 * 66 + 2)  # 8 labels (0..3 twice) of 64 px
    argv = own_ckpts + ["--cfg-scale", "0.5"]
    same = sample.main(sample.parse_args(argv + ["--out", str(tmp_path / "h.png")]))
    other = sample.main(sample.parse_args(argv + ["--seed", "1", "--out", str(tmp_path / "i.png")]))
    pixels = [np.asarray(Image.open(p)) for p in (out, same, other)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(
        pixels[0], pixels[2]
    )  # --seed decides


def read_npz(path):
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"], json.loads(str(z["meta"]))


def test_npz_shapes_balance_resize_and_resume(own_ckpts, tmp_path, monkeypatch):
    argv = own_ckpts + ["--num-samples", "10", "--batch-size", "4", "--image-size-eval", "32"]
    ref = sample.main(sample.parse_args(argv + ["--out", str(tmp_path / "ref.npz")]))
    images, labels, meta = read_npz(ref)
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    assert sorted(np.bincount(labels, minlength=4)) == [
        2,
        2,
        3,
        3,
    ]  # balanced: N / K each, rest spread
    assert not np.array_equal(labels, np.resize(np.arange(4), 10))  # shuffled
    assert (
        meta["resize_filter"] == "antialias"
        and meta["image_size"] == 64
        and meta["cfg_scale"] == 1.5
    )
    assert not (tmp_path / "ref-shards" / "shard_00000.npz").exists()  # merged, then cleaned up

    calls = []
    real_generate = gpt.generate

    def flaky_generate(*args, **kwargs):  # the run dies while sampling its third shard
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(gpt, "generate", flaky_generate)
    out = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        sample.main(sample.parse_args(argv + ["--out", str(out)]))
    assert sorted(p.name for p in (tmp_path / "run-shards").glob("*.npz")) == [
        "shard_00000.npz",
        "shard_00001.npz",
    ]
    other = [
        a if a != "32" else "16" for a in argv
    ]  # same --out, other settings: the shards are refused
    with pytest.raises(data.UserError, match="other settings"):
        sample.main(sample.parse_args(other + ["--out", str(out)]))
    calls.clear()
    sample.main(
        sample.parse_args(argv + ["--out", str(out)])
    )  # restart: only the missing shard is sampled
    assert len(calls) == 1
    images2, labels2, _ = read_npz(out)
    assert np.array_equal(images2, images) and np.array_equal(labels2, labels)


def test_npz_official_resize_and_native_size(own_ckpts, tmp_path):
    argv = own_ckpts + [
        "--num-samples",
        "4",
        "--image-size-eval",
        "32",
        "--resize-filter",
        "official",
    ]
    official = sample.main(sample.parse_args(argv + ["--out", str(tmp_path / "o.npz")]))
    images, _, meta = read_npz(official)
    assert images.shape == (4, 32, 32, 3) and meta["resize_filter"] == "official"
    native = sample.main(
        sample.parse_args(own_ckpts + ["--num-samples", "4", "--out", str(tmp_path / "n.npz")])
    )
    images, _, meta = read_npz(native)
    assert images.shape == (4, 64, 64, 3) and meta["resize_filter"] == "none"  # 64 px <= 256: kept


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(own_ckpts, tmp_path):
    """Shard seeds do not depend on the rank count: 2 CPU ranks (gloo) write what 1 process writes."""
    argv = own_ckpts + ["--num-samples", "7", "--batch-size", "2"]
    one = sample.main(sample.parse_args(argv + ["--out", str(tmp_path / "one.npz")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "sample.py"),
            *argv,
            "--out",
            str(tmp_path / "two.npz"),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    (a, la, _), (b, lb, _) = read_npz(one), read_npz(tmp_path / "two.npz")
    assert a.shape == (7, 64, 64, 3) and np.array_equal(a, b) and np.array_equal(la, lb)
