"""Train the LlamaGen GPT on token grids (official train_c2i.py, train_c2i_fsdp.py, train_t2i.py).

    python train_gpt.py --model tiny --code-path data/toy-codes --max-steps 300 \
        --global-batch-size 32
    torchrun --standalone --nproc_per_node=8 train_gpt.py --model XL --code-path codes/ \
        --vq-ckpt vq_ds16_c2i.pt
    torchrun --standalone --nproc_per_node=8 train_gpt.py --model 3B --code-path codes/ --fsdp
    python train_gpt.py --resume results/000-GPT-tiny/checkpoints/last.pt --code-path data/toy-codes
    python train_gpt.py --model tiny --code-path data/toy-t2i-codes --max-steps 300  # text-to-image

Codes come from `python data.py extract`; vocabulary, block size and class count are read from their
meta.json. A store from `python text.py extract` (meta.json model_type "t2i": codes + T5 caption
features) trains the text-conditional model (official train_t2i.py); its bad records are skipped by
the loss (valid = 0) and counted in the log. The official recipe is the default (paper section 3.1
and the official scripts): AdamW (0.9, 0.95), weight decay 0.05 on matrices and embeddings, constant
lr 1e-4, global batch 256, gradient clipping 1.0, dropouts 0.1, bf16 autocast on GPUs (fp32 on the
CPU, where bf16 autocast is slower and only approximates). Unlike the official trainer, --resume
continues mid-epoch exactly (data order, RNG, optimizer, EMA) and --gradient-accumulation-steps
works. --fsdp shards each block (FSDP2) and saves the same gathered checkpoint format, optimizer
included.
"""

import argparse
import copy
import functools
import math
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import common
import data
import text
from gpt import GPT, GPT_CONFIGS, GPTConfig, generate

# what a checkpoint's model must share with the codes it resumes on (all read from meta.json)
DATA_FIELDS = (
    "vocab_size",
    "block_size",
    "num_classes",
    "model_type",
    "cls_token_num",
    "caption_dim",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="train the LlamaGen GPT on token codes")
    p.add_argument("--model", default="GPT-B", type=functools.partial(common.preset, GPT_CONFIGS))
    p.add_argument("--code-path", required=True, help="folder from `python data.py extract`")
    p.add_argument("--extra-code-path", help="second code set (e.g. crop range 1.05)")
    p.add_argument("--resume", help="checkpoint to continue exactly (same world size for the RNG)")
    p.add_argument("--vq-ckpt", help="tokenizer that decodes the sample grids")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument(
        "--mixed-precision",
        choices=["fp32", "bf16", "fp16"],
        help="default: bf16 on GPUs, fp32 on the CPU",
    )
    defaults = {  # the type follows the default; False = a switch
        "--results-dir": "results",
        "--extra-prob": 0.5,
        "--epochs": 300,
        "--global-batch-size": 256,
        "--gradient-accumulation-steps": 1,
        "--lr": 1e-4,
        "--warmup-steps": 0,
        "--min-lr": 0.0,
        "--weight-decay": 0.05,
        "--beta1": 0.9,
        "--beta2": 0.95,
        "--max-grad-norm": 1.0,
        "--dropout": 0.1,
        "--class-dropout-prob": 0.1,
        "--drop-path": 0.0,
        "--ema": False,
        "--ema-decay": 0.9999,
        "--compile": False,
        "--fsdp": False,
        "--global-seed": 0,
        "--num-workers": 4,
        "--log-every": 100,
        "--ckpt-every": 5000,
        "--sample-every": 5000,
        "--cfg-scale": 4.0,
    }
    helps = {
        "--extra-prob": "chance of drawing from --extra-code-path",
        "--warmup-steps": "linear warmup, then --lr-schedule",
        "--min-lr": "end of the cosine schedule",
        "--dropout": "token, residual and FFN dropout",
        "--class-dropout-prob": "label or caption -> null, for CFG",
        "--drop-path": "> 0 turns residual and FFN dropout off (official)",
        "--ema": "keep an EMA of the weights (--ema-decay)",
        "--compile": "torch.compile the model",
        "--fsdp": "shard params, grads and optimizer per block (XXL, 3B)",
        "--sample-every": "PNG grid every N steps (needs --vq-ckpt)",
        "--cfg-scale": "guidance of the sample grids",
    }
    for flag, default in defaults.items():
        if default is False:
            p.add_argument(flag, action="store_true", help=helps.get(flag))
        else:
            p.add_argument(flag, type=type(default), default=default, help=helps.get(flag))
    return p.parse_args(argv)


def get_lr(args, step, total_steps):
    """Linear warmup, then constant (official) or cosine down to --min-lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    t = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


# -----------------------------------------------------------------------------
# The steps of main: data, model, one train step, sample, save


def micro_batch(args, env):
    """Samples per rank per forward pass: the global batch over processes x accumulation."""
    accum = args.gradient_accumulation_steps
    micro, rem = divmod(args.global_batch_size, env.world_size * accum)
    if rem or not micro:
        raise common.UserError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of processes "
            f"({env.world_size}) x --gradient-accumulation-steps ({accum})"
        )
    if args.fsdp and (env.precision == "fp16" or not env.distributed):
        raise common.UserError(
            "--fsdp needs torchrun (torchrun --nproc_per_node=8 train_gpt.py ...) and bf16 or fp32"
        )
    return micro


def build_data(args):
    """The code store: c2i (codes, label) or, for a `text.py extract` store, t2i (codes, caption
    features, mask, valid); the GPT's sizes come from its meta.json (dataset.meta)."""
    if data.read_code_meta(args.code_path).get("model_type") == "t2i":
        return text.CaptionCodeDataset(args.code_path)
    return data.CodeDataset(args.code_path, args.extra_code_path, args.extra_prob, args.global_seed)


def build_config(args, meta, ckpt):
    """A fresh GPTConfig from the preset and the codes; on resume the checkpoint's, which must
    fit the codes."""
    if meta.get("model_type") == "t2i":  # caption slots and T5 width of the store
        cond = dict(
            model_type="t2i", cls_token_num=meta["max_tokens"], caption_dim=meta["caption_dim"]
        )
    else:
        cond = dict(num_classes=meta["num_classes"])
    resid = 0.0 if args.drop_path > 0 else args.dropout  # official: drop-path replaces them
    config = GPTConfig.from_name(
        args.model,
        vocab_size=meta["vocab_size"],
        block_size=meta["block_size"],
        class_dropout_prob=args.class_dropout_prob,
        token_dropout_p=args.dropout,
        resid_dropout_p=resid,
        ffn_dropout_p=resid,
        drop_path_rate=args.drop_path,
        **cond,
    )
    saved = GPTConfig(**ckpt["config"]) if ckpt else config  # resume: the checkpoint's model
    differ = [k for k in DATA_FIELDS if getattr(saved, k) != getattr(config, k)]
    if differ:
        raise common.UserError(
            f"{args.resume} was trained on other codes ({', '.join(differ)} differ from "
            f"{args.code_path})"
        )
    return saved


def shard(model, precision):
    """FSDP2: fully_shard each transformer block, then the root (embeddings, norm, output)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]  # official: bf16 params, reductions
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def build_model(args, env, config, ckpt):
    """-> [model, raw_model, ema, optimizer, scaler]: model to train (compiled, DDP-wrapped as
    asked); raw_model for EMA, sampling and saving; ema (or None) in fp32; on resume all of them
    and this rank's RNG as saved."""
    torch.manual_seed(args.global_seed)  # same init on every rank: FSDP2 does not broadcast
    raw_model = GPT(config)
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
    raw_model.to(env.device)
    ema = copy.deepcopy(raw_model).requires_grad_(False) if args.ema else None
    if ema is not None and ckpt and ckpt["ema"]:
        ema.load_state_dict(ckpt["ema"])
    torch.manual_seed(args.global_seed * env.world_size + env.rank)  # per-rank dropout (DiT)
    if args.fsdp:
        shard(raw_model, env.precision)
        if ema is not None:
            shard(ema, "fp32")
    model = torch.compile(raw_model) if args.compile else raw_model  # before DDP (nanoGPT)
    if env.distributed and not args.fsdp:
        model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    # AdamW with weight decay on matrices and embeddings only (dim >= 2), fused on GPUs
    params = list(raw_model.parameters())
    groups = [
        dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
        dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0),
    ]
    fused = env.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, args.lr, (args.beta1, args.beta2), fused=fused)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")
    if ckpt:  # the optimizer state is saved whole (gathered under FSDP)
        full = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(raw_model, optimizer, ckpt["optimizer"], options=full)
        scaler.load_state_dict(ckpt["scaler"])
        common.restore_rng(ckpt["rng"], env)
    return [model, raw_model, ema, optimizer, scaler]


def train_step(args, env, parts, batches, lr):
    """One optimizer step over --gradient-accumulation-steps micro-batches, then the EMA ->
    (loss, skipped t2i records, gradient norm before clipping)."""
    model, raw_model, ema, optimizer, scaler = parts
    for group in optimizer.param_groups:
        group["lr"] = lr
    accum, step_loss, skipped = args.gradient_accumulation_steps, 0, 0
    for micro_step in range(accum):
        codes, cond, *t2i = (t.to(env.device, non_blocking=True) for t in next(batches))
        # codes (micro, block_size); cond: labels (micro,) or captions (micro, n_cond, D) with
        # t2i = [emb_mask (micro, n_cond), valid (micro,)]; bad records have valid = False
        t2i = dict(emb_mask=t2i[0], valid=t2i[1]) if t2i else {}
        last = micro_step == accum - 1  # gradients are reduced across ranks on the last only
        if isinstance(model, DDP):  # nanoGPT's one flag instead of the no_sync() context
            model.require_backward_grad_sync = last
        elif args.fsdp:
            raw_model.set_requires_gradient_sync(last)
        with env.ctx:  # mean CE over micro x block_size, without the full fp32 logits
            _, loss = model(codes[:, :-1], cond, targets=codes, return_logits=False, **t2i)
        scaler.scale(loss / accum).backward()
        step_loss += loss.detach() / accum
        skipped += (~t2i["valid"]).sum() if t2i else 0
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        common.update_ema(ema, raw_model, args.ema_decay)
    return step_loss, skipped, grad_norm


@torch.no_grad()
def sample_grid(args, env, raw_model, vq, dataset, path):
    """Eight samples, one PNG: every rank samples (sharded weights need all), rank 0 writes."""
    c, emb_mask = raw_model.config, None
    if c.model_type == "t2i":  # the first captions of the data
        cond, emb_mask = (t.to(env.device) for t in dataset.captions(8))
    else:  # classes spread over the label range
        cond = torch.linspace(0, c.num_classes - 1, min(8, c.num_classes), device=env.device).long()
    if args.fsdp:  # root params (embeddings, output) stay gathered for the KV-cache decode
        raw_model.unshard()
    cfg_scale = args.cfg_scale if c.class_dropout_prob > 0 else 1.0  # no null class, no CFG
    generator = torch.Generator(env.device).manual_seed(args.global_seed)
    with env.ctx:
        codes = generate(raw_model, cond, cfg_scale, emb_mask=emb_mask, generator=generator)
    if args.fsdp:
        raw_model.reshard()
    images = vq.decode_code(codes)  # (B, 3, H, W) from the square grid, in fp32
    if env.rank == 0:
        data.save_image_grid(images, path, nrow=len(cond))


def save(args, env, parts, run_dir, step, meta):
    """Full state dicts (gathered on every rank under FSDP) + every rank's RNG, plain types."""
    _, raw_model, ema, optimizer, scaler = parts
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    obj = {
        "model": get_model_state_dict(raw_model, options=full),
        "ema": get_model_state_dict(ema, options=full) if ema is not None else None,
        "optimizer": get_optimizer_state_dict(raw_model, optimizer, options=full),
        "scaler": scaler.state_dict(),
        "config": asdict(raw_model.config),
        "vq_config": meta.get("tokenizer", {}).get("config"),  # sample.py: which tokenizer
        "args": vars(args),
        "step": step,
        "rng": common.gather_rng(env),
    }
    common.save_checkpoints(obj, run_dir, step, env)


# -----------------------------------------------------------------------------


def main(args):
    env = common.setup(args.mixed_precision)
    micro, accum = micro_batch(args, env), args.gradient_accumulation_steps
    ckpt = common.load_checkpoint(args.resume) if args.resume else None
    dataset = build_data(args)
    config = build_config(args, dataset.meta, ckpt)
    vq = None  # loaded before the seeding: its random init must not move the training RNG
    if args.vq_ckpt and args.sample_every > 0:
        vq = data.load_tokenizer(args.vq_ckpt, env.device, vocab_size=config.vocab_size)
    parts = build_model(args, env, config, ckpt)
    step = ckpt["step"] if ckpt else 0
    run_dir = common.run_dir(args.results_dir, args.model, args.resume)
    logger = common.JsonlLogger(run_dir / "log.jsonl")
    # one loader for the whole run, from `step` on; a private generator leaves the global RNG
    sampler = common.TrainSampler(len(dataset), micro * accum, env, args.global_seed, step)
    workers, pin = args.num_workers, env.device.type == "cuda"
    loader = DataLoader(
        dataset,
        micro,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
        generator=torch.Generator(),
    )
    batches = iter(loader)
    total_steps = args.max_steps or args.epochs * sampler.steps_per_epoch
    common.print0(
        f"{args.model} {config.model_type}: {sum(p.numel() for p in parts[1].parameters()):,} "
        f"parameters, vocab {config.vocab_size}, {config.block_size} tokens; {len(dataset)} "
        f"sequences, {env.world_size} x {micro} x {accum} per step, {env.precision}"
    )

    parts[0].train()
    bar = tqdm(total=total_steps, initial=step, disable=env.rank != 0, desc="train")
    log_loss, log_skipped, log_steps, t0 = 0, 0, 0, time.time()
    while step < total_steps:
        lr = get_lr(args, step, total_steps)
        loss, skipped, grad_norm = train_step(args, env, parts, batches, lr)
        step, log_steps = step + 1, log_steps + 1
        log_loss, log_skipped = log_loss + loss, log_skipped + skipped
        bar.update()
        if step % args.log_every == 0 or step == total_steps:  # averaged over steps and ranks
            totals = torch.stack([log_loss, torch.as_tensor(log_skipped, device=env.device)])
            if env.distributed:
                dist.all_reduce(totals)
            loss_avg = totals[0].item() / log_steps / env.world_size
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            tokens = log_steps * args.global_batch_size * config.block_size
            record = dict(
                step=step,
                epoch=(step - 1) // sampler.steps_per_epoch,
                loss=loss_avg,
                lr=lr,
                grad_norm=norm.item(),
                tokens_per_s=tokens / (time.time() - t0),
            )
            if config.model_type == "t2i":  # bad records the loss skipped since the last line
                record["skipped"] = int(totals[1])
            logger.log(record)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            log_loss, log_skipped, log_steps, t0 = 0, 0, 0, time.time()
        if vq is not None and (step % args.sample_every == 0 or step == total_steps):
            # before saving, so that a resumed run continues from the same RNG state
            sample_grid(args, env, parts[1], vq, dataset, run_dir / "samples" / f"{step:07d}.png")
        if step % args.ckpt_every == 0 or step == total_steps:
            save(args, env, parts, run_dir, step, dataset.meta)
    common.print0(f"\ndone: {run_dir}")
    bar.close()
    if env.distributed:
        dist.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    common.cli(main, parse_args)
