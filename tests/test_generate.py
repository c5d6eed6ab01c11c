"""Tests for gpt.generate beyond ordinary sampling: speculative Jacobi decoding keeps the exact
distribution (chi-square and total variation against probabilities from teacher-forced passes)
in fewer forward passes, and a prefix of kept tokens continues like greedy decoding would.

    python -m pytest tests/test_generate.py -q
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
V, L = 4, 4  # 4 tokens of a 2 x 2 grid, 4 codes: 256 possible sequences


def tiny(scale=0.25, token_scale=1.0, **kw):
    """A random 2-layer GPT whose next-token distributions are neither flat nor one-hot (or,
    with a large scale and a small token_scale, nearly deterministic)."""
    torch.manual_seed(0)
    config = dict(dim=32, n_layer=2, n_head=2, vocab_size=V, block_size=L, num_classes=3)
    model = gpt.GPT(gpt.GPTConfig(**{**config, "multiple_of": 8, **kw})).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, scale)  # zero at init: every token would be equally likely
        model.tok_embeddings.weight.normal_(0, token_scale)
    return model


def exact_probabilities(model, label, cfg_scale=1.0, **filters):
    """P(sequence) for all V**L sequences: the product of the filtered, guided next-token
    distributions of one teacher-forced forward pass (no KV cache, no sampling code)."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (V**L, L)
    null = torch.full((len(seqs),), model.config.num_classes)
    with torch.no_grad():
        cond, _ = model(seqs[:, :-1], torch.full_like(null, label))
        uncond, _ = model(seqs[:, :-1], null)
    logits = uncond + (cond - uncond) * cfg_scale if cfg_scale > 1 else cond
    p = gpt.probs(logits, **filters)  # (V**L, L, V)
    return p.gather(2, seqs[..., None])[..., 0].prod(1)


def chi_square(tokens, p):
    """Pearson's statistic of sampled sequences against p, bins of expectation < 5 pooled,
    and the 0.1% critical value (Wilson-Hilferty)."""
    counts = torch.bincount((tokens * V ** torch.arange(L - 1, -1, -1)).sum(1), minlength=V**L)
    expected = p * len(tokens)
    assert counts[expected == 0].sum() == 0, "drew a sequence of probability 0"
    big = expected >= 5
    obs = torch.cat([counts[big].float(), counts[~big].sum()[None].float()])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    dof = len(exp) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    return ((obs - exp) ** 2 / exp).sum().item(), critical


@pytest.mark.slow
@pytest.mark.parametrize("window", [1, 2, L])  # L: the window spans the whole sequence
@pytest.mark.parametrize(
    "settings", [{}, dict(cfg_scale=3.0, temperature=0.8, top_k=3)], ids=["plain", "cfg-topk-temp"]
)
def test_jacobi_decoding_keeps_the_exact_distribution(window, settings):
    model, n = tiny(), 20000
    p = exact_probabilities(model, 1, **settings)
    stats = {}
    generator = torch.Generator().manual_seed(window)
    tokens = gpt.generate(
        model,
        torch.full((n,), 1),
        jacobi_window=window,
        stats=stats,
        generator=generator,
        **settings,
    )
    stat, critical = chi_square(tokens, p)
    tv = (
        0.5
        * (
            torch.bincount((tokens * V ** torch.arange(L - 1, -1, -1)).sum(1), minlength=V**L) / n
            - p
        )
        .abs()
        .sum()
    )
    assert stat < critical and tv < 0.03, (stat, critical, tv)
    assert stats["forward_passes"] <= L  # never more passes than ordinary sampling
    # the same test rejects a sampler that is off: here, another temperature
    wrong = exact_probabilities(model, 1, **{**settings, "temperature": 1.3})
    stat, critical = chi_square(tokens, wrong)
    assert stat > 3 * critical


def test_jacobi_accepts_most_drafts_of_a_confident_model():
    # confident, and blind to the tokens before (zero token embeddings): drafts drawn from one
    # pass's p stay right in the next. (A random model that is confident but chaotic in the
    # previous token, as with token_scale 0.05, gains nothing: every correction moves the rest.)
    model = tiny(scale=3.0, token_scale=0.0, block_size=64, vocab_size=16)
    labels = torch.arange(3).repeat(4)
    ordinary, jacobi = {}, {}
    gpt.generate(model, labels, stats=ordinary)
    gpt.generate(model, labels, jacobi_window=16, stats=jacobi, generator=torch.Generator())
    assert ordinary["forward_passes"] == 64  # the prefill counts one
    assert jacobi["forward_passes"] < 64 / 3, jacobi


def test_jacobi_keeps_a_draft_unless_its_distribution_moved():
    """Coupled draft updates: on a Markov chain p(x_t | x_t-1) = 0.7 uniform + 0.3 [x_t = x_t-1]
    over 32 codes (a fake `feed`, no model), a draft after a rejection is redrawn only with the
    probability that its p moved (0.3 at most), so the next draft's context mostly stands and
    whole runs are accepted. Drawing those drafts from p independently, as plain SJD does,
    changes nearly all of them: 19 passes for 64 tokens (measured), against about 5.5 here."""
    vocab, length, eps, passes = 32, 64, 0.3, []
    for seed in range(20):
        tokens = torch.zeros(1, length, dtype=torch.long)
        generator = torch.Generator().manual_seed(seed)

        def feed(start, end, last):  # fed token j -> p (1, last, V) of token j + 1
            passes[-1] += 1
            prev = F.one_hot(tokens[:, end - last : end], vocab)
            return (1 - eps) / vocab + eps * prev

        passes.append(0)
        gpt._jacobi(feed, tokens, 1, length, 8, generator)
    assert sum(passes) / len(passes) < 9, passes


def test_jacobi_is_reproducible_and_window_0_is_ordinary_sampling():
    model, labels = tiny(block_size=16, vocab_size=8), torch.tensor([0, 1, 2, 0])
    run = lambda w, seed: gpt.generate(
        model, labels, cfg_scale=2.0, jacobi_window=w, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(5, 3), run(5, 3))
    assert torch.equal(
        run(0, 3), gpt.generate(model, labels, 2.0, generator=torch.Generator().manual_seed(3))
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_jacobi_decoding_on_gpu(device="cuda"):
    model, labels = tiny(block_size=16, vocab_size=8).to(device), torch.tensor([0, 1, 2, 0])
    labels = labels.to(device)
    run = lambda w, **kw: gpt.generate(model, labels, 2.0, jacobi_window=w, **kw)
    assert torch.equal(run(5, top_k=1), run(0, top_k=1))  # greedy: the same tokens
    seeded = lambda: run(16, generator=torch.Generator(device).manual_seed(0))
    assert torch.equal(seeded(), seeded())


def greedy(model, labels, prefix, steps):
    """Teacher-forced greedy continuation: one full forward pass per new token."""
    seq = prefix
    for _ in range(steps):
        logits, _ = model(seq, labels)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("window", [0, 3])
def test_prefix_is_kept_and_top_k_1_continues_greedily(window):
    model, labels = tiny(scale=1.0, block_size=16, vocab_size=8), torch.tensor([0, 1, 2])
    prefix = torch.randint(0, 8, (3, 6), generator=torch.Generator().manual_seed(0))
    stats = {}
    out = gpt.generate(model, labels, prefix=prefix, top_k=1, jacobi_window=window, stats=stats)
    assert torch.equal(out[:, :6], prefix)
    assert torch.equal(out, greedy(model, labels, prefix, 16 - 6))
    if window == 0:
        assert stats["forward_passes"] == 16 - 6  # one prefill (condition + prefix), then 9 steps
    with pytest.raises(ValueError, match="leaves nothing to sample"):
        gpt.generate(model, labels, prefix=torch.zeros(3, 16, dtype=torch.long))
