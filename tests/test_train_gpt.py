"""Tests for train_gpt.py: overfit, exact resume (bare or with changed flags), DDP and FSDP (gloo,
2 CPU processes) equal to one process, gradient accumulation, end to end with samples and a
loadable checkpoint, and one-line errors.

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
        tokenizer=dict(config=None, sha256="ab" * 32),
        complete=True,
    )
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def run(tmp_path, name, *flags, code_path=None):
    """main(parse_args(...)) in this process -> run directory."""
    argv = ["--model", "tiny", "--code-path", str(code_path or tmp_path / "codes")]
    argv += ["--results-dir", str(tmp_path / name), "--num-workers", "0", "--log-every", "1"]
    return train_gpt.main(train_gpt.parse_args([*argv, *flags]))


def cli(monkeypatch, capsys, *argv):
    """The script's command line in this process -> (exit status, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["train_gpt.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        common.cli(train_gpt.main, train_gpt.parse_args)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def torchrun(tmp_path, name, *flags, nproc=2):
    """The same run under `torchrun --nproc_per_node=2` (gloo on the CPU) -> the newest run
    directory."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [
        "--standalone",
        "train_gpt.py",
        "--model",
        "tiny",
        "--code-path",
        str(tmp_path / "codes"),
    ]
    cmd += ["--results-dir", str(tmp_path / name), "--num-workers", "0", "--log-every", "1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return sorted((tmp_path / name).glob("*-GPT-tiny"))[-1]


def log(run_dir, key="loss"):
    return [json.loads(line)[key] for line in (run_dir / "log.jsonl").read_text().splitlines()]


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


def test_overfits_toy_codes(tmp_path, capsys):
    make_codes(tmp_path / "codes", n=8, n_aug=1)
    flags = ("--max-steps", "150", "--global-batch-size", "8", "--lr", "3e-3", *NO_DROPOUT)
    run_dir = run(tmp_path, "r", *flags, "--log-every", "50", "--ckpt-every", "1000")
    # the run folder, processes, threads and precision come first, before any step
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{run_dir}: GPT-tiny c2i") and "CPU thread(s) each, fp32" in first
    assert log(run_dir, "step") == [1, 50, 100, 150]  # the first step is logged too
    losses = log(run_dir)
    assert abs(losses[0] - math.log(64)) < 0.05  # zero-initialised output: ln(vocab) at first
    assert losses[-1] < 0.3, losses[-1]  # memorised, far below ln(64) = 4.16
    assert sorted(c.name for c in (run_dir / "checkpoints").iterdir()) == ["0000150.pt", "last.pt"]


RESUME_FLAGS = (  # 24 rows / 4 per step = 6 steps per epoch: step 6 ends the first epoch
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


def test_resume_is_exact(tmp_path, capsys):
    """Stop mid-epoch and at an epoch boundary; resumed runs end bit-identical (dropout, EMA
    on). A bare --resume CKPT continues CKPT's run: its preset, codes, lr, schedule, EMA."""
    make_codes(tmp_path / "codes", n=24)
    run_dir = run(tmp_path, "r", *RESUME_FLAGS)
    whole = final(run_dir)
    assert whole["step"] == 8 and "6 steps per epoch" in capsys.readouterr().out
    keep = tmp_path / "keep"
    shutil.copytree(run_dir / "checkpoints", keep)
    # mid-epoch with all the flags again (a new run folder: the file is outside checkpoints/);
    # at the epoch boundary bare, in the run's own folder
    for start in (keep / "0000003.pt", run_dir / "checkpoints" / "0000006.pt"):
        if start.parent == keep:
            resumed_dir = run(tmp_path, "r", *RESUME_FLAGS, "--resume", str(start))
        else:
            args = train_gpt.parse_args(["--resume", str(start), "--num-workers", "0"])
            resumed_dir = train_gpt.main(args)
            assert args.lr == 1e-3 and args.ema and args.model == "GPT-tiny"
        assert (resumed_dir == run_dir) == (start.parent.name == "checkpoints")
        resumed = final(resumed_dir)
        assert resumed["step"] == 8
        assert_state_close(resumed["model"], whole["model"], exact=True)
        assert_state_close(resumed["ema"], whole["ema"], exact=True)
        for k, v in whole["optimizer"]["state"].items():
            assert torch.equal(resumed["optimizer"]["state"][k]["exp_avg_sq"], v["exp_avg_sq"])
    assert not torch.equal(whole["ema"]["output.weight"], whole["model"]["output.weight"])
    # the killed run had logged steps 7 and 8: the resumed one logs them once more, not twice
    assert log(run_dir, "step") == list(range(1, 9))
    assert log(run_dir, "lr")[2] == pytest.approx(1e-3)  # the saved schedule, not the defaults


def test_resume_with_changed_flags(tmp_path, monkeypatch, capsys, vq_ckpt):
    """Flags that may change (length, cadences, workers) change and are listed; the others keep
    the saved run's values, and changing one (batch size, lr) is refused in one line."""
    make_codes(tmp_path / "codes", n=24)
    first = run(tmp_path, "r", *RESUME_FLAGS, "--max-steps", "3")
    ckpt = first / "checkpoints" / "last.pt"
    capsys.readouterr()
    train_gpt.main(
        train_gpt.parse_args(["--resume", str(ckpt), "--max-steps", "5", "--log-every", "2"])
    )
    out = capsys.readouterr().out
    assert "steps 3 -> 5" in out and "max_steps 3 -> 5; log_every 1 -> 2" in out
    resumed = final(first)
    assert resumed["step"] == 5 and resumed["ema"] is not None  # EMA kept without --ema
    assert resumed["args"]["lr"] == 1e-3 and resumed["args"]["global_batch_size"] == 4
    assert log(first, "step") == [1, 2, 3, 4, 5]
    for flag, value in ("--global-batch-size", 8), ("--lr", 0.01):
        code, err = cli(monkeypatch, capsys, "--resume", ckpt, flag, value)
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag} {value} differs")
    # a tokenizer checkpoint is not a run to continue
    code, err = cli(monkeypatch, capsys, "--resume", vq_ckpt)
    assert code == 2 and err == [
        f"error: {vq_ckpt} was not written by train_gpt.py; resume one of its checkpoints/*.pt"
    ]
    code, err = cli(monkeypatch, capsys, "--max-steps", "1")
    assert code == 2 and err[0].startswith("error: --code-path is required")


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    make_codes(tmp_path / "codes", n=16)
    flags = ("--max-steps", "3", "--global-batch-size", "8", *NO_DROPOUT, "--lr", "1e-3")
    a = run(tmp_path, "a", *flags)
    b = run(tmp_path, "b", *flags, "--gradient-accumulation-steps", "4")
    np.testing.assert_allclose(log(a), log(b), rtol=1e-5)
    assert_state_close(final(a)["model"], final(b)["model"])
    # a line averages the steps since the last one; the extra line of step 1 starts no new one
    c = run(tmp_path, "c", *flags, "--log-every", "3")
    assert log(c, "step") == [1, 3]
    np.testing.assert_allclose(log(c), [log(a)[0], np.mean(log(a))], rtol=1e-6)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode, vq_ckpt):
    """gloo on the CPU: 2 ranks x 2 micro-steps x 2 = the one-process global batch of 8."""
    make_codes(tmp_path / "codes", n=24, vocab=1024)
    flags = ("--max-steps", "4", "--global-batch-size", "8", *NO_DROPOUT, "--lr", "1e-3")
    flags += ("--ema", "--ema-decay", "0.5", "--ckpt-every", "2", "--log-every", "3")
    one = run(tmp_path, "one", *flags)
    extra = ("--fsdp", "--vq-ckpt", str(vq_ckpt), "--sample-every", "4") if mode == "fsdp" else ()
    two = torchrun(tmp_path, "two", *flags, "--gradient-accumulation-steps", "2", *extra)
    np.testing.assert_allclose(log(two), log(one), rtol=1e-5)
    assert_state_close(final(two)["model"], final(one)["model"])
    assert_state_close(final(two)["ema"], final(one)["ema"])
    assert len(final(two)["rng"]) == 2
    if mode == "fsdp":  # the gathered optimizer state comes back: resume under FSDP is exact too
        whole = final(two)
        keep = tmp_path / "keep"
        shutil.copytree(two / "checkpoints", keep)
        # the saved flags (--fsdp, accumulation, EMA, samples) hold; a new folder: 001-GPT-tiny
        resumed = torchrun(tmp_path, "two", "--resume", str(keep / "0000002.pt"))
        assert resumed.name == "001-GPT-tiny" and final(resumed)["step"] == 4
        assert_state_close(final(resumed)["model"], whole["model"], exact=True)
        assert_state_close(final(resumed)["ema"], whole["ema"], exact=True)
        gpt.GPT.from_checkpoint(final(resumed))  # same format, no special flag
        assert (resumed / "samples" / "0000004.png").is_file()  # sampling on sharded weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", [(), ("--fsdp",)])
def test_gpu_bf16_one_process_under_torchrun(tmp_path, extra):
    """bf16 autocast (+ FSDP's bf16 MixedPrecisionPolicy) on one GPU: trains and saves a loadable
    file."""
    make_codes(tmp_path / "codes", n=16)
    run_dir = torchrun(
        tmp_path, "g", "--max-steps", "3", "--global-batch-size", "8", *extra, nproc=1
    )
    assert all(math.isfinite(x) for x in log(run_dir))
    assert gpt.GPT.from_checkpoint(final(run_dir)).config.vocab_size == 64


def test_end_to_end_with_samples(tmp_path, toy_folder, vq_ckpt):
    argv = ["extract", "--vq-ckpt", str(vq_ckpt), "--data-path", str(toy_folder)]
    argv += ["--code-path", str(tmp_path / "codes"), "--image-size", "32", "--num-workers", "0"]
    data.extract_codes(data.parse_args(argv))
    flags = ("--max-steps", "2", "--global-batch-size", "8", "--vq-ckpt", str(vq_ckpt))
    run_dir = run(tmp_path, "r", *flags, "--sample-every", "2", "--ema")
    assert (run_dir / "samples" / "0000002.png").is_file()
    assert log(run_dir, "step") == [1, 2]
    ckpt = final(run_dir)
    assert ckpt["vq_config"]["codebook_size"] == 1024 and ckpt["step"] == 2
    # the tokenizer's fingerprint, for sample.py to refuse another one
    assert ckpt["tokenizer_sha256"] == common.file_digest(vq_ckpt)
    torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)  # plain types only
    model = gpt.GPT.from_checkpoint(final(run_dir))
    c = model.config
    assert (c.vocab_size, c.block_size, c.num_classes) == (1024, 16, 4)
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


def test_flags_and_lr_schedule(capsys):
    args = train_gpt.parse_args(
        ["--code-path", "x", "--warmup-steps", "10", "--lr-schedule", "cosine", "--min-lr", "1e-5"]
    )
    assert args.model == "GPT-B" and args.lr == 1e-4 and args.global_batch_size == 256
    assert args.num_workers == common.NUM_WORKERS  # spare cores, at most 4
    assert train_gpt.get_lr(args, 1, 110) == pytest.approx(1e-5)
    assert train_gpt.get_lr(args, 10, 110) == pytest.approx(1e-4)
    assert train_gpt.get_lr(args, 61, 110) == pytest.approx(1e-5 + 0.5 * 9e-5)
    # steps count from 1; the last one is one step short of --min-lr
    assert train_gpt.get_lr(args, 110, 110) == pytest.approx(
        1e-5 + 9e-5 * (1 + math.cos(0.99 * math.pi)) / 2
    )
    const = train_gpt.parse_args(["--code-path", "x", "--model", "XL"])
    assert const.model == "GPT-XL" and train_gpt.get_lr(const, 12345, 99999) == 1e-4
    with pytest.raises(SystemExit):  # --help: the docstring, then every flag with its default
        train_gpt.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "    python train_gpt.py --resume" in out and "default: 0.0001" in out
    assert "preset (default: GPT-B)" in out
