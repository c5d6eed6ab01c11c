"""Text-to-image extras: caption cleaning, FLAN-T5-XL caption features, the t2i training store.

    python data.py toy data/toy-t2i --per-class 32   # 4 x 32 toy images + captions.jsonl
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
(~11 GB download once; offline, a cached copy is used without asking the hub) or --t5-path DIR.

The store (--code-path) is one folder, made by data.open_store as the class-conditional one:
meta.json (model_type "t2i", vocab_size, block_size, caption_dim, max_tokens, ...), codes.npy
(N, h*w) int32 token grids, valid.npy (N,) bool (image readable and >= image size),
caption_lengths.npy (N,) int64 (T5 tokens of each caption; 0 = no caption or a bad image) and
caption_features.f16, the T5 tokens of all captions back to back as a raw float16
(total_tokens, 2048) memmap, record i's at the cumulative sum of the lengths before it: ~60 KB
per 15-token caption instead of 0.5 MB for a padded (120, 2048) row, and no file per caption.
Extraction is resumable (rerun the same command) and single-process.

Flags of `text.py extract` (their defaults follow below, with --help):
  --data-path           a .jsonl file, or a folder of them: {"image_path": ..., "text": ...} per
                        line, image paths relative to the file
  --code-path           the store folder to write (or to finish)
  --vq-ckpt             the tokenizer that makes the codes
  --image-size          the centre crop, in pixels; smaller images count as bad
  --caption-key         which caption of the official [blip, llava, llava_first] lists (or its
                        index), or which key of a {"blip": ...} dict
  --trunc-caption       keep only the caption's first sentence (the text before the first ".")
  --t5-path             a local copy of google/flan-t5-xl; none: the Hugging Face cache
  --batch-size          records per batch (T5 and the tokenizer)
  --num-workers         image loader processes (default: this machine's spare cores)
"""

import argparse
import functools
import html
import json
import re
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import data
from common import UserError

T5_MODEL = "google/flan-t5-xl"  # the official text encoder; its last_hidden_state is 2048 wide
MAX_TOKENS = 120  # caption slots, = the t2i GPT's cls_token_num (official t5_feature_max_len)
CAPTION_KEYS = ["blip", "llava", "llava_first"]  # order of the official `text` lists

# ----------------------------------------------------------------------------------------------
# Caption cleaning: web alt-text noise out, content words in (applied twice, as the official)

_CJK = "\u2e80-\u2fdf\u3000-\u33ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
# Each pattern (case-insensitive) in turn is replaced by a space, or by the second item of a
# (pattern, replacement) pair; the order matters (a URL goes before its file name could, a tag
# before its "<" symbol).
_CLEAN_RULES = [
    (r"<\s*person\s*>", "person"),  # LAION placeholder tag
    r"\b(?:https?://|ftp://|www\.)\S+",  # URLs
    r"\b[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|io|co|ru|de|uk|info|html?|php)\b(?:/\S*)?",  # domains
    r"<[^>]*>",  # HTML tags
    r"@[\w.]+",  # @mentions
    f"[{_CJK}]+",  # CJK and full-width text
    ("[\u2010-\u2015\u2212\ufe58\ufe63]", "-"),  # every dash is "-"
    ("[\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033]", '"'),  # every double quote is "
    ("[\u2018\u2019\u201a\u201b\u2032`\u00b4]", "'"),  # every single quote is '
    r"\b\d{1,3}(?:\.\d{1,3}){3}\b",  # IP addresses
    r"\\n",  # escaped newlines
    r"\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|svg|pdf|zip|mp4)\b",  # file names
    r"#\d+|\b\d{5,}\b",  # ids, long numbers
    r"\b[a-z]{1,3}\d{3,}\b|\b[a-z]+\d+[a-z]+\b|\b\d+[a-z]+\d+\b",  # product codes: jc6640vc
    r"\b\d+(?:\.\d+)?\s*[x\u00d7]\s*\d+(?:\.\d+)?(?:\s*(?:px|cm|mm|in))?\b",  # sizes: 1920x1080
    r"\b(?:free shipping|click (?:here|for)|download|for sale|buy now|shop now)\b",  # shop spam
    r"\bstock photo\b|\bpage \d+\b",
    r"[^\w\s.,!?:;'\"%$+=&-]",  # emoji, symbols, brackets
    (r"\S*[-_]\S*[-_]\S*[-_]\S*", lambda m: re.sub("[-_]", " ", m.group())),  # a-b-c-d: words
    "_",
    r"\.{2,}",  # ellipses
    (r"([,!?:;'\"-])\1+", r"\1"),  # repeated punctuation
    r"(?:^|\s)[.,:;!?'\"-](?=\s|$)",  # orphan punctuation
    r"\s+",
]


def clean_caption(text):
    """Lower-case a caption; strip URLs, HTML, CJK, ids, shop spam and odd symbols (twice, as the
    official: the first pass can leave new noise, e.g. a tag behind an escaped entity)."""
    for _ in range(2):
        text = html.unescape(html.unescape(urllib.parse.unquote_plus(text))).strip().lower()
        for rule in _CLEAN_RULES:  # (pattern, replacement); re caches the compiled patterns
            rule = rule if isinstance(rule, tuple) else (rule, " ")
            text = re.sub(*rule, text, flags=re.IGNORECASE)
        text = text.strip(" '\"-_,:;+")
    return text


# ----------------------------------------------------------------------------------------------
# The T5 encoder: captions -> right-aligned features (B, 120, D) and masks (B, 120)


def left_pad(emb, mask):
    """Move the valid tokens of each row to the right end, keeping their order; zero the padding.
    (B, S, D), (B, S) -> same shapes, the mask as bool."""
    order = mask.argsort(dim=1, stable=True)  # (B, S): pads first, then tokens, in order
    mask = mask.bool().take_along_dim(order, 1)
    return emb.take_along_dim(order[..., None], 1) * mask[..., None], mask  # indices broadcast


class TextEncoder:
    """FLAN-T5-XL's tokenizer + encoder from the Hugging Face cache (downloaded once) or a local
    copy at `path`; encode() gives the official left-padded caption features."""

    def __init__(self, path=None, device="cpu"):
        name = str(path or T5_MODEL)
        dtype = torch.bfloat16 if "cuda" in str(device) else torch.float32  # as the official
        try:  # the cache first (no hub request at all when the files are there), then the hub
            import transformers  # optional: only text-to-image needs it (an ImportError if absent)

            for cached in (True, False):
                try:  # loading in the dtype (not .to(dtype) after) keeps T5's `wo` layers in
                    # fp32, as the official; transformers 5 calls it `dtype`, takes `torch_dtype`
                    self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                        name, local_files_only=cached
                    )
                    model = transformers.T5EncoderModel.from_pretrained(
                        name, torch_dtype=dtype, local_files_only=cached
                    )
                    break
                except OSError:
                    if path or not cached:  # a local folder that does not load: say why
                        raise
                    # a first download; but offline the hub client retries for ~50 s before it
                    # fails, so ask once, with a short timeout, whether the hub ($HF_ENDPOINT,
                    # through any proxy set) answers; URLError is an OSError
                    urllib.request.urlopen(
                        common.hf_url(T5_MODEL, "config.json"), timeout=5
                    ).close()
        # no transformers; not in the cache, a bad folder (URLError is an OSError); a bad name
        except (ImportError, OSError, ValueError) as e:
            raise UserError(
                f"cannot load the text encoder {name} ({str(e).splitlines()[0][:200]}); text "
                "prompts need the optional packages transformers and sentencepiece (pip install "
                f"transformers sentencepiece), and {T5_MODEL} downloads into the Hugging Face "
                "cache once, online (~11 GB), or pass --t5-path DIR with a copy of it"
            ) from None
        # from_pretrained gives the model in eval mode
        self.model, self.dim = model.to(device), model.config.d_model  # 2048 for flan-t5-xl

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
        emb = self.model(**tokens).last_hidden_state  # from input_ids and attention_mask
        return left_pad(emb.float(), tokens.attention_mask)


def caption_condition(args, config, device):
    """sample.py's text condition -> (emb (B, cls_token_num, caption_dim), mask (B, cls_token_num))
    on device: --caption-features (a .pt or .npz with emb (B, S, D) and mask (B, S), or one
    caption's (S, D) and (S,)), or the --prompt texts (sample.py's argparse adds the lines of
    --prompt-file to them) through T5."""
    path = args.caption_features
    if path:
        try:
            obj = np.load(path) if path.endswith(".npz") else common.load_checkpoint(path)
            emb, mask = (torch.as_tensor(obj[key]) for key in ("emb", "mask"))
            if emb.ndim == 2:  # one caption (S, D) and (S,): a batch of one
                emb, mask = emb[None], mask[None]
            emb, mask = left_pad(emb, mask)
        except Exception as e:  # missing or unreadable file, a key missing, shapes that disagree
            raise UserError(
                f"--caption-features {path} must hold 'emb' (B, S, D) and 'mask' (B, S), e.g. "
                f"torch.save(dict(emb=..., mask=...)) ({type(e).__name__}: {e})"
            ) from None
    else:
        prompts = [p.strip() for p in args.prompt if p.strip()]  # file lines end in "\n"
        if not prompts:
            raise UserError('no prompts: pass --prompt "a photo of a cat" or a --prompt-file')
        emb, mask = TextEncoder(args.t5_path, device).encode(prompts)  # freed on return
    pad = config.cls_token_num - emb.shape[1]  # fewer slots: more padding on the left, as T5's
    if pad < 0 or emb.shape[2] != config.caption_dim:
        raise UserError(
            f"caption features {tuple(emb.shape)} do not fit the GPT: (B, up to "
            f"{config.cls_token_num}, caption_dim {config.caption_dim}); {T5_MODEL} gives "
            "(B, 120, 2048)"
        )
    return F.pad(emb.float(), (0, 0, pad, 0)).to(device), F.pad(mask, (pad, 0)).to(device)


# ----------------------------------------------------------------------------------------------
# JSON-lines data and the caption-feature + code store


def read_jsonl(data_path, key="blip", trunc=False):
    """A .jsonl file, or a folder of them (sorted) -> [(image Path, caption)]; image paths are
    relative to the file's folder. A record's text is a string, or the official list [blip, llava,
    llava_first] of which `key` (--caption-key: a name or an index) picks one, or a dict with
    `key`; the caption is "" when there is none; trunc (--trunc-caption): its first sentence."""
    data_path, records = Path(data_path), []
    try:  # a file globs to nothing; a folder without .jsonl files fails to read, naming it
        for f in sorted(data_path.glob("*.jsonl")) or [data_path]:
            for line in filter(str.strip, f.read_text().splitlines()):
                record = json.loads(line)
                text = record.get("text")
                if isinstance(text, list):  # the official [blip, llava, llava_first]
                    i = CAPTION_KEYS.index(key) if key in CAPTION_KEYS else int(key)
                    text = dict(enumerate(text)).get(i)
                elif isinstance(text, dict):
                    text = text.get(key)
                text = text if isinstance(text, str) else ""
                records.append(
                    (f.parent / record["image_path"], text.split(".")[0] if trunc else text)
                )
    except Exception as e:  # unreadable file, bad JSON, no image_path, a bad --caption-key
        raise UserError(f"{f}: {type(e).__name__} {e}; want JSON lines with image_path and text")
    if not records:
        raise UserError(
            f'no records in {data_path}; want lines like {{"image_path": "a.jpg", "text": "a cat"}}'
        )
    return records


def load_records(records, size):
    """DataLoader collate: [(image path, caption)] -> crops (b, 3, S, S) in [-1, 1], ok (b,) bool,
    captions (b strings; "" = none). A bad image (unreadable, or under S on its short side: the
    official t2i data drops those) gives zeros, ok False and no caption, so the store keeps one
    row per record."""

    def load(path, caption):
        img = data.load_image(path, skip_bad=True)  # None (and a warning) when unreadable
        if img is None or min(img.size) < size:
            return torch.zeros(3, size, size), False, ""
        return data.pil_to_tensor(data.center_crop_arr(img, size)), True, caption

    return torch.utils.data.default_collate([load(*record) for record in records])


@torch.inference_mode()
def extract(args, encoder=None):
    """JSON-lines captions + images -> the store at args.code_path, resuming an interrupted run
    (official extract_t5_feature.py + extract_codes_t2i.py in one pass) -> its meta."""
    from tqdm import tqdm

    device = common.setup("fp32").device
    records = read_jsonl(args.data_path, args.caption_key, args.trunc_caption)
    out = Path(args.code_path)
    vq, meta = data.store_meta(args, device)  # the tokenizer in fp32, as the official
    encoder = encoder or TextEncoder(args.t5_path, device)  # after the cheap checks: it is slow
    n = len(records)
    meta.update(
        model_type="t2i",
        num_images=n,
        caption_dim=encoder.dim,
        max_tokens=MAX_TOKENS,
        caption_key=args.caption_key,
        trunc_caption=args.trunc_caption,
    )
    # int32 codes: 1 KB per 256-token image, next to ~60 KB of caption features
    arrays = dict(
        codes=((n, meta["block_size"]), np.int32), valid=((n,), bool), caption_lengths=((n,), int)
    )
    done = data.open_store(out, meta, arrays).get("num_done", 0)  # the last commit
    codes, valid, lengths = (np.load(out / f"{k}.npy", mmap_mode="r+") for k in arrays)
    loader = torch.utils.data.DataLoader(
        records[done:],
        args.batch_size,
        num_workers=args.num_workers,
        collate_fn=functools.partial(load_records, size=args.image_size),
    )
    with open(out / "caption_features.f16", "ab") as feats:
        # drop what a killed run wrote after its commit: 2 bytes per float16
        feats.truncate(lengths[:done].sum() * encoder.dim * 2)
        for crops, ok, captions in tqdm(loader, f"{n - done} records"):
            rows = slice(done, done + len(ok))
            emb, mask = encoder.encode(captions)  # (b, 120, D), (b, 120)
            mask[[not c for c in captions]] = False  # no caption: no features, an invalid row
            # rows are right-aligned, so emb[mask] is each caption's tokens, back to back
            feats.write(emb[mask].clamp(-65504, 65504).half().cpu().numpy())
            lengths[rows], valid[rows] = mask.sum(1).cpu(), ok
            # bad images were zeros: their codes are stored too, but never used (valid False)
            codes[rows] = vq.encode(crops.to(device))[2].view(len(ok), -1).cpu()
            # commit: features and arrays are with the OS (memmap pages survive a killed process)
            # before meta.json says they are done
            feats.flush()
            done = rows.stop
            common.write_json({**meta, "num_done": done}, out / "meta.json")
    usable = lengths > 0  # a readable image with a caption (a bad image has no caption tokens)
    meta.update(
        num_done=n,
        num_tokens=int(lengths.sum()),
        bad_images=int((~valid).sum()),
        missing_captions=int((valid & ~usable).sum()),
        num_valid=int(usable.sum()),
        complete=True,
    )
    common.write_json(meta, out / "meta.json")
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
        # (N,) caption tokens per row: 0 for no caption and for a bad image (load_records), so
        # a row is usable iff it has tokens (valid.npy only feeds extract's counts); and where
        # each caption ends in the features
        self.lengths = np.load(self.path / "caption_lengths.npy")
        self.ends = np.cumsum(self.lengths)
        self.codes = None  # memmaps, opened in each DataLoader worker (a memmap pickles as a copy)

    def __len__(self):
        return len(self.lengths)

    def captions(self, n):
        """(emb (n, 120, D), mask (n, 120)) of the first n usable records, e.g. for sample grids."""
        rows = [self[0, i] for i in np.flatnonzero(self.lengths)[:n]]
        return torch.utils.data.default_collate(rows)[1:3]

    def __getitem__(self, key):
        i, slots = key[1], self.meta["max_tokens"]
        if self.codes is None:
            self.codes = np.load(self.path / "codes.npy", mmap_mode="r")
            self.features = np.memmap(  # (total tokens, D) float16
                self.path / "caption_features.f16", np.float16, "r"
            ).reshape(-1, self.meta["caption_dim"])
        n, end = self.lengths[i], self.ends[i]
        emb = torch.tensor(self.features[end - n : end]).float()  # (n, D)
        mask = torch.arange(slots) >= slots - n  # right-aligned: the last n slots hold the caption
        codes = torch.tensor(self.codes[i]).long()  # (h*w,), copied out of the memmap
        return codes, F.pad(emb, (0, 0, slots - n, 0)), mask, bool(n)


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=["extract"])  # the one command so far
    for flag in "--data-path --code-path --vq-ckpt".split():
        p.add_argument(flag, required=True)
    for flag, default in {
        "--image-size": 256,
        "--batch-size": 32,
        "--num-workers": common.NUM_WORKERS,
        "--caption-key": "blip",
    }.items():
        p.add_argument(flag, type=type(default), default=default, help="default: %(default)s")
    p.add_argument("--trunc-caption", action="store_true")
    p.add_argument("--t5-path")
    return p.parse_args(argv)


def main(args):
    meta = extract(args)
    print(
        f"{meta['num_valid']} of {meta['num_images']} records usable in {args.code_path} "
        f"({meta['bad_images']} bad or too-small images, {meta['missing_captions']} missing "
        f"captions); {meta['num_tokens']} caption tokens"
    )


if __name__ == "__main__":
    common.cli(main, parse_args)
