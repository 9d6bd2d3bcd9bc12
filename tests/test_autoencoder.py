"""The z-conditioned autoencoder: shapes, the stage-1 interface, conditioning, the VQ codebook."""

from __future__ import annotations

import pytest
import torch
from support import TINY_COND

from pipeline.core.config import AutoencoderConfig, VQConfig
from pipeline.models.autoencoder import Autoencoder, EMAVectorQuantizer, ZResBlock


def _cfg(channels: tuple[int, ...] = (8, 16, 16), **kw) -> AutoencoderConfig:
    return AutoencoderConfig(
        channels=channels, norm_groups=4, vq=VQConfig(num_codes=16, code_dim=4), **kw
    )


def _model(kind: str, channels: tuple[int, ...] = (8, 16, 16), **kw) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(_cfg(channels, **kw), TINY_COND, kind)  # type: ignore[arg-type]


def _batch(n: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, size, size, generator=gen), torch.rand(n, generator=gen)


@pytest.mark.parametrize("kind", ["vqvae", "vaegan"])
@pytest.mark.parametrize(("channels", "factor"), [((8, 16, 16), 4), ((8, 8, 16, 16), 8)])
@pytest.mark.parametrize("attention", [True, False])
def test_shapes_for_every_config(
    kind: str, channels: tuple[int, ...], factor: int, attention: bool
) -> None:
    model = _model(kind, channels, attention=attention, num_res_blocks=2 if attention else 1)
    x, z = _batch()
    c = 4
    assert model.downsample_factor == factor and model.latent_channels == c
    out = model(x, z)
    assert out.recon.shape == x.shape
    assert out.latent.shape == (2, c, 32 // factor, 32 // factor)
    latent = model.encode_to_latent(x, z)
    assert latent.shape == out.latent.shape
    assert model.decode_from_latent(latent, z).shape == x.shape
    if kind == "vqvae":
        assert out.vq_loss is not None and out.kl is None
        assert model.pre_quant(x, z).shape == latent.shape
        idx = model.encode_to_indices(x, z)
        assert idx.shape == (2, 32 // factor, 32 // factor) and idx.dtype == torch.int64
        assert int(idx.min()) >= 0 and int(idx.max()) < 16
        decoded = model.decode_indices(idx, z)
        torch.testing.assert_close(decoded, model.decode_from_latent(latent, z))
    else:
        assert out.kl is not None and out.vq_loss is None
        assert model.encode_to_latent(x, z, sample=True).shape == latent.shape


def test_vq_only_methods_refuse_vaegan() -> None:
    model = _model("vaegan")
    x, z = _batch()
    with pytest.raises(ValueError, match="vqvae"):
        model.encode_to_indices(x, z)
    with pytest.raises(ValueError, match="kind"):
        Autoencoder(_cfg(), TINY_COND, "vae")  # type: ignore[arg-type]


def test_bad_inputs_give_clear_errors() -> None:
    model = _model("vqvae")
    x, z = _batch()
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(2, 1, 30, 30), z)
    with pytest.raises(ValueError, match="z must have shape"):
        model(x, torch.rand(3))
    with pytest.raises(ValueError, match="latent must have shape"):
        model.decode_from_latent(torch.rand(2, 3, 8, 8), z)
    with pytest.raises(ValueError, match="code indices"):
        model.decode_indices(torch.full((2, 8, 8), 16), z)


@pytest.mark.parametrize("kind", ["vqvae", "vaegan"])
def test_changing_z_changes_decoder_output(kind: str) -> None:
    model = _model(kind).eval()
    x, _ = _batch()
    latent = model.encode_to_latent(x, torch.full((2,), 0.5))
    low = model.decode_from_latent(latent, torch.zeros(2))
    high = model.decode_from_latent(latent, torch.ones(2))
    assert (low - high).abs().mean() > 1e-3


def test_z_reaches_every_residual_block() -> None:
    model = _model("vaegan", channels=(8, 8, 16, 16))
    x, z = _batch()
    model(x, z).recon.sum().backward()
    blocks = [m for m in model.modules() if isinstance(m, ZResBlock)]
    # encoder and decoder: one block per level plus two in each middle block
    assert len(blocks) == 2 * (4 + 2)
    for block in blocks:
        assert block.film.weight.grad is not None and block.film.weight.grad.abs().sum() > 0
    assert sum(1 for m in model.modules() if m.__class__.__name__ == "Conditioner") == 1


def test_codebook_is_buffers_and_updated_only_in_training() -> None:
    model = _model("vqvae")
    names = dict(model.named_buffers())
    assert {"quantizer.codebook", "quantizer.cluster_size", "quantizer.embed_sum"} <= set(names)
    assert not any(n.startswith("quantizer.") for n, _ in model.named_parameters())
    x, z = _batch()
    before = model.quantizer.codebook.clone()
    model.train()
    model.encode_to_indices(x, z)
    model.encode_to_latent(x, z)
    torch.testing.assert_close(model.quantizer.codebook, before)
    model.eval()
    model(x, z)
    torch.testing.assert_close(model.quantizer.codebook, before)
    model.train()
    out = model(x, z)
    assert not torch.equal(model.quantizer.codebook, before)
    assert 0 < out.codes_used.item() <= 1 and 1 <= out.perplexity.item() <= 16


def test_first_training_step_initialises_codebook_from_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(VQConfig(num_codes=8, code_dim=3)).train()
    x = torch.randn(2, 3, 4, 4) * 5 + 10
    vq(x)
    flat = x.permute(0, 2, 3, 1).reshape(-1, 3)
    # every code is now (within EMA smoothing) a data vector, far from the N(0, 1/d) init
    assert torch.cdist(vq.codebook, flat).min(dim=1).values.max() < 1e-3


def test_dead_code_is_revived_from_recent_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(VQConfig(num_codes=4, code_dim=2, dead_code_threshold=1.0)).train()
    codes = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [100.0, 100.0]])
    vq.codebook.copy_(codes)
    vq.cluster_size.copy_(torch.tensor([10.0, 10.0, 10.0, 0.5]))  # code 3 is dead
    vq.embed_sum.copy_(codes * vq.cluster_size[:, None])
    x = codes[:3].repeat(6, 1).reshape(2, 3, 3, 2).permute(0, 3, 1, 2) + 0.01
    assert 3 not in vq(x).indices.unique().tolist()
    flat = x.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.cdist(vq.codebook[3:4], flat).min() < 1e-5  # restarted from an encoder output
    assert vq.cluster_size[3].item() == pytest.approx(1.0)
    # unused but alive codes are kept: code 2 would not be restarted with a threshold of 1
    vq.cluster_size[2] = 10.0
    vq(x[:, :, :1, :1])  # only code 0 is used
    torch.testing.assert_close(vq.codebook[2], torch.tensor([0.01, 3.01]), atol=0.05, rtol=0)


def test_ema_codebook_converges_to_cluster_means() -> None:
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(
        VQConfig(num_codes=2, code_dim=1, decay=0.5, dead_code_threshold=0.0)
    ).train()
    vq.codebook.copy_(torch.tensor([[-1.0], [1.0]]))
    x = torch.tensor([-2.0, -4.0, 2.0, 6.0]).view(1, 1, 2, 2)
    for _ in range(40):
        vq(x)
    torch.testing.assert_close(vq.codebook.flatten(), torch.tensor([-3.0, 4.0]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["vqvae", "vaegan"])
def test_relu_output_draws_exact_zeros_and_keeps_the_rest(kind: str) -> None:
    """``output_activation: relu`` clips the image (not the tissue logits) at 0; ``none`` keeps
    the output conv's value."""
    torch.manual_seed(0)
    plain = _model(kind, tissue_weight=1.0).eval()
    relu = _model(kind, tissue_weight=1.0, output_activation="relu").eval()
    relu.load_state_dict(plain.state_dict())
    x, z = _batch()
    with torch.no_grad():
        latent = plain.encode_to_latent(x, z)
        raw, raw_logits = plain.decode_with_tissue(latent, z)
        out, logits = relu.decode_with_tissue(latent, z)
        assert (raw < 0).any()  # an untrained decoder gives negatives: the test can fail
        torch.testing.assert_close(out, raw.clamp_min(0))
        torch.testing.assert_close(relu.decode_from_latent(latent, z), out)
        assert raw_logits is not None and logits is not None
        torch.testing.assert_close(logits, raw_logits)  # the tissue head is untouched
    with pytest.raises(ValueError, match="output_activation"):
        _cfg(output_activation="tanh")
