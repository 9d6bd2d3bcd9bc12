"""Gated PixelCNN prior and its sampler: causality, no blind spot, conditioning, sampling."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipeline.core.config import ConditioningConfig, PriorConfig
from pipeline.core.labels import covariate_codes, covariate_schema
from pipeline.inference.autoregressive import sample_codes
from pipeline.models.pixelcnn import GatedPixelCNN

COND = ConditioningConfig(sinusoidal_dim=8, dim=16)


def _model(n_layers: int = 2, kernel_size: int = 3, channels: int = 8, num_codes: int = 6):
    torch.manual_seed(0)
    cfg = PriorConfig(channels=channels, n_layers=n_layers, kernel_size=kernel_size)
    return GatedPixelCNN(num_codes, cfg, COND).eval()


def _input_gradients(model: GatedPixelCNN, side: int) -> torch.Tensor:
    """|d logits(i) / d embedded input(j)| summed over channels: (side*side, side, side)."""
    captured: list[torch.Tensor] = []
    model.layers[0].register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    codes = torch.randint(
        0, model.num_codes, (1, side, side), generator=torch.Generator().manual_seed(1)
    )
    logits = model(codes, torch.tensor([0.3]))
    weights = torch.randn(model.num_codes, generator=torch.Generator().manual_seed(2))
    grads = []
    for r in range(side):
        for c in range(side):
            (g,) = torch.autograd.grad(logits[0, :, r, c] @ weights, captured[0], retain_graph=True)
            grads.append(g[0].abs().sum(0))
    return torch.stack(grads)


@pytest.mark.parametrize(("n_layers", "kernel_size"), [(1, 3), (3, 3), (2, 5)])
def test_logits_depend_only_on_earlier_positions_without_blind_spot(
    n_layers: int, kernel_size: int
) -> None:
    side = 6
    model = _model(n_layers, kernel_size)
    grads = _input_gradients(model, side)
    reach = (kernel_size // 2) * (n_layers + 1)  # columns reached by n_layers + 1 layers
    for i in range(side * side):
        r, c = divmod(i, side)
        flat = grads[i].flatten()
        assert torch.all(flat[i:] == 0), f"position {(r, c)} sees its own or a later input"
        if c > 0:
            assert grads[i][r, c - 1] > 0, f"{(r, c)} does not see its left neighbour"
        if r > 0:
            for cc in range(max(0, c - reach), min(side, c + reach + 1)):
                assert grads[i][r - 1, cc] > 0, f"{(r, c)} has a blind spot at {(r - 1, cc)}"


def test_every_layer_is_conditioned_on_z() -> None:
    model = _model(n_layers=3).train()
    codes = torch.randint(0, model.num_codes, (4, 5, 5), generator=torch.Generator().manual_seed(0))
    logits = model(codes, torch.tensor([0.0, 0.3, 0.6, 1.0]))
    assert logits.shape == (4, model.num_codes, 5, 5)
    logits.logsumexp(1).sum().backward()
    for layer in model.layers:
        assert layer.cond.weight.grad is not None and layer.cond.weight.grad.abs().sum() > 0
    same = model(codes[:1].expand(2, -1, -1), torch.tensor([0.1, 0.9]))
    assert not torch.allclose(same[0], same[1])


def test_dropout_acts_in_training_only() -> None:
    """``prior.dropout``: training forwards drop features (two passes differ); in eval mode the
    network equals the same weights without dropout, so sampling is unchanged."""
    torch.manual_seed(0)
    with_dropout = GatedPixelCNN(
        6, PriorConfig(channels=8, n_layers=2, kernel_size=3, dropout=0.5), COND
    )
    plain = _model()
    plain.load_state_dict(with_dropout.state_dict())
    codes = torch.randint(0, 6, (2, 5, 5), generator=torch.Generator().manual_seed(1))
    z = torch.tensor([0.2, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(with_dropout.eval()(codes, z), plain(codes, z))
        with_dropout.train()
        assert not torch.allclose(with_dropout(codes, z), with_dropout(codes, z))
    with pytest.raises(ValueError):
        PriorConfig(dropout=1.0)


def _sharp_model() -> GatedPixelCNN:
    """A random model with confident, position- and z-dependent predictions."""
    model = _model(n_layers=2, kernel_size=5, num_codes=12)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def test_incremental_sampler_logits_equal_the_full_forward_pass(monkeypatch) -> None:
    model = _sharp_model()
    z = torch.tensor([0.0, 0.4, 0.4, 1.0])
    seen: list[torch.Tensor] = []
    head_step = model.head_step
    monkeypatch.setattr(model, "head_step", lambda h, t: seen.append(head_step(h, t)) or seen[-1])
    codes = sample_codes(model, z, (5, 6), generator=torch.Generator().manual_seed(0))
    incremental = torch.stack(seen, dim=-1).reshape(4, model.num_codes, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(incremental, model(codes, z), atol=1e-4, rtol=1e-4)
    assert codes.unique().numel() > 6  # a varied grid, not a fixed point


def test_top_k_1_sampling_equals_greedy_decoding_with_the_full_network() -> None:
    model = _sharp_model()
    z = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    sampled = sample_codes(model, z, (5, 6), top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = torch.zeros(5, 5, 6, dtype=torch.long)
    with torch.no_grad():
        for r in range(5):
            for c in range(6):
                greedy[:, r, c] = model(greedy, z)[:, :, r, c].argmax(1)
    assert sampled.dtype == torch.int64 and sampled.shape == (5, 5, 6)
    assert greedy.unique().numel() > 1
    torch.testing.assert_close(sampled, greedy)


def test_sampling_is_deterministic_under_a_seed() -> None:
    model = _sharp_model()
    z = torch.tensor([0.1, 0.7, 0.7])

    def draw(seed: int) -> torch.Tensor:
        return sample_codes(
            model, z, (4, 4), temperature=1.5, generator=torch.Generator().manual_seed(seed)
        )

    threads = torch.get_num_threads()
    first = draw(3)
    assert torch.get_num_threads() == threads  # the single-threaded loop restores the setting
    torch.testing.assert_close(first, draw(3))
    assert not torch.equal(first, draw(4))
    assert int(first.min()) >= 0 and int(first.max()) < model.num_codes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"z": [0.5, 1.2]}, "z must lie in"),
        ({"z": [-0.1]}, "z must lie in"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 13}, "top_k"),
        ({"shape": (0, 4)}, "shape"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"z": [0.5], "shape": (3, 3)} | kwargs
    with pytest.raises(ValueError, match=match):
        sample_codes(_sharp_model(), **args)


def test_codes_with_close_codebook_vectors_start_with_close_features() -> None:
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(6, 4, generator=gen)
    codebook[1] = codebook[0] + 1e-4  # a near-duplicate of code 0
    torch.manual_seed(0)
    cfg = PriorConfig(channels=8, n_layers=1, kernel_size=3)
    model = GatedPixelCNN(6, cfg, COND, codebook)
    table = model.input_codes().detach()
    assert (table[0] - table[1]).norm() < 1e-3 * (table[0] - table[2:]).norm(dim=1).min()
    logits = model(torch.randint(0, 6, (2, 3, 3), generator=gen), torch.tensor([0.2, 0.7]))
    torch.testing.assert_close(logits[:, 0], logits[:, 1], atol=1e-3, rtol=0)
    assert torch.equal(model.state_dict()["input_codes.codebook"], model.input_codes.codebook)
    with pytest.raises(ValueError, match="codebook must be"):
        GatedPixelCNN(5, cfg, COND, codebook)


def _covariate_model() -> tuple[GatedPixelCNN, torch.Tensor]:
    """A sharp random prior conditioned on age and sex, and the codes of four subjects."""
    manifest = pd.DataFrame({"age": [20.0, 40.0, 60.0, 90.0], "sex": ["F", "M", "F", "M"]})
    schema = covariate_schema(manifest, ["age", "sex"])
    torch.manual_seed(0)
    cfg = PriorConfig(channels=8, n_layers=2, kernel_size=5)
    model = GatedPixelCNN(12, cfg, COND, schema=schema).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model, torch.from_numpy(covariate_codes(manifest, schema)).float()


def test_covariate_guidance_1_is_the_conditional_sampler() -> None:
    model, covariates = _covariate_model()
    z = torch.tensor([0.2, 0.4, 0.6, 0.8])

    def draw(guidance: float, cov: torch.Tensor | None) -> torch.Tensor:
        return sample_codes(
            model,
            z,
            (4, 5),
            generator=torch.Generator().manual_seed(1),
            covariates=cov,
            guidance=guidance,
        )

    plain = draw(1.0, covariates)
    guided = draw(3.0, covariates)
    assert guided.shape == plain.shape == (4, 4, 5)
    assert not torch.equal(guided, plain)  # the guided logits differ from the conditional ones
    # with every covariate unknown, given and unknown logits agree: guidance changes nothing
    unknown = torch.full_like(covariates, float("nan"))
    torch.testing.assert_close(draw(3.0, unknown), draw(1.0, unknown))
    torch.testing.assert_close(draw(3.0, None), draw(1.0, None))


def test_covariate_guidance_draws_from_the_mixed_logits() -> None:
    """top_k = 1 makes the draw the argmax: each guided code is the argmax of
    unknown + w * (given - unknown) logits of the full network at that position."""
    model, covariates = _covariate_model()
    z, w = torch.tensor([0.1, 0.5, 0.5, 0.9]), 2.5
    codes = sample_codes(model, z, (4, 4), top_k=1, covariates=covariates, guidance=w)
    unknown = torch.full_like(covariates, float("nan"))
    with torch.no_grad():
        given = model(codes, z, covariates=covariates)
        blank = model(codes, z, covariates=unknown)
    expected = (blank + w * (given - blank)).argmax(1)
    torch.testing.assert_close(codes, expected)
    assert not torch.equal(codes, given.argmax(1))  # and not the conditional argmax


def test_sampler_rejects_negative_guidance() -> None:
    with pytest.raises(ValueError, match="guidance"):
        sample_codes(_sharp_model(), [0.5], (3, 3), guidance=-1.0)
