"""Tests for token-code extraction and CodeDataset (data.py): stored codes equal vq.encode of the
official crops, resume after an interruption, unreadable images, meta.json, torchrun extraction.

    python -m pytest tests/test_codes.py -q
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import vq

ROOT = Path(__file__).resolve().parents[1]
S = 32  # toy images are 32 px; VQ-tiny downsamples 8x -> 4 x 4 = 16 tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def extract(vq_ckpt, folder, code_path, image_size=S, flush_every=20, **flags):
    """`python data.py extract ...` in this process; flags as keyword arguments."""
    argv = ["extract", "--vq-ckpt", str(vq_ckpt), "--data-path", str(folder)]
    argv += ["--code-path", str(code_path), "--image-size", str(image_size), "--num-workers", "0"]
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return data.extract_codes(data.parse_args(argv), flush_every=flush_every)


def load_store(code_path):
    return [np.load(Path(code_path) / f"{k}.npy") for k in ("codes", "labels", "done")]


def encode(model, crops):
    """Reference: encode PIL crops one batch at a time -> (codes (n, h*w), quant)."""
    x = torch.stack([data.pil_to_tensor(c) for c in crops])
    with torch.no_grad():
        quant, _, ind = model.encode(x)
    return ind.view(len(crops), -1).numpy(), quant


def reference_ten_crop(img, size, crop_range):
    """TenCrop written out by hand: 4 corners + centre of the ADM crop, then of its mirror image."""
    big = data.center_crop_arr(img, int(size * crop_range))
    m = big.width - size
    boxes = [(0, 0), (m, 0), (0, m), (m, m), (round(m / 2), round(m / 2))]
    mirror = big.transpose(Image.FLIP_LEFT_RIGHT)
    return [im.crop((x, y, x + size, y + size)) for im in (big, mirror) for x, y in boxes]


# ----------------------------------------------------------------------------------------------


def test_centre_and_flip_codes_equal_encode_and_decode(vq_ckpt, toy_folder, tmp_path):
    meta = extract(vq_ckpt, toy_folder, tmp_path / "codes")
    codes, labels, done = load_store(tmp_path / "codes")
    folder = data.ImageFolder(toy_folder, augment=None)
    assert codes.shape == (32, 2, 16) and codes.dtype == np.uint16 and done.all()
    assert labels.tolist() == [lab for _, lab in folder.samples]
    model = data.load_tokenizer(vq_ckpt)
    for i in (0, 13, 31):
        img = data.center_crop_arr(data.load_image(folder.samples[i][0]), S)
        ref, quant = encode(model, [img, img.transpose(Image.FLIP_LEFT_RIGHT)])
        np.testing.assert_array_equal(codes[i], ref)
        with (
            torch.no_grad()
        ):  # the stored codes decode to the tokenizer's reconstruction of the crop
            torch.testing.assert_close(
                model.decode_code(torch.from_numpy(codes[i].astype(np.int64))),
                model.decode(quant),
                rtol=1e-4,
                atol=1e-5,
            )
    # meta.json describes the store and the tokenizer that made it
    assert meta == json.loads((tmp_path / "codes" / "meta.json").read_text())
    assert (meta["vocab_size"], meta["grid_size"], meta["block_size"], meta["image_size"]) == (
        1024,
        4,
        16,
        S,
    )
    assert meta["classes"] == folder.classes and meta["num_classes"] == 4
    assert (
        meta["n_aug"],
        meta["ten_crop"],
        meta["num_images"],
        meta["num_valid"],
        meta["num_bad"],
    ) == (2, False, 32, 32, 0)
    assert meta["complete"] and meta["dtype"] == "uint16"
    tok = meta["tokenizer"]
    assert tok["sha256"] == hashlib.sha256(Path(vq_ckpt).read_bytes()).hexdigest()
    assert tok["config"]["codebook_size"] == 1024 and meta["flip"]


def test_no_flip_keeps_only_unmirrored_crops(vq_ckpt, toy_folder, tmp_path):
    for ten in (False, True):
        kw = dict(ten_crop=True) if ten else {}
        both = extract(vq_ckpt, toy_folder, tmp_path / f"both{ten}", **kw)
        one = extract(vq_ckpt, toy_folder, tmp_path / f"one{ten}", no_flip=True, **kw)
        assert (both["n_aug"], one["n_aug"], one["flip"]) == ((10, 5) if ten else (2, 1)) + (False,)
        mirrored, plain = (
            load_store(tmp_path / f"both{ten}")[0],
            load_store(tmp_path / f"one{ten}")[0],
        )
        np.testing.assert_array_equal(plain, mirrored[:, : one["n_aug"]])


@pytest.mark.parametrize("crop_range", [1.1, 1.05])
def test_ten_crop_codes_equal_encode(vq_ckpt, toy_folder, tmp_path, crop_range):
    meta = extract(
        vq_ckpt, toy_folder, tmp_path / "codes", ten_crop=True, crop_range=crop_range, batch_size=5
    )
    assert (meta["n_aug"], meta["crop_range"]) == (10, crop_range)
    codes, _, _ = load_store(tmp_path / "codes")
    model = data.load_tokenizer(vq_ckpt)
    folder = data.ImageFolder(toy_folder, augment=None)
    for i in (2, 30):
        img = data.load_image(folder.samples[i][0])
        crops = reference_ten_crop(img, S, crop_range)
        assert all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(crops, data.crops(img, S, True, crop_range))
        )
        np.testing.assert_array_equal(codes[i], encode(model, crops)[0])
    assert len({codes[2, k].tobytes() for k in range(10)}) > 1  # the crops differ


class Killed(Exception):
    pass


def test_extraction_resumes_after_interruption(vq_ckpt, toy_folder, tmp_path, monkeypatch):
    extract(vq_ckpt, toy_folder, tmp_path / "fresh", batch_size=4)
    real_encode, calls, kill_at = vq.VQModel.encode, [], [3]

    def flaky_encode(self, x):
        calls.append(len(x))
        if kill_at and len(calls) == kill_at[0]:
            raise Killed  # the job dies while encoding the third batch
        return real_encode(self, x)

    monkeypatch.setattr(vq.VQModel, "encode", flaky_encode)
    with pytest.raises(Killed):
        extract(vq_ckpt, toy_folder, tmp_path / "codes", batch_size=4, flush_every=1)
    assert load_store(tmp_path / "codes")[2].sum() == 8  # two batches of 4 images were saved
    assert not json.loads((tmp_path / "codes" / "meta.json").read_text())["complete"]
    calls.clear(), kill_at.clear()
    meta = extract(vq_ckpt, toy_folder, tmp_path / "codes", batch_size=4)
    assert sum(calls) == (32 - 8) * 2  # only the rest was encoded (2 crops per image)
    assert meta["complete"]
    for a, b in zip(load_store(tmp_path / "codes"), load_store(tmp_path / "fresh")):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(
        data.UserError, match="different grid_size, block_size, image_size"
    ):  # settings must match to resume
        extract(vq_ckpt, toy_folder, tmp_path / "codes", image_size=64)


def test_unreadable_images_named_or_skipped(vq_ckpt, toy_folder, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(toy_folder, folder)
    bad = folder / "001-green-stripes" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(data.UserError, match="broken.png"):
        extract(vq_ckpt, folder, tmp_path / "codes")
    meta = extract(vq_ckpt, folder, tmp_path / "codes2", skip_bad_images=True)
    assert (meta["num_images"], meta["num_valid"], meta["num_bad"]) == (33, 32, 1)
    assert meta["bad_files"] == [str(bad)] and meta["complete"]
    ds = data.CodeDataset(tmp_path / "codes2")
    assert len(ds) == 32 and all(ds[(0, i)][1] >= 0 for i in range(len(ds)))


def test_code_dataset_draws(tmp_path):
    def store(path, value, n=64, n_aug=10):
        path.mkdir()
        codes = np.lib.format.open_memmap(path / "codes.npy", "w+", np.uint16, (n, n_aug, 16))
        codes[:] = (
            value + np.arange(n_aug, dtype=np.uint16)[None, :, None]
        )  # token = value + crop index
        codes.flush()
        np.save(path / "labels.npy", np.where(np.arange(n) == 5, data.BAD_LABEL, np.arange(n) % 4))
        np.save(path / "done.npy", np.ones(n, dtype=bool))  # row 5: an unreadable image
        meta = dict(
            vocab_size=1024,
            grid_size=4,
            block_size=16,
            num_classes=4,
            classes=list("abcd"),
            num_images=n,
            n_aug=n_aug,
            complete=True,
        )
        (path / "meta.json").write_text(json.dumps(meta))

    store(tmp_path / "a", 0)
    store(tmp_path / "b", 100)
    ds = data.CodeDataset(tmp_path / "a", seed=1)
    assert len(ds) == 63 and ds.meta["block_size"] == 16 and ds.meta["num_classes"] == 4
    codes, label = ds[(0, 5)]  # row 6: row 5 is skipped
    assert codes.dtype == torch.int64 and codes.shape == (16,) and label == 6 % 4
    first = [ds[(0, i)][0][0].item() for i in range(63)]
    assert first == [ds[(0, i)][0][0].item() for i in range(63)]  # seeded by (seed, epoch, row)
    assert len(set(first)) == 10  # every crop gets drawn
    assert first != [ds[(1, i)][0][0].item() for i in range(63)]
    mixed = data.CodeDataset(tmp_path / "a", extra_code_path=tmp_path / "b", extra_prob=0.5)
    from_b = np.mean([mixed[(0, i)][0][0].item() >= 100 for i in range(63)])
    assert 0.25 < from_b < 0.75
    never = data.CodeDataset(tmp_path / "a", extra_code_path=tmp_path / "b", extra_prob=0.0)
    assert all(never[(0, i)][0][0].item() < 100 for i in range(63))
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    (tmp_path / "b" / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(data.UserError, match="did not finish; run the same"):
        data.CodeDataset(tmp_path / "a", extra_code_path=tmp_path / "b")


def test_torchrun_cli_extraction_equals_one_process(vq_ckpt, toy_folder, tmp_path):
    extract(vq_ckpt, toy_folder, tmp_path / "one", ten_crop=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "data.py",
        "extract",
        "--vq-ckpt",
        str(vq_ckpt),
        "--data-path",
        str(toy_folder),
        "--code-path",
        str(tmp_path / "two"),
        "--image-size",
        str(S),
        "--ten-crop",
        "--crop-range",
        "1.1",
        "--batch-size",
        "3",
        "--num-workers",
        "0",
    ]
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for a, b in zip(load_store(tmp_path / "two"), load_store(tmp_path / "one")):
        np.testing.assert_array_equal(a, b)
    bad = subprocess.run(
        [
            sys.executable,
            "data.py",
            "extract",
            "--vq-ckpt",
            str(tmp_path / "missing.pt"),
            "--data-path",
            str(toy_folder),
            "--code-path",
            str(tmp_path / "x"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error: checkpoint not found" in bad.stderr
