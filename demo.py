"""A local web page to try LlamaGen: pick ImageNet classes and sampling settings, watch the GPT
draw, or keep the top rows of a photo and let it finish the picture.

    python demo.py                     # released GPT-B 256 + VQ-16 on http://127.0.0.1:8000
    python demo.py --model L --image-size 384 --port 8080
    python demo.py --gpt-ckpt results/001-GPT-tiny/checkpoints/last.pt \\
        --vq-ckpt results/000-VQ-tiny/checkpoints/last.pt
    python demo.py --prompt "a photo of a cat on a red sofa"   # t2i_XL_stage1_256 + transformers

The official repository ships a Gradio app (`app.py`); this one needs nothing beyond the card's
dependencies: the standard library's ThreadingHTTPServer serves one page, whose script asks for
PNG grids and polls /progress while the GPT runs. The models load as `sample.py` loads them
(released files downloaded once into $LLAMAGEN_CACHE, or --gpt-ckpt / --vq-ckpt, ours or official),
and every sample.py flag works here too (--labels, --cfg-scale, --top-k, --seed, --jacobi-window,
--mixed-precision...): it sets the page's first values. A text-to-image GPT takes the page's prompt
through FLAN-T5 (the optional transformers package), loaded once.

Completion shows what raster-order generation means: the tokenizer encodes the image, the first
K token rows are kept as the prefix of `gpt.generate(prefix=...)`, and the GPT samples the rest,
each token seeing only the tokens above and to its left (paper Sec. 2.1).

Safe by default: it listens on 127.0.0.1 only (--host 0.0.0.0 opens it to the network), answers
only its own routes (no files from disk), reads at most --max-upload-mb of an upload, refuses a
bad parameter with HTTP 400 and one line, and runs one generation at a time (the others wait up
to BUSY_WAIT_S, then get HTTP 503 "busy"). A request that fails, or a browser that goes away,
never stops the server.
"""

import argparse
import functools
import http.server
import json
import tempfile
import threading
import time
import traceback
import urllib.parse
from io import BytesIO
from pathlib import Path

from PIL import Image

import common
import data
import sample
import text
from common import UserError

MAX_IMAGES = 16  # per request: a GPT-B batch of 16 (32 rows with guidance) fits any GPU
BUSY_WAIT_S = 120  # how long a request waits for the running generation before "busy"

# query parameter -> (type, test, what it must be); defaults come from the command line
PARAMS = {
    "labels": (str, lambda v: True, "class names or ids"),  # sample.parse_labels checks them
    "prompt": (str, lambda v: True, "a text"),
    "n": (int, lambda v: 1 <= v <= MAX_IMAGES, f"an integer in 1..{MAX_IMAGES}"),
    "cfg_scale": (float, lambda v: 0 <= v <= 100, "a number in 0..100 (<= 1: no guidance)"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "temperature": (float, lambda v: 0 < v <= 10, "a number in (0, 10]"),
    "seed": (int, lambda v: 0 <= v < 2**63, "an integer >= 0"),
    "keep_rows": (int, lambda v: v >= 1, "an integer >= 1, below the token rows"),
}


class Refused(Exception):
    """An HTTP answer other than 200 or 400: (status, one-line message)."""


class Demo:
    """The loaded models, the page, and one generation at a time."""

    def __init__(self, args):
        # sample.py's steps: load once (this fills in cfg_scale and top_k for the model's kind)
        self.args = args
        self.info = sample.load_models(args)  # the GPT, its tokenizer, env, name, passes
        self.model = self.info.gpt
        c, self.lock = self.model.config, threading.Lock()
        self.t2i, self.size = c.model_type == "t2i", args.image_size_eval
        if self.t2i:  # caption_condition builds an encoder per call: load FLAN-T5 only once
            text.TextEncoder = functools.lru_cache(maxsize=1)(text.TextEncoder)
        # the output head runs once per forward pass (the prefill counts one): a token counter
        # with a Jacobi window, total (a pass per token) is only the most the call can take
        self.progress = dict(done=0, total=0, busy=False, at_most=args.jacobi_window > 0)
        count = lambda *_: self.progress.update(done=self.progress["done"] + 1)
        self.model.output.register_forward_hook(count)
        # the demo classes of sample_c2i.py, or a small model's first classes in turn
        K = c.num_classes
        labels = args.labels or (sample.DEMO_LABELS if K == 1000 else [i % K for i in range(8)])
        self.defaults = dict(
            labels=", ".join(str(y) for y in labels),
            prompt=(args.prompt or [""])[0],
            n=4 if self.t2i else min(len(labels), MAX_IMAGES),
            cfg_scale=args.cfg_scale,
            top_k=args.top_k,
            top_p=args.top_p,
            temperature=args.temperature,
            seed=args.seed,
            keep_rows=c.grid_size // 2,
        )
        print(f"{self.info.name}: drawing the first grid", flush=True)
        self.first_png, _, headers = self.answer(self.defaults)
        names = sample.CLASS_NAMES.read_text().splitlines()
        config = dict(
            name=self.info.name,
            size=self.size,
            t2i=self.t2i,
            max_images=MAX_IMAGES,
            seconds=headers["X-Seconds"],
            defaults=self.defaults,
            classes=[line.split(", ")[0] for line in names]
            if K == len(names)
            else [f"class {i}" for i in range(K)],
        )
        page = PAGE.replace("CONFIG", json.dumps(config).replace("</", "<\\/"))
        self.page = page.encode()

    def request_args(self, query: dict) -> argparse.Namespace:
        """A query string over the defaults -> sample.py's args for one grid; a bad or unknown
        parameter -> UserError (HTTP 400)."""
        opts = dict(self.defaults)
        for key, value in query.items():
            if key not in PARAMS:
                raise UserError(f"unknown parameter {key!r}; known: {', '.join(PARAMS)}")
            kind, ok, rule = PARAMS[key]
            try:
                opts[key] = kind(value)
                valid = ok(opts[key])
            except ValueError:
                valid = False
            if not valid:
                raise UserError(f"{key} must be {rule}, got {str(value)[:80]!r}")
        args = argparse.Namespace(**{**vars(self.args), **opts})
        n, items = opts["n"], [item.strip() for item in opts["labels"].split(",")]
        args.labels = None if self.t2i else [items[i % len(items)] for i in range(n)]  # in turn
        args.prompt, args.prompt_file = [opts["prompt"]] * n if self.t2i else None, None
        return args

    def answer(self, query: dict, upload: bytes | None = None):
        """A query (and an uploaded image to complete) -> (PNG grid, its type, headers)."""
        args = self.request_args(query)  # every check before the queue
        pictures = [] if upload is None else [read_picture(upload)]
        if not self.lock.acquire(timeout=BUSY_WAIT_S):
            raise Refused(503, "busy: another generation is still running; try again soon")
        try:
            kept = args.keep_rows * self.model.config.grid_size if pictures else 0
            total = self.model.config.block_size - kept  # one prefill, then a pass per token
            self.progress.update(done=0, total=total, busy=True)
            start = time.perf_counter()
            images, nrow = sample.draw_grid(args, self.info, pictures)
            seconds = time.perf_counter() - start
        finally:
            self.progress["busy"] = False
            self.info.passes.clear()  # draw_grid's per-call statistics: not kept for ever
            self.lock.release()
        with tempfile.TemporaryDirectory() as tmp:
            grid = data.save_image_grid(sample.resize(args, images), Path(tmp) / "g.png", nrow)
            png = grid.read_bytes()
        return png, "image/png", {"X-Seconds": f"{seconds:.2f}"}


def read_picture(upload: bytes) -> Image.Image:
    """Uploaded image bytes -> an RGB PIL image (draw_grid centre-crops it to the GPT's size)."""
    try:
        with Image.open(BytesIO(upload)) as img:
            return img.convert("RGB")
    except Exception as e:  # not an image, truncated, a decompression bomb
        raise UserError(f"cannot read the uploaded image ({type(e).__name__})") from None


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes: / (the page), /first.png, /progress, /generate?..., POST /complete?... (body: an
    image file). Anything else: 404."""

    server_version = "llamagen-demo"
    timeout = 60  # seconds: a client that stops sending is dropped, its thread freed

    def do_GET(self):
        self.route()

    def do_POST(self):
        self.route()

    def route(self):
        demo, url = self.server.demo, urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        routes = {
            ("GET", "/"): lambda: (demo.page, "text/html; charset=utf-8", {}),
            ("GET", "/first.png"): lambda: (demo.first_png, "image/png", {}),
            ("GET", "/progress"): lambda: (json.dumps(demo.progress), "application/json", {}),
            ("GET", "/generate"): lambda: demo.answer(query),
            ("POST", "/complete"): lambda: demo.answer(query, self.upload()),
        }
        try:
            if (self.command, url.path) not in routes:
                raise Refused(404, f"not found: {self.command} {url.path}")
            reply = 200, *routes[self.command, url.path]()
        except Refused as e:
            reply = e.args
        except (UserError, ValueError) as e:  # generate's ValueError: e.g. keep_rows too large
            reply = 400, str(e).splitlines()[0]
        except Exception:  # a bug or out of memory: the log has it, the server goes on
            traceback.print_exc()
            reply = 500, "internal error: see the server's log"
        try:
            self.send(*reply)
        except OSError:  # the browser went away before the answer: nothing to tell it
            pass

    def upload(self) -> bytes:
        """The request body, at most --max-upload-mb."""
        size = int(self.headers.get("Content-Length") or 0)
        limit = int(self.server.demo.args.max_upload_mb * 2**20)
        if size > limit:
            raise Refused(413, f"the upload is over {limit / 2**20:g} MB (--max-upload-mb)")
        body = self.rfile.read(size) if size > 0 else b""  # read(-1) would wait for the end
        if size <= 0 or len(body) < size:  # none, or the browser stopped sending
            raise UserError("no image: upload one or click a generated image")
        return body

    def send(self, status, body, kind="text/plain; charset=utf-8", headers={}):
        body = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        for key, value in {"Content-Type": kind, "Content-Length": len(body), **headers}.items():
            self.send_header(key, str(value))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        if not self.path.startswith("/progress"):  # polled several times a second
            super().log_request(code, size)


def make_server(args) -> http.server.ThreadingHTTPServer:
    """Listen on --host:--port, load the models, draw the first grid; -> the server."""
    try:
        server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    try:
        server.demo = Demo(args)
    except BaseException:
        server.server_close()
        raise
    return server


def main(args):
    server = make_server(args)
    host, port = server.server_address[:2]
    print(f"serving http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="a local web demo of LlamaGen; any other flag is sample.py's (--gpt-ckpt, "
        "--vq-ckpt, --model, --image-size, --labels, --prompt, --cfg-scale, --top-k, ...)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0: the whole network can use it")
    p.add_argument("--port", type=common.number(int, 0, 65535), default=8000, help="0: any free")
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest image to complete")
    args, rest = p.parse_known_args(argv)
    return argparse.Namespace(**vars(sample.parse_args(rest)), **vars(args))


PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>LlamaGen demo</title>
<style>
body{font:15px system-ui,sans-serif;margin:1.2em 2em;color:#222}
label{display:inline-block;margin:.35em 1.2em .35em 0}
input[type=number]{width:5.5em} #labels,#prompt{width:32em} #search{width:18em}
.tabs button{font-size:15px;padding:.3em 1em;border:1px solid #999;background:#eee}
.tabs button.on{background:#fff;font-weight:bold;border-bottom-color:#fff}
#form{border:1px solid #999;padding:.6em 1em;margin-top:-1px}
#go{font-size:16px;padding:.3em 1.5em} #error{color:#b00020;font-weight:bold}
#grid{display:block;max-width:100%;margin-top:1em;cursor:crosshair}
#source{vertical-align:middle;max-height:72px} #chosen{color:#555}
</style></head><body>
<h2>LlamaGen demo: <span id=name></span></h2>
<div class=tabs><button id=tab-gen class=on>Generate</button
><button id=tab-complete>Complete an image</button></div>
<form id=form>
<div id=classbox><label>Search classes <input id=search list=names
 placeholder="type a name, pick one to add it"></label><datalist id=names></datalist>
<label>Classes (ids or names, comma-separated) <input id=labels name=labels></label>
<div id=chosen></div></div>
<div id=promptbox hidden><label>Prompt <input id=prompt name=prompt></label></div>
<label>cfg scale <input name=cfg_scale type=number step=any min=0></label>
<label>top-k <input name=top_k type=number min=0></label>
<label>top-p <input name=top_p type=number step=any min=0 max=1></label>
<label>temperature <input name=temperature type=number step=any min=0></label>
<label>seed <input name=seed type=number min=0></label>
<label>images <input name=n type=number min=1></label>
<div id=completebox hidden>
<label>Image <input id=upload type=file accept="image/*"></label> or click an image of the grid
<img id=source alt="">
<label>token rows to keep <input name=keep_rows type=number min=0></label></div>
<p><button id=go>Generate</button> <progress id=bar hidden></progress>
<span id=status></span> <span id=error></span></p>
</form>
<img id=grid src="/first.png" alt="generated images">
<script type=application/json id=config>CONFIG</script>
<script>
const $ = id => document.getElementById(id), C = JSON.parse($('config').textContent);
const form = $('form');
let mode = 'gen', source = null, running = false;
$('name').textContent = `${C.name}, ${C.size} px`;
$('status').textContent = `first grid: ${C.seconds} s`;
for (const [k, v] of Object.entries(C.defaults)) if (form.elements[k]) form.elements[k].value = v;
form.elements.n.max = C.max_images;
$('classbox').hidden = C.t2i; $('promptbox').hidden = !C.t2i;
$('names').append(...C.classes.map((c, i) => new Option(`${i} ${c}`)));
const showChosen = () => $('chosen').textContent = $('labels').value.split(',')
  .map(s => C.classes[parseInt(s)] || s.trim()).join(', ');
$('labels').oninput = showChosen; showChosen();
$('search').onchange = e => {
  const id = parseInt(e.target.value);
  if (id >= 0) $('labels').value += ($('labels').value.trim() ? ', ' : '') + id;
  e.target.value = ''; showChosen();
};
function tab(name) {
  mode = name; $('completebox').hidden = name != 'complete';
  $('tab-gen').className = name == 'gen' ? 'on' : '';
  $('tab-complete').className = name == 'complete' ? 'on' : '';
  $('go').textContent = name == 'gen' ? 'Generate' : 'Complete';
}
$('tab-gen').onclick = () => tab('gen'); $('tab-complete').onclick = () => tab('complete');
function fit() {  // small images (toy models) are shown enlarged, pixel for pixel
  const g = $('grid'), k = Math.max(1, Math.floor(600 / g.naturalWidth));
  g.style.width = g.naturalWidth * k + 'px'; g.style.imageRendering = k > 1 ? 'pixelated' : '';
}
$('grid').onload = fit; if ($('grid').complete) fit();
function useSource(blob) { source = blob; $('source').src = URL.createObjectURL(blob); }
$('upload').onchange = e => e.target.files[0] && useSource(e.target.files[0]);
$('grid').onclick = e => {  // the clicked cell of the grid (images of C.size px, 2 px gaps)
  const g = e.target, cell = C.size + 2, k = g.naturalWidth / g.clientWidth;
  const col = Math.floor(e.offsetX * k / cell), row = Math.floor(e.offsetY * k / cell);
  const c = document.createElement('canvas'); c.width = c.height = C.size;
  c.getContext('2d').drawImage(g, col * cell + 2, row * cell + 2, C.size, C.size,
                               0, 0, C.size, C.size);
  c.toBlob(useSource); tab('complete');
};
async function poll() {
  const p = await (await fetch('/progress')).json();
  if (!running) return;
  $('bar').max = p.total || 1; $('bar').value = p.done;
  const of = p.at_most ? 'of at most' : 'of';
  $('status').textContent = p.busy ? `forward pass ${p.done} ${of} ${p.total}` : 'waiting';
}
form.onsubmit = async e => {
  e.preventDefault();
  const q = new URLSearchParams(new FormData(form));
  q.delete(C.t2i ? 'labels' : 'prompt'); if (mode == 'gen') q.delete('keep_rows');
  $('error').textContent = '';
  if (mode == 'complete' && !source)
    return $('error').textContent = 'choose an image: upload one or click a generated one';
  running = true; $('go').disabled = true; $('bar').hidden = false;
  const timer = setInterval(poll, 250);
  try {
    const r = await fetch((mode == 'gen' ? '/generate?' : '/complete?') + q,
                          mode == 'gen' ? {} : {method: 'POST', body: source});
    if (!r.ok) throw new Error(await r.text());
    $('grid').src = URL.createObjectURL(await r.blob());
    $('status').textContent = `${r.headers.get('X-Seconds')} s`;
  } catch (err) {
    $('status').textContent = ''; $('error').textContent = err.message;
  } finally {
    running = false; clearInterval(timer); $('go').disabled = false; $('bar').hidden = true;
  }
};
</script></body></html>
"""

if __name__ == "__main__":
    common.cli(main, parse_args)
