"""The README stays true: its quick start runs (step counts cut down) and its file map is current.

python -m pytest tests/test_readme.py -q
python tests/test_readme.py /tmp/qs      # run the full quick start there, timing each step
"""

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Smaller numbers for the test: the commands and flags are the README's own.
CUT_DOWN = [
    (r"--per-class \d+", "--per-class 8"),
    (r"--max-steps \d+", "--max-steps 2"),
    (r"--num-samples \d+", "--num-samples 8"),
    (r"--log-every \d+", "--log-every 1"),
]


def section(name):
    text = README.read_text()
    start, end = text.index(f"<!-- {name}:start -->"), text.index(f"<!-- {name}:end -->")
    return text[start:end]


def quickstart_commands(cut_down=False):
    """The shell lines of the README's quick start block, optionally with smaller step counts."""
    block = section("quickstart").split("```bash", 1)[1].split("```", 1)[0]
    lines = [
        line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]
    if cut_down:
        for pattern, repl in CUT_DOWN:
            lines = [re.sub(pattern, repl, line) for line in lines]
    return lines


def run(commands, workdir, env=None):
    """Run each `python X.py ...` line with this interpreter in `workdir`.
    Yields (line, seconds, output)."""
    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "python", line
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, str(ROOT / argv[1]), *argv[2:]],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        yield line, time.time() - t0, r.stdout + r.stderr


def test_quickstart_runs_offline(tmp_path):
    env = {
        **os.environ,
        "LLAMAGEN_CACHE": str(tmp_path / "cache"),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # any download attempt fails at once
        "OMP_NUM_THREADS": "1",
    }
    outputs = [out for _, _, out in run(quickstart_commands(cut_down=True), tmp_path, env)]
    assert (tmp_path / "quickstart_grid.png").is_file() and (tmp_path / "toy_samples.npz").is_file()
    assert re.search(
        r"FID \(adm/random-weights\)\s+\d", outputs[-1]
    )  # the mode is named in the result
    assert not (tmp_path / "cache").exists() or not any(
        (tmp_path / "cache").iterdir()
    )  # nothing downloaded


def test_file_map_lists_every_script_with_its_line_count():
    rows = re.findall(r"^\| `([^`]+)` \| (\d*) \|", section("filemap"), flags=re.M)
    listed = {name: count for name, count in rows}
    for script in ROOT.glob("*.py"):
        assert script.name in listed, f"README file map misses {script.name}"
    for name, count in listed.items():
        assert (ROOT / name).exists(), f"README file map lists missing {name}"
        if count:
            actual = len((ROOT / name).read_text().splitlines())
            assert abs(actual - int(count)) <= max(15, actual // 10), (
                f"README says {name} has {count} lines, it has {actual}: update the file map"
            )


def readme_command_lines():
    """(script, argv) of every `python X.py ...` / `torchrun ... X.py ...` line in the README's
    code blocks."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), flags=re.S)
    for line in (
        l.split("#")[0].strip() for b in blocks for l in b.replace("\\\n", " ").splitlines()
    ):
        words = shlex.split(line) if line.startswith(("python ", "torchrun ")) else []
        scripts = [
            i
            for i, w in enumerate(words)
            if w.endswith(".py") and "/" not in w and (ROOT / w).is_file()
        ]
        if scripts and words[:2] != ["python", "-m"]:
            yield words[scripts[0]], words[scripts[0] + 1 :]


def test_every_readme_command_parses(tmp_path, monkeypatch):
    """Each README command line parses with its script's flags. Flags that read their file at
    parse time (prompt files, pictures to complete) get a stand-in in a scratch folder."""
    import importlib

    from PIL import Image

    import common

    monkeypatch.chdir(tmp_path)
    seen = set()
    for script, argv in readme_command_lines():
        for word in argv:
            if word.endswith((".txt", ".png", ".jpg")) and not Path(word).exists():
                Path(word).parent.mkdir(parents=True, exist_ok=True)
                if word.endswith(".txt"):
                    Path(word).write_text("a photo of a cat\n")
                else:
                    Image.new("RGB", (16, 16)).save(word)
        module = importlib.import_module(script[:-3])
        try:
            module.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README: `{script} {' '.join(argv)}` does not parse") from None
        except common.UserError as e:  # the flags parsed; an input checked up front is absent
            assert "not" in str(e) or "cannot" in str(e), e
        seen.add(script)
    assert {"sample.py", "train_vq.py", "train_gpt.py", "data.py", "fid.py", "text.py"} <= seen


def test_readme_picture_exists():
    for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text()):
        assert (ROOT / path).is_file(), path


if __name__ == "__main__":  # the full quick start, timed: the numbers quoted in the README
    workdir = Path(sys.argv[1])
    workdir.mkdir(parents=True, exist_ok=True)
    for line, seconds, out in run(quickstart_commands(), workdir):
        print(f"{seconds:7.1f} s  {line}\n{out.strip()[-600:]}\n", flush=True)
