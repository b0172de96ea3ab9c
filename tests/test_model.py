"""AVME: ELBO terms, KL, importance-weighted bounds, sampling, checkpoints, bad inputs."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch.distributions import Normal

from avme_ext import AVME, AVMEConfig
from avme_ext.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from avme_ext.model import gaussian_kl
from helpers import DataSizeArgs

TINY: DataSizeArgs = {"data_dim": 12, "enc_hidden": 8, "dec_hidden": 6, "latent_dim": 3, "steps": 4}


def tiny_model(num_classes: int = 0, encoder_input: str = "canvas", seed: int = 0) -> AVME:
    torch.manual_seed(seed)
    return AVME(**TINY, num_classes=num_classes, encoder_input=encoder_input, impl="ref").double()


def binary_batch(batch: int, seed: int = 1, dim: int = TINY["data_dim"]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch, dim), generator=g).double()


def sampled_log_weights(model: AVME, x: torch.Tensor, y_vec: torch.Tensor | None, eps: torch.Tensor) -> torch.Tensor:
    """log p(x | z) + sum_t [log N(z_t; 0, I) - log q(z_t)] for z_t = mu_t + sigma_t * eps_t, from
    torch.distributions and BCE: (B, D), (B, C) or None, (K, B, Z) -> (B,)."""
    out = model.core(x, y_vec, eps)
    z = out.mu + torch.exp(0.5 * out.logvar) * eps
    q = Normal(out.mu, torch.exp(0.5 * out.logvar))
    prior = Normal(torch.zeros_like(z), torch.ones_like(z))
    log_px_z = -torch.nn.functional.binary_cross_entropy_with_logits(out.canvas, x, reduction="none").sum(1)
    log_prior_over_posterior: torch.Tensor = (prior.log_prob(z) - q.log_prob(z)).sum(dim=(0, 2))
    return log_px_z + log_prior_over_posterior


def test_analytic_kl_matches_monte_carlo_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(5, 3, generator=g, dtype=torch.float64) * 0.5
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    exact = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), exact)
    z = q.rsample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(monte_carlo, gaussian_kl(mu, logvar), rtol=0, atol=0.03)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_elbo_terms_and_loss(num_classes):
    model = tiny_model(num_classes)
    x = binary_batch(5)
    y = torch.tensor([0, 1, 2, 0, 1]) if num_classes else None
    eps = torch.randn(4, 5, 3, dtype=torch.float64)
    terms = model(x, y, eps=eps)
    out = model.core(x, None if y is None else torch.nn.functional.one_hot(y, 3).double(), eps)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.canvas, x, reduction="none").sum(1)
    torch.testing.assert_close(terms.reconstruction, bce)
    torch.testing.assert_close(terms.kl, gaussian_kl(out.mu, out.logvar).T)
    torch.testing.assert_close(terms.loss, bce + terms.kl.sum(1))
    loss, t2 = model.loss(x, y, kl_weight=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, (t2.reconstruction + 0.5 * t2.kl.sum(1)).mean())


@pytest.mark.parametrize(("num_classes", "encoder_input"), [(0, "canvas"), (3, "error")])
def test_iwae_with_one_sample_is_the_sampled_elbo(num_classes, encoder_input):
    model = tiny_model(num_classes, encoder_input)
    x = binary_batch(6)
    y = torch.tensor([0, 1, 2, 2, 1, 0]) if num_classes else None
    bound = model.iwae_bound(x, y, samples=1, generator=torch.Generator().manual_seed(7))
    eps = model.core.draw_noise(6, torch.Generator().manual_seed(7))
    torch.testing.assert_close(bound, sampled_log_weights(model, x, model.encode_labels(y, 6), eps))


def test_iwae_bound_uses_exactly_s_draws_per_image_in_any_chunking(monkeypatch):
    """S = 5 in calls of at most 3 trajectories (3 + 2 draws per image): the bound is
    logsumexp_s log w_s - log S over exactly the S draws each image got."""
    model = tiny_model(3, "error")
    x, y = binary_batch(3), torch.tensor([2, 0, 1])
    drawn: list[torch.Tensor] = []
    draw_noise = model.core.draw_noise

    def recording(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = draw_noise(batch_size, generator)
        drawn.append(eps)
        return eps

    monkeypatch.setattr(model.core, "draw_noise", recording)
    bound = model.iwae_bound(x, y, samples=5, max_rows=3, generator=torch.Generator().manual_seed(4))
    assert [eps.shape[1] for eps in drawn] == [3, 2] * 3  # one image per group: 3 draws, then the other 2
    y_vec = model.encode_labels(y, 3)
    assert y_vec is not None
    for i in range(3):
        eps = torch.cat(drawn[2 * i : 2 * i + 2], dim=1)
        log_w = sampled_log_weights(model, x[i].expand(5, -1), y_vec[i].expand(5, -1), eps)
        torch.testing.assert_close(bound[i], torch.logsumexp(log_w, 0) - math.log(5))


def test_iwae_is_no_worse_than_elbo_on_average_and_chunking_is_invisible():
    model = tiny_model(0)
    x = binary_batch(8)
    elbo = -model(x, generator=torch.Generator().manual_seed(0)).loss
    iwae = model.iwae_bound(x, samples=64, generator=torch.Generator().manual_seed(1))
    assert iwae.mean() > elbo.mean()
    # The same draws in different chunk layouts give the same bound.
    chunked = model.iwae_bound(x, samples=64, max_rows=10, generator=torch.Generator().manual_seed(1))
    one_go = model.iwae_bound(x, samples=64, max_rows=10_000, generator=torch.Generator().manual_seed(1))
    assert chunked.shape == one_go.shape == (8,)
    assert torch.isfinite(chunked).all()
    # Averages over different draws agree to Monte Carlo error.
    torch.testing.assert_close(chunked.mean(), one_go.mean(), rtol=0, atol=1.0)


def test_conditional_marginal_is_logsumexp_over_classes():
    model = tiny_model(3)
    x = binary_batch(4)
    per_class = model.class_log_likelihoods(x, samples=8, generator=torch.Generator().manual_seed(0))
    assert per_class.shape == (4, 3)
    marginal = AVME.marginal_from_class_bounds(per_class)
    torch.testing.assert_close(marginal, torch.logsumexp(per_class, 1) - math.log(3))
    assert (marginal <= per_class.max(1).values).all()
    with pytest.raises(ValueError, match="conditional"):
        tiny_model(0).class_log_likelihoods(x)


def test_sample_and_reconstruct_shapes_and_ranges():
    model = tiny_model(3)
    probs, steps = model.sample(
        y=torch.tensor([0, 1, 2]), return_steps=True, generator=torch.Generator().manual_seed(0)
    )
    assert probs.shape == (3, 12)
    assert steps is not None
    assert steps.shape == (4, 3, 12)
    assert ((probs >= 0) & (probs <= 1)).all()
    torch.testing.assert_close(steps[-1], probs)
    recon, _ = model.reconstruct(binary_batch(3), torch.tensor([0, 1, 2]))
    assert recon.shape == (3, 12)
    probs, none = tiny_model(0).sample(5)
    assert probs.shape == (5, 12)
    assert none is None
    with pytest.raises(ValueError, match="does not match"):
        model.sample(2, y=torch.tensor([0, 1, 2]))


def test_bad_model_inputs():
    model = tiny_model(3)
    x = binary_batch(3)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="x must be binary"):
        model(x * 0.5, y)
    nan_x = x.clone()
    nan_x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x must be binary"):
        model(nan_x, y)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        model(x, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        model(x, torch.tensor([-1, 1, 2]))
    with pytest.raises(TypeError, match="integer tensor of class labels"):
        model(x, y.double())
    with pytest.raises(ValueError, match=r"y must have shape \(3\)"):
        model(x, y[:2])
    with pytest.raises(ValueError, match="y is required"):
        model(x)
    with pytest.raises(ValueError, match="y must be None"):
        tiny_model(0)(x, y)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 12\)"):
        model(x[:, :5], y)
    with pytest.raises(TypeError, match="x must be a float, uint8 or bool"):
        model(x.long(), y)
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        model.iwae_bound(x, y, samples=0)


def test_uint8_and_bool_images_are_accepted():
    model = tiny_model(0)
    x = binary_batch(3)
    eps = torch.randn(4, 3, 3, dtype=torch.float64)
    ref = model(x, eps=eps).loss
    torch.testing.assert_close(model(x.to(torch.uint8), eps=eps).loss, ref)
    torch.testing.assert_close(model(x.bool(), eps=eps).loss, ref)


def test_config_round_trip_and_unknown_keys():
    config = AVMEConfig(num_classes=10, steps=3, encoder_input="error")
    assert AVMEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys"):
        AVMEConfig.from_dict({**config.to_dict(), "attention": True})
    with pytest.raises(ValueError, match="encoder_input"):
        AVMEConfig(encoder_input="diff")


def test_checkpoint_round_trip_with_optimizer_and_generator(tmp_path):
    model = tiny_model(3).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = binary_batch(4).float()
    y = torch.tensor([0, 1, 2, 0])
    model.loss(x, y)[0].backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    path = save_checkpoint(
        tmp_path / "run" / "last",
        model,
        optimizer=optimizer,
        rng_states={"noise": generator.get_state()},
        trainer_state={"epoch": 2, "step": 17},
    )
    assert path.name == "last.safetensors"
    assert path.with_suffix(".json").is_file()
    checkpoint = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert checkpoint.trainer_state == {"epoch": 2, "step": 17}
    assert checkpoint.config == model.config
    restored = torch.optim.Adam(tiny_model(3).float().parameters(), lr=1e-3)
    assert checkpoint.optimizer_state is not None
    restored.load_state_dict(checkpoint.optimizer_state)
    for original, reloaded in zip(optimizer.param_groups[0]["params"], restored.param_groups[0]["params"], strict=True):
        assert torch.equal(optimizer.state[original]["exp_avg_sq"], restored.state[reloaded]["exp_avg_sq"])
        assert torch.equal(optimizer.state[original]["step"], restored.state[reloaded]["step"])
    assert torch.equal(checkpoint.rng_states["noise"], generator.get_state())
    loaded = load_model(tmp_path / "run")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    assert not loaded.training


def test_checkpoint_errors(tmp_path):
    model = tiny_model(0).float()
    path = save_checkpoint(tmp_path / "ok", model)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        load_model(truncated)
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match=r"evil\.safetensors"):
        load_model(evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="expected"):
        load_model(path, expected_config=AVMEConfig(**TINY, num_classes=10))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no best\.safetensors"):
        load_model(tmp_path / "empty_run")
