"""demo.py with tiny random models: the page, PNG grids, completion, errors, concurrency, and a
real browser (headless Chromium, skipped when it is not installed).

    python -m pytest -q tests/test_demo.py
"""

import contextlib
import http.client
import io
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import demo
import gpt
import text

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
CHROMIUM = Path("/usr/bin/chromium")
CELL = 32 + 2  # VQ-tiny (downsample 8) on a 4 x 4 token grid: 32 px images, 2 px gaps


@contextlib.contextmanager
def running(argv):
    """demo.py on a free port, serving from a thread; yields the server (server.url)."""
    server = demo.make_server(demo.parse_args(["--port", "0", *argv]))
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def tiny_gpt(path, vq_ckpt, **overrides):
    """A random GPT-tiny on VQ-tiny codes (vocab 1024, 4 x 4 tokens), our checkpoint format."""
    torch.manual_seed(0)
    config = gpt.GPTConfig.from_name("GPT-tiny", vocab_size=1024, block_size=16, **overrides)
    model = gpt.GPT(config)
    torch.nn.init.normal_(model.output.weight, std=0.5)  # the init zeroes the head
    vq_config = common.load_checkpoint(vq_ckpt)["config"]
    ckpt = {"model": model.state_dict(), "config": asdict(config), "vq_config": vq_config}
    return ["--gpt-ckpt", str(common.save_checkpoint(ckpt, path)), "--vq-ckpt", str(vq_ckpt)]


@pytest.fixture(scope="module")
def server(vq_ckpt, tmp_path_factory):
    """A class-conditional demo: 1000 ImageNet classes, 32 px images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.py's one_thread
    with running(tiny_gpt(tmp_path_factory.mktemp("demo") / "gpt.pt", vq_ckpt)) as server:
        yield server
    torch.set_num_threads(threads)


def fetch(server, path, body=None):
    """GET (or POST body) -> (status, headers, body bytes), errors included."""
    request = urllib.request.Request(server.url + path, data=body)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def png(body) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def query(**params):
    return urllib.parse.urlencode(params)


def test_page_first_grid_and_generation(server):
    status, headers, page = fetch(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    config = json.loads(page.decode().split("id=config>")[1].split("</script>")[0])
    assert config["classes"][207] == "golden retriever" and config["size"] == 32
    assert b'src="/first.png"' in page and float(config["seconds"]) > 0
    # the first grid is ready before any click: the 8 demo classes, 4 per row
    status, headers, first = fetch(server, "/first.png")
    assert status == 200 and png(first).shape == (2 * CELL + 2, 4 * CELL + 2, 3)

    path = "/generate?" + query(labels="golden retriever, 1", n=3, seed=1, cfg_scale=2, top_k=50)
    status, headers, body = fetch(server, path)
    assert status == 200 and headers["Content-Type"] == "image/png"
    grid = png(body)
    assert grid.shape == (CELL + 2, 3 * CELL + 2, 3) and grid.std() > 10  # not blank
    assert float(headers["X-Seconds"]) > 0
    assert fetch(server, path)[2] == body  # the same seed draws the same images
    assert fetch(server, path.replace("seed=1", "seed=2"))[2] != body
    progress = json.loads(fetch(server, "/progress")[2])
    assert progress == {"done": 16, "total": 16, "busy": False, "at_most": False}  # a pass a token


def test_completion_keeps_the_picture_and_its_rows(server):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    upload = io.BytesIO()
    picture.save(upload, "PNG")
    path = "/complete?" + query(labels=3, n=2, keep_rows=2)
    status, headers, body = fetch(server, path, upload.getvalue())
    assert status == 200, body
    grid = png(body)  # one row: the picture, its kept rows (the rest grey), two completions
    assert grid.shape == (CELL + 2, 4 * CELL + 2, 3)
    cell = lambda i: grid[2 : 2 + 32, 2 + i * CELL : 2 + i * CELL + 32]
    assert np.array_equal(cell(0), np.asarray(data.center_crop_arr(picture, 32)))
    assert (cell(1)[16:] == 128).all() and cell(1)[:16].std() > 0  # 2 token rows = 16 px kept
    assert json.loads(fetch(server, "/progress")[2])["total"] == 16 - 2 * 4  # prefill + 7
    status, _, body = fetch(server, path.replace("keep_rows=2", "keep_rows=4"), upload.getvalue())
    assert status == 400 and b"keep-rows" in body  # all 4 rows kept: nothing left to draw


def test_bad_requests_get_one_line_and_the_server_stays_up(server, vq_ckpt):
    bad = [
        dict(n=0),
        dict(n=17),
        dict(n="two"),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(temperature="nan"),
        dict(cfg_scale="inf"),
        dict(seed=-1),
        dict(keep_rows=0),
        dict(labels="not a class"),
        dict(labels=1000),
        dict(colour="red"),
    ]
    for params in bad:
        status, headers, body = fetch(server, "/generate?" + query(**params))
        assert status == 400 and headers["Content-Type"].startswith("text/plain"), params
        assert body and b"\n" not in body, body
    for path in ["/demo.py", "/../demo.py", "/first.png/../demo.py", "/%2e%2e/etc/passwd"]:
        assert fetch(server, path)[0] == 404
    assert fetch(server, "/generate", b"x")[0] == 404  # POST is for /complete only
    assert fetch(server, "/complete")[0] == 404
    status, _, body = fetch(server, "/complete", b"not an image")
    assert status == 400 and b"cannot read the uploaded image" in body
    assert fetch(server, "/complete", b"")[0] == 400
    # an upload over --max-upload-mb is refused before it is read
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/complete")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and b"--max-upload-mb" in response.read()
    conn.close()
    # a port in use: a one-line error before any model loads
    with pytest.raises(common.UserError, match="cannot listen"):
        demo.make_server(demo.parse_args(["--port", str(server.server_address[1])]))
    assert fetch(server, "/")[0] == 200


def test_jacobi_demo_counts_passes_up_to_one_per_token(vq_ckpt, tmp_path):
    with running(tiny_gpt(tmp_path / "gpt.pt", vq_ckpt) + ["--jacobi-window", "8"]) as server:
        assert fetch(server, "/generate?" + query(labels="1", n=1))[0] == 200
        progress = json.loads(fetch(server, "/progress")[2])
    # the page says "forward pass 5 of at most 16": the passes stop early
    assert progress["at_most"] and 1 < progress["done"] <= progress["total"] == 16


def test_concurrent_requests_progress_busy_and_closed_connections(server, monkeypatch):
    # a slower model (20 ms per forward pass), so requests overlap and progress can be seen
    slow = server.demo.model.output.register_forward_hook(lambda *_: time.sleep(0.02))
    try:
        # a browser that leaves mid-generation, and one that sends garbage
        for raw in [b"GET /generate?n=2 HTTP/1.0\r\n\r\n", b"BLAH\r\n\r\n"]:
            with socket.create_connection(server.server_address[:2]) as s:
                s.sendall(raw)
        answers = [None, None]
        jobs = [
            threading.Thread(
                target=lambda i=i: answers.__setitem__(i, fetch(server, f"/generate?n=2&seed={i}"))
            )
            for i in range(2)
        ]
        for job in jobs:
            job.start()
        seen = []
        while any(job.is_alive() for job in jobs):
            seen.append(json.loads(fetch(server, "/progress")[2]))
        for job in jobs:
            job.join()
    finally:
        slow.remove()
    assert [a[0] for a in answers] == [200, 200] and answers[0][2] != answers[1][2]
    assert any(p["busy"] and 0 < p["done"] < p["total"] == 16 for p in seen)
    # one generation at a time: past BUSY_WAIT_S a request gets a clear "busy"
    monkeypatch.setattr(demo, "BUSY_WAIT_S", 0.05)
    with server.demo.lock:
        status, _, body = fetch(server, "/generate")
    assert status == 503 and body.startswith(b"busy")
    assert fetch(server, "/generate?n=1")[0] == 200


def test_text_to_image_prompts(vq_ckpt, tmp_path, monkeypatch):
    """A t2i GPT takes the prompt through one T5 encoder (a fake here) kept for every request."""
    made, seen = [], []

    class FakeEncoder:
        def __init__(self, path=None, device="cpu"):
            made.append(path)

        def encode(self, captions):
            seen.extend(captions)
            g = torch.Generator().manual_seed(len(captions[0]))
            return torch.randn(len(captions), 120, 32, generator=g), torch.ones(len(captions), 120)

    monkeypatch.setattr(text, "TextEncoder", FakeEncoder)
    argv = tiny_gpt(
        tmp_path / "t2i.pt", vq_ckpt, model_type="t2i", cls_token_num=120, caption_dim=32
    )
    with running([*argv, "--prompt", "a red disc"]) as server:
        page = fetch(server, "/")[2].decode()
        assert '"t2i": true' in page and '"prompt": "a red disc"' in page
        status, _, body = fetch(server, "/generate?" + query(prompt="a blue ring", n=2))
        assert status == 200 and png(body).shape == (CELL + 2, 2 * CELL + 2, 3)
    assert len(made) == 1 and seen == ["a red disc"] * 4 + ["a blue ring"] * 2


def chromium(url, tmp_path, *flags) -> str:
    """Headless Chromium on url with the given flags (a screenshot, the DOM): -> its stdout."""
    browser = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    done = subprocess.run([*browser, *flags, url], capture_output=True, text=True, timeout=120)
    return done.stdout


def find_grid(page: np.ndarray, grid: np.ndarray):
    """The scale k (1..8) at which grid appears pixel for pixel in page (nearest-neighbour
    enlarged), or None."""
    for k in range(1, 9):
        big = grid.repeat(k, 0).repeat(k, 1)
        h, w, _ = big.shape
        # candidates: where the first image's corner pixel (past the 2 px gap) is
        for y, x in zip(*np.nonzero((page == big[2 * k, 2 * k]).all(-1))):
            y0, x0 = y - 2 * k, x - 2 * k
            window = page[y0 : y0 + h, x0 : x0 + w]
            if y0 >= 0 and x0 >= 0 and window.shape == big.shape:
                if np.abs(window - big).mean() < 2:
                    return k
    return None


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium (apt-get install chromium)")
def test_headless_chromium_shows_the_grid(server, tmp_path):
    shot = tmp_path / "demo.png"
    chromium(server.url + "/", tmp_path, f"--screenshot={shot}", "--window-size=1000,800")
    page = png(shot.read_bytes()).astype(int)
    first = png(fetch(server, "/first.png")[2]).astype(int)
    assert page.shape == (800, 1000, 3) and first.std() > 10  # the grid is not blank
    assert find_grid(page, first), "no grid in the screenshot"
    # the page's script ran: it filled in the settings, the class names and the first time
    dom = chromium(server.url + "/", tmp_path, "--dump-dom")
    assert "first grid: " in dom and "golden retriever, otter, lesser panda" in dom
