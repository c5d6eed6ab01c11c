"""Train the LlamaGen GPT on token grids (official train_c2i.py, train_c2i_fsdp.py, train_t2i.py).

    python train_gpt.py --model tiny --code-path data/toy-codes --max-steps 300 \
        --global-batch-size 32
    torchrun --standalone --nproc_per_node=8 train_gpt.py --model XL --code-path codes/ \
        --vq-ckpt vq_ds16_c2i.pt
    torchrun --standalone --nproc_per_node=8 train_gpt.py --model 3B --code-path codes/ --fsdp
    python train_gpt.py --resume results/000-GPT-tiny/checkpoints/last.pt   # continue that run
    python train_gpt.py --resume results/000-GPT-tiny/checkpoints/last.pt --max-steps 600
    python train_gpt.py --model tiny --code-path data/toy-t2i-codes --max-steps 300  # text-to-image

Codes come from `python data.py extract`; vocabulary, block size and class count are read from their
meta.json. A store from `python text.py extract` (meta.json model_type "t2i": codes + T5 caption
features) trains the text-conditional model (official train_t2i.py); its bad records are skipped by
the loss (valid = 0) and counted in the log. The official recipe is the default (paper section 3.1
and the official scripts): AdamW (0.9, 0.95), weight decay 0.05 on matrices and embeddings, constant
lr 1e-4, global batch 256, gradient clipping 1.0, dropouts 0.1, bf16 autocast on GPUs (fp32 on the
CPU, where bf16 autocast is slower and only approximates). --fsdp shards each block (FSDP2) and
saves the same gathered checkpoint format, optimizer included.

Unlike the official trainer, --resume continues mid-epoch exactly (data order, RNG, optimizer, EMA:
bit for bit the uninterrupted run), and a bare `--resume CKPT` is the checkpoint's own run: its
preset, codes, lr, batch, schedule, EMA and seed. Flags in MAY_CHANGE may be given anew (the
start-up line lists them); any other one that differs is refused, since the run would no longer be
the one that was saved (a new batch size, for one, reorders every epoch). The start-up line also
names the run folder, the processes, threads and precision, and the steps per epoch.

log.jsonl has a line every --log-every steps: step; loss, averaged over these steps and all ranks;
skipped, the bad t2i records among them; lr; grad_norm, the last step's before clipping; time, in
Unix seconds (throughput: the steps between two lines over their times). One more line comes after
the first step (its loss is ln(vocab): the zero-initialised output layer's uniform guess) without
cutting the first average short: the line of step 250 averages steps 1..250. The checkpoint
records the sha256 of the tokenizer that made the codes, so that sample.py can refuse another one.

Flags (their defaults follow below, with --help):
  --model               a preset of gpt.GPT_CONFIGS: B, L, XL, XXL, 3B or tiny (or GPT-B, ...)
  --code-path           the folder of `python data.py extract` or `python text.py extract`
  --extra-code-path     a second code set of the same images, drawn with chance --extra-prob
                        (the official recipe: ten-crop codes at crop ranges 1.1 and 1.05)
  --resume              a checkpoints/*.pt of a run to continue
  --vq-ckpt             the tokenizer that decodes a PNG grid every --sample-every steps,
                        guided with --cfg-scale
  --results-dir         runs go to RESULTS_DIR/NNN-MODEL/ (log.jsonl, checkpoints/, samples/)
  --epochs, --max-steps the length of the run; --max-steps 0 means --epochs
  --global-batch-size   samples per optimizer step over all processes, each taking them in
                        --gradient-accumulation-steps micro-batches
  --lr, --warmup-steps, --lr-schedule, --min-lr
                        linear warmup to --lr, then constant, or cosine down to --min-lr
  --weight-decay        AdamW's, on matrices and embeddings only
  --max-grad-norm       gradient clipping
  --dropout             token, residual and FFN dropout
  --class-dropout-prob  label or caption -> null, which classifier-free guidance needs
  --drop-path           stochastic depth; > 0 turns residual and FFN dropout off (official)
  --ema, --ema-decay    keep an EMA of the weights (what sample.py loads)
  --mixed-precision     fp32, bf16 or fp16; none given: bf16 on GPUs, fp32 on the CPU
  --compile             torch.compile the model
  --fsdp                shard parameters, gradients and optimizer per block (XXL, 3B)
  --global-seed         the seed of init, data order, per-rank dropout and sample grids
  --num-workers         DataLoader worker processes per rank (default: the spare cores)
  --log-every, --ckpt-every, --sample-every
                        cadences in optimizer steps; all three also after the last step
                        (0: never)
"""

import argparse
import copy
import functools
import math
import time

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import common
import data
import text
from gpt import GPT, GPT_CONFIGS, GPTConfig, generate

# flag: default, whose type is the flag's (paths and switches follow in build_parser)
FLAGS = {
    "--extra-prob": 0.5,
    "--results-dir": "results",
    "--epochs": 300,
    "--max-steps": 0,
    "--global-batch-size": 256,
    "--gradient-accumulation-steps": 1,
    "--lr": 1e-4,
    "--warmup-steps": 0,
    "--min-lr": 0.0,
    "--weight-decay": 0.05,
    "--max-grad-norm": 1.0,
    "--dropout": 0.1,
    "--class-dropout-prob": 0.1,
    "--drop-path": 0.0,
    "--ema-decay": 0.9999,
    "--global-seed": 0,
    "--num-workers": common.NUM_WORKERS,
    "--log-every": 100,
    "--ckpt-every": 5000,
    "--sample-every": 5000,
    "--cfg-scale": 4.0,
}
# What a resumed run may change: how long it runs, what it logs, saves and samples, where its files
# are, and how the same computation is laid out on the machine. The checkpoint's model must still
# fit the codes (data_and_config checks it).
MAY_CHANGE = """code_path extra_code_path vq_ckpt results_dir epochs max_steps log_every ckpt_every
    sample_every cfg_scale num_workers compile fsdp gradient_accumulation_steps""".split()
# full (gathered) state dicts on rank 0's CPU, which saves them: one checkpoint format with or
# without FSDP, loaded whole into a sharded or a plain model
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written (commands, then what each flag means), then every
    flag with its default."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--model",
        default="GPT-B",
        type=functools.partial(common.preset, GPT_CONFIGS),  # "XL" = "GPT-XL"
        help="a gpt.GPT_CONFIGS preset",
    )
    p.add_argument(
        "--lr-schedule", choices="constant cosine".split(), default="constant", help="after warmup"
    )
    p.add_argument(
        "--mixed-precision", choices="fp32 bf16 fp16".split(), help="None: bf16 on GPUs, else fp32"
    )
    # what each flag means: the docstring
    for flag, default in FLAGS.items():
        p.add_argument(flag, type=type(default), default=default, help="default: %(default)s")
    for flag in "--code-path --extra-code-path --resume --vq-ckpt".split():
        p.add_argument(flag, help="a path")
    for flag in "--ema --compile --fsdp".split():
        p.add_argument(flag, action="store_true", help="a switch")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def get_lr(args, step, total_steps):
    """The learning rate of optimizer step `step` (1 .. total_steps): linear warmup over the first
    --warmup-steps, then constant (official) or cosine down to --min-lr."""
    warmup = args.warmup_steps
    if step <= warmup:
        return args.lr * step / warmup
    # the constant schedule is the cosine's start (t = 0) kept for ever; t = 0 at the first step
    # after warmup, and < 1 at the last (total_steps > warmup here)
    t = (step - 1 - warmup) / (total_steps - warmup) * (args.lr_schedule == "cosine")
    return args.min_lr + (args.lr - args.min_lr) * (1 + math.cos(math.pi * t)) / 2


# -----------------------------------------------------------------------------
# The steps of main: settings, data, model, one train step, outputs


def data_and_config(args, env, ckpt):
    """-> (micro-batch, dataset, GPTConfig), all checked before any work. The micro-batch is
    what each rank feeds one forward pass: the global batch over processes x accumulation."""
    if not args.code_path:  # not required by argparse: a bare --resume takes the saved one
        raise common.UserError("--code-path is required: a folder from `python data.py extract`")
    micro, rem = divmod(args.global_batch_size, env.world_size * args.gradient_accumulation_steps)
    if rem or not micro:
        raise common.UserError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of processes "
            f"({env.world_size}) x --gradient-accumulation-steps "
            f"({args.gradient_accumulation_steps})"
        )
    if args.fsdp and (env.precision == "fp16" or not env.distributed):
        raise common.UserError(
            "--fsdp needs torchrun (torchrun --nproc_per_node=8 train_gpt.py ...) and bf16 or fp32"
        )

    # the data: c2i (codes, label) or, from a `text.py extract` store (meta.json model_type
    # "t2i"), (codes, caption features, mask, valid); the config: the preset's, with the flags'
    # dropouts and the store's vocabulary, block size and classes or caption slots
    meta = data.read_code_meta(args.code_path)
    if meta.get("model_type") == "t2i":  # caption slots and T5 width of the store
        dataset = text.CaptionCodeDataset(args.code_path)
        cond = dict(
            model_type="t2i", cls_token_num=meta["max_tokens"], caption_dim=meta["caption_dim"]
        )
    else:
        dataset = data.CodeDataset(
            args.code_path, args.extra_code_path, args.extra_prob, args.global_seed
        )
        cond = dict(num_classes=meta["num_classes"])
    resid = 0.0 if args.drop_path else args.dropout  # official: drop-path replaces them
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
    # the flags are the saved run's (above), so only other codes can make these differ
    if ckpt and ckpt["config"] != vars(config):
        raise common.UserError(
            f"{args.resume} was trained on other codes than {args.code_path}, which give "
            f"{dict(set(vars(config).items()) - set(ckpt['config'].items()))}"
        )
    return micro, dataset, config


def build_model(args, env, config, ckpt):
    """-> (model, raw_model, ema, optimizer, scaler): model to train (compiled, DDP-wrapped as
    asked); raw_model for EMA, sampling and saving; ema (or None); on resume all of them and this
    rank's RNG as saved."""
    torch.manual_seed(args.global_seed)  # same init on every rank: FSDP2 does not broadcast
    raw_model = GPT(config).to(env.device)
    ema = copy.deepcopy(raw_model) if args.ema else None  # never in a backward pass
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        if ema:  # a resumed run has the saved run's --ema, so the file holds one
            ema.load_state_dict(ckpt["ema"])
    torch.manual_seed(args.global_seed * env.world_size + env.rank)  # per-rank dropout (DiT)
    if args.fsdp:  # FSDP2: fully_shard each transformer block, then the root
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = torch.bfloat16 if env.precision == "bf16" else None
        # (param_dtype, reduce_dtype): bf16 compute copies and gradient reductions, as official
        policy = MixedPrecisionPolicy(dtype, dtype)
        # the EMA (if any) is sharded alike, so that it updates shard by shard; it never runs
        # forward, so its compute dtype does not matter. The root (embeddings, norm, output) last.
        for module in filter(None, [raw_model, ema]):
            for part in [*module.layers, module]:
                fully_shard(part, mp_policy=policy)
    if args.compile:  # in place: the module and its state_dict keys stay as they are
        raw_model.compile()
    # what the train step calls: DDP on the module's one device (CPU or this rank's GPU)
    model = raw_model
    if env.distributed and not args.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(raw_model)
    # AdamW with weight decay on matrices and embeddings only (dim >= 2; the official has no
    # biases, so the others are norm weights), fused on GPUs
    groups = [  # [decayed, not decayed], each in the model's parameter order
        dict(
            params=[p for p in raw_model.parameters() if (p.dim() >= 2) == decay],
            weight_decay=args.weight_decay * decay,
        )
        for decay in (True, False)
    ]
    # betas (0.9, 0.95) as official (train_c2i.py --beta1, --beta2)
    optimizer = torch.optim.AdamW(groups, args.lr, (0.9, 0.95), fused=env.device.type == "cuda")
    scaler = torch.amp.GradScaler(enabled=env.precision == "fp16")  # fp16 only on GPUs
    if ckpt:  # the optimizer state is saved whole (gathered under FSDP)
        set_optimizer_state_dict(raw_model, optimizer, ckpt["optimizer"], options=FULL)
        scaler.load_state_dict(ckpt["scaler"])
        common.restore_rng(ckpt["rng"], env)
    return model, raw_model, ema, optimizer, scaler


def train_step(args, env, parts, batches, lr, sums):
    """One optimizer step over --gradient-accumulation-steps micro-batches, then the EMA; adds
    [loss, skipped t2i records, 1 step] to sums -> the gradient norm before clipping."""
    model, raw_model, ema, optimizer, scaler = parts
    for group in optimizer.param_groups:
        group["lr"] = lr
    accum = args.gradient_accumulation_steps
    for micro_step in range(accum):
        codes, cond, *t2i = (t.to(env.device) for t in next(batches))
        # codes (micro, block_size); cond: labels (micro,) or captions (micro, n_cond, D) with
        # t2i = [emb_mask (micro, n_cond), valid (micro,)]: the model's next two arguments
        # DDP: nanoGPT's one flag instead of the no_sync() context (a plain attribute elsewhere):
        # gradients are all-reduced on the last micro-step only. FSDP reduce-scatters every
        # micro-step, so that no full-size gradients wait in memory between them.
        model.require_backward_grad_sync = micro_step == accum - 1
        with env.ctx:  # mean CE over micro x block_size, without the full fp32 logits
            _, loss = model(codes[:, :-1], cond, codes, *t2i, return_logits=False)
        scaler.scale(loss / accum).backward()
        sums[0] += loss.detach() / accum
        if t2i:  # records with valid = False, which the loss skipped
            sums[1] += (~t2i[1]).sum()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()  # set_to_none
    if ema:  # --ema
        common.update_ema(ema, raw_model, args.ema_decay)
    sums[2] += 1
    return grad_norm


@torch.no_grad()
def sample_and_save(args, env, parts, vq, dataset, run, step):
    """The outputs after a step, in this order so that a resumed run continues from the RNG
    state after both: a PNG grid of eight samples every --sample-every steps (with --vq-ckpt;
    every rank samples, since sharded weights need all, and rank 0 writes), then a checkpoint
    every --ckpt-every steps (full state dicts, which every rank helps gather under FSDP, and
    every rank's RNG, all plain types); both after the last step."""
    _, raw_model, ema, optimizer, scaler = parts
    c = raw_model.config
    if vq and run.due(step, args.sample_every):
        if c.model_type == "t2i":  # the first captions of the data
            cond, emb_mask = dataset.captions(8)
        else:  # eight classes spread over the label range (0 0 1 1 2 2 3 3 for four), as
            # their own mask, which a c2i GPT ignores (as in sample.py)
            cond = emb_mask = torch.arange(8) * c.num_classes // 8
        if args.fsdp:  # root params (embeddings, output) stay gathered for the KV-cache decode
            raw_model.unshard()
        with env.ctx:  # guidance needs the null class, which class dropout trains
            codes = generate(
                raw_model,
                cond.to(env.device),
                args.cfg_scale if c.class_dropout_prob else 1.0,
                emb_mask=emb_mask.to(env.device),
                generator=torch.Generator(env.device).manual_seed(args.global_seed),
            )
        if args.fsdp:
            raw_model.reshard()
        if env.rank == 0:  # the tokenizer decodes (8, 3, H, W) in fp32
            data.save_image_grid(
                vq.decode_code(codes), run.folder / f"samples/{step:07d}.png", nrow=8
            )
    if run.due(step, args.ckpt_every):
        tokenizer = dataset.meta["tokenizer"]
        # every rank helps gather; rank 0 writes checkpoints/{step:07d}.pt and last.pt
        common.save_checkpoints(
            {
                "model": get_model_state_dict(raw_model, options=FULL),
                "ema": ema and get_model_state_dict(ema, options=FULL),  # or None
                "optimizer": get_optimizer_state_dict(raw_model, optimizer, options=FULL),
                "scaler": scaler.state_dict(),
                "config": vars(c),  # plain types (a dataclass's fields)
                # which tokenizer made the codes: sample.py decodes with it, and refuses another
                "vq_config": tokenizer["config"],
                "tokenizer_sha256": tokenizer.get("sha256"),  # stores of older versions: none
                "args": vars(args),
                "step": step,
                "rng": common.gather_rng(env),
            },
            run.folder,
            step,
            env,
        )


# -----------------------------------------------------------------------------


def main(args):
    # a bare --resume CKPT takes every flag from CKPT's run (common.resume_args refuses changes
    # outside MAY_CHANGE); only our checkpoints have "vq_config" (not a VQ's or an official one)
    env, ckpt, changed = common.Run.setup(
        args, build_parser(), MAY_CHANGE, "vq_config", "train_gpt.py"
    )
    micro, dataset, config = data_and_config(args, env, ckpt)
    # the tokenizer that decodes sample grids, loaded before the seeding: its random init must
    # not move the training RNG
    vq = args.vq_ckpt and data.load_tokenizer(args.vq_ckpt, env.device, config.vocab_size)
    parts = build_model(args, env, config, ckpt)
    # one loader for the whole run, from the checkpoint's step on, that leaves the global RNG
    # alone; a step takes micro x accumulation samples from each rank. Then the run folder.
    run = common.Run(
        args, env, dataset, micro, args.gradient_accumulation_steps, ckpt.get("step", 0)
    )
    common.print0(
        f"{run.folder}: {args.model} {config.model_type}, "
        f"{sum(p.numel() for p in parts[1].parameters()):,} parameters, vocab "
        f"{config.vocab_size}, {config.block_size} tokens; {len(dataset)} sequences, "
        f"{env.world_size} x {micro} x {args.gradient_accumulation_steps} per step, "
        f"{run.steps_per_epoch} steps per epoch, steps {run.start} -> {run.total}; {env}",
        *changed,  # the flags a resumed run overrides: "max_steps 300 -> 600"
        sep="; ",
    )

    # [loss, skipped records, steps] since the last log line, summed by train_step
    sums = torch.zeros(3, device=env.device)
    for step in run:  # 1..total under rank 0's bar; `step`: the ones done after this one
        lr = get_lr(args, step, run.total)
        grad_norm = train_step(args, env, parts, run.batches, lr, sums)
        due = run.due(step, args.log_every)
        if due or step == 1:  # averaged over the steps since the last line and over the ranks
            if env.distributed:
                torch.distributed.all_reduce(sums)
            loss, skipped, steps = sums.tolist()  # steps x processes
            loss /= steps
            run.bar.set_postfix(loss=loss)
            run.log(
                {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "skipped": skipped,  # t2i: bad records the loss skipped
                    "time": time.time(),  # throughput: steps or tokens between lines / time
                }
            )
            # a new average starts, but not after the extra line of step 1, so that the line of
            # step 250 still averages steps 1..250 (the README's numbers): sums keeps each rank's
            # share of the totals (all of them in one process)
            sums[:] = 0 if due else sums / env.world_size
        sample_and_save(args, env, parts, vq, dataset, run, step)
    if env.distributed:
        torch.distributed.destroy_process_group()
    return run.folder


if __name__ == "__main__":
    common.cli(main, parse_args)
