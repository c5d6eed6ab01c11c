"""The runtime every script shares: errors, downloads, processes, precision, checkpoints, logs.

Nothing here is about images or models. Each script calls `env = setup(args.mixed_precision)` once,
then reads `env.rank`, `env.device`, `env.ctx` (the autocast context); the same code runs as
`python x.py` (one process, CPU or one GPU) and under `torchrun` (DDP iff RANK is set, as nanoGPT).

    python -c "import common; print(common.setup())"   # what this machine gives a script
"""

import argparse
import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


class UserError(RuntimeError):
    """A mistake the user can fix; `cli` prints it as one line instead of a traceback."""


def cli(main, parse_args):
    """Run `main(parse_args())`; a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        return main(parse_args())
    except UserError as e:
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # end any progress bar, so the error gets its own line
            bar.close()
        # DataLoader workers re-raise with the worker's traceback in the message: keep its last line
        lines = [line for line in str(e).splitlines() if line.strip()] or ["unknown error"]
        print("error: " + lines[-1].split("UserError: ")[-1], file=sys.stderr)
        sys.exit(2)


def preset(table: dict, name: str) -> str:
    """The one resolver of preset names: 'XL' or 'GPT-XL' -> 'GPT-XL' (argparse `type=`)."""
    for key in table:
        if name in (key, key.split("-", 1)[1]):
            return key
    raise argparse.ArgumentTypeError(f"unknown preset {name!r}; choose {', '.join(table)}")


def number(cast, low, high=float("inf")):
    """argparse type: a `cast` number in [low, high], e.g. number(int, 1) for a count; out of range
    -> "must be in [low, high], got x", and a ValueError -> argparse's "invalid parse value"."""

    def parse(text):
        if not low <= cast(text) <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return cast(text)

    return parse


# ----------------------------------------------------------------------------------------------
# Downloads: one cache folder; a partial file resumes; verified before it gets its final name


def cache_dir() -> Path:
    """Where downloads live: $LLAMAGEN_CACHE, else ~/.cache/llamagen."""
    return Path(os.environ.get("LLAMAGEN_CACHE", Path.home() / ".cache" / "llamagen")).expanduser()


def hf_url(repo: str, filename: str) -> str:
    """URL of a file in a Hugging Face repo; $HF_ENDPOINT picks a mirror, as in huggingface_hub."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo}/resolve/main/{filename}"


def file_digest(path, algo="sha256") -> str:
    """Hex digest of a file, read in 1 MB blocks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url, filename=None, sha256=None, desc=None, check=None, retries=2) -> Path:
    """The cached path of `url`, downloaded first if needed. A killed download resumes its
    `.part` (HTTP Range); a dropped connection is retried. The file gets its name in the cache
    only after it passed every check: the server's length, the sha256 (a full digest or a
    prefix; the Hugging Face Hub sends the file's sha256 as its ETag), and check(path), which
    raises a UserError when the file is not what it claims to be (an HTML error page saved
    under a checkpoint's name). A file that fails is removed, never cached."""
    import requests
    from tqdm import tqdm

    dest = cache_dir() / (filename or url.split("?")[0].rstrip("/").split("/")[-1])
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    hint = f"download it by hand from {url} to {dest} (LLAMAGEN_CACHE moves the cache)"
    offset = part.stat().st_size if part.exists() else 0
    try:
        r = requests.get(url, stream=True, timeout=30, headers={"Range": f"bytes={offset}-"})
    except requests.RequestException as e:
        raise UserError(f"cannot reach {url} ({type(e).__name__}); {hint}") from None
    with r:
        if r.status_code not in (200, 206, 416):  # 416: the .part is already whole
            raise UserError(f"downloading {url} failed with HTTP {r.status_code}; {hint}")
        etag = r.headers.get("X-Linked-Etag", r.headers.get("ETag", "")).strip('W/"').lower()
        sha256 = sha256 or (etag if len(etag) == 64 else None)
        offset *= r.status_code != 200  # 200: the server ignored Range, start over
        length = r.headers.get("Content-Length") if r.status_code != 416 else None
        total = offset + int(length) if length else None
        try:
            with (
                open(part, "ab" if offset else "wb") as f,
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=desc) as bar,
            ):
                for chunk in r.iter_content(chunk_size=1 << 16) if r.status_code != 416 else []:
                    bar.update(f.write(chunk))
        except (requests.RequestException, OSError) as e:
            if retries:  # a dropped connection: ask again for the rest
                return download(url, filename, sha256, desc, check, retries - 1)
            raise UserError(
                f"download of {url} broke off ({type(e).__name__}); run again"
            ) from None
    try:
        if total not in (None, part.stat().st_size):
            raise UserError(f"{part.stat().st_size} bytes, not {total}")
        if sha256 and not file_digest(part).startswith(sha256):
            raise UserError(f"not the sha256 {sha256}")
        if check is not None:
            check(part)
    except UserError as e:
        part.unlink()
        raise UserError(
            f"the download of {url} failed its check ({e}): removed it; {hint}"
        ) from None
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------------------------
# Processes, device, precision


@dataclass
class Env:
    """What a script needs to know about where it runs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    precision: str  # fp32, bf16 or fp16
    ctx: object  # autocast context for forward passes (a nullcontext for fp32)
    threads: int = 1  # CPU threads of this process

    def __str__(self):
        where = f"{self.world_size} process(es) on {self.device.type}"
        return f"{where}, {self.threads} CPU thread(s) each, {self.precision}"


def cpus_per_process() -> int:
    """This machine's cores shared out over the processes torchrun starts on it."""
    return max(1, os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


NUM_WORKERS = min(4, cpus_per_process() - 1)  # DataLoader workers: spare cores, at most 4


def setup(precision=None) -> Env:
    """Start (or join) the processes, pick the device, the CPU threads and the precision, once."""
    cuda = torch.cuda.is_available()
    distributed = "RANK" in os.environ  # launched by torchrun
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # processes torchrun starts here
    if "OMP_NUM_THREADS" not in os.environ and per_node > 1:  # else the user's (or torch's) choice
        # torch's default (a thread per core in every process) oversubscribes under torchrun,
        # and OpenMP threads that wait on each other made steps 10-35x slower on a busy machine;
        # one process keeps torch's default (cores / 1) or what its caller already set
        torch.set_num_threads(cpus_per_process())
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # official
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    precision = precision or ("bf16" if cuda else "fp32")  # CPU bf16 autocast is slower, not faster
    if precision == "fp16" and not cuda:
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    return Env(
        rank, world, local_rank, device, distributed, precision, ctx, torch.get_num_threads()
    )


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def rank0_first(env: Env, fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0, then, after a barrier, on the other ranks -> its result. For
    a download: rank 0 fetches the file, the others then find it in the cache (instead of every
    rank writing the same file at once)."""
    if env.rank == 0:
        result = fn(*args, **kwargs)
    if env.distributed:
        dist.barrier()
    return result if env.rank == 0 else fn(*args, **kwargs)


@torch.no_grad()
def update_ema(ema_model, model, decay: float):
    """ema = decay * ema + (1 - decay) * param; buffers (e.g. the VQ usage ring) are copied."""
    for ema_p, p in zip(ema_model.parameters(), model.parameters()):
        ema_p.mul_(decay).add_(p.detach().to(ema_p.dtype), alpha=1 - decay)
    for ema_b, b in zip(ema_model.buffers(), model.buffers()):
        ema_b.copy_(b)


def gather_rng(env: Env) -> list:
    """Every rank's torch RNG states (dropout, class dropout), collective. Python's and numpy's
    are not needed: every augmentation draws from a generator seeded by (seed, epoch, index)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    states = [{"torch": torch.get_rng_state(), "cuda": cuda}] * env.world_size
    if env.distributed:
        dist.all_gather_object(states, states[0])
    return states


def restore_rng(states: list, env: Env):
    """Set this rank's RNG state from a gather_rng list (exact only at the same world size)."""
    if len(states) != env.world_size:
        print0(
            f"warning: saved with {len(states)} processes, now {env.world_size}: RNG not restored"
        )
        return
    torch.set_rng_state(states[env.rank]["torch"])
    if states[env.rank]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states[env.rank]["cuda"])


class TrainSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) forever: each epoch a fresh permutation seeded by seed + epoch, this
    rank's share of it (DistributedSampler's order with drop_last), cut to whole optimizer steps of
    `rank_batch` samples. Starting at `start_step` makes a resumed run see exactly the samples the
    uninterrupted one would; the epoch travels with the index so datasets seed their augmentation
    by it, even in persistent DataLoader workers."""

    def __init__(self, n: int, rank_batch: int, env: Env, seed: int, start_step: int = 0):
        self.n, self.rank_batch, self.env, self.seed, self.start = (
            n,
            rank_batch,
            env,
            seed,
            start_step,
        )
        self.steps_per_epoch = n // env.world_size // rank_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{n} samples do not fill one step of {rank_batch} x {env.world_size} processes; "
                "lower --global-batch-size"
            )

    def __iter__(self):
        epoch, skip = divmod(self.start, self.steps_per_epoch)
        world, used = self.env.world_size, self.steps_per_epoch * self.rank_batch
        while True:
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + epoch)
            )
            mine = order[: self.n // world * world][self.env.rank :: world][:used]
            yield from ((epoch, i) for i in mine[skip * self.rank_batch :].tolist())
            epoch, skip = epoch + 1, 0

    def batches(self, dataset, micro_batch: int, num_workers: int):
        """An endless iterator of micro-batches: ONE DataLoader for the run (persistent workers).
        Its own generator keeps the global torch RNG untouched, so a resumed run's dropout
        stream continues exactly where the saved one stopped."""
        loader = torch.utils.data.DataLoader(
            dataset,
            micro_batch,
            sampler=self,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=self.env.device.type == "cuda",
            generator=torch.Generator(),
        )
        return iter(loader)


# ----------------------------------------------------------------------------------------------
# Checkpoints, run folders, logs


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temporary file beside `path`, renamed over it only when the block completes: a
    crash never leaves a half-written file and never spoils the previous version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(obj, path) -> Path:
    """torch.save, atomically; a failed write (disk full) leaves the previous file as it was."""
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
        msg = str(e).splitlines()[0][:200]
        raise UserError(
            f"could not write {path} ({msg}); the previous version is untouched"
        ) from None
    return Path(path)


def write_json(obj, path):
    """json.dump, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def load_checkpoint(path) -> dict:
    """torch.load(weights_only=True) onto the CPU, memory-mapped; one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    for mmap in (True, False):  # files in the legacy (pre-zip) format cannot be memory-mapped
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # RuntimeError for truncated zips, UnpicklingError for objects, ...
            if not (mmap and "mmap" in str(e)):
                # torch's own message goes on to advise weights_only=False: never for a file
                # of unknown origin, so only its type is passed on
                raise UserError(
                    f"cannot load {path} as a plain PyTorch checkpoint ({type(e).__name__}): "
                    "a truncated or corrupt file, another format, or one holding Python objects"
                ) from None


def run_dir(root, name, resume=None) -> Path:
    """The resumed run's folder (resume = .../RUN/checkpoints/x.pt), else root/{idx:03d}-{name}
    with the next free index (DiT); rank 0 creates it and tells the others."""
    if resume is not None and Path(resume).resolve().parent.name == "checkpoints":
        return Path(resume).resolve().parent.parent
    out = [None]
    if is_main():
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name[:3]) for p in root.glob("[0-9][0-9][0-9]-*")]
        out[0] = root / f"{max(taken, default=-1) + 1:03d}-{name}"
        out[0].mkdir()
    if dist.is_initialized():
        dist.broadcast_object_list(out, src=0)
    return Path(out[0])


def resume_args(args, parser, saved: dict, may_change) -> list:
    """A bare --resume continues the saved run: every flag takes its saved value unless the
    command line gave another (a value that differs from the flag's default). Only the flags in
    may_change (logging, checkpoint cadence, the step budget, ...) may differ; another changed
    flag is refused, since the run would no longer be the one that was saved. -> the flags
    that were changed, for the start-up line."""
    changed = []
    for key, value in saved.items():
        given = getattr(args, key, value)
        if given == value or key == "resume":
            continue
        if given == parser.get_default(key):  # not on the command line: the saved value
            setattr(args, key, value)
        elif key in may_change:
            changed.append(f"{key} {value} -> {given}")
        else:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"{flag} {given} differs from the resumed run's {value}; resume without it, or "
                "start a new run (--finetune for the VQ) to change it"
            )
    return changed


def save_checkpoints(obj, folder, step: int, env: Env):
    """Rank 0 writes checkpoints/{step:07d}.pt and last.pt; every rank waits for it (DiT)."""
    if env.rank == 0:
        for name in (f"{step:07d}.pt", "last.pt"):
            save_checkpoint(obj, Path(folder) / "checkpoints" / name)
    if env.distributed:
        dist.barrier()


class JsonlLogger:
    """Appends one JSON object per line (rank 0 only). A resumed run first drops the lines of
    steps after its checkpoint (logged by the run that was killed), so no step appears twice."""

    def __init__(self, path, resume_step=None):
        self.path = Path(path)
        if resume_step is not None and is_main() and self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
            with atomic_write(self.path, "w") as f:
                f.writelines(kept)

    def log(self, record: dict):
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Run:
    """The skeleton both trainers share, from their common flags (--global-seed, --num-workers,
    --max-steps, --epochs, --results-dir, --model, --resume): this rank's endless micro-batches
    from step `start` on (one TrainSampler and DataLoader for the run; `accumulation`
    micro-batches make an optimizer step), the step count, the run folder and its log.
    `for step in run:` walks the steps still to take, start+1 .. total (`step` = the steps done
    after it) under rank 0's progress bar, `run.bar`. The folder is created here: build the Run
    after every check that can fail. Run.setup, the first step of a trainer's main, reads the
    --resume checkpoint and its flags, then starts the processes."""

    @staticmethod
    def setup(args, parser, may_change, key, script):
        """-> (Env, the --resume checkpoint or {}, the flags the command line changed): a bare
        --resume continues the saved run with its flags (resume_args), then setup(). A checkpoint
        without `key` is refused: `script` did not write it."""
        ckpt = load_checkpoint(args.resume) if args.resume else {}
        if ckpt and key not in ckpt:  # released weights, another script's checkpoint
            raise UserError(
                f"{args.resume} was not written by {script}; resume one of its checkpoints/*.pt"
            )
        changed = ckpt and resume_args(args, parser, ckpt["args"], may_change)
        return setup(args.mixed_precision), ckpt, changed

    def __init__(self, args, env, dataset, micro_batch, accumulation=1, start=0):
        sampler = TrainSampler(
            len(dataset), micro_batch * accumulation, env, args.global_seed, start
        )
        self.batches = sampler.batches(dataset, micro_batch, args.num_workers)
        self.steps_per_epoch, self.start = sampler.steps_per_epoch, start
        self.total = args.max_steps or args.epochs * sampler.steps_per_epoch  # 0: --epochs
        self.folder = run_dir(args.results_dir, args.model, args.resume)
        self.log = JsonlLogger(self.folder / "log.jsonl", start).log  # drops lines after start

    def __iter__(self):
        from tqdm import tqdm

        steps = range(self.start + 1, self.total + 1)
        self.bar = tqdm(
            steps, self.folder.name, self.total, initial=self.start, disable=not is_main()
        )
        return iter(self.bar)

    def due(self, step, every):
        """Every `every` steps and after the last one; never for every = 0."""
        return every > 0 and (step % every == 0 or step == self.total)
