"""Shared pytest fixtures: repo on sys.path, a private download cache, no network but loopback,
a local HTTP server standing in for the Hugging Face hub, and a small toy image folder.

    python -m pytest -q
"""

import functools
import http.server
import ipaddress
import socket
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPEC = ROOT.parent / "shared" / "spec"  # the spec folder beside the checkout, when present


@pytest.fixture(autouse=True)
def _offline_and_private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own empty cache, and any connection outside 127.0.0.0/8 fails."""
    monkeypatch.setenv("LLAMAGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                raise ConnectionRefusedError(f"tests may not use the network (tried {host})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", _loopback_only(socket.getaddrinfo))


def _loopback_only(getaddrinfo):
    @functools.wraps(getaddrinfo)
    def wrapped(host, *args, **kwargs):
        if host not in (None, "localhost") and not str(host).startswith("127.") and host != "::1":
            raise socket.gaierror(f"tests may not resolve {host}")
        return getaddrinfo(host, *args, **kwargs)

    return wrapped


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support; can drop the connection once after N bytes."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range") and server.support_range:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        for key, value in server.extra_headers.get(path.name, {}).items():
            self.send_header(key, value)
        self.end_headers()
        body = data[start:]
        if server.fail_after_bytes is not None:  # simulate a dropped connection, once
            n, server.fail_after_bytes = server.fail_after_bytes, None
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def http_server(tmp_path):
    """A file server on 127.0.0.1. Put files in `server.directory`; the URL is `server.url`.

    Knobs: server.fail_after_bytes (drop the next response after N bytes), server.support_range,
    server.extra_headers[filename] = {header: value}; server.requests logs (path, Range header).
    """
    directory = tmp_path / "served"
    directory.mkdir()
    handler = functools.partial(_RangeHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.directory, server.url = directory, f"http://127.0.0.1:{server.server_address[1]}"
    server.requests, server.extra_headers = [], {}
    server.fail_after_bytes, server.support_range = None, True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory):
    """A small toy image folder: 4 classes x 8 images of 32 x 32 px."""
    import data

    return data.make_toy_dataset(
        tmp_path_factory.mktemp("toy"), num_classes=4, per_class=8, size=32
    )


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run fastest that way, and two spinning OpenMP threads on a
    busy 2-core machine are several times slower. Modules opt in with pytest.mark.usefixtures."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def vq_ckpt(tmp_path_factory):
    """A randomly initialised VQ-tiny (downsample 8, 1024 codes) saved in our checkpoint format."""
    from dataclasses import asdict
    import torch
    import common
    import vq

    torch.manual_seed(0)
    model = vq.VQModel(vq.VQConfig.from_name("VQ-tiny"))
    return common.save_checkpoint(
        {"model": model.state_dict(), "config": asdict(model.config)},
        tmp_path_factory.mktemp("vq") / "vq.pt",
    )
