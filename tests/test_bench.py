"""bench/run_all.py: the quick run measures every figure the GPU run does (so the script cannot rot
unnoticed), and --jacobi-ckpt measures a checkpoint of ours.

    python -m pytest tests/test_bench.py -q
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import gpt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "run_all.py"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all, jacobi_map = load_script("run_all"), load_script("jacobi_map")


def test_quick_plan_mirrors_the_full_one():
    """--quick swaps the models for tiny ones, never the list of figures."""
    assert run_all.QUICK.keys() == run_all.FULL.keys()
    assert len(run_all.QUICK["sample"]) == 2 and len(run_all.FULL["sample"]) == 6
    assert {t for _, t in run_all.FULL["sample"]} == {256, 576}  # 256 and 384 px
    assert {m for m, _ in run_all.FULL["sample"]} == {"GPT-B", "GPT-L", "GPT-XL"}
    assert {(d, m) for d, m, *_ in run_all.FULL["train"]} >= {("cuda", "GPT-B"), ("cuda", "GPT-L")}


@pytest.mark.slow
def test_quick_run_has_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["figures"]
    assert report["quick"] and report["peaks"]["cpu"]["bandwidth"] > 0
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in rows), rows
    by_section = {s: [r for r in rows if r["section"] == s] for s in {r["section"] for r in rows}}
    assert set(by_section) == set(run_all.SECTIONS)

    decoded = [r for r in by_section["sample"] if "decode" in r]  # + the no-cache baseline
    tokens = {t for _, t in run_all.QUICK["sample"]}
    combos = {(r["tokens"], r["precision"], r["decode"]) for r in decoded}
    assert combos == {(t, p, d) for t in tokens for p in ("fp32", "bf16") for d in run_all.DECODE}
    assert all(r["fraction"] > 0 and r["floor"] > 0 for r in decoded)
    assert [r["name"].endswith("no KV cache") for r in by_section["sample"]].count(True) == 1

    jacobi = by_section["jacobi"]
    assert [r["window"] for r in jacobi] == list(run_all.WINDOWS)
    block_size = run_all.QUICK["jacobi"][1]
    assert jacobi[0]["value"] == block_size  # W = 0: one pass per token, the prefill included
    assert all(1 <= r["value"] <= block_size and r["seconds"] > 0 for r in jacobi)

    train = {r["name"].split()[1]: r for r in by_section["train"]}
    assert set(train) == {"ours", "full-logits", "cpu"}  # "cpu": the ours/full-logits ratio
    assert all(r["fraction"] > 0 for r in (train["ours"], train["full-logits"]))
    assert train["cpu"]["value"] == pytest.approx(
        train["ours"]["s_per_step"] / train["full-logits"]["s_per_step"]
    )
    assert len(by_section["tokenizer"]) == len(by_section["extract"]) == 1
    assert len(by_section["fid"]) == 3  # two preprocessing modes + the Frechet distance


def test_jacobi_on_a_checkpoint_of_ours(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # common.setup leaves the thread count alone
    config = gpt.GPTConfig.from_name("GPT-tiny", vocab_size=32, block_size=16, num_classes=4)
    torch.manual_seed(0)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    common.save_checkpoint(
        {"model": gpt.GPT(config).state_dict(), "ema": None, "config": asdict(config)}, path
    )
    out = tmp_path / "jacobi.json"
    args = run_all.parse_args(["--jacobi-ckpt", str(path), "--batch", "2", "--json", str(out)])
    assert run_all.main(args) == 0
    rows = json.loads(out.read_text())["figures"]
    assert [r["window"] for r in rows] == list(run_all.WINDOWS)  # only the Jacobi section ran
    assert rows[0]["value"] == 16 and all(r["name"].startswith("run W=") for r in rows)
    assert "run W=32" in capsys.readouterr().out

    with pytest.raises(common.UserError, match="checkpoint not found"):
        run_all.main(run_all.parse_args(["--jacobi-ckpt", str(tmp_path / "missing.pt")]))
    with pytest.raises(SystemExit):  # argparse: exit status 2 and a one-line usage error
        run_all.parse_args(["--only", "nothing"])


def test_acceptance_passes_by_hand():
    # prefill: token 0; then passes that accept tokens 1-2, 3, 4-7 (stats["accepted"] = 3, 4, 8)
    got = jacobi_map.acceptance_passes([3, 4, 8], 8).tolist()
    assert got == [1, 2, 2, 3, 4, 4, 4, 4]


def test_jacobi_map_draws_each_tokens_pass(vq_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)  # a random GPT-tiny on VQ-tiny codes: 4 x 4 tokens, 32 px images
    config = gpt.GPTConfig.from_name("GPT-tiny", vocab_size=1024, block_size=16, num_classes=4)
    model = gpt.GPT(config)
    torch.nn.init.normal_(model.output.weight, std=0.5)  # the init zeroes the head
    stats = {}
    gpt.generate(model, torch.tensor([1]), 4.0, jacobi_window=4, stats=stats)
    passes = jacobi_map.acceptance_passes([n for (n,) in stats["accepted"]], 16)
    # the prefill, then never back in time, and the last token in the last pass
    assert passes[0] == 1 and (np.diff(passes) >= 0).all()
    assert passes[-1] == stats["forward_passes"] > 1

    vq_config = common.load_checkpoint(vq_ckpt)["config"]
    ckpt = {"model": model.state_dict(), "config": asdict(config), "vq_config": vq_config}
    argv = ["--gpt-ckpt", str(common.save_checkpoint(ckpt, tmp_path / "gpt.pt"))]
    argv += ["--vq-ckpt", str(vq_ckpt), "--labels", "0", "1", "2"]
    out = jacobi_map.main(jacobi_map.parse_args(argv + ["--out", str(tmp_path / "m.png")]))
    side = 4 * jacobi_map.CELL  # 2 per row: (image, map) twice; 2 rows
    assert Image.open(out).size == (2 * (2 * side + 8), 2 * (jacobi_map.CAPTION + side + 2) + 2)
    with pytest.raises(common.UserError, match="draws a .png"):
        jacobi_map.parse_args(argv + ["--out", str(tmp_path / "m.npz"), "--num-samples", "2"])
