"""Tests for common.py, the shared runtime: downloads against a local server, checkpoints,
RNG state, EMA, precision, run folders, logs, one-line errors, the resumable sampler, and the
trainers' Run skeleton.

    python -m pytest tests/test_common.py -q
"""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import data

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
ENV = common.setup()  # one CPU process

# ----------------------------------------------------------------------------------------------
# downloads against a local server


def _serve(server, name, payload):
    (server.directory / name).write_bytes(payload)
    return f"{server.url}/{name}"


def test_download_fetches_then_uses_cache(http_server):
    payload = bytes(range(256)) * 500
    url = _serve(http_server, "w.bin", payload)
    path = common.download(url, sha256=hashlib.sha256(payload).hexdigest())
    assert path.read_bytes() == payload and path.parent == common.cache_dir()
    assert len(http_server.requests) == 1
    assert (
        common.download(url) == path and len(http_server.requests) == 1
    )  # second call: no request


def test_download_resumes_after_dropped_connection(http_server):
    payload = np.random.default_rng(0).bytes(300_000)
    url = _serve(http_server, "big.bin", payload)
    http_server.fail_after_bytes = 100_000
    path = common.download(url)
    assert path.read_bytes() == payload
    ranges = [r for _, r in http_server.requests]
    assert ranges[0] in (None, "bytes=0-") and ranges[1].startswith("bytes=")
    assert int(ranges[1].split("=")[1].rstrip("-")) > 0  # the retry asked only for the rest


def test_download_resumes_from_partial_file_of_earlier_run(http_server):
    payload = np.random.default_rng(1).bytes(50_000)
    url = _serve(http_server, "p.bin", payload)
    (common.cache_dir()).mkdir(parents=True, exist_ok=True)
    (common.cache_dir() / "p.bin.part").write_bytes(payload[:20_000])
    assert common.download(url).read_bytes() == payload
    assert http_server.requests[0][1] == "bytes=20000-"


def test_download_rejects_corrupt_file(http_server):
    payload = b"not the weights you were looking for" * 100
    url = _serve(http_server, "c.bin", payload)
    with pytest.raises(common.UserError, match="failed its check .not the sha256"):
        common.download(url, sha256="0" * 64)
    assert (
        not (common.cache_dir() / "c.bin").exists()
        and not (common.cache_dir() / "c.bin.part").exists()
    )
    # the hub's ETag carries the sha256: a mismatch there is caught too
    http_server.extra_headers["c.bin"] = {"ETag": '"' + "a" * 64 + '"'}
    with pytest.raises(common.UserError, match="failed its check .not the sha256"):
        common.download(url)


def test_download_offline_error_names_url_and_destination(monkeypatch):
    url = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt"
    with pytest.raises(common.UserError) as e:
        common.download(url)
    assert url in str(e.value) and str(common.cache_dir() / "c2i_B_256.pt") in str(e.value)
    assert "\n" not in str(e.value)


def test_hf_url_honours_hf_endpoint(monkeypatch):
    assert common.hf_url("a/b", "f.pt") == "https://huggingface.co/a/b/resolve/main/f.pt"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert common.hf_url("a/b", "f.pt") == "http://127.0.0.1:9/a/b/resolve/main/f.pt"


# ----------------------------------------------------------------------------------------------
# checkpoints, RNG, EMA, precision


def test_checkpoint_roundtrip_is_atomic_and_plain(tmp_path):
    obj = {
        "model": {"w": torch.randn(3)},
        "step": 7,
        "args": {"lr": 1e-4},
        "rng": common.gather_rng(ENV),
    }
    path = common.save_checkpoint(obj, tmp_path / "a" / "ckpt.pt")
    got = common.load_checkpoint(path)
    assert torch.equal(got["model"]["w"], obj["model"]["w"]) and got["step"] == 7
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "stats.json"
    common.write_json({"v": 1}, path)
    with pytest.raises(KeyboardInterrupt):
        with common.atomic_write(path, "w") as f:
            f.write('{"v": 2, "trunc')
            raise KeyboardInterrupt  # a crash half-way through the write
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == [
        "stats.json"
    ]


def test_load_tokenizer_errors_are_one_line(tmp_path, vq_ckpt):
    assert data.load_tokenizer(vq_ckpt).config.codebook_size == 1024
    common.save_checkpoint(
        {"model": {"tok_embeddings.weight": torch.zeros(4, 2)}}, tmp_path / "gpt.pt"
    )
    with pytest.raises(
        common.UserError, match=r"cannot load the tokenizer .*gpt\.pt: .*(GPT|VQ)"
    ) as e:
        data.load_tokenizer(tmp_path / "gpt.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(common.UserError, match="checkpoint not found"):
        data.load_tokenizer(tmp_path / "missing.pt")


def test_load_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(common.UserError, match="checkpoint not found"):
        common.load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(common.UserError, match="bad.pt"):
        common.load_checkpoint(bad)
    torch.save(
        {"args": __import__("argparse").Namespace(a=1)}, tmp_path / "ns.pt"
    )  # not plain types
    with pytest.raises(common.UserError, match="plain PyTorch checkpoint"):
        common.load_checkpoint(tmp_path / "ns.pt")


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    common.save_checkpoint({"rng": common.gather_rng(ENV)}, tmp_path / "r.pt")
    want = torch.rand(3)
    common.restore_rng(common.load_checkpoint(tmp_path / "r.pt")["rng"], ENV)
    assert torch.equal(torch.rand(3), want)


def test_update_ema_matches_formula():
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    common.update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.equal(ema.running_mean, model.running_mean)


def test_setup_precision():
    assert (ENV.precision, ENV.device.type, ENV.rank, ENV.world_size) == ("fp32", "cpu", 0, 1)
    with common.setup("bf16").ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with ENV.ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(common.UserError, match="needs a GPU"):
        common.setup("fp16")


def test_run_dir_next_free_number_resume_and_jsonl(tmp_path):
    a, b = common.run_dir(tmp_path, "VQ-tiny"), common.run_dir(tmp_path, "VQ-tiny")
    assert (a.name, b.name) == ("000-VQ-tiny", "001-VQ-tiny")
    a.rmdir()  # a gap: the next run takes the next number after the largest, never a taken one
    assert common.run_dir(tmp_path, "GPT-tiny").name == "002-GPT-tiny"
    assert common.run_dir(tmp_path, "x", resume=b / "checkpoints" / "last.pt") == b.resolve()
    common.save_checkpoints({"step": 3}, b, 3, ENV)
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["0000003.pt", "last.pt"]
    log = common.JsonlLogger(b / "log.jsonl")
    log.log({"step": 1, "loss": 0.5})
    log.log({"step": 2, "loss": 0.25})
    lines = (b / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [0.5, 0.25]


def test_preset_names():
    table = {"GPT-B": 0, "GPT-XL": 0, "GPT-tiny": 0}
    assert [common.preset(table, n) for n in ("XL", "GPT-XL", "tiny")] == [
        "GPT-XL",
        "GPT-XL",
        "GPT-tiny",
    ]
    with pytest.raises(Exception, match="unknown preset 'VQ-99'; choose GPT-B, GPT-XL, GPT-tiny"):
        common.preset(table, "VQ-99")


def test_train_sampler_order_and_resume():
    n, batch, seed = 23, 4, 5
    one = common.TrainSampler(n, batch, ENV, seed)
    assert one.steps_per_epoch == 5
    stream = iter(one)
    got = [next(stream) for _ in range(2 * 20)]
    for epoch in (0, 1):  # each epoch: DistributedSampler's order, cut to whole steps
        ref = torch.utils.data.DistributedSampler(range(n), 1, 0, shuffle=True, seed=seed)
        ref.set_epoch(epoch)
        assert got[20 * epoch : 20 * epoch + 20] == [(epoch, i) for i in list(ref)[:20]]
    resumed = iter(common.TrainSampler(n, batch, ENV, seed, start_step=7))
    assert [next(resumed) for _ in range(12)] == got[28:40]
    two = [common.Env(r, 2, r, ENV.device, False, "fp32", None) for r in (0, 1)]
    shares = [iter(common.TrainSampler(n, batch // 2, e, seed)) for e in two]
    first_step = sorted(next(s)[1] for s in shares for _ in range(2))
    ref = list(torch.randperm(n, generator=torch.Generator().manual_seed(seed)))[:4]
    assert first_step == sorted(int(i) for i in ref)  # two ranks share one global batch
    with pytest.raises(common.UserError, match="do not fill one step"):
        common.TrainSampler(3, 4, ENV, 0)


def test_cli_prints_one_line_error(tmp_path):
    code = (
        "import common\n"
        "def main(a): raise common.UserError('Caught UserError in DataLoader worker process 0.\\n"
        "Traceback ...\\ncommon.UserError: cannot read image x.png')\n"
        "common.cli(main, lambda: None)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: cannot read image x.png"


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = common.save_checkpoint({"step": 1}, tmp_path / "last.pt")
    (tmp_path / ".last.pt.tmp999").write_bytes(b"left by a killed writer")

    def disk_full(obj, f):
        f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(common.UserError, match="could not write .*last.pt.*previous version"):
        common.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert common.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary files, stale or new


def test_threads_follow_processes_per_node_unless_set():
    code = "import common; print(common.setup().threads)"
    cores = common.cpus_per_process() * int(__import__("os").environ.get("LOCAL_WORLD_SIZE", 1))
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    for extra, want in (
        ({"LOCAL_WORLD_SIZE": "2"}, max(1, cores // 2)),
        ({"OMP_NUM_THREADS": "1"}, 1),
    ):
        r = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
        )
        assert int(r.stdout) == want, r.stderr


def test_cli_error_gets_its_own_line_after_a_progress_bar():
    code = (
        "import common, tqdm\n"
        "def main(a):\n"
        "    bar = tqdm.tqdm(total=10, file=__import__('sys').stderr); bar.update(3)\n"
        "    raise common.UserError('bad input')\n"
        "common.cli(main, lambda: None)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == "error: bad input"


def test_download_check_rejects_an_error_page(http_server):
    url = _serve(http_server, "vq_ds16_c2i.pt", b"<html>rate limited</html>")
    with pytest.raises(common.UserError, match="failed its check .*removed it") as e:
        common.download(url, check=common.load_checkpoint)
    assert "weights_only=False" not in str(e.value)
    assert not any(common.cache_dir().iterdir())  # nothing cached, nothing half-written


def test_resume_args_continue_the_saved_run():
    import argparse

    parser = argparse.ArgumentParser()
    for flag, default in (("--lr", 1e-4), ("--max-steps", None), ("--global-batch-size", 256)):
        parser.add_argument(flag, type=type(default or 1), default=default)
    parser.add_argument("--resume")
    saved = {"lr": 1e-3, "max_steps": 100, "global_batch_size": 32, "resume": None}
    args = parser.parse_args(["--resume", "x.pt"])  # bare: everything as saved
    assert common.resume_args(args, parser, saved, {"max_steps"}) == []
    assert (args.lr, args.max_steps, args.global_batch_size) == (1e-3, 100, 32)
    args = parser.parse_args(["--resume", "x.pt", "--max-steps", "200"])
    assert common.resume_args(args, parser, saved, {"max_steps"}) == ["max_steps 100 -> 200"]
    args = parser.parse_args(["--resume", "x.pt", "--global-batch-size", "64"])
    with pytest.raises(common.UserError, match="--global-batch-size 64 differs from .* 32"):
        common.resume_args(args, parser, saved, {"max_steps"})


def test_log_drops_the_steps_of_a_killed_run_on_resume(tmp_path):
    log = common.JsonlLogger(tmp_path / "log.jsonl")
    for step in (10, 20, 30):  # the run was killed after logging step 30, saved at step 20
        log.log({"step": step})
    log = common.JsonlLogger(tmp_path / "log.jsonl", resume_step=20)
    log.log({"step": 30})
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]


class _Keys(torch.utils.data.Dataset):
    """Ten samples that are their own (epoch, index) keys."""

    def __len__(self):
        return 10

    def __getitem__(self, key):
        return torch.tensor(key)


def test_run_skeleton_resume_steps_cadence_and_folder(tmp_path):
    """common.Run: setup() reads a --resume checkpoint of its own script only; the loop walks
    start+1..total (--max-steps, else --epochs) over the sampler's micro-batches; due() every n
    steps and after the last; a resumed run continues the saved run's folder and log."""
    import argparse

    parser = argparse.ArgumentParser()
    for flag, default in ("--max-steps", 0), ("--epochs", 2), ("--global-seed", 0):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--num-workers", type=int, default=0)
    for flag in ("--resume", "--results-dir", "--model", "--mixed-precision"):
        parser.add_argument(flag)
    args = parser.parse_args(["--results-dir", str(tmp_path), "--model", "m"])
    env, ckpt, changed = common.Run.setup(args, parser, [], "key", "x.py")
    assert (env.world_size, ckpt, changed) == (1, {}, {})  # no --resume: nothing changed
    run = common.Run(args, env, _Keys(), 2, accumulation=2)  # 4 a step: 2 steps an epoch
    assert (run.total, run.steps_per_epoch, run.folder.name) == (4, 2, "000-m")  # --epochs 2
    keys = torch.cat([next(run.batches) for _ in range(4)])  # micro-batches of 2: two steps
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))  # epoch 0's
    assert keys[:, 0].tolist() == [0] * 8 and keys[:, 1].tolist() == order[:8].tolist()
    assert list(run) == [1, 2, 3, 4] and run.bar.n == 4
    assert [s for s in range(1, 5) if run.due(s, 3)] == [3, 4] and not run.due(4, 0)
    run.log({"step": 2})
    run.log({"step": 4})  # logged, then the run was killed: resumed from step 2
    saved = {"args": {**vars(args), "max_steps": 3}, "key": 1, "step": 2}
    path = common.save_checkpoint(saved, run.folder / "checkpoints" / "0000002.pt")
    resume = parser.parse_args(["--resume", str(path), "--max-steps", "6"])
    _, ckpt, changed = common.Run.setup(resume, parser, ["max_steps"], "key", "x.py")
    assert ckpt["step"] == 2 and changed == ["max_steps 3 -> 6"] and resume.model == "m"
    again = common.Run(resume, env, _Keys(), 4, start=ckpt["step"])
    assert again.folder == run.folder and list(again) == [3, 4, 5, 6]
    assert next(again.batches)[:, 0].tolist() == [1] * 4  # step 3 begins epoch 1
    lines = (run.folder / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2]  # step 4 dropped
    with pytest.raises(common.UserError, match="was not written by y.py; resume one of its"):
        common.Run.setup(resume, parser, [], "other_key", "y.py")
