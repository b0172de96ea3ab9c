"""The pixel likelihoods (avme_ext.likelihoods): the discretized logistic's probabilities, gradients and
draws; the model's config, ELBO, IWAE and evaluation with either likelihood; and the Bernoulli path
against numbers written by the code from before the likelihood option.

``tests/data/checkpoint_before_likelihood.safetensors`` was written by the package as it was before
``AVMEConfig.likelihood`` existed: a float32 AVME(data_dim=12, num_classes=3, enc_hidden=5,
dec_hidden=4, latent_dim=3, steps=3) saved with ``save_checkpoint``, its trainer state holding inputs
and what that code computed from them in float64 (ELBO terms, IWAE bounds with S=6, and
``evaluate(..., samples=5, batch_size=3, seed=4).summary()`` on seven binary images).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import pytest
import torch

from avme_ext.checkpoint import load_checkpoint, load_model, save_checkpoint
from avme_ext.config import AVMEConfig, default_image_shape
from avme_ext.data import ImageSplit
from avme_ext.evaluation import evaluate, merge_results
from avme_ext.likelihoods import (
    BINS,
    INIT_LOG_SCALE,
    LOG_SCALE_MAX,
    LOG_SCALE_MIN,
    BernoulliLikelihood,
    DiscretizedLogistic,
    discretized_logistic_log_prob,
)
from avme_ext.model import AVME
from avme_ext.results import bits_per_dim
from helpers import ModelArgs

OLD_CHECKPOINT = Path(__file__).resolve().parent / "data" / "checkpoint_before_likelihood.safetensors"
SMALL: ModelArgs = {"enc_hidden": 8, "dec_hidden": 8, "latent_dim": 3, "steps": 3, "impl": "ref"}
LEVELS = torch.arange(BINS, dtype=torch.float64) / (BINS - 1)  # every value of an 8-bit pixel


class InMemorySplit:
    """What :func:`evaluate` reads of an ImageSplit, over images held as they are fed to the model."""

    name = "memory/test"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.images = images
        self.labels = labels if labels is not None else torch.full((images.shape[0],), -1, dtype=torch.int64)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all())

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index, generator=None, device=None, dtype=torch.float32):
        return self.images[index].to(device=device, dtype=dtype), self.labels[index].to(device)


def in_memory_split(images: torch.Tensor, labels: torch.Tensor | None = None) -> ImageSplit:
    """An :class:`InMemorySplit`, typed as the ImageSplit it stands in for (it has what evaluate reads)."""
    return cast(ImageSplit, InMemorySplit(images, labels))


def eight_bit(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random 8-bit intensities k/255 (float32), with the edge values 0 and 1 present."""
    x = torch.randint(0, BINS, shape, generator=torch.Generator().manual_seed(seed)).float() / (BINS - 1)
    x.view(-1)[:2] = torch.tensor([0.0, 1.0])
    return x


def logistic_of(model: AVME) -> DiscretizedLogistic:
    """The likelihood of a model made with ``likelihood="logistic"``."""
    likelihood = model.likelihood
    assert isinstance(likelihood, DiscretizedLogistic), likelihood
    return likelihood


def logistic_model(image_shape=(3, 4, 4), seed: int = 0, **kwargs) -> AVME:
    torch.manual_seed(seed)
    return AVME(data_dim=math.prod(image_shape), likelihood="logistic", image_shape=image_shape, **{**SMALL, **kwargs})


# --------------------------------------------------------------------------- the distribution
@pytest.mark.parametrize("log_scale", [LOG_SCALE_MIN, -5.0, INIT_LOG_SCALE, LOG_SCALE_MAX])
def test_probabilities_of_the_256_values_sum_to_one(log_scale):
    means = torch.tensor([0.0, 1e-7, 0.3, 0.5, 0.97, 1.0 - 1e-7, 1.0], dtype=torch.float64)
    log_p = discretized_logistic_log_prob(LEVELS[:, None], means[None, :], torch.tensor(log_scale, dtype=torch.float64))
    assert log_p.shape == (BINS, len(means))
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.exp().sum(dim=0), torch.ones_like(means), rtol=0, atol=1e-12)


def test_colour_probabilities_sum_to_one_per_channel_with_their_own_scales():
    likelihood = DiscretizedLogistic((3, 2, 2), dtype=torch.float64)
    with torch.no_grad():
        likelihood.log_scale.copy_(torch.tensor([-6.0, -3.0, -1.0]))
    canvas = torch.randn(1, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    # every pixel takes every value: 256 "images" whose pixel d is value k
    log_p = likelihood.log_prob(canvas.expand(BINS, 12), LEVELS[:, None].expand(BINS, 12))
    torch.testing.assert_close(log_p.exp().sum(dim=0), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)
    pixel_scales = likelihood.pixel_log_scale()
    assert pixel_scales.tolist() == [-6.0] * 4 + [-3.0] * 4 + [-1.0] * 4  # channel c owns its H*W pixels


def brute_force_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: float) -> torch.Tensor:
    """log of the logistic's mass on each value's bin, edges to +-inf: the difference of its CDF below
    the mean and of its survival function above it (so the small numbers are computed, not cancelled)."""
    half = 0.5 / (BINS - 1)
    scale = math.exp(log_scale)
    a, b = (x + half - mean) / scale, (x - half - mean) / scale
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    below = torch.where(x >= 1, one, torch.sigmoid(a)) - torch.where(x <= 0, zero, torch.sigmoid(b))
    above = torch.where(x <= 0, one, torch.sigmoid(-b)) - torch.where(x >= 1, zero, torch.sigmoid(-a))
    return torch.log(torch.where(x > mean, above, below))


@pytest.mark.parametrize("log_scale", [LOG_SCALE_MIN, -4.0, INIT_LOG_SCALE, LOG_SCALE_MAX])
def test_float32_log_prob_matches_float64_brute_force_into_the_far_tails(log_scale):
    """Where the float64 CDF difference is still accurate (probabilities down to 1e-200) the float32
    formula agrees; a float32 CDF difference would give -inf for most of these."""
    mean = torch.tensor([1e-6, 0.2, 0.5, 0.9, 1.0 - 1e-6], dtype=torch.float64)
    x, m = torch.broadcast_tensors(LEVELS[:, None], mean[None, :])
    expected = brute_force_log_prob(x, m, log_scale)
    usable = expected > -460  # the float64 difference of two numbers of about e^-460 is still exact enough
    got = discretized_logistic_log_prob(x.float(), m.float(), torch.tensor(log_scale))
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double()[usable], expected[usable], rtol=2e-5, atol=2e-5)
    if log_scale == LOG_SCALE_MIN:
        naive = brute_force_log_prob(x.float(), m.float(), log_scale)
        assert (~torch.isfinite(naive)).any()  # what the identity avoids in float32


def test_values_near_a_bin_centre_get_that_bins_probability():
    """x need only be near k/255 (float16 data is within 1/8 of a bin): its log-probability is value k's, exactly."""
    likelihood = DiscretizedLogistic((1, 4, 4), dtype=torch.float64)
    x = eight_bit((3, 16), seed=5).double()
    canvas = torch.randn(3, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2
    exact = likelihood.log_prob(canvas, x)
    for offset in (-0.2 / 255, 0.2 / 255):
        torch.testing.assert_close(likelihood.log_prob(canvas, (x + offset).clamp(0, 1)), exact, rtol=0, atol=0)
    torch.testing.assert_close(likelihood.log_prob(canvas, x.half().double()), exact, rtol=0, atol=0)


def test_bernoulli_log_prob_is_the_log_of_each_pixels_probability():
    """log p(x_d | s_K) = log sigmoid(s) for a 1 and log(1 - sigmoid(s)) for a 0; nll is minus its sum."""
    generator = torch.Generator().manual_seed(7)
    canvas = torch.randn(3, 10, generator=generator, dtype=torch.float64) * 3
    x = torch.randint(0, 2, (3, 10), generator=generator).double()
    p = torch.sigmoid(canvas)
    expected = torch.log(torch.where(x == 1, p, 1 - p))
    likelihood = BernoulliLikelihood()
    torch.testing.assert_close(likelihood.log_prob(canvas, x), expected)
    torch.testing.assert_close(likelihood.nll(canvas, x), -expected.sum(dim=1))


def test_gradients_are_finite_and_correct_at_the_edges_and_in_the_tails():
    x = torch.tensor([0.0, 0.0, 1.0, 1.0, 1 / 255, 254 / 255, 0.5, 0.5], dtype=torch.float64)
    canvas = torch.tensor([-30.0, 30.0, 30.0, -30.0, -12.0, 12.0, 25.0, -25.0], dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(
        [LOG_SCALE_MIN, -3.0, 0.0, -1.0, LOG_SCALE_MIN, -4.0, -6.0, -6.0], dtype=torch.float64, requires_grad=True
    )

    def fn(canvas, log_scale):
        return discretized_logistic_log_prob(x, torch.sigmoid(canvas), log_scale)

    assert torch.autograd.gradcheck(fn, (canvas, log_scale))
    fn(canvas, log_scale).sum().backward()
    assert canvas.grad is not None
    assert log_scale.grad is not None
    assert torch.isfinite(canvas.grad).all()
    assert torch.isfinite(log_scale.grad).all()
    # float32, saturated canvases and a log-scale beyond the clamp: still finite
    likelihood = DiscretizedLogistic((1, 2, 4))
    with torch.no_grad():
        likelihood.log_scale.fill_(-50.0)
    canvas32 = (canvas.detach().float() * 10).requires_grad_()
    likelihood.nll(canvas32.view(1, 8), x.float().view(1, 8)).sum().backward()
    assert canvas32.grad is not None
    assert likelihood.log_scale.grad is not None
    assert torch.isfinite(canvas32.grad).all()
    assert torch.isfinite(likelihood.log_scale.grad).all()


def test_log_scale_is_a_per_channel_parameter_clamped_where_used():
    model = logistic_model((3, 2, 2))
    state = model.state_dict()
    assert state["likelihood.log_scale"].shape == (3,)
    assert state["likelihood.log_scale"].tolist() == [INIT_LOG_SCALE] * 3
    assert sorted(k for k in state if not k.startswith("core.")) == ["likelihood.log_scale"]
    likelihood = logistic_of(model)
    with torch.no_grad():
        likelihood.log_scale.copy_(torch.tensor([-100.0, -2.0, 100.0]))
    used = likelihood.pixel_log_scale().view(3, 4)
    torch.testing.assert_close(used, torch.tensor([LOG_SCALE_MIN, -2.0, LOG_SCALE_MAX]).view(3, 1).expand(3, 4))
    model.reset_parameters()
    assert likelihood.log_scale.tolist() == [INIT_LOG_SCALE] * 3


def test_a_draw_of_the_pixels_follows_the_probabilities():
    likelihood = DiscretizedLogistic((1, 1, 1), dtype=torch.float64)
    with torch.no_grad():
        likelihood.log_scale.fill_(math.log(0.02))
    means = torch.tensor([[0.003]], dtype=torch.float64).expand(200_000, 1)  # an edge bin with a lot of mass
    draws = likelihood.sample(means, generator=torch.Generator().manual_seed(0))
    levels = draws * (BINS - 1)
    assert torch.equal(levels, levels.round())
    assert draws.min() >= 0
    assert draws.max() <= 1
    counts = torch.bincount(levels.long().view(-1), minlength=BINS).double() / draws.numel()
    canvas = torch.logit(means[:1]).expand(BINS, 1)
    expected = likelihood.log_prob(canvas, LEVELS[:, None]).exp().view(-1)
    assert expected[0] > 0.4
    torch.testing.assert_close(counts, expected, rtol=0, atol=4e-3)


# --------------------------------------------------------------------------- config
def test_config_fields_round_trip_through_json_and_old_configs_load():
    config = AVMEConfig(data_dim=3072, likelihood="logistic", image_shape=[3, 32, 32])  # type: ignore[arg-type]  # a list, as JSON has it
    assert config.image_shape == (3, 32, 32)
    assert config.channels == 3
    assert AVMEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    old = {
        "data_dim": 784,
        "num_classes": 10,
        "enc_hidden": 400,
        "dec_hidden": 400,
        "latent_dim": 100,
        "steps": 12,
        "encoder_input": "canvas",
    }  # a config.json written before these fields
    loaded = AVMEConfig.from_dict(old)
    assert loaded.likelihood == "bernoulli"
    assert loaded.image_shape is None
    assert loaded.resolved_image_shape == (1, 28, 28)
    # the shape a config implies is stored as None, so one model has one config however it is written
    assert AVMEConfig(image_shape=(1, 28, 28)) == AVMEConfig()
    assert AVMEConfig(data_dim=50).resolved_image_shape == default_image_shape(50) == (1, 1, 50)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"likelihood": "gaussian"}, r"likelihood must be one of \('bernoulli', 'logistic'\), got 'gaussian'"),
        (
            {"data_dim": 784, "image_shape": (3, 28, 28)},
            r"image_shape \(3, 28, 28\) holds 2352 pixels but data_dim is 784",
        ),
        ({"data_dim": 12, "image_shape": (3, 4)}, r"image_shape must be \(channels, height, width\), got \(3, 4\)"),
        ({"data_dim": 12, "image_shape": (3, 0, 4)}, r"image_shape's height must be an integer >= 1"),
        ({"data_dim": 12, "image_shape": "3x2x2"}, r"image_shape must be \(channels, height, width\)"),
    ],
)
def test_bad_config_fields_are_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        AVMEConfig(**fields)
    with pytest.raises(ValueError, match=message):
        AVME(**fields, device="meta")


def test_logistic_model_checkpoint_round_trip(tmp_path):
    model = logistic_model((3, 2, 2))
    with torch.no_grad():
        logistic_of(model).log_scale.copy_(torch.tensor([-3.0, -2.5, -4.0]))
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.image_shape == (3, 2, 2)
    assert torch.equal(logistic_of(loaded).log_scale, logistic_of(model).log_scale)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"]["likelihood"] == "logistic"
    assert meta["config"]["image_shape"] == [3, 2, 2]


# --------------------------------------------------------------------------- data checks
def test_logistic_data_must_be_eight_bit_intensities():
    model = logistic_model((1, 2, 3))
    good = eight_bit((2, 6), seed=0)
    model(good)  # accepted
    model(good.double())  # any float dtype
    with pytest.raises(TypeError, match="divide 8-bit pixels by 255"):
        model((good * 255).to(torch.uint8))
    between_bins = good.clamp(max=254 / 255) + 0.5 / 255  # inside [0, 1], but half a bin from every k/255
    for bad in (good + 0.5 / 255, good * 1.01 + 0.02, between_bins, torch.full((2, 6), float("nan"))):
        with pytest.raises(ValueError, match=r"x must hold 8-bit intensities k/255"):
            model(bad)
    with pytest.raises(ValueError, match="binary"):  # the Bernoulli model still wants 0/1 pixels
        AVME(data_dim=6, **SMALL)(good)


# --------------------------------------------------------------------------- ELBO, IWAE, evaluation
@pytest.mark.parametrize("image_shape", [(1, 4, 4), (3, 4, 4)])
@pytest.mark.parametrize("encoder_input", ["canvas", "error"])
def test_logistic_elbo_and_iwae(image_shape, encoder_input):
    model = logistic_model(image_shape, encoder_input=encoder_input, num_classes=2)
    d = math.prod(image_shape)
    x, y = eight_bit((5, d), seed=1), torch.tensor([0, 1, 1, 0, 1])
    eps = model.core.draw_noise(5, torch.Generator().manual_seed(2))
    terms = model(x, y, eps=eps)
    assert terms.reconstruction.shape == (5,)
    assert terms.kl.shape == (5, SMALL["steps"])
    canvas = model.core(x, torch.nn.functional.one_hot(y, 2).float(), eps).canvas
    expected = -discretized_logistic_log_prob(x, torch.sigmoid(canvas), logistic_of(model).pixel_log_scale()).sum(1)
    torch.testing.assert_close(terms.reconstruction, expected)
    assert (terms.reconstruction > 0).all()  # a discrete likelihood: -log P >= 0
    loss, _ = model.loss(x, y, eps=eps)
    loss.backward()
    log_scale_grad = logistic_of(model).log_scale.grad
    assert log_scale_grad is not None
    assert torch.isfinite(log_scale_grad).all()
    bound = model.iwae_bound(x, y, samples=7, max_rows=10, generator=torch.Generator().manual_seed(3))
    assert bound.shape == (5,)
    assert torch.isfinite(bound).all()
    assert (bound < 0).all()
    # the IWAE weights use the same likelihood: log w = log p(z) - log q(z) - (the ELBO's reconstruction)
    out = model.core(x, torch.nn.functional.one_hot(y, 2).float(), eps)
    z = out.mu + torch.exp(0.5 * out.logvar) * eps
    log_prior_over_posterior = 0.5 * (eps.square() - z.square() + out.logvar).sum(dim=(0, 2))
    weights = model.log_weights(x, torch.nn.functional.one_hot(y, 2).float(), eps)
    torch.testing.assert_close(weights, log_prior_over_posterior - terms.reconstruction)


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2.0), 784) == pytest.approx(1.0)
    assert bits_per_dim(100.0, 3072) == pytest.approx(100.0 / (3072 * math.log(2.0)))
    assert math.isnan(bits_per_dim(math.nan, 10))
    with pytest.raises(ValueError, match="data_dim must be an integer >= 1"):
        bits_per_dim(1.0, 0)


def test_evaluation_names_the_likelihood_and_reports_bits_per_dim():
    model = logistic_model((3, 2, 2), num_classes=2)
    split = in_memory_split(eight_bit((7, 12), seed=4), torch.tensor([0, 1, 0, 1, 1, 0, 0]))
    result = evaluate(model, split, samples=4, batch_size=3, seed=1)
    summary = result.summary()
    assert summary["likelihood"] == "logistic"
    assert summary["data_dim"] == 12
    for key in ("nelbo", "iwae_nll", "nll_given_y", "nll_marginal"):
        assert summary[f"{key}_bits_per_dim"] == pytest.approx(summary[key] / (12 * math.log(2.0)), rel=1e-12), key
    shards = [evaluate(model, split, samples=4, batch_size=3, seed=1, shard=(r, 2)) for r in range(2)]
    assert merge_results(shards).summary() == summary
    logistic_elbo = evaluate(model, split, batch_size=3, shard=(0, 2))
    bernoulli_elbo = evaluate(
        AVME(data_dim=12, num_classes=2, **SMALL),
        in_memory_split(torch.ones(7, 12), split.labels),
        batch_size=3,
        shard=(1, 2),
    )
    with pytest.raises(ValueError, match=r"different models \(likelihood, data_dim\)"):
        merge_results([logistic_elbo, bernoulli_elbo])


# --------------------------------------------------------------------------- the Bernoulli path as it was
def test_checkpoint_from_before_the_likelihood_option_loads_and_computes_the_same():
    checkpoint = load_checkpoint(OLD_CHECKPOINT)
    assert checkpoint.config == AVMEConfig(
        data_dim=12, num_classes=3, enc_hidden=5, dec_hidden=4, latent_dim=3, steps=3
    )
    assert checkpoint.config.likelihood == "bernoulli"
    expected = checkpoint.trainer_state["expected"]
    model = load_model(OLD_CHECKPOINT, dtype=torch.float64, impl="ref")
    assert set(model.state_dict()) == set(checkpoint.model_state)  # the Bernoulli has no parameters
    x, y = torch.tensor(expected["x"], dtype=torch.float64), torch.tensor(expected["y"])
    terms = model(x, y, eps=torch.tensor(expected["eps"], dtype=torch.float64))
    torch.testing.assert_close(terms.reconstruction.tolist(), expected["reconstruction"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.kl.tolist(), expected["kl"], rtol=1e-12, atol=1e-12)
    iwae = model.iwae_bound(x, y, samples=6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(iwae.tolist(), expected["iwae"], rtol=1e-12, atol=1e-12)

    split = in_memory_split(
        torch.tensor(expected["split_images"], dtype=torch.uint8), torch.tensor(expected["split_labels"])
    )
    summary = evaluate(model, split, samples=5, batch_size=3, seed=4).summary()
    old = expected["eval_summary"]
    for key, value in old.items():  # every key as it was ...
        assert summary[key] == pytest.approx(value, rel=1e-12), key
    added = set(summary) - set(old)  # ... and only additions
    assert added == {
        "likelihood",
        "data_dim",
        "nelbo_bits_per_dim",
        "iwae_nll_bits_per_dim",
        "nll_given_y_bits_per_dim",
        "nll_marginal_bits_per_dim",
    }
    assert summary["likelihood"] == "bernoulli"
    assert summary["data_dim"] == 12


def test_avme_eval_names_the_likelihood_and_prints_bits_per_dim(tmp_path, capsys):
    """A logistic model of 28x28 grey images evaluated by the command line (binary images are 8-bit
    intensities too: k = 0 or 255)."""
    from avme_ext.cli import main

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "grey.safetensors", AVME(likelihood="logistic", **SMALL))
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            str(path),
            "--samples",
            "2",
            "--num-images",
            "6",
            "--batch-size",
            "3",
            "--json",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["likelihood"] == "logistic"
    assert summary["data_dim"] == 784
    assert "logistic likelihood" in printed
    assert "D = 784" in printed
    assert f"({summary['iwae_nll_bits_per_dim']:.4f} bits/dim)" in printed
    assert f"({summary['nelbo_bits_per_dim']:.4f} bits/dim)" in printed
    assert json.loads(out.read_text())["provenance"]["model_config"]["likelihood"] == "logistic"
