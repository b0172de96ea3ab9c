"""Tests of avme_ext.evaluation on tiny models and a few dozen real binarized MNIST test images."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from avme_ext.data import ImageSplit, load_split
from avme_ext.evaluation import EvalResult, chunk_generator, chunk_seed, evaluate, merge_results
from avme_ext.model import AVME
from helpers import ModelArgs

SIZES: ModelArgs = {"enc_hidden": 24, "dec_hidden": 24, "latent_dim": 6, "steps": 4, "impl": "ref"}
NUM_IMAGES = 36
BATCH = 8  # 5 chunks of 8, 8, 8, 8, 4 images


def _train_a_little(model: AVME, steps: int = 25) -> AVME:
    """A few Adam steps on training images, so the posterior differs from the prior."""
    train = load_split("binarized_mnist", "train").subset(200, torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(2)
    for step in range(steps):
        x, y = train.batch(torch.arange(50 * (step % 4), 50 * (step % 4 + 1)))
        loss, _ = model.loss(x, y if model.num_classes else None, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def split() -> ImageSplit:
    return load_split("binarized_mnist", "test").subset(NUM_IMAGES, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model() -> AVME:
    torch.manual_seed(0)
    return _train_a_little(AVME(**SIZES))


@pytest.fixture(scope="module")
def cond_model() -> AVME:
    torch.manual_seed(1)
    return _train_a_little(AVME(num_classes=10, **SIZES))


def _assert_results_equal(a: EvalResult, b: EvalResult) -> None:
    assert a.samples == b.samples
    for name in EvalResult._PER_IMAGE:
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            assert torch.equal(va, vb), name


def test_nelbo_is_reconstruction_plus_kl(model, split):
    result = evaluate(model, split, batch_size=BATCH)
    assert len(result) == NUM_IMAGES
    assert torch.equal(result.indices, torch.arange(NUM_IMAGES))
    assert result.nelbo.dtype == torch.float64
    assert result.kl.shape == (NUM_IMAGES, model.steps)
    torch.testing.assert_close(result.nelbo, result.reconstruction + result.kl.sum(1), rtol=0, atol=1e-9)
    assert result.iwae_nll is None
    assert result.nll_given_y is None
    assert result.nll_marginal is None
    assert bool((result.kl >= 0).all())
    assert bool(torch.isfinite(result.nelbo).all())
    summary = result.summary()
    assert summary["num_images"] == NUM_IMAGES
    assert math.isclose(summary["nelbo"], summary["reconstruction"] + summary["kl"], rel_tol=1e-12)
    assert math.isclose(sum(summary["kl_per_step"]), summary["kl"], rel_tol=1e-9)
    assert "iwae_nll" not in summary


def test_summary_standard_errors_are_the_sample_std_over_root_n():
    """nelbo_sem and iwae_nll_sem: the sample standard deviation (n - 1) over sqrt(n), against numpy."""
    rng = np.random.default_rng(7)
    nelbo, iwae = rng.normal(90.0, 5.0, 6), rng.normal(88.0, 4.0, 6)
    result = EvalResult(
        indices=torch.arange(6),
        nelbo=torch.from_numpy(nelbo),
        reconstruction=torch.from_numpy(nelbo),
        kl=torch.zeros(6, 2, dtype=torch.float64),
        iwae_nll=torch.from_numpy(iwae),
        samples=4,
    )
    summary = result.summary()
    assert math.isclose(summary["nelbo_sem"], np.std(nelbo, ddof=1) / math.sqrt(6), rel_tol=1e-12)
    assert math.isclose(summary["iwae_nll_sem"], np.std(iwae, ddof=1) / math.sqrt(6), rel_tol=1e-12)
    one = EvalResult(indices=torch.arange(1), nelbo=torch.ones(1), reconstruction=torch.ones(1), kl=torch.zeros(1, 2))
    assert math.isnan(one.summary()["nelbo_sem"])  # one image: no spread to measure


def test_elbo_matches_model_forward_with_chunk_noise(model, split):
    result = evaluate(model, split, batch_size=BATCH, seed=5)
    x, _ = split.batch(torch.arange(BATCH, 2 * BATCH))
    with torch.no_grad():
        terms = model(x, generator=chunk_generator(5, 1, "cpu", "elbo"))
    torch.testing.assert_close(result.nelbo[BATCH : 2 * BATCH], terms.loss.double())


def test_gray_levels_are_binarized_from_each_chunks_data_stream(model):
    """Dynamic binarization: chunk i's images are Bernoulli(gray) draws from its own "data" stream
    (seed, i), and its ELBO noise from its "elbo" stream."""
    gray = torch.rand(NUM_IMAGES, 784, generator=torch.Generator().manual_seed(8))
    split = ImageSplit(gray, torch.zeros(NUM_IMAGES, dtype=torch.int64), False, "gray/test")
    assert split.dynamic
    result = evaluate(model, split, batch_size=BATCH, seed=3)
    for i, start in enumerate(range(0, NUM_IMAGES, BATCH)):
        x = torch.bernoulli(gray[start : start + BATCH], generator=chunk_generator(3, i, "cpu", "data"))
        with torch.no_grad():
            terms = model(x, generator=chunk_generator(3, i, "cpu", "elbo"))
        torch.testing.assert_close(result.nelbo[start : start + BATCH], terms.loss.double())


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_and_merged_equals_unsharded(model, split, world):
    full = evaluate(model, split, samples=3, batch_size=BATCH, seed=7)
    shards = [evaluate(model, split, samples=3, batch_size=BATCH, seed=7, shard=(r, world)) for r in range(world)]
    assert sum(len(s) for s in shards) == NUM_IMAGES
    assert len(shards[0]) == (20 if world == 2 else 16)  # chunks 0, 2, 4 (8 + 8 + 4) / 0, 3 (8 + 8)
    _assert_results_equal(merge_results(list(reversed(shards))), full)


def test_shard_without_chunks_is_empty_and_merges(model, split):
    tiny = split.subset(5, torch.Generator().manual_seed(3))  # one chunk only
    full = evaluate(model, tiny, samples=2, batch_size=BATCH)
    empty = evaluate(model, tiny, samples=2, batch_size=BATCH, shard=(1, 2))
    assert len(empty) == 0
    assert empty.iwae_nll is not None
    assert empty.kl.shape == (0, model.steps)
    _assert_results_equal(merge_results([empty, full]), full)


def test_deterministic_given_seed(model, split):
    a = evaluate(model, split, samples=2, batch_size=BATCH, seed=11)
    b = evaluate(model, split, samples=2, batch_size=BATCH, seed=11)
    _assert_results_equal(a, b)
    c = evaluate(model, split, samples=2, batch_size=BATCH, seed=12)
    assert not torch.equal(a.nelbo, c.nelbo)
    # The ELBO has its own random stream: asking for the IWAE does not change it.
    elbo_only = evaluate(model, split, batch_size=BATCH, seed=11)
    assert torch.equal(elbo_only.nelbo, a.nelbo)


def test_chunk_seeds_are_distinct_and_stable():
    seeds = {chunk_seed(s, i, stream) for s in range(3) for i in range(50) for stream in ("elbo", "iwae", "class")}
    assert len(seeds) == 3 * 50 * 3
    assert chunk_seed(0, 0, "elbo") == chunk_seed(0, 0, "elbo") < 2**63
    with pytest.raises(ValueError, match="stream"):
        chunk_seed(0, 0, "nope")


def test_iwae_one_sample_is_the_sampled_elbo_of_the_same_noise(model, split):
    """iwae_bound(S=1) = log p(x|z) + log p(z) - log q(z|x) for z from the identically seeded noise."""
    x, _ = split.batch(torch.arange(12))
    k, z_dim = model.steps, model.config.latent_dim
    bound = model.iwae_bound(x, None, 1, generator=torch.Generator().manual_seed(3))
    # iwae_bound draws eps of shape (K, n * S, Z) = (K, 12, Z) from the generator.
    eps = torch.randn((k, 12, z_dim), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        terms = model(x, eps=eps)
        out = model.core(x, None, eps)
    z = out.mu + torch.exp(0.5 * out.logvar) * eps
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(dim=(0, 2))
    log_q = Normal(out.mu, torch.exp(0.5 * out.logvar)).log_prob(z).sum(dim=(0, 2))
    sampled_elbo = -terms.reconstruction + log_prior - log_q
    torch.testing.assert_close(bound, sampled_elbo, rtol=1e-5, atol=1e-3)
    # Averaged over draws the sampled KL matches the analytic KL the negative ELBO uses.
    assert bound.shape == (12,)


def test_evaluate_iwae_uses_the_chunk_stream(model, split):
    result = evaluate(model, split, samples=3, batch_size=BATCH, seed=4, max_rows=7)
    x, _ = split.batch(torch.arange(2 * BATCH, 3 * BATCH))
    bound = model.iwae_bound(x, None, 3, max_rows=7, generator=chunk_generator(4, 2, "cpu", "iwae"))
    assert result.iwae_nll is not None
    torch.testing.assert_close(result.iwae_nll[2 * BATCH : 3 * BATCH], -bound.double())
    summary = result.summary()
    assert summary["iwae_samples"] == 3
    assert math.isfinite(summary["iwae_nll"])


def test_iwae_64_is_no_worse_than_the_elbo(model, split):
    iwae = evaluate(model, split, samples=64, batch_size=BATCH, seed=0)
    elbo_mean = torch.stack([evaluate(model, split, batch_size=BATCH, seed=s).nelbo for s in range(4)]).mean()
    one = evaluate(model, split, samples=1, batch_size=BATCH, seed=0)
    assert iwae.iwae_nll is not None
    assert one.iwae_nll is not None
    assert float(iwae.iwae_nll.mean()) <= float(elbo_mean)
    assert float(iwae.iwae_nll.mean()) <= float(one.iwae_nll.mean())


def test_conditional_marginal_is_logsumexp_of_class_bounds(cond_model, split):
    result = evaluate(cond_model, split, samples=3, batch_size=BATCH, seed=2)
    assert result.iwae_nll is not None
    assert result.nll_given_y is not None
    assert result.nll_marginal is not None
    assert result.class_nll is not None
    c = cond_model.num_classes
    assert result.class_nll.shape == (NUM_IMAGES, c)
    expected = -(torch.logsumexp(-result.class_nll, dim=1) - math.log(c))
    torch.testing.assert_close(result.nll_marginal, expected)
    torch.testing.assert_close(result.nll_given_y, result.class_nll.gather(1, split.labels.view(-1, 1)).squeeze(1))
    assert torch.equal(result.iwae_nll, result.nll_given_y)
    # p(x) >= p(x|y) p(y) with a uniform prior, and p(x) <= max_c p(x|c).
    assert bool((result.nll_marginal <= result.nll_given_y + math.log(c) + 1e-9).all())
    assert bool((result.nll_marginal >= result.class_nll.min(dim=1).values - 1e-9).all())
    # The class table is model.class_log_likelihoods with the chunk's "class" stream.
    x, _ = split.batch(torch.arange(BATCH))
    table = cond_model.class_log_likelihoods(x, 3, generator=chunk_generator(2, 0, "cpu", "class"))
    torch.testing.assert_close(result.class_nll[:BATCH], -table.double())
    summary = result.summary()
    assert {"nll_given_y", "nll_marginal", "iwae_nll"} <= set(summary)


def test_conditional_without_marginal(cond_model, split):
    result = evaluate(cond_model, split, samples=2, batch_size=BATCH, marginal=False)
    assert result.nll_marginal is None
    assert result.class_nll is None
    assert result.iwae_nll is not None
    assert result.nll_given_y is not None
    assert torch.equal(result.iwae_nll, result.nll_given_y)
    x, y = split.batch(torch.arange(BATCH))
    bound = cond_model.iwae_bound(x, y, 2, generator=chunk_generator(0, 0, "cpu", "iwae"))
    torch.testing.assert_close(result.nll_given_y[:BATCH], -bound.double())
    assert "nll_marginal" not in result.summary()


def test_conditional_sharding_and_determinism(cond_model, split):
    full = evaluate(cond_model, split, samples=2, batch_size=BATCH, seed=9)
    shards = [evaluate(cond_model, split, samples=2, batch_size=BATCH, seed=9, shard=(r, 2)) for r in range(2)]
    _assert_results_equal(merge_results(shards), full)


def test_errors(model, cond_model, split):
    with pytest.raises(ValueError, match="shard"):
        evaluate(model, split, shard=(2, 2))
    with pytest.raises(ValueError, match="samples"):
        evaluate(model, split, samples=-1)
    unlabeled = ImageSplit(split.images, torch.full_like(split.labels, -1), True, "nolabels")
    with pytest.raises(ValueError, match="labels"):
        evaluate(cond_model, unlabeled)
    with pytest.raises(ValueError, match="at least one"):
        merge_results([])
    part = evaluate(model, split, batch_size=BATCH, shard=(0, 2))
    with pytest.raises(ValueError, match="more than one"):
        merge_results([part, part])
    with pytest.raises(ValueError, match="different samples"):
        merge_results([part, evaluate(model, split, samples=1, batch_size=BATCH, shard=(1, 2))])


def test_progress_bar_does_not_change_results(model, split, capsys):
    a = evaluate(model, split, samples=1, batch_size=BATCH, progress=True)
    err = capsys.readouterr().err
    assert "nelbo=" in err
    _assert_results_equal(a, evaluate(model, split, samples=1, batch_size=BATCH))


def test_chunk_seed_is_the_eval_namespace_of_derive_seed():
    from avme_ext.seeds import derive_seed

    # values of the former private hash, so results of earlier evaluations stay reproducible
    known = {
        (0, 0, "elbo"): 6561077256986760138,
        (7, 3, "iwae"): 3966894830935414917,
        (123, 45, "class"): 8206139814530748599,
        (2**40, 9, "data"): 4943704000034059393,
    }
    for (seed, chunk, stream), value in known.items():
        assert chunk_seed(seed, chunk, stream) == value == derive_seed("avme-eval", seed, chunk, stream)


def test_gather_across_ranks_merges_what_all_ranks_send(model, split, monkeypatch):
    """gather_across_ranks = merge_results(distributed.all_gather_objects(result on the CPU))."""
    import avme_ext.distributed as D
    from avme_ext.evaluation import gather_across_ranks

    full = evaluate(model, split, samples=2, batch_size=BATCH, seed=3)
    shards = [evaluate(model, split, samples=2, batch_size=BATCH, seed=3, shard=(r, 3)) for r in range(3)]
    sent = []

    def all_gather_objects(obj):
        sent.append(obj)
        return [shards[2], obj, shards[1]]  # what ranks 2, 0 and 1 sent, in any order

    monkeypatch.setattr(D, "all_gather_objects", all_gather_objects, raising=False)
    merged = gather_across_ranks(shards[0])
    assert len(sent) == 1
    assert sent[0].nelbo.device.type == "cpu"
    _assert_results_equal(merged, full)


class _RecordingBar:
    """Stands in for tqdm: records the total and every update."""

    instances: ClassVar[list[_RecordingBar]] = []

    def __init__(self, *args, total=None, **kwargs):
        self.total, self.updates, self.closed = total, [], False
        _RecordingBar.instances.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        self.closed = True


@pytest.mark.parametrize("conditional", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_progress_moves_within_a_chunk(model, cond_model, split, monkeypatch, conditional):
    """One chunk of 36 images, S=4, at most 8 trajectories at once: the bar moves every 2 images (and
    every class for the marginal), and the results are those of whole-chunk IWAE calls."""
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    _RecordingBar.instances.clear()
    net = cond_model if conditional else model
    result = evaluate(net, split, samples=4, batch_size=NUM_IMAGES, max_rows=8, seed=1, progress=True)
    (bar,) = _RecordingBar.instances
    passes = 10 if conditional else 1
    assert bar.total == NUM_IMAGES * passes
    assert sum(bar.updates) == bar.total
    assert bar.closed
    assert bar.updates == [2] * (NUM_IMAGES // 2 * passes)
    x, _ = split.batch(torch.arange(NUM_IMAGES))
    if conditional:
        table = net.class_log_likelihoods(x, 4, max_rows=8, generator=chunk_generator(1, 0, "cpu", "class"))
        torch.testing.assert_close(result.class_nll, -table.double(), rtol=0, atol=0)
    else:
        bound = net.iwae_bound(x, None, 4, max_rows=8, generator=chunk_generator(1, 0, "cpu", "iwae"))
        torch.testing.assert_close(result.iwae_nll, -bound.double(), rtol=0, atol=0)


def test_progress_counts_images_for_the_elbo(model, split, monkeypatch):
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    _RecordingBar.instances.clear()
    evaluate(model, split, batch_size=BATCH, progress=True, shard=(1, 2))
    (bar,) = _RecordingBar.instances
    assert bar.total == 16
    assert bar.updates == [8, 8]


def test_estimate_cost_counts_trajectories_and_measures_a_rate(model, cond_model):
    from avme_ext.evaluation import estimate_cost

    generator_state = torch.get_rng_state()
    plain = estimate_cost(model, 30, samples=50, max_rows=256, pilot_seconds=0.01)
    assert torch.equal(torch.get_rng_state(), generator_state)  # the pilot draws from its own generator
    assert plain.trajectories == 30 * (1 + 50)
    assert math.isfinite(plain.seconds)
    assert plain.seconds > 0
    assert plain.trajectories_per_second > 0
    assert plain.calls == 1 + 6  # one chunk of 30 images: its ELBO pass, then the IWAE in 6 groups of 5 * 50 rows
    assert math.isclose(
        plain.seconds, plain.calls * plain.seconds_per_call + plain.trajectories / plain.trajectories_per_second
    )
    marginal = estimate_cost(cond_model, 30, samples=50, max_rows=256, pilot_seconds=0.01)
    assert marginal.trajectories == 30 * (1 + 50 * 10)
    assert estimate_cost(cond_model, 30, samples=50, marginal=False, pilot_seconds=0.01).trajectories == 30 * 51
    assert estimate_cost(model, 30, pilot_seconds=0.01).trajectories == 30
    with pytest.raises(ValueError, match="num_images"):
        estimate_cost(model, -1)
