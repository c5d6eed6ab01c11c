"""Text-to-image extras: caption cleaning, FLAN-T5-XL caption features, the t2i training store.

    python text.py toy data/toy-t2i      # 4 x 32 toy images + captions.jsonl ("a red disc", ...)
    python text.py extract --data-path data/toy-t2i/captions.jsonl \\
        --code-path data/toy-t2i-codes --vq-ckpt VQ.pt --image-size 64
    python train_gpt.py --model tiny --code-path data/toy-t2i-codes --global-batch-size 32 \\
        --max-steps 300
    python sample.py --gpt-ckpt results/000-GPT-tiny/checkpoints/last.pt --vq-ckpt VQ.pt \\
        --prompt "a red disc"
    python sample.py --prompt "a photo of a cat on a red sofa"   # released t2i_XL_stage1_256.pt

Paper Sec. 3.2 conditions the GPT on text through FLAN-T5-XL: this file follows LlamaGen's
`language/t5.py`, `language/extract_t5_feature.py` and `dataset/t2i.py`. Captions are cleaned twice
(DeepFloyd/PixArt-style rules, re-derived here), encoded by the google/flan-t5-xl encoder into
120 x 2048 features, and right-aligned ("left padding") with zeroed padding and a 0/1 mask, so the
caption always ends right before the first image token. Needs the optional packages `transformers`
and `sentencepiece`, imported only on this path; the encoder comes from the Hugging Face cache
(~11 GB download once) or --t5-path DIR.

The store (--code-path) is one folder: meta.json (model_type "t2i", vocab_size, block_size,
caption_dim, max_tokens, ...), codes.npy (N, h*w) int32 token grids, valid.npy (N,) bool (image
readable and >= image size), caption_lengths.npy (N,) int64 (T5 tokens of each caption; 0 = no
caption) and caption_features.f16, the valid T5 tokens of all captions back to back as a raw
float16 (total_tokens, 2048) memmap, record i's at the cumulative sum of the lengths before it:
~60 KB per 15-token caption instead of 0.5 MB for a padded (120, 2048) row, and no file per
caption. Extraction is resumable (rerun the same command) and single-process.
"""

import argparse
import functools
import html
import json
import re
import urllib.parse
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
from common import UserError, cli, write_json

T5_MODEL = "google/flan-t5-xl"  # the official text encoder; its last_hidden_state is 2048 wide
MAX_TOKENS = 120  # caption slots, = the t2i GPT's cls_token_num (official t5_feature_max_len)
CAPTION_KEYS = ["blip", "llava", "llava_first"]  # order of the official `text` lists

# ----------------------------------------------------------------------------------------------
# Caption cleaning: web alt-text noise out, content words in (applied twice, as the official)

_CJK = "\u2e80-\u2fdf\u3000-\u33ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
# Each pattern (case-insensitive) in turn is replaced by its replacement; the order matters (a URL
# goes before its file name could, a tag before its "<" symbol).
_CLEAN_RULES = [
    (re.compile(pattern, re.IGNORECASE), replacement)
    for pattern, replacement in [
        (r"<\s*person\s*>", "person"),  # LAION placeholder tag
        (r"\b(?:https?://|ftp://|www\.)\S+", " "),  # URLs
        (r"\b[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|io|co|ru|de|uk|info|html?|php)\b(?:/\S*)?", " "),
        (r"<[^>]*>", " "),  # HTML tags
        (r"@[\w.]+", " "),  # @mentions
        (f"[{_CJK}]+", " "),  # CJK and full-width text
        ("[\u2010-\u2015\u2212\ufe58\ufe63]", "-"),  # every dash is "-"
        ("[\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033]", '"'),  # every double quote is "
        ("[\u2018\u2019\u201a\u201b\u2032`\u00b4]", "'"),  # every single quote is '
        (r"\b\d{1,3}(?:\.\d{1,3}){3}\b", " "),  # IP addresses
        (r"\\n", " "),  # escaped newlines
        (r"\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|svg|pdf|zip|mp4)\b", " "),  # file names
        (r"#\d+|\b\d{5,}\b", " "),  # ids, long numbers
        (r"\b[a-z]{1,3}\d{3,}\b|\b[a-z]+\d+[a-z]+\b|\b\d+[a-z]+\d+\b", " "),  # codes: jc6640vc
        (r"\b\d+(?:\.\d+)?\s*[x\u00d7]\s*\d+(?:\.\d+)?(?:\s*(?:px|cm|mm|in))?\b", " "),  # 1920x1080
        (r"\b(?:free shipping|click (?:here|for)|download|for sale|buy now|shop now)\b", " "),
        (r"\bstock photo\b|\bpage \d+\b", " "),
        (r"[^\w\s.,!?:;'\"%$+=&-]", " "),  # emoji, symbols, brackets
        (r"\S*[-_]\S*[-_]\S*[-_]\S*", lambda m: re.sub("[-_]", " ", m.group())),  # a-b-c-d: words
        ("_", " "),
        (r"\.{2,}", " "),  # ellipses
        (r"([,!?:;'\"-])\1+", r"\1"),  # repeated punctuation
        (r"(?:^|\s)[.,:;!?'\"-](?=\s|$)", " "),  # orphan punctuation
        (r"\s+", " "),
    ]
]


def clean_caption(text: str) -> str:
    """Lower-case a caption; strip URLs, HTML, CJK, ids, shop spam and odd symbols (twice, as the
    official: the first pass can leave new noise, e.g. a tag behind an escaped entity)."""
    for _ in range(2):
        text = html.unescape(html.unescape(urllib.parse.unquote_plus(str(text)))).strip().lower()
        for pattern, replacement in _CLEAN_RULES:
            text = pattern.sub(replacement, text)
        text = text.strip(" '\"-_,:;+")
    return text


# ----------------------------------------------------------------------------------------------
# The T5 encoder: captions -> right-aligned features (B, 120, D) and masks (B, 120)


def left_pad(emb: torch.Tensor, mask: torch.Tensor):
    """Move the valid tokens of each row to the right end, keeping their order; zero the padding.
    (B, S, D), (B, S) -> same shapes, the mask as bool."""
    order = mask.int().argsort(dim=1, stable=True)  # (B, S): pads first, then tokens, in order
    mask = mask.bool().gather(1, order)
    return emb.gather(1, order[..., None].expand_as(emb)) * mask[..., None], mask


class TextEncoder:
    """FLAN-T5-XL's tokenizer + encoder from the Hugging Face cache (downloaded once) or a local
    copy at `path`; encode() gives the official left-padded caption features."""

    def __init__(self, path=None, device="cpu"):
        try:  # optional: only text-to-image needs it
            import transformers
        except ImportError:
            raise UserError(
                "text prompts need the optional package transformers (pip install transformers "
                f"sentencepiece) and the {T5_MODEL} encoder (fetched into the Hugging Face cache "
                "on first use, or --t5-path DIR)"
            ) from None
        device, name = torch.device(device), str(path or T5_MODEL)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # official: bf16
        # loading in the dtype (not .to(dtype) after) keeps T5's `wo` layers in fp32, as the
        # official; transformers 5 renamed the argument
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name)
            model = transformers.T5EncoderModel.from_pretrained(name, **{key: dtype})
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load the text encoder {name} ({str(e).splitlines()[0][:200]}); it "
                "downloads into the Hugging Face cache once online, or pass --t5-path DIR"
            ) from None
        self.model, self.dim = model.to(device).eval(), model.config.d_model  # 2048 for flan-t5-xl

    @torch.no_grad()
    def encode(self, captions):
        """B captions -> emb (B, 120, D) float32, right-aligned and zero-padded; mask (B, 120) bool.
        The encoder sees the right-padded batch with its attention mask (official t5.py), so each
        row equals the caption encoded alone; left_pad then moves it to the end."""
        tokens = self.tokenizer(
            [clean_caption(c) for c in captions],
            max_length=MAX_TOKENS,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).to(self.model.device)
        out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return left_pad(out.last_hidden_state.float(), tokens.attention_mask)


def caption_condition(args, config, device):
    """sample.py's text condition -> (emb (B, cls_token_num, caption_dim), mask (B, cls_token_num))
    on device: --caption-features (a .pt or .npz with emb (B, S, D) and mask (B, S), or one
    caption's (S, D) and (S,)), or the --prompt texts and --prompt-file lines through T5."""
    path = args.caption_features
    if path:
        try:
            obj = (
                dict(np.load(path))
                if path.endswith(".npz")
                else torch.load(path, weights_only=True)
            )
            emb, mask = torch.as_tensor(obj["emb"]).float(), torch.as_tensor(obj["mask"])
            if emb.ndim == 2:  # one caption: (S, D) and (S,)
                emb, mask = emb[None], mask[None]
            emb, mask = left_pad(emb, mask)
        except Exception as e:  # missing or unreadable file, a key missing, shapes that disagree
            raise UserError(
                f"--caption-features {path} must hold 'emb' (B, S, D) and 'mask' (B, S), e.g. "
                f"torch.save(dict(emb=..., mask=...)) ({type(e).__name__}: {e})"
            ) from None
    else:
        try:
            lines = Path(args.prompt_file).read_text().splitlines() if args.prompt_file else []
        except OSError as e:
            raise UserError(f"cannot read --prompt-file ({e})") from None
        prompts = [p.strip() for p in (args.prompt or []) + lines if p.strip()]
        if not prompts:
            raise UserError('no prompts: pass --prompt "a photo of a cat" or a --prompt-file')
        emb, mask = TextEncoder(args.t5_path, device).encode(prompts)  # freed on return
    slots, dim = config.cls_token_num, config.caption_dim
    if emb.ndim != 3 or emb.shape[1] > slots or emb.shape[2] != dim:
        raise UserError(
            f"caption features {tuple(emb.shape)} do not fit the GPT: (B, up to {slots}, "
            f"caption_dim {dim}); {T5_MODEL} gives (B, 120, 2048)"
        )
    pad = slots - emb.shape[1]  # fewer slots: more padding on the left, as the encoder would give
    return F.pad(emb, (0, 0, pad, 0)).to(device), F.pad(mask, (pad, 0)).to(device)


# ----------------------------------------------------------------------------------------------
# JSON-lines data and the caption-feature + code store


def read_jsonl(data_path):
    """A .jsonl file, or a folder of them (sorted) -> [(image Path, text)]; image paths are
    relative to the file's folder."""
    data_path = Path(data_path)
    files = sorted(data_path.glob("*.jsonl")) if data_path.is_dir() else [data_path]
    records = []
    try:
        for f in files:
            for line in filter(str.strip, f.read_text().splitlines()):
                record = json.loads(line)
                records.append((f.parent / record["image_path"], record.get("text")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{f}: {type(e).__name__} {e}; want JSON lines with image_path and text")
    if not records:
        raise UserError(
            f'no records in {data_path}; want lines like {{"image_path": "a.jpg", "text": "a cat"}}'
        )
    return records


def pick_caption(text, key="blip", trunc=False):
    """The caption of one record: a string as is, or the `key` entry (a name or an index) of the
    official [blip, llava, llava_first] list, or of a dict; None when there is none."""
    if isinstance(text, (list, tuple)):
        i = CAPTION_KEYS.index(key) if key in CAPTION_KEYS else int(key)
        text = text[i] if i < len(text) else None
    elif isinstance(text, dict):
        text = text.get(key)
    if not isinstance(text, str):
        return None
    return text.split(".")[0] if trunc else text  # --trunc-caption: the first sentence only


def load_crops(paths, size):
    """DataLoader collate: image paths -> (crops (b, 3, S, S) in [-1, 1], ok (b,) numpy bool). A
    bad image (unreadable, or under S on its short side: the official t2i data drops those) gives
    zeros and ok False, so the store keeps one row per record."""
    crops, ok = [], []
    for path in paths:
        img = data.load_image(path, skip_bad=True)  # None (and a warning) when unreadable
        ok.append(img is not None and min(img.size) >= size)
        crops.append(data.center_crop_arr(img, size) if ok[-1] else None)
    zeros = torch.zeros(3, size, size)
    return torch.stack([data.pil_to_tensor(c) if c else zeros for c in crops]), np.array(ok)


def open_store(path, meta: dict, arrays: dict, ignore=("data_path", "tokenizer")) -> dict:
    """A store folder of .npy arrays {name: (shape, dtype)} plus meta.json. New: zero-filled
    arrays and `meta`. Existing: its meta.json must agree with `meta` (but for the `ignore` keys),
    so a resumed extraction cannot mix settings. -> the meta.json on disk."""
    path = Path(path)
    if (path / "meta.json").is_file():
        stored = json.loads((path / "meta.json").read_text())
        changed = [k for k in meta if k not in ignore and stored.get(k) != meta[k]]
        if changed:
            raise UserError(
                f"{path} holds a store made with a different {', '.join(changed)}; "
                "pass a new --code-path or delete that folder"
            )
        return stored
    path.mkdir(parents=True, exist_ok=True)
    for name, (shape, dtype) in arrays.items():
        np.lib.format.open_memmap(path / f"{name}.npy", "w+", dtype, shape).flush()
    write_json(meta, path / "meta.json")
    return meta


@torch.inference_mode()
def extract(args, encoder=None) -> dict:
    """JSON-lines captions + images -> the store at args.code_path, resuming an interrupted run
    (official extract_t5_feature.py + extract_codes_t2i.py in one pass) -> its meta."""
    from tqdm import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    records, out = read_jsonl(args.data_path), Path(args.code_path)
    vq = data.load_tokenizer(args.vq_ckpt, device)  # fp32, as the official
    grid, rest = divmod(args.image_size, vq.config.downsample)
    if rest:
        raise UserError(
            f"--image-size {args.image_size} is not a multiple of {vq.config.downsample}"
        )
    encoder = encoder or TextEncoder(args.t5_path, device)  # after the cheap checks: it is slow
    n = len(records)
    meta = dict(
        model_type="t2i",
        vocab_size=vq.config.codebook_size,
        grid_size=grid,
        block_size=grid * grid,
        image_size=args.image_size,
        num_images=n,
        caption_dim=encoder.dim,
        max_tokens=MAX_TOKENS,
        caption_key=args.caption_key,
        trunc_caption=args.trunc_caption,
        data_path=str(Path(args.data_path).resolve()),
        tokenizer=dict(path=str(Path(args.vq_ckpt).resolve()), config=asdict(vq.config)),
    )
    # int32 codes: 1 KB per 256-token image, next to ~60 KB of caption features
    arrays = dict(codes=((n, grid**2), np.int32), valid=((n,), bool), caption_lengths=((n,), int))
    stored = open_store(out, meta, arrays)
    done, tokens = stored.get("num_done", 0), stored.get("num_tokens", 0)  # the last commit
    arrays = {k: np.load(out / f"{k}.npy", mmap_mode="r+") for k in arrays}
    loader = torch.utils.data.DataLoader(
        [path for path, _ in records[done:]],
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=functools.partial(load_crops, size=args.image_size),
    )
    with open(out / "caption_features.f16", "ab") as feats:
        feats.truncate(tokens * encoder.dim * 2)  # drop what a killed run wrote after its commit
        for crops, ok in tqdm(loader, f"{len(records) - done} records", unit="batch"):
            rows = np.arange(done, done + len(ok))
            texts = [
                pick_caption(records[i][1], args.caption_key, args.trunc_caption) for i in rows
            ]
            emb, mask = encoder.encode([t or "" for t in texts])  # (b, 120, D), (b, 120)
            mask[[t is None for t in texts]] = False  # no caption: no features, an invalid row
            # rows are right-aligned, so emb[mask] is each caption's tokens, back to back
            feats.write(emb[mask].clamp(-65504, 65504).half().cpu().numpy().tobytes())
            arrays["caption_lengths"][rows] = mask.sum(1).cpu().numpy()
            # bad images were zeros: their codes are stored too, but never used (valid False)
            arrays["codes"][rows] = vq.encode(crops.to(device))[2].view(len(rows), -1).cpu()
            arrays["valid"][rows] = ok
            done, tokens = done + len(rows), tokens + int(mask.sum())
            # commit: features and arrays are with the OS (memmap pages survive a killed process)
            # before meta.json says they are done
            feats.flush()
            write_json({**meta, "num_done": done, "num_tokens": tokens}, out / "meta.json")
    lengths, valid = arrays["caption_lengths"], arrays["valid"]
    meta.update(
        num_done=done,
        num_tokens=tokens,
        bad_images=int((~valid).sum()),
        missing_captions=int((lengths == 0).sum()),
        num_valid=int((valid & (lengths > 0)).sum()),
        complete=True,
    )
    write_json(meta, out / "meta.json")
    return meta


class CaptionCodeDataset(torch.utils.data.Dataset):
    """Store row -> (codes (h*w,) int64, emb (120, D) float32 right-aligned, mask (120,) bool,
    valid bool).

    Keys are (epoch, index) pairs from common.TrainSampler; the epoch is unused, since the official
    t2i data has no random augmentation. Bad records stay in (zero features, valid False) so the
    loss can skip them, as the official dataset returns dummies: `model(..., valid=valid)`.
    train_gpt.py makes one for a store whose meta.json says model_type "t2i" and builds the t2i
    GPTConfig from `.meta` (vocab_size, block_size, caption_dim, max_tokens)."""

    def __init__(self, code_path):
        self.path, self.meta = Path(code_path), data.read_code_meta(code_path)
        if not self.meta.get("complete"):
            raise UserError(f"the extraction into {code_path} did not finish; rerun it to resume")
        lengths = np.load(self.path / "caption_lengths.npy")  # (N,) caption tokens per record
        self.offsets = np.cumsum(lengths) - lengths  # (N,) where each starts in the features
        self.valid = np.load(self.path / "valid.npy") & (lengths > 0)  # (N,)
        self.lengths = lengths * self.valid  # an invalid row gets no caption tokens
        self.codes = self.features = None  # memmaps, opened in each DataLoader worker

    def __len__(self):
        return len(self.valid)

    def captions(self, n: int = 8):
        """(emb (n, 120, D), mask (n, 120)) of the first n usable records, e.g. for sample grids."""
        rows = [self[0, i] for i in np.flatnonzero(self.valid)[:n]]
        return tuple(torch.utils.data.default_collate(rows)[1:3])

    def __getitem__(self, key):
        _, i = key
        slots, dim = self.meta["max_tokens"], self.meta["caption_dim"]
        if self.codes is None:
            self.codes = np.load(self.path / "codes.npy", mmap_mode="r")
            features = np.memmap(self.path / "caption_features.f16", np.float16, "r")
            self.features = features.reshape(-1, dim)  # (total tokens, D)
        start, n = self.offsets[i], self.lengths[i]
        emb = torch.zeros(slots, dim)  # right-aligned: the last n slots hold the caption
        emb[slots - n :] = torch.from_numpy(self.features[start : start + n].astype(np.float32))
        mask = torch.arange(slots) >= slots - n
        return torch.from_numpy(self.codes[i].astype(np.int64)), emb, mask, bool(self.valid[i])


# ----------------------------------------------------------------------------------------------
# Command line


def make_toy_t2i(root, num_classes=4, per_class=32, size=64) -> Path:
    """data.make_toy_dataset images plus root/captions.jsonl: for each image the official caption
    list [blip, llava, llava_first], written from its class name."""
    root = Path(data.make_toy_dataset(root, num_classes, per_class, size))
    lines = []
    for path in data.list_images(root):
        what = path.parent.name.split("-", 1)[1].replace("-", " ")  # "000-red-disc" -> "red disc"
        texts = [
            f"a {what}",
            f"a picture of a {what} on a dark background",
            f"a picture of a {what}",
        ]
        lines.append(json.dumps({"image_path": str(path.relative_to(root)), "text": texts}) + "\n")
    (root / "captions.jsonl").write_text("".join(lines))
    return root / "captions.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="text-to-image data: toy captions, T5 + codes")
    sub = parser.add_subparsers(dest="cmd", required=True)
    toy = sub.add_parser("toy", help="toy images and captions.jsonl")
    toy.add_argument("root")
    toy.add_argument("--num-classes", type=int, default=4)
    toy.add_argument("--per-class", type=int, default=32)
    toy.add_argument("--size", type=int, default=64)
    ex = sub.add_parser("extract", help="T5 caption features + token codes (resumable)")
    ex.add_argument("--data-path", required=True, help=".jsonl file or folder: image_path, text")
    ex.add_argument("--code-path", required=True, help="output store folder")
    ex.add_argument("--vq-ckpt", required=True)
    ex.add_argument("--image-size", type=int, default=256)
    ex.add_argument("--caption-key", default="blip", help="blip, llava, llava_first or an index")
    ex.add_argument("--trunc-caption", action="store_true", help="only the text before the 1st .")
    ex.add_argument("--t5-path", default=None, help=f"local copy of {T5_MODEL} (default: HF cache)")
    ex.add_argument("--batch-size", type=int, default=32)
    ex.add_argument("--num-workers", type=int, default=4)
    return parser.parse_args(argv)


def main(args):
    if args.cmd == "toy":
        print(make_toy_t2i(args.root, args.num_classes, args.per_class, args.size))
        return
    meta = extract(args)
    print(
        f"{meta['num_valid']} of {meta['num_images']} records usable in {args.code_path} "
        f"({meta['bad_images']} bad or too-small images, {meta['missing_captions']} missing "
        f"captions); {meta['num_tokens']} caption tokens"
    )


if __name__ == "__main__":
    cli(main, parse_args)
