"""Tests for train_gpt.py: overfit, exact resume, DDP and FSDP (gloo, 2 CPU processes) equal to one
process, gradient accumulation, end to end with samples and a loadable checkpoint.

    python -m pytest tests/test_train_gpt.py -q
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import data
import gpt
import train_gpt

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make_codes(path, n=16, n_aug=2, block_size=16, vocab=64, num_classes=4, seed=0):
    """A code folder in the extract_codes format, filled with random tokens."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    codes = np.lib.format.open_memmap(path / "codes.npy", "w+", np.uint16, (n, n_aug, block_size))
    codes[:] = rng.integers(0, vocab, codes.shape)
    codes.flush()
    np.save(path / "labels.npy", np.arange(n, dtype=np.int64) % num_classes)
    np.save(path / "done.npy", np.ones(n, dtype=bool))
    meta = dict(
        vocab_size=vocab,
        grid_size=math.isqrt(block_size),
        block_size=block_size,
        image_size=32,
        num_classes=num_classes,
        classes=[f"c{i}" for i in range(num_classes)],
        num_images=n,
        n_aug=n_aug,
        tokenizer=dict(config=None),
        complete=True,
    )
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def run(tmp_path, name, *flags, code_path=None):
    """main(parse_args(...)) in this process -> run directory."""
    argv = [
        "--model",
        "tiny",
        "--code-path",
        str(code_path or tmp_path / "codes"),
        "--results-dir",
        str(tmp_path / name),
        "--num-workers",
        "0",
        "--log-every",
        "1",
        *flags,
    ]
    return train_gpt.main(train_gpt.parse_args(argv))


def torchrun(tmp_path, name, *flags, nproc=2):
    """The same run under `torchrun --nproc_per_node=2` (gloo on the CPU) -> run directory."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        "train_gpt.py",
        "--model",
        "tiny",
        "--code-path",
        str(tmp_path / "codes"),
        "--results-dir",
        str(tmp_path / name),
        "--num-workers",
        "0",
        "--log-every",
        "1",
        *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return next((tmp_path / name).glob("000-*"))


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def final(run_dir):
    return common.load_checkpoint(run_dir / "checkpoints" / "last.pt")


def assert_state_close(a, b, exact=False):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


NO_DROPOUT = ("--dropout", "0", "--class-dropout-prob", "0")


# ----------------------------------------------------------------------------------------------


def test_overfits_toy_codes(tmp_path):
    make_codes(tmp_path / "codes", n=8, n_aug=1)
    run_dir = run(
        tmp_path,
        "r",
        "--max-steps",
        "150",
        "--global-batch-size",
        "8",
        "--lr",
        "3e-3",
        *NO_DROPOUT,
        "--ckpt-every",
        "1000",
    )
    log = losses(run_dir)
    assert abs(log[0] - math.log(64)) < 0.05  # zero-initialised output: exactly ln(vocab) at first
    assert log[-1] < 0.3, log[-1]  # memorised, far below ln(64) = 4.16


def test_resume_is_exact(tmp_path):
    """Stop mid-epoch and at an epoch boundary; resumed runs end bit-identical (dropout, EMA
    on)."""
    make_codes(tmp_path / "codes", n=24)
    flags = (
        "--max-steps",
        "8",
        "--global-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "2",
        "--ckpt-every",
        "3",
        "--ema",
        "--ema-decay",
        "0.9",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--lr-schedule",
        "cosine",
    )
    run_dir = run(tmp_path, "r", *flags)
    whole = final(run_dir)
    epochs = [json.loads(x)["epoch"] for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert whole["step"] == 8 and epochs == [0] * 6 + [1] * 2  # 6 steps per epoch
    keep = tmp_path / "keep"
    shutil.copytree(run_dir / "checkpoints", keep)
    for start in (keep / "0000003.pt", run_dir / "checkpoints" / "0000006.pt"):
        resumed_dir = run(tmp_path, "r", *flags, "--resume", str(start))
        assert (resumed_dir == run_dir) == (
            start.parent.name == "checkpoints"
        )  # same run dir if possible
        resumed = final(resumed_dir)
        assert resumed["step"] == 8
        assert_state_close(resumed["model"], whole["model"], exact=True)
        assert_state_close(resumed["ema"], whole["ema"], exact=True)
        for k, v in whole["optimizer"]["state"].items():
            assert torch.equal(resumed["optimizer"]["state"][k]["exp_avg_sq"], v["exp_avg_sq"])
    assert not torch.equal(whole["ema"]["output.weight"], whole["model"]["output.weight"])


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    make_codes(tmp_path / "codes", n=16)
    flags = ("--max-steps", "3", "--global-batch-size", "8", *NO_DROPOUT, "--lr", "1e-3")
    a = run(tmp_path, "a", *flags)
    b = run(tmp_path, "b", *flags, "--gradient-accumulation-steps", "4")
    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-5)
    assert_state_close(final(a)["model"], final(b)["model"])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode, vq_ckpt):
    """gloo on the CPU: 2 ranks x 2 micro-steps x 2 = the one-process global batch of 8."""
    make_codes(tmp_path / "codes", n=24, vocab=1024)
    flags = (
        "--max-steps",
        "4",
        "--global-batch-size",
        "8",
        *NO_DROPOUT,
        "--lr",
        "1e-3",
        "--ema",
        "--ema-decay",
        "0.5",
        "--ckpt-every",
        "2",
    )
    one = run(tmp_path, "one", *flags)
    extra = ("--fsdp", "--vq-ckpt", str(vq_ckpt), "--sample-every", "4") if mode == "fsdp" else ()
    two = torchrun(tmp_path, "two", *flags, "--gradient-accumulation-steps", "2", *extra)
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    assert_state_close(final(two)["model"], final(one)["model"])
    assert_state_close(final(two)["ema"], final(one)["ema"])
    assert len(final(two)["rng"]) == 2
    if mode == "fsdp":  # the gathered optimizer state comes back: resume under FSDP is exact too
        whole = final(two)
        keep = tmp_path / "keep"
        shutil.copytree(two / "checkpoints", keep)
        torchrun(
            tmp_path,
            "two",
            *flags,
            "--gradient-accumulation-steps",
            "2",
            *extra,
            "--resume",
            str(keep / "0000002.pt"),
        )
        assert_state_close(final(two)["model"], whole["model"], exact=True)
        gpt.GPT.from_checkpoint(final(two))  # same format, no special flag
        assert (two / "samples" / "0000004.png").is_file()  # sampling works on sharded weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", [(), ("--fsdp",)])
def test_gpu_bf16_one_process_under_torchrun(tmp_path, extra):
    """bf16 autocast (+ FSDP's bf16 MixedPrecisionPolicy) on one GPU: trains and saves a loadable
    file."""
    make_codes(tmp_path / "codes", n=16)
    run_dir = torchrun(
        tmp_path, "g", "--max-steps", "3", "--global-batch-size", "8", *extra, nproc=1
    )
    assert all(math.isfinite(x) for x in losses(run_dir))
    assert gpt.GPT.from_checkpoint(final(run_dir)).config.vocab_size == 64


def test_end_to_end_with_samples(tmp_path, toy_folder, vq_ckpt):
    argv = ["extract", "--vq-ckpt", str(vq_ckpt), "--data-path", str(toy_folder)]
    argv += ["--code-path", str(tmp_path / "codes"), "--image-size", "32", "--num-workers", "0"]
    data.extract_codes(data.parse_args(argv))
    run_dir = run(
        tmp_path,
        "r",
        "--max-steps",
        "2",
        "--global-batch-size",
        "8",
        "--vq-ckpt",
        str(vq_ckpt),
        "--sample-every",
        "2",
        "--ema",
    )
    assert (run_dir / "samples" / "0000002.png").is_file()
    assert [json.loads(x)["step"] for x in (run_dir / "log.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    ckpt = final(run_dir)
    assert ckpt["vq_config"]["codebook_size"] == 1024 and ckpt["step"] == 2
    torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)  # plain types only
    model = gpt.GPT.from_checkpoint(final(run_dir))
    assert (model.config.vocab_size, model.config.block_size, model.config.num_classes) == (
        1024,
        16,
        4,
    )
    assert gpt.generate(model, torch.tensor([0, 3])).shape == (2, 16)


def test_user_errors(tmp_path, capsys):
    make_codes(tmp_path / "codes", n=8)
    with pytest.raises(common.UserError, match="multiple of"):
        run(tmp_path, "r", "--global-batch-size", "6", "--gradient-accumulation-steps", "4")
    with pytest.raises(common.UserError, match="meta.json"):
        run(tmp_path, "r", code_path=tmp_path / "nothing")
    with pytest.raises(common.UserError, match="--fsdp needs torchrun"):
        run(tmp_path, "r", "--global-batch-size", "8", "--fsdp")
    with pytest.raises(SystemExit):  # one resolver of preset names: common.preset
        train_gpt.parse_args(["--code-path", "x", "--model", "XS"])
    assert "unknown preset 'XS'" in capsys.readouterr().err
    first = run(tmp_path, "r", "--global-batch-size", "8", "--max-steps", "1")
    make_codes(tmp_path / "other", n=8, vocab=32)  # the checkpoint's model must fit the codes
    with pytest.raises(common.UserError, match="other codes.*vocab_size"):
        resume = ("--resume", str(first / "checkpoints" / "last.pt"))
        run(tmp_path, "r", "--global-batch-size", "8", *resume, code_path=tmp_path / "other")


def test_lr_schedule():
    args = train_gpt.parse_args(
        ["--code-path", "x", "--warmup-steps", "10", "--lr-schedule", "cosine", "--min-lr", "1e-5"]
    )
    assert args.model == "GPT-B" and args.lr == 1e-4 and args.global_batch_size == 256
    assert train_gpt.get_lr(args, 0, 110) == pytest.approx(1e-5)
    assert train_gpt.get_lr(args, 9, 110) == pytest.approx(1e-4)
    assert train_gpt.get_lr(args, 60, 110) == pytest.approx(1e-5 + 0.5 * 9e-5)
    assert train_gpt.get_lr(args, 110, 110) == pytest.approx(1e-5)
    const = train_gpt.parse_args(["--code-path", "x", "--model", "XL"])
    assert const.model == "GPT-XL" and train_gpt.get_lr(const, 12345, 99999) == 1e-4
