"""Tests for data.py's shared runtime and image datasets.

python -m pytest tests/test_data.py -q
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image

import data

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
    assert torch.equal(ds[(0, 5)][0], x1)  # a plain index is epoch 0
    # a new epoch draws new crops
    assert any(not torch.equal(ds[(1, i)][0], ds[(0, i)][0]) for i in range(8))


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
