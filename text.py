"""Text-to-image extras: caption cleaning, FLAN-T5-XL caption features, and the t2i training store.

Follows LlamaGen's `language/t5.py`, `language/extract_t5_feature.py` and `dataset/t2i.py`: captions
are cleaned twice (DeepFloyd/PixArt-style rules, re-derived here), encoded by the google/flan-t5-xl
encoder into 120 x 2048 features, and right-aligned ("left padding") with zeroed padding and a 0/1
mask. Needs the optional packages `transformers` and `sentencepiece`, imported only on this path;
the encoder comes from the Hugging Face cache (~11 GB download once) or --t5-path DIR.

    python text.py toy data/toy-t2i            # 4 x 32 toy images + captions.jsonl ("a red disc", ...)
    python text.py extract --data-path data/toy-t2i/captions.jsonl --code-path data/toy-t2i-codes --vq-ckpt VQ.pt --image-size 64
    python train_gpt.py --model tiny --code-path data/toy-t2i-codes --global-batch-size 32 --max-steps 300
    python sample.py --gpt-ckpt results/000-GPT-tiny/checkpoints/last.pt --vq-ckpt VQ.pt --prompt "a red disc"
    python sample.py --prompt "a photo of a cat on a red sofa"   # released t2i_XL_stage1_256.pt

The store (--code-path) is one folder: meta.json (model_type "t2i", vocab_size, block_size, ...),
codes.npy (N, 1, h*w) uint16 token grids, valid.npy (N,) bool (image readable and >= image size),
caption_index.npy (N, 2) int64 (offset, n_tokens; 0 tokens = no features) and caption_features.f16,
the valid T5 tokens of all captions back to back as a raw float16 (total_tokens, 2048) memmap:
~60 KB per 15-token caption instead of 0.5 MB for a padded (120, 2048) row, and no file per caption.
Extraction is resumable (rerun the same command) and single-process.
"""

import html
import json
import re
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import torch

from data import (
    UserError,
    load_tokenizer,
    write_json,
    center_crop_arr,
    cli,
    load_image,
    pil_to_tensor,
)

T5_MODEL = "google/flan-t5-xl"  # the official text encoder; its last_hidden_state is 2048 wide
MAX_TOKENS = 120  # caption slots, = the t2i GPT's cls_token_num
CAPTION_KEYS = ["blip", "llava", "llava_first"]  # order of the official `text` lists
MISSING = (
    f"text prompts need the optional package transformers (pip install transformers sentencepiece) "
    f"and the {T5_MODEL} encoder (fetched into the Hugging Face cache on first use, or --t5-path DIR)"
)


def _transformers():
    """The transformers module, or a UserError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserError(MISSING) from None
    return transformers


# ----------------------------------------------------------------------------------------------
# Caption cleaning: web alt-text noise out, content words in (applied twice, as the official)


def _rx(pattern):
    return re.compile(pattern, re.IGNORECASE)


_CJK = "\u2e80-\u2fdf\u3000-\u33ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_CLEAN_RULES = [  # (pattern, replacement), in order
    (_rx(r"<\s*person\s*>"), "person"),  # LAION placeholder tag
    (_rx(r"\b(?:https?://|ftp://|www\.)\S+"), " "),  # URLs
    (_rx(r"\b[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|io|co|ru|de|uk|info|html?|php)\b(?:/\S*)?"), " "),
    (_rx(r"<[^>]*>"), " "),  # HTML tags
    (_rx(r"@[\w.]+"), " "),  # @mentions
    (_rx(f"[{_CJK}]+"), " "),  # CJK and full-width text
    (_rx("[\u2010-\u2015\u2212\ufe58\ufe63]"), "-"),  # every dash is "-"
    (_rx("[\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033]"), '"'),  # every double quote is "
    (_rx("[\u2018\u2019\u201a\u201b\u2032`\u00b4]"), "'"),  # every single quote is '
    (_rx(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"), " "),  # IP addresses
    (_rx(r"\\n"), " "),  # escaped newlines
    (_rx(r"\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|svg|pdf|zip|mp4)\b"), " "),  # file names
    (_rx(r"#\d+|\b\d{5,}\b"), " "),  # ids, long numbers
    (
        _rx(r"\b[a-z]{1,3}\d{3,}\b|\b[a-z]+\d+[a-z]+\b|\b\d+[a-z]+\d+\b"),
        " ",
    ),  # product codes: jc6640vc
    (
        _rx(r"\b\d+(?:\.\d+)?\s*[x\u00d7]\s*\d+(?:\.\d+)?(?:\s*(?:px|cm|mm|in))?\b"),
        " ",
    ),  # 1920x1080
    (
        _rx(
            r"\b(?:free shipping|click (?:here|for)|download|for sale|buy now|shop now|stock photo)\b"
        ),
        " ",
    ),
    (_rx(r"\bpage \d+\b"), " "),
    (_rx(r"[^\w\s.,!?:;'\"%$+=&-]"), " "),  # emoji, symbols, brackets
    (
        _rx(r"\S*[-_]\S*[-_]\S*[-_]\S*"),
        lambda m: re.sub(r"[-_]", " ", m.group()),
    ),  # a-b-c-d -> words
    (_rx(r"_"), " "),
    (_rx(r"\.{2,}"), " "),  # ellipses
    (_rx(r"([,!?:;'\"-])\1+"), r"\1"),  # repeated punctuation
    (_rx(r"(?:^|\s)[.,:;!?'\"-](?=\s|$)"), " "),  # orphan punctuation
    (_rx(r"\s+"), " "),
]


def clean_caption(text: str, passes: int = 2) -> str:
    """Lower-case a caption and strip URLs, HTML, CJK, ids, shop spam and odd symbols (twice, as official)."""
    for _ in range(passes):
        text = html.unescape(html.unescape(urllib.parse.unquote_plus(str(text)))).strip().lower()
        for pattern, repl in _CLEAN_RULES:
            text = pattern.sub(repl, text)
        text = text.strip(" '\"-_,:;+")
    return text


# ----------------------------------------------------------------------------------------------
# The T5 encoder: captions -> right-aligned features (B, 120, D) and masks (B, 120)


def left_pad(emb: torch.Tensor, mask: torch.Tensor):
    """Move the valid tokens of each row to the right end, keeping their order; zero the padding."""
    mask = mask.bool()
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices  # pads first, then tokens
    emb = torch.gather(emb, 1, order[..., None].expand_as(emb))
    mask = torch.gather(mask, 1, order)
    return emb * mask[..., None], mask


class TextEncoder:
    """A T5 tokenizer + encoder pair; encode() gives the official left-padded caption features."""

    def __init__(self, tokenizer, model, max_length: int = MAX_TOKENS):
        self.tokenizer, self.model, self.max_length = tokenizer, model.eval(), max_length
        self.dim = model.config.d_model

    @classmethod
    def from_pretrained(cls, path=None, device="cpu", dtype=None) -> "TextEncoder":
        """flan-t5-xl from the Hugging Face cache (downloaded once), or a local copy at `path`."""
        tf = _transformers()
        device = torch.device(device)
        dtype = dtype or (
            torch.bfloat16 if device.type == "cuda" else torch.float32
        )  # official: bf16
        name = str(path or T5_MODEL)
        if path is not None and not Path(path).is_dir():
            raise UserError(
                f"--t5-path {path} is not a folder; point it at a local copy of {T5_MODEL}"
            )
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(name)
            model = (
                tf.T5EncoderModel.from_pretrained(name, dtype=dtype)
                if int(tf.__version__.split(".")[0]) >= 5
                else tf.T5EncoderModel.from_pretrained(name, torch_dtype=dtype)
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load the text encoder {name} ({str(e).splitlines()[0][:200]}); it downloads "
                f"into the Hugging Face cache once online, or pass --t5-path DIR with a local copy"
            ) from None
        return cls(tokenizer, model.to(device))

    @torch.no_grad()
    def encode(self, captions, clean: bool = True):
        """List of B captions -> (emb (B, 120, D) float32, right-aligned and zero-padded; mask (B, 120) bool)."""
        texts = [clean_caption(c) if clean else c for c in captions]
        tok = self.tokenizer(
            texts,
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.model.device
        emb = self.model(
            input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device)
        ).last_hidden_state.float()  # (B, 120, D), right-padded
        return left_pad(emb, tok.attention_mask.to(device))


def encode_prompts(prompts, t5_path=None, device="cpu", dtype=None):
    """Load the T5 encoder, encode prompts to (emb (B, 120, D), mask (B, 120)), and free it again."""
    encoder = TextEncoder.from_pretrained(t5_path, device, dtype)
    emb, mask = encoder.encode(list(prompts))
    del encoder
    return emb, mask


def read_prompts(prompts=None, prompt_file=None) -> list:
    """--prompt texts plus the non-empty lines of --prompt-file, in that order."""
    out = list(prompts or [])
    if prompt_file is not None:
        if not Path(prompt_file).is_file():
            raise UserError(f"prompt file not found: {prompt_file}")
        out += [line.strip() for line in Path(prompt_file).read_text().splitlines() if line.strip()]
    if not out:
        raise UserError(
            'no prompts: pass --prompt "a photo of a cat" or a --prompt-file with one per line'
        )
    return out


def fit_condition(emb: torch.Tensor, mask: torch.Tensor, tokens: int, dim: int):
    """Check caption features against a t2i GPT (cls_token_num, caption_dim); shorter ones are padded on the left."""
    if emb.shape[-1] != dim:
        raise UserError(
            f"caption features are {emb.shape[-1]} wide but the GPT expects caption_dim {dim} "
            f"({T5_MODEL} gives 2048)"
        )
    if emb.shape[1] > tokens:
        raise UserError(f"caption features have {emb.shape[1]} slots, more than the GPT's {tokens}")
    pad = tokens - emb.shape[1]
    return (
        torch.cat([emb.new_zeros(emb.shape[0], pad, dim), emb], 1),
        torch.cat([mask.new_zeros(mask.shape[0], pad), mask], 1),
    )


def caption_condition(args, config, device):
    """sample.py: --caption-features, or prompts through the T5 encoder -> (emb (B, T, D), mask (B, T)) on device."""
    if args.caption_features:
        emb, mask = load_caption_features(args.caption_features)
    else:
        emb, mask = encode_prompts(
            read_prompts(args.prompt, args.prompt_file), args.t5_path, device
        )
    emb, mask = fit_condition(emb, mask, config.cls_token_num, config.caption_dim)
    return emb.to(device), mask.to(device)


def load_caption_features(path):
    """A .pt or .npz file with emb (B, T, D) and mask (B, T) -> (emb float32, mask bool), right-aligned."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"caption features file not found: {path}")
    try:
        obj = (
            dict(np.load(path))
            if path.suffix == ".npz"
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except Exception as e:
        raise UserError(f"cannot read caption features {path} ({type(e).__name__})") from None
    if not isinstance(obj, dict) or "emb" not in obj or "mask" not in obj:
        raise UserError(
            f"{path} must hold 'emb' (B, T, D) and 'mask' (B, T), e.g. torch.save(dict(emb=..., mask=...))"
        )
    emb, mask = torch.as_tensor(obj["emb"]).float(), torch.as_tensor(obj["mask"])
    emb, mask = (emb[None], mask[None]) if emb.ndim == 2 else (emb, mask)
    if emb.ndim != 3 or tuple(mask.shape) != tuple(emb.shape[:2]):
        raise UserError(
            f"{path}: emb {tuple(emb.shape)} and mask {tuple(mask.shape)} must be (B, T, D) and (B, T)"
        )
    return left_pad(emb, mask)


# ----------------------------------------------------------------------------------------------
# JSON-lines data and the caption-feature + code store


def read_jsonl(data_path):
    """A .jsonl file, or a folder of them (sorted) -> [(image Path, text)]; relative paths from the file's folder."""
    data_path = Path(data_path)
    files = sorted(data_path.glob("*.jsonl")) if data_path.is_dir() else [data_path]
    if not files or not all(f.is_file() for f in files):
        raise UserError(
            f"no JSON-lines captions at {data_path} (want lines like "
            f'{{"image_path": "a.jpg", "text": "a cat"}})'
        )
    records = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                records.append((f.parent / r["image_path"], r.get("text")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{f}:{n} is not a JSON object with image_path and text") from None
    return records


def pick_caption(text, key="blip", trunc=False):
    """The caption of one record: a string as is, or the `key` entry of [blip, llava, llava_first]."""
    if isinstance(text, (list, tuple)):
        i = CAPTION_KEYS.index(key) if key in CAPTION_KEYS else int(key)
        text = text[i] if i < len(text) else None
    elif isinstance(text, dict):
        text = text.get(key)
    if not isinstance(text, str):
        return None
    return text.split(".")[0] if trunc else text  # --trunc-caption: the first sentence only


class _Images(torch.utils.data.Dataset):
    """Record i -> (image (3, S, S) in [-1, 1] or zeros, ok), ok = readable and at least S on the short side."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = load_image(self.paths[i])
        except UserError:
            print(f"\nskipping unreadable image {self.paths[i]}", file=sys.stderr)
            return torch.zeros(3, self.size, self.size), False
        if min(img.size) < self.size:
            return torch.zeros(3, self.size, self.size), False
        return pil_to_tensor(center_crop_arr(img, self.size)), True


@torch.inference_mode()
def extract(
    data_path,
    code_path,
    vq_ckpt,
    encoder: TextEncoder,
    image_size=256,
    caption_key="blip",
    trunc_caption=False,
    batch_size=32,
    num_workers=4,
    device="cpu",
) -> dict:
    """JSON-lines captions + images -> the store at code_path (resumes an interrupted run); returns meta."""
    from dataclasses import asdict

    records, code_path = read_jsonl(data_path), Path(code_path)
    vq = load_tokenizer(vq_ckpt, device)  # fp32, as official
    if image_size % vq.config.downsample:
        raise UserError(
            f"--image-size {image_size} is not a multiple of the tokenizer's downsampling {vq.config.downsample}"
        )
    N, grid = len(records), image_size // vq.config.downsample
    meta = dict(
        model_type="t2i",
        vocab_size=vq.config.codebook_size,
        grid_size=grid,
        block_size=grid * grid,
        image_size=image_size,
        num_images=N,
        n_aug=1,
        caption_dim=encoder.dim,
        max_tokens=encoder.max_length,
        caption_key=caption_key,
        trunc_caption=trunc_caption,
        data_path=str(Path(data_path).resolve()),
        tokenizer=dict(path=str(Path(vq_ckpt).resolve()), config=asdict(vq.config)),
    )
    files = {
        k: code_path / f
        for k, f in (
            ("codes", "codes.npy"),
            ("valid", "valid.npy"),
            ("index", "caption_index.npy"),
            ("feats", "caption_features.f16"),
        )
    }
    old = (
        json.loads((code_path / "meta.json").read_text())
        if (code_path / "meta.json").is_file()
        else None
    )
    if old is not None:
        changed = [k for k in meta if k not in ("data_path", "tokenizer") and old.get(k) != meta[k]]
        if changed:
            raise UserError(
                f"{code_path} holds a store made with a different {', '.join(changed)}; "
                f"pass a new --code-path or delete that folder"
            )
        done, tokens = old["num_done"], old["num_tokens"]
    else:
        code_path.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(
            files["codes"],
            "w+",
            np.uint16 if meta["vocab_size"] <= 2**16 else np.int32,
            (N, 1, grid * grid),
        ).flush()
        np.save(files["valid"], np.zeros(N, dtype=bool))
        np.save(files["index"], np.zeros((N, 2), dtype=np.int64))
        done, tokens = 0, 0
    codes, valid, index = (np.load(files[k], mmap_mode="r+") for k in ("codes", "valid", "index"))
    loader = torch.utils.data.DataLoader(
        _Images([p for p, _ in records[done:]], image_size),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    with open(files["feats"], "ab") as feats:
        feats.truncate(
            tokens * encoder.dim * 2
        )  # drop what an interrupted run wrote after its last commit
        for x, ok in loader:
            rows = range(done, done + len(x))
            captions = [pick_caption(records[i][1], caption_key, trunc_caption) for i in rows]
            have = [j for j, c in enumerate(captions) if c is not None]
            if have:
                emb, mask = encoder.encode([captions[j] for j in have])  # (b, T, D) right-aligned
                for j, e, m in zip(have, emb, mask):
                    n = int(m.sum())
                    feats.write(
                        e[-n:].clamp(-65504, 65504).cpu().numpy().astype(np.float16).tobytes()
                    )
                    index[done + j] = (tokens, n)
                    tokens += n
            if ok.any():
                ind = vq.encode(x[ok].to(device))[2].view(int(ok.sum()), 1, -1)  # (b, 1, h*w)
                codes[done + np.flatnonzero(ok.numpy())] = ind.cpu().numpy()
            valid[done : done + len(x)] = ok.numpy()
            done += len(x)
            feats.flush()
            for a in (codes, valid, index):
                a.flush()
            write_json(
                {**meta, "num_done": done, "num_tokens": tokens}, code_path / "meta.json"
            )  # commit
            print(f"\r{done}/{N} records", end="", file=sys.stderr)
    print(file=sys.stderr)
    n_feat = index[:, 1] > 0
    meta.update(
        num_done=done,
        num_tokens=tokens,
        bad_images=int((~valid).sum()),
        missing_captions=int((~n_feat).sum()),
        num_valid=int((valid & n_feat).sum()),
        complete=True,
    )
    write_json(meta, code_path / "meta.json")
    return meta


class CaptionCodeDataset(torch.utils.data.Dataset):
    """Store row i -> (codes (h*w,) int64, emb (120, D) float32 right-aligned, mask (120,) bool, valid bool).

    Bad records stay in (zero codes/features, valid False) so the loss can skip them, as the official
    dataset returns dummies: `model(..., valid=valid)`; count them with `(~valid).sum()`.
    """

    def __init__(self, code_path):
        self.path = Path(code_path)
        meta_path = self.path / "meta.json"
        self.meta = meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("model_type") != "t2i":
            raise UserError(
                f"{code_path} is not a text-to-image store; make one with `python text.py extract`"
            )
        if not meta.get("complete"):
            raise UserError(f"the extraction into {code_path} did not finish; rerun it to resume")
        self.index = np.load(self.path / "caption_index.npy")
        self.valid = np.load(self.path / "valid.npy") & (self.index[:, 1] > 0)
        self.vocab_size, self.block_size = meta["vocab_size"], meta["block_size"]
        self.caption_dim, self.max_tokens = meta["caption_dim"], meta["max_tokens"]
        self._codes = self._feats = None  # memmaps, opened lazily in each DataLoader worker

    num_classes = (
        1000  # unused by t2i GPTs; GPTConfig's default, so the trainer's checks stay uniform
    )

    def set_epoch(self, epoch: int):
        pass  # no random augmentation: the official t2i data has no flips

    def __len__(self):
        return len(self.index)

    def captions(self, n: int = 8):
        """(emb (n, T, D), mask (n, T)) of the first n usable records, e.g. for sample grids."""
        rows = [self[int(i)] for i in np.flatnonzero(self.valid)[:n]]
        return torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])

    def __getitem__(self, i):
        if self._codes is None:
            self._codes = np.load(self.path / "codes.npy", mmap_mode="r")
            self._feats = np.memmap(self.path / "caption_features.f16", np.float16, "r").reshape(
                -1, self.caption_dim
            )
        T, (start, n), ok = self.max_tokens, self.index[i], bool(self.valid[i])
        emb, mask = torch.zeros(T, self.caption_dim), torch.zeros(T, dtype=torch.bool)
        if ok:  # right-aligned: the last n slots hold the caption
            emb[T - n :] = torch.from_numpy(self._feats[start : start + n].astype(np.float32))
            mask[T - n :] = True
        codes = (
            torch.from_numpy(self._codes[i, 0].astype(np.int64))
            if ok
            else torch.zeros(self.block_size, dtype=torch.long)
        )
        return codes, emb, mask, ok


# ----------------------------------------------------------------------------------------------
# Command line


def make_toy_t2i(root, num_classes=4, per_class=32, size=64, seed=0) -> Path:
    """data.make_toy_dataset images plus root/captions.jsonl, texts [blip, llava, llava_first] from the class names."""
    from data import list_images, make_toy_dataset

    root = Path(make_toy_dataset(root, num_classes, per_class, size, seed))
    lines = []
    for p in list_images(root):
        what = p.parent.name.split("-", 1)[1].replace("-", " ")  # "000-red-disc" -> "red disc"
        texts = [
            f"a {what}",
            f"a picture of a {what} on a dark background",
            f"a picture of a {what}",
        ]
        lines.append(json.dumps({"image_path": str(p.relative_to(root)), "text": texts}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


def parse_args(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        description="text-to-image data: toy captions, T5 feature + code extraction"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    toy = sub.add_parser("toy", help="toy images and captions.jsonl")
    toy.add_argument("root")
    toy.add_argument("--num-classes", type=int, default=4)
    toy.add_argument("--per-class", type=int, default=32)
    toy.add_argument("--size", type=int, default=64)
    ex = sub.add_parser(
        "extract", help="T5 caption features + token codes of a JSON-lines set (resumable)"
    )
    ex.add_argument(
        "--data-path", required=True, help=".jsonl file or folder of them: image_path, text"
    )
    ex.add_argument("--code-path", required=True, help="output store folder")
    ex.add_argument("--vq-ckpt", required=True)
    ex.add_argument("--image-size", type=int, default=256)
    ex.add_argument(
        "--caption-key",
        default="blip",
        help="entry of list texts: blip, llava, llava_first or an index",
    )
    ex.add_argument(
        "--trunc-caption", action="store_true", help="keep the text before the first '.'"
    )
    ex.add_argument(
        "--t5-path", default=None, help=f"local copy of {T5_MODEL} (default: Hugging Face cache)"
    )
    ex.add_argument("--batch-size", type=int, default=32)
    ex.add_argument("--num-workers", type=int, default=4)
    return parser.parse_args(argv)


def main(args):
    if args.cmd == "toy":
        print(make_toy_t2i(args.root, args.num_classes, args.per_class, args.size))
        return
    for flag, path in (("--vq-ckpt", args.vq_ckpt), ("--data-path", args.data_path)):
        if not Path(path).exists():  # fail before the slow T5 load
            raise UserError(f"{flag} {path} does not exist")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = TextEncoder.from_pretrained(args.t5_path, device)
    m = extract(
        args.data_path,
        args.code_path,
        args.vq_ckpt,
        encoder,
        args.image_size,
        args.caption_key,
        args.trunc_caption,
        args.batch_size,
        args.num_workers,
        device,
    )
    print(
        f"{m['num_valid']} of {m['num_images']} records usable in {args.code_path} ({m['bad_images']} bad or "
        f"too-small images, {m['missing_captions']} missing captions); {m['num_tokens']} caption tokens"
    )


if __name__ == "__main__":
    cli(main, parse_args)
