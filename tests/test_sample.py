"""sample.py end to end with tiny models; a local HTTP server stands in for the Hugging Face hub.

python -m pytest tests/test_sample.py -q
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import gpt
import sample
import vq

ROOT = Path(__file__).resolve().parents[1]
# ds16 like the released VQ-16, but 32 channels and 64 codes, so 256 px decode in a second
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
    config = gpt.GPTConfig.from_name(
        "GPT-tiny", vocab_size=64, block_size=block_size, num_classes=num_classes
    )
    model = gpt.GPT(config)
    # the init zeroes the head: make tokens depend on context
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model, vq.VQModel(TINY_VQ)


def run(argv):
    return sample.main(sample.parse_args(argv))


@pytest.fixture
def hub(http_server, monkeypatch):
    """Tiny files served as c2i_B_256.pt (official format) and vq_ds16_c2i.pt (the hub's layout)."""
    served = http_server.directory / "FoundationVision" / "LlamaGen" / "resolve" / "main"
    served.mkdir(parents=True)
    model, tokenizer = tiny_models()
    torch.save({"model": model.state_dict()}, served / "c2i_B_256.pt")
    # the VQ in our format: official-format VQ files are vq.py's tests (its presets only)
    vq_ckpt = {"model": tokenizer.state_dict(), "config": asdict(TINY_VQ)}
    torch.save(vq_ckpt, served / "vq_ds16_c2i.pt")
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    http_server.served = served
    return http_server


@pytest.fixture
def own_ckpts(tmp_path):
    """Our checkpoints (config inside): a 4-class GPT on a 4 x 4 grid + the tiny VQ -> 64 px; the
    GPT records its tokenizer's sha256, as train_gpt.py does."""
    model, tokenizer = tiny_models(block_size=16, num_classes=4)
    v = common.save_checkpoint(
        {"model": tokenizer.state_dict(), "ema": None, "config": asdict(TINY_VQ)},
        tmp_path / "vq.pt",
    )
    ckpt = {"model": model.state_dict(), "ema": None, "config": asdict(model.config)}
    ckpt.update(vq_config=asdict(TINY_VQ), tokenizer_sha256=common.file_digest(v))
    g = common.save_checkpoint(ckpt, tmp_path / "gpt.pt")
    return ["--gpt-ckpt", str(g), "--vq-ckpt", str(v)]


def test_default_run_downloads_then_uses_the_cache(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = run([])  # `python sample.py`: released B-256 + VQ-16, demo labels
    assert out == Path("samples/c2i_B_256-seed0.png") and out.exists()
    assert str(out) in capsys.readouterr().out
    assert Image.open(out).size == (4 * 258 + 2, 2 * 258 + 2)  # 8 images of 256 px, 4 per row
    assert sorted(p for p, _ in hub.requests) == [
        "/FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt",
        "/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt",
    ]
    assert (common.cache_dir() / "c2i_B_256.pt").exists()
    run(["--labels", "1", "--out", str(tmp_path / "again.png")])
    assert len(hub.requests) == 2  # second run: all from the cache


def test_interrupted_download_resumes(hub, tmp_path):
    hub.fail_after_bytes = 300_000  # the first response (the GPT file, 0.8 MB) drops at 300 kB
    assert run(["--labels", "3", "--out", str(tmp_path / "x.png")]).exists()
    ranges = [r for p, r in hub.requests if p.endswith("c2i_B_256.pt")]
    assert len(ranges) == 2 and ranges[0] == "bytes=0-"
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 300_000  # the retry asked only for the rest
    got = (common.cache_dir() / "c2i_B_256.pt").read_bytes()
    assert got == (hub.served / "c2i_B_256.pt").read_bytes()


def test_corrupt_download_is_rejected(hub, tmp_path):
    hub.extra_headers["c2i_B_256.pt"] = {"ETag": '"' + "0" * 64 + '"'}  # the hub's sha256
    with pytest.raises(common.UserError, match="c2i_B_256.pt .*sha256"):
        run(["--labels", "3", "--out", str(tmp_path / "x.png")])
    assert not (common.cache_dir() / "c2i_B_256.pt").exists()
    assert not (common.cache_dir() / "c2i_B_256.pt.part").exists()


def test_offline_without_cache_names_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    url = "127.0.0.1:9/FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt"
    with pytest.raises(common.UserError, match=url):
        run(["--out", str(tmp_path / "x.png")])


def test_html_error_page_is_never_cached(hub, tmp_path):
    (hub.served / "c2i_B_256.pt").write_text("<html>rate limited</html>")  # a mirror's answer
    with pytest.raises(common.UserError, match="c2i_B_256.pt .*removed it"):
        run(["--labels", "3", "--out", str(tmp_path / "x.png")])
    assert not any(common.cache_dir().iterdir())


def test_class_names_resolve():
    assert len(sample.CLASS_NAMES.read_text().splitlines()) == 1000
    names = ["golden retriever", "207", "Red Panda", "geyser", "tench"]
    assert sample.parse_labels(names, 1000) == [207, 207, 387, 974, 0]
    for bad, match in [
        ("crane", "134: crane; 517: crane"),  # ambiguous: the bird, the machine
        ("golden", "207: golden retriever"),  # no such name: the near ones
        ("1000", r"ids 0\.\.999"),  # out of range
    ]:
        with pytest.raises(common.UserError, match=match):
            sample.parse_labels([bad], 1000)


def cli_error(argv, capsys):
    """sample.py as the shell runs it: exit status 2 and one line `error: ...` on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        common.cli(sample.main, lambda: sample.parse_args(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt", "a cat", "--num-samples", "8"], "takes no prompts"),
        (["--prompt", "a cat", "--labels", "1"], "prompts take no --labels"),
        (["--complete", "a.png", "--num-samples", "8"], "no --complete"),
        (["--model", "XL", "--image-size", "256"], "no released c2i GPT-XL 256"),
        (["--image-size", "512"], "no released c2i GPT-B 512"),
        (["--prompt", "a cat", "--model", "B"], "no released t2i GPT-B 256.*GPT-XL 512"),
        (["--out", "x.npz"], "--out x.npz: a grid is a .png"),  # .npz without --num-samples
        (["--out", "noext"], "--out noext: a grid is a .png"),  # an unknown kind
        (["--num-samples", "8", "--out", "x.png"], "--num-samples writes an .npz"),
        (["--out", "file.txt/x.png"], "cannot write to file.txt"),  # a file as the folder
        (["--complete", "missing.png"], "cannot read image missing.png"),
        (["--complete", "file.txt"], "cannot read image file.txt"),
    ],
)
def test_flag_errors_before_any_download(argv, match, http_server, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("a file, not a folder")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")  # --complete reads its images at once
    assert re.search(match, cli_error(argv, capsys))
    assert http_server.requests == []  # nothing downloaded, nothing drawn


def test_unwritable_output_folder(own_ckpts, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    (tmp_path / "ro").mkdir(mode=0o500)
    assert "cannot write to" in cli_error(own_ckpts + ["--out", str(tmp_path / "ro/x.png")], capsys)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--batch-size", "0"], "--batch-size: must be in [1, inf]"),
        (["--num-samples", "0"], "--num-samples: must be in [1, inf]"),
        (["--top-p", "1.5"], "--top-p: must be in [0, 1]"),
        (["--top-k", "-1"], "--top-k: must be in [0, inf]"),
        (["--temperature", "-0.5"], "--temperature: must be in [0, inf]"),
        (["--jacobi-window", "-1"], "--jacobi-window: must be in [0, inf]"),
        (["--keep-rows", "0"], "--keep-rows: must be in [1, inf]"),
        (["--nrow", "x"], "--nrow: invalid parse value: 'x'"),
        (["--model", "9B"], "unknown preset '9B'; choose GPT-B"),
        (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
        (["--prompt-file", "missing.txt"], "--prompt-file: can't open 'missing.txt'"),
    ],
)
def test_argparse_rejects_bad_values(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args(argv)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--nrow NROW default: 4" in out and "--batch-size BATCH_SIZE default: 32" in out
    assert "--cfg-scale CFG_SCALE default: set by the model" in out
    assert "--nrow images per grid row" in out  # the meanings: the module docstring


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--labels", "4"], r"'4' is not one class of this model \(ids 0\.\.3"),
        (["--labels", "golden retriever"], r"ids 0\.\.3.*207: golden retriever"),
        (["--mixed-precision", "fp16"], "fp16 needs a GPU"),
        (["--image-size", "256"], "does not match"),
        (["--prompt", "a cat"], "gpt is a c2i GPT: text-to-image takes --prompt"),
        (["--complete", "PICTURE", "--keep-rows", "4"], "--keep-rows must be below 4"),
    ],
)
def test_flag_errors_with_own_checkpoints(own_ckpts, argv, match, tmp_path):
    if "fp16" in argv and torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    Image.new("RGB", (64, 64)).save(tmp_path / "p.png")
    argv = [str(tmp_path / "p.png") if a == "PICTURE" else a for a in argv]
    with pytest.raises(common.UserError, match=match):
        run(own_ckpts + argv + ["--out", str(tmp_path / "x.png")])


def test_the_gpt_knows_its_tokenizer(own_ckpts, hub, tmp_path):
    """train_gpt.py records the sha256 of the tokenizer file; another one is refused."""
    other = torch.load(own_ckpts[3], weights_only=True)
    other["model"] = tiny_models(seed=1)[1].state_dict()  # same config, other codebook
    common.save_checkpoint(other, tmp_path / "other_vq.pt")
    argv = own_ckpts[:2] + ["--labels", "1", "--out", str(tmp_path / "b.png")]
    with pytest.raises(common.UserError, match="another tokenizer than .*other_vq.pt"):
        run(argv + ["--vq-ckpt", str(tmp_path / "other_vq.pt")])
    # no --vq-ckpt: the released VQ-16 (here the hub's tiny stand-in) is not the GPT's either
    with pytest.raises(common.UserError, match="another tokenizer than .*vq_ds16_c2i.pt"):
        run(argv)
    argv += ["--vq-ckpt", str(tmp_path / "other_vq.pt"), "--any-tokenizer"]
    assert run(argv).exists()  # for those who know what they are doing


def test_official_files_take_image_size(own_ckpts, tmp_path):
    model, _ = tiny_models()  # an official file (no config) of a GPT trained on 16 x 16 grids
    torch.save({"model": model.state_dict()}, tmp_path / "official.pt")
    argv = ["--gpt-ckpt", str(tmp_path / "official.pt"), *own_ckpts[2:], "--labels", "1", "2"]
    out = run(argv + ["--out", str(tmp_path / "a.png")])  # the image size: --image-size 256
    assert Image.open(out).size == (2 * 258 + 2, 258 + 2)
    out = run(argv + ["--image-size", "128", "--out", str(tmp_path / "b.png")])  # 8 x 8 tokens
    assert Image.open(out).size == (2 * 130 + 2, 130 + 2)
    torch.save({"model": vq.VQModel(TINY_VQ).state_dict()}, tmp_path / "vq_as_gpt.pt")
    with pytest.raises(common.UserError, match="cannot load the GPT .*vq_as_gpt.pt"):
        run(["--gpt-ckpt", str(tmp_path / "vq_as_gpt.pt"), *own_ckpts[2:]])


def test_own_checkpoints_grid_seed_nrow_and_cfg_warning(own_ckpts, tmp_path, capsys):
    out = run(own_ckpts + ["--cfg-scale", "0.5", "--out", str(tmp_path / "g.png")])
    printed = capsys.readouterr()
    assert "warning: --cfg-scale 0.5" in printed.err
    assert f"{out} (16 forward passes per image)" in printed.out  # one per token of 4 x 4
    assert Image.open(out).size == (4 * 66 + 2, 2 * 66 + 2)  # 8 labels (0..3 twice) of 64 px
    argv = own_ckpts + ["--cfg-scale", "0.5"]
    same = run(argv + ["--nrow", "8", "--out", str(tmp_path / "h.png")])
    assert Image.open(same).size == (8 * 66 + 2, 66 + 2)  # one row
    other = run(argv + ["--seed", "1", "--out", str(tmp_path / "i.png")])
    pixels = [np.asarray(Image.open(p)) for p in (out, same, other)]
    assert np.array_equal(pixels[0][:68], pixels[1][:, : 4 * 66 + 2])  # the same first 4
    assert not np.array_equal(pixels[0], pixels[2])  # --seed decides


def spy_on_generate(monkeypatch):
    """Record every gpt.generate call: (jacobi_window, prefix, tokens drawn)."""
    calls, real_generate = [], gpt.generate

    def spy(*args, **kwargs):
        tokens = real_generate(*args, **kwargs)
        calls.append((args[6], args[7], tokens))
        return tokens

    monkeypatch.setattr(gpt, "generate", spy)
    return calls


def test_jacobi_window_reaches_generate_for_grids_and_npz(own_ckpts, tmp_path, monkeypatch, capsys):
    calls = spy_on_generate(monkeypatch)
    argv = own_ckpts + ["--jacobi-window", "16", "--labels", "1", "2"]
    run(argv + ["--out", str(tmp_path / "a.png")])
    run(argv + ["--num-samples", "2", "--out", str(tmp_path / "a.npz")])
    assert [window for window, _, _ in calls] == [16, 16]
    passes = re.findall(r"\(([\d.]+) forward passes per image\)", capsys.readouterr().out)
    assert len(passes) == 2 and all(1 <= float(p) <= 16 for p in passes)


def test_complete_keeps_the_top_token_rows(own_ckpts, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pictures = [tmp_path / "wide.png", tmp_path / "red.png"]
    Image.fromarray(rng.integers(0, 256, (80, 120, 3), np.uint8)).save(pictures[0])
    Image.new("RGB", (64, 64), "red").save(pictures[1])
    calls = spy_on_generate(monkeypatch)
    argv = ["--complete", *map(str, pictures), "--keep-rows", "2", "--labels", "0", "1", "2"]
    out = run(own_ckpts + argv + ["--batch-size", "4", "--out", str(tmp_path / "c.png")])
    assert len(calls) == 1  # a grid is one gpt.generate call: --batch-size is the .npz's
    # a row per picture: the original, its kept rows, 3 completions (one per label)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 66 + 2, 5 * 66 + 2, 3)
    tokenizer = vq.VQModel.from_checkpoint(common.load_checkpoint(own_ckpts[3]))
    crops = [data.center_crop_arr(data.load_image(p), 64) for p in pictures]
    assert np.array_equal(grid[2:66, 2:66], np.asarray(crops[0]))  # the original, cropped
    assert (grid[2 + 32 : 66, 68:132] == 128).all()  # below the 2 kept token rows: grey
    codes = tokenizer.encode(torch.stack([data.pil_to_tensor(c) for c in crops]))[-1].view(2, 16)
    _, prefix, tokens = calls[0]
    assert torch.equal(prefix, codes[:, :8].repeat(3, 1))  # 2 rows of 4 tokens, every label
    assert torch.equal(tokens[:, :8], prefix) and not torch.equal(tokens, codes.repeat(3, 1))


def test_functions_for_a_web_demo(own_ckpts):
    """demo.py's path: load once, then grids for changing labels and settings."""
    args = sample.parse_args(own_ckpts)
    models = sample.load_models(args)
    assert (args.cfg_scale, args.top_k, models.name, args.image_size) == (4.0, 2000, "gpt", 64)
    args.labels, args.seed = ["3", "1"], 5
    images, nrow = sample.draw_grid(args, models)
    assert images.shape == (2, 3, 64, 64) and nrow == 2 and models.passes == [16]
    args.cfg_scale, args.top_k = 1.0, 1  # top-k 1: greedy, so the seed does not matter
    args.seed = 6
    again, _ = sample.draw_grid(args, models)
    args.seed = 7
    assert torch.equal(again, sample.draw_grid(args, models)[0])


def test_compile_flag_hands_a_compiled_decode_step_to_generate(own_ckpts, tmp_path, monkeypatch):
    compiled, seen = [], []
    real_generate = gpt.generate

    def fake_compile(fn, **kwargs):  # torch.compile on the CPU needs a compiler: stand in for it
        compiled.append((fn, kwargs))
        return fn

    def spy(*args, **kwargs):
        seen.append(args[5])  # decode_fn
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(gpt, "generate", spy)
    run(own_ckpts + ["--labels", "1", "--out", str(tmp_path / "a.png")])
    run(own_ckpts + ["--labels", "1", "--compile", "--out", str(tmp_path / "b.png")])
    assert seen == [None, gpt.decode_one_token]
    assert compiled == [(gpt.decode_one_token, dict(mode="reduce-overhead", fullgraph=True))]


def read_npz(path):
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"], json.loads(str(z["meta"]))


def test_npz_shapes_balance_resize_and_resume(own_ckpts, tmp_path, monkeypatch):
    argv = own_ckpts + ["--num-samples", "10", "--batch-size", "4", "--image-size-eval", "32"]
    ref = run(argv + ["--out", str(tmp_path / "ref.npz")])
    images, labels, meta = read_npz(ref)
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    assert sorted(np.bincount(labels, minlength=4)) == [2, 2, 3, 3]  # N / K each, rest spread
    assert not np.array_equal(labels, np.resize(np.arange(4), 10))  # shuffled
    assert meta["resize_filter"] == "antialias" and meta["image_size"] == 64
    assert meta["cfg_scale"] == 1.5 and meta["top_k"] == 0  # the FID defaults of an own GPT
    assert meta["model"] == asdict(tiny_models(16, 4)[0].config)  # not a preset it never was
    assert not (tmp_path / "ref-shards").exists()  # merged, then cleaned up

    calls = []
    real_generate = gpt.generate

    def flaky_generate(*args, **kwargs):  # the run dies while drawing its third shard
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(gpt, "generate", flaky_generate)
    out = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        run(argv + ["--out", str(out)])
    assert sorted(p.name for p in (tmp_path / "run-shards").glob("*.done")) == [
        "00000.done",
        "00001.done",
    ]
    other = [a if a != "32" else "16" for a in argv]  # same --out, other settings: refused
    with pytest.raises(
        common.UserError, match="run-shards was made with a different image_size_eval"
    ):
        run(other + ["--out", str(out)])
    calls.clear()
    run(argv + ["--out", str(out)])  # restart: only the missing shard is drawn
    assert len(calls) == 1
    images2, labels2, _ = read_npz(out)
    assert np.array_equal(images2, images) and np.array_equal(labels2, labels)
    calls.clear()
    assert run(argv + ["--out", str(out)]) == out and calls == []  # done: nothing to draw


def test_npz_official_resize_and_native_size(own_ckpts, tmp_path, monkeypatch):
    argv = own_ckpts + ["--num-samples", "4", "--image-size-eval", "32"]
    official = run(argv + ["--resize-filter", "official", "--out", str(tmp_path / "o.npz")])
    images, _, meta = read_npz(official)
    assert images.shape == (4, 32, 32, 3) and meta["resize_filter"] == "official"
    antialiased, _, _ = read_npz(run(argv + ["--out", str(tmp_path / "a.npz")]))
    assert not np.array_equal(images, antialiased)  # the filter matters
    monkeypatch.chdir(tmp_path)  # the default name: the GPT file, the seed
    native = run(own_ckpts + ["--num-samples", "4"])
    assert native == Path("samples/gpt-seed0.npz")
    images, _, meta = read_npz(native)
    assert images.shape == (4, 64, 64, 3) and meta["resize_filter"] == "none"  # 64 px <= 256


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(own_ckpts, tmp_path):
    """Shard seeds do not depend on the rank count: 2 CPU ranks (gloo) write what 1 process does."""
    argv = own_ckpts + ["--num-samples", "7", "--batch-size", "2"]
    one = run(argv + ["--out", str(tmp_path / "one.npz")])
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
