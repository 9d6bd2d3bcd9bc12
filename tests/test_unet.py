"""The z-conditioned diffusion UNet (tiny configuration)."""

from __future__ import annotations

import pytest
import torch
from support import TINY_COND, TINY_LDM, tiny_ldm
from torch.nn.attention import SDPBackend

import pipeline.models.unet as unet_module
from pipeline.core.config import LDMConfig
from pipeline.models.unet import ZConditionedUNet

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_zero_init(module: torch.nn.Module) -> torch.nn.Module:
    """MONAI zero-initialises residual branches and the output conv (identity at init);
    give them random weights so that conditioning effects are visible in untrained nets."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def _unet(config: LDMConfig = TINY_LDM) -> ZConditionedUNet:
    torch.manual_seed(0)
    unet = ZConditionedUNet(config, TINY_COND, latent_channels=3).eval()
    return randomize_zero_init(unet)


def _inputs(b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 8, 8, generator=gen), torch.randint(0, 1000, (b,), generator=gen)


def test_output_shape_and_z_changes_output() -> None:
    unet = _unet()
    x, t = _inputs()
    with torch.no_grad():
        low = unet(x, t, torch.zeros(4))
        high = unet(x, t, torch.ones(4))
        half = unet(x, t, torch.full((4,), 0.5))  # fractional z is a valid condition
    assert low.shape == x.shape
    assert (low - high).abs().mean() > 1e-3
    assert (half - low).abs().mean() > 1e-4 and (half - high).abs().mean() > 1e-4


def test_drop_mask_replaces_z_by_the_null_condition() -> None:
    unet = _unet()
    x, t = _inputs()
    drop = torch.ones(4, dtype=torch.bool)
    with torch.no_grad():
        a = unet(x, t, torch.zeros(4), drop)
        b = unet(x, t, torch.ones(4), drop)
        mixed = unet(x, t, torch.zeros(4), torch.tensor([True, False, True, False]))
        cond = unet(x, t, torch.zeros(4))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1], cond[1])


def test_z_enters_time_embedding_and_cross_attention() -> None:
    unet = _unet()
    x, t = _inputs()
    seen: dict[str, torch.Tensor] = {}

    def record_time(module, args, out) -> None:
        seen["time"] = out

    def record_context(module, args, kwargs, out) -> None:
        seen["cross"] = kwargs["context"]

    unet.unet.class_embedding.register_forward_hook(record_time)
    cross = next(m for n, m in unet.unet.named_modules() if n.endswith("attn2"))
    cross.register_forward_hook(record_context, with_kwargs=True)
    z = torch.rand(4)
    with torch.no_grad():
        unet(x, t, z)
    time_dim = unet.unet.time_embed[-1].out_features
    assert seen["time"].shape == (4, time_dim)
    torch.testing.assert_close(seen["cross"], unet.z_embed(z)[:, None, :])
    unet.train()
    unet(x, t, z).square().mean().backward()
    assert unet.unet.class_embedding[1].weight.grad.abs().sum() > 0


def test_without_cross_attention_z_conditions_through_the_time_embedding() -> None:
    plain = _unet(tiny_ldm(cross_attention=False))
    names = [n for n, _ in plain.unet.named_modules()]
    assert not any(n.endswith("attn2") for n in names)  # no cross-attention anywhere
    assert any(n.endswith("attn") for n in names)  # the attention level keeps self-attention
    n_params = sum(p.numel() for p in plain.parameters())
    assert n_params < sum(p.numel() for p in _unet().parameters())
    x, t = _inputs()
    with torch.no_grad():
        low, high = plain(x, t, torch.zeros(4)), plain(x, t, torch.ones(4))
        dropped = plain(x, t, torch.zeros(4), torch.ones(4, dtype=torch.bool))
        dropped_high = plain(x, t, torch.ones(4), torch.ones(4, dtype=torch.bool))
    assert (low - high).abs().mean() > 1e-3
    torch.testing.assert_close(dropped, dropped_high)


def test_files_from_before_the_key_rebuild_with_cross_attention() -> None:
    stored = TINY_LDM.model_dump()
    del stored["cross_attention"]
    config = LDMConfig.model_validate(stored)
    assert config.cross_attention
    names = [n for n, _ in ZConditionedUNet(config, TINY_COND, 3).named_modules()]
    assert any(n.endswith("attn2") for n in names)


@pytest.mark.parametrize("cross_attention", [True, False])
def test_attention_runs_on_the_math_kernel_on_the_cpu(monkeypatch, cross_attention) -> None:
    chosen: list[object] = []
    real_kernel = unet_module.sdpa_kernel

    def recording_kernel(backends):
        chosen.append(backends)
        return real_kernel(backends)

    monkeypatch.setattr(unet_module, "sdpa_kernel", recording_kernel)
    unet = _unet(tiny_ldm(cross_attention=cross_attention))
    x, t = _inputs()
    z = torch.rand(4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = unet(x, t, z)
    assert chosen == [SDPBackend.MATH]
    for module in unet.modules():  # MONAI's own (non-fused) attention gives the same output
        if hasattr(module, "use_flash_attention"):
            module.use_flash_attention = False
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, z), out)


def test_invalid_latent_channels() -> None:
    with pytest.raises(ValueError, match="latent_channels"):
        ZConditionedUNet(TINY_LDM, TINY_COND, latent_channels=0)
