"""Train the class-conditional LlamaGen GPT on token grids (official train_c2i.py + train_c2i_fsdp.py).

    python train_gpt.py --model tiny --code-path data/toy-codes --max-steps 300 --global-batch-size 32
    torchrun --standalone --nproc_per_node=8 train_gpt.py --model XL --code-path codes/ --vq-ckpt vq_ds16_c2i.pt
    torchrun --standalone --nproc_per_node=8 train_gpt.py --model 3B --code-path codes/ --fsdp
    python train_gpt.py --resume results/000-GPT-tiny/checkpoints/last.pt --code-path data/toy-codes
    python train_gpt.py --model tiny --code-path data/toy-t2i-codes --max-steps 300   # text-to-image

Codes come from `python data.py extract`; vocabulary, block size and class count are read from their
meta.json. A store from `python text.py extract` (meta.json model_type "t2i": codes + T5 caption
features) trains the text-conditional model (official train_t2i.py); its bad records are skipped by the
loss (valid = 0) and counted in the log. The official recipe is the default: AdamW (0.9, 0.95), wd 0.05 on matrices and
embeddings, constant lr 1e-4, global batch 256, clip 1.0, dropouts 0.1, bf16 autocast on GPUs
(fp32 on the CPU, where bf16 autocast is slower and only approximates). Unlike the official
trainer, --resume continues mid-epoch exactly (data order, RNG, optimizer, EMA) and
--gradient-accumulation-steps works. --fsdp shards each block (FSDP2) and saves the same
gathered checkpoint format, optimizer included.
"""

import argparse
import contextlib
import copy
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import text
from gpt import GPT, GPT_CONFIGS, GPTConfig, generate, resolve_model_name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="train the LlamaGen c2i GPT on token codes")
    p.add_argument(
        "--model", default="GPT-B", choices=list(GPT_CONFIGS) + [k[4:] for k in GPT_CONFIGS]
    )
    p.add_argument("--code-path", required=True, help="folder written by `python data.py extract`")
    p.add_argument(
        "--extra-code-path", help="second code set (e.g. crop range 1.05), drawn with --extra-prob"
    )
    p.add_argument("--extra-prob", type=float, default=0.5)
    p.add_argument("--results-dir", default="results")
    p.add_argument(
        "--resume", help="checkpoint to continue from exactly (same world size for exact RNG)"
    )
    p.add_argument("--vq-ckpt", help="tokenizer used to decode the sample grids")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--min-lr", type=float, default=0.0, help="end of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.1, help="token, residual and FFN dropout")
    p.add_argument(
        "--class-dropout-prob", type=float, default=0.1, help="label -> null class, for CFG"
    )
    p.add_argument(
        "--drop-path", type=float, default=0.0, help="> 0 turns resid/FFN dropout off (official)"
    )
    p.add_argument(
        "--ema", action="store_true", help="keep an EMA of the weights (decay --ema-decay)"
    )
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument(
        "--mixed-precision",
        choices=["fp32", "bf16", "fp16"],
        help="default bf16 on GPUs, fp32 on CPU",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--fsdp", action="store_true", help="shard params/grads/optimizer per block (XXL, 3B)"
    )
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument(
        "--sample-every", type=int, default=5000, help="PNG grid every N steps (needs --vq-ckpt)"
    )
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance for the sample grids")
    args = p.parse_args(argv)
    args.model = resolve_model_name(args.model)
    return args


def get_lr(args, step, total_steps):
    """Linear warmup, then constant (official) or cosine down to --min-lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    t = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def shard(model, precision):
    """FSDP2: fully_shard each transformer block, then the root (embeddings, norm, output)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp32": None}[
        precision
    ]  # official: bf16 params and reductions
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def main(args):
    d = data.init_dist()
    precision = args.mixed_precision or ("bf16" if d.device.type == "cuda" else "fp32")
    if args.fsdp and (precision == "fp16" or not d.distributed):
        raise data.UserError(
            "--fsdp needs torchrun (torchrun --nproc_per_node=8 train_gpt.py ...) and bf16 or fp32"
        )
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # official
    micro, rem = divmod(args.global_batch_size, d.world_size * args.gradient_accumulation_steps)
    if rem or not micro:
        raise data.UserError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of processes "
            f"({d.world_size}) x --gradient-accumulation-steps ({args.gradient_accumulation_steps})"
        )
    ckpt = data.load_checkpoint(args.resume) if args.resume else None
    t2i = (
        data.read_code_meta(args.code_path).get("model_type") == "t2i"
    )  # a `text.py extract` store
    dataset = (
        text.CaptionCodeDataset(args.code_path)
        if t2i
        else data.CodeDataset(
            args.code_path, args.extra_code_path, args.extra_prob, seed=args.global_seed
        )
    )
    meta = dataset.meta
    if ckpt is not None:  # the model is the checkpoint's; the data must fit it
        config = GPTConfig(**ckpt["config"])
        if (config.vocab_size, config.block_size, config.num_classes) != (
            dataset.vocab_size,
            dataset.block_size,
            dataset.num_classes,
        ):
            raise data.UserError(
                f"{args.resume} was trained on codes with vocab {config.vocab_size}, block "
                f"{config.block_size}, {config.num_classes} classes; {args.code_path} differs"
            )
    else:
        resid = (
            0.0 if args.drop_path > 0 else args.dropout
        )  # official: drop-path replaces these dropouts
        config = GPTConfig.from_name(
            args.model,
            vocab_size=dataset.vocab_size,
            block_size=dataset.block_size,
            num_classes=dataset.num_classes,
            class_dropout_prob=args.class_dropout_prob,
            token_dropout_p=args.dropout,
            resid_dropout_p=resid,
            ffn_dropout_p=resid,
            drop_path_rate=args.drop_path,
            **(
                dict(
                    model_type="t2i",
                    cls_token_num=dataset.max_tokens,
                    caption_dim=dataset.caption_dim,
                )
                if t2i
                else {}
            ),
        )

    # model: same init on every rank (FSDP2 does not broadcast), then per-rank seeds (DiT)
    torch.manual_seed(args.global_seed)
    raw_model = GPT(config)
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(d.device)
    ema = copy.deepcopy(raw_model).requires_grad_(False) if args.ema else None
    if ema is not None and ckpt is not None and ckpt["ema"] is not None:
        ema.load_state_dict(ckpt["ema"])
    torch.manual_seed(args.global_seed * d.world_size + d.rank)
    if args.fsdp:
        shard(raw_model, precision)
        if ema is not None:
            shard(ema, "fp32")
    model = torch.compile(raw_model) if args.compile else raw_model  # compile before DDP (nanoGPT)
    if d.distributed and not args.fsdp:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    data.print0(
        f"{args.model}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters "
        f"(vocab {config.vocab_size}, {config.block_size} tokens, {config.num_classes} classes), "
        f"{len(dataset)} sequences, {d.world_size} x {micro} x {args.gradient_accumulation_steps}, {precision}"
    )
    if t2i:
        data.print0(
            f"text-to-image: {int((~dataset.valid).sum())} of {len(dataset)} records are bad (unreadable "
            f"or small image, no caption) and will be skipped by the loss"
        )

    # AdamW, weight decay on matrices and embeddings only (dim >= 2), fused on GPUs
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=d.device.type == "cuda"
    )
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "fp16")
    ctx = data.autocast_ctx(d.device, precision)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    step = epoch = batch_in_epoch = 0
    if ckpt is not None:
        set_optimizer_state_dict(
            raw_model, optimizer, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        if len(ckpt["rng"]) == d.world_size:
            data.set_rng_state(ckpt["rng"][d.rank])
        else:
            data.print0(
                f"warning: saved with {len(ckpt['rng'])} processes, now {d.world_size}: RNG not restored"
            )
    run_dir = (
        Path(args.resume).parent.parent
        if args.resume and Path(args.resume).parent.name == "checkpoints"
        else data.make_results_dir(args.results_dir, args.model)
    )
    logger = data.JsonlLogger(run_dir / "log.jsonl")

    sampler = DistributedSampler(
        dataset, d.world_size, d.rank, shuffle=True, seed=args.global_seed, drop_last=True
    )
    rank_batch = micro * args.gradient_accumulation_steps
    steps_per_epoch = len(sampler) // rank_batch
    if steps_per_epoch == 0:
        raise data.UserError(
            f"{len(dataset)} sequences do not fill one global batch of {args.global_batch_size}"
        )
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    vq = None
    if args.vq_ckpt and args.sample_every > 0:
        vq = data.load_tokenizer(args.vq_ckpt, d.device)
        if vq.config.codebook_size != config.vocab_size:
            raise data.UserError(
                f"--vq-ckpt has {vq.config.codebook_size} codes, the GPT {config.vocab_size}"
            )

    def save(step):
        """Gather full state dicts on rank 0 (collective under FSDP) and write {step}.pt + last.pt."""
        rng = [data.get_rng_state()] * d.world_size  # every rank's RNG, for an exact resume
        if d.distributed:
            dist.all_gather_object(rng, rng[0])
        obj = {
            "model": get_model_state_dict(raw_model, options=full),
            "ema": get_model_state_dict(ema, options=full) if ema is not None else None,
            "optimizer": get_optimizer_state_dict(raw_model, optimizer, options=full),
            "scaler": scaler.state_dict(),
            "config": asdict(config),
            "vq_config": meta.get("tokenizer", {}).get("config"),
            "code_meta": {k: v for k, v in meta.items() if k != "tokenizer"},
            "args": vars(args),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "rng": rng,
        }
        if d.rank == 0:
            data.save_checkpoint(obj, run_dir / "checkpoints" / f"{step:07d}.pt")
            data.save_checkpoint(obj, run_dir / "checkpoints" / "last.pt")
        if d.distributed:
            dist.barrier()

    @torch.no_grad()
    def sample_grid(step):
        """Every rank samples (sharded weights need all of them); rank 0 writes the PNG."""
        labels = torch.linspace(
            0, config.num_classes - 1, min(8, config.num_classes), device=d.device
        ).long()
        emb_mask = None
        if t2i:  # the first captions of the data instead of labels
            labels, emb_mask = (t.to(d.device) for t in dataset.captions(8))
        if args.fsdp:
            raw_model.unshard()  # root params (embeddings, output) stay gathered for the KV-cache decode
        with ctx:
            cfg = (
                args.cfg_scale if config.class_dropout_prob > 0 else 1.0
            )  # no null class, no guidance
            codes = generate(
                raw_model,
                labels,
                cfg_scale=cfg,
                emb_mask=emb_mask,
                generator=torch.Generator(d.device).manual_seed(args.global_seed),
            )
        if args.fsdp:
            raw_model.reshard()
        g = meta["grid_size"]
        images = vq.decode_code(codes, shape=(len(labels), vq.config.codebook_embed_dim, g, g))
        if d.rank == 0:
            data.save_image_grid(images, run_dir / "samples" / f"{step:07d}.png", nrow=len(labels))

    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=d.rank != 0, desc="train")
    log_loss, log_steps, t0 = torch.zeros((), device=d.device), 0, time.time()
    skipped = torch.zeros((), device=d.device, dtype=torch.long)  # t2i samples with valid = 0
    while step < total_steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        order = list(sampler)[
            batch_in_epoch * rank_batch :
        ]  # skip what this epoch already consumed
        loader = iter(
            DataLoader(
                dataset,
                micro,
                sampler=order,
                drop_last=True,
                num_workers=args.num_workers,
                pin_memory=d.device.type == "cuda",
                generator=torch.Generator(),
            )
        )
        while batch_in_epoch < steps_per_epoch and step < total_steps:
            lr = get_lr(args, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro_step in range(args.gradient_accumulation_steps):
                z, y, *extra = (t.to(d.device, non_blocking=True) for t in next(loader))
                # z (micro, block_size); y labels (micro,), or t2i captions (micro, T, D) + mask, valid
                extra = dict(emb_mask=extra[0], valid=extra[1]) if t2i else {}
                if t2i:
                    skipped += (~extra["valid"]).sum()
                last = micro_step == args.gradient_accumulation_steps - 1
                if args.fsdp:
                    raw_model.set_requires_gradient_sync(last)
                sync = (
                    contextlib.nullcontext()
                    if last or not isinstance(model, DDP)
                    else model.no_sync()
                )
                with sync:
                    with ctx:  # (None, mean CE over B x block_size) without the full fp32 logits
                        _, loss = model(z[:, :-1], y, targets=z, return_logits=False, **extra)
                    scaler.scale(loss / args.gradient_accumulation_steps).backward()
                log_loss += loss.detach() / args.gradient_accumulation_steps
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                data.update_ema(ema, raw_model, args.ema_decay)
            step, batch_in_epoch, log_steps = step + 1, batch_in_epoch + 1, log_steps + 1
            bar.update()
            if step % args.log_every == 0 or step == total_steps:
                if d.distributed:
                    dist.all_reduce(log_loss)
                    dist.all_reduce(skipped)
                loss_avg = log_loss.item() / log_steps / d.world_size
                norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                dt = time.time() - t0
                logger.log(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss_avg,
                        "lr": lr,
                        "grad_norm": norm.item(),
                        "tokens_per_s": log_steps * args.global_batch_size * config.block_size / dt,
                        **({"skipped": int(skipped)} if t2i else {}),
                    }
                )
                skipped.zero_()
                bar.set_postfix(loss=f"{loss_avg:.4f}")
                log_loss.zero_()
                log_steps, t0 = 0, time.time()
            if vq is not None and (step % args.sample_every == 0 or step == total_steps):
                sample_grid(
                    step
                )  # before saving, so a resumed run continues from the same RNG state
            if step % args.ckpt_every == 0 or step == total_steps:
                save(step)
        if batch_in_epoch == steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    data.print0(f"done: {run_dir}")
    if d.distributed:
        dist.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    data.cli(main, parse_args)
