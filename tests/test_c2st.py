"""The classifier two-sample test on small synthetic brain-like 32x32 slices made here.

Its controls: two draws of one distribution score about 0.5, a slightly blurred copy close
to 1.0; the anatomy variant (both sides blurred) ignores a pixel-scale checkerboard but
still sees a missing ventricle.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.core.config import C2STConfig
from pipeline.core.errors import InputError
from pipeline.metrics import c2st

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
CPU = torch.device("cpu")
#: Slices a side: 3/4 train the judge, 1/4 are held out.
N = 384
#: A short judge for 32x32 slices (the pipeline's default runs 2400 steps).
CFG = C2STConfig(members=1, steps=200, curve_every=100, batch_size=32)


def brains(n: int, seed: int, *, ventricle: bool = True) -> torch.Tensor:
    """Brain-like slices: an ellipse (grey shell, white core), a dark ventricle, texture, noise.

    Size, position, texture and noise vary per slice, so two seeds give two disjoint draws
    of one distribution.

    Returns:
        (n, 1, 32, 32) intensities in [0, 1], background 0.
    """
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, SIZE)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    centre = 0.06 * torch.randn(n, 2, 1, 1, generator=gen)
    radii = torch.tensor([0.8, 0.65]).view(1, 2, 1, 1)
    radii = radii + 0.06 * torch.rand(n, 2, 1, 1, generator=gen)
    r = (
        ((yy - centre[:, :1]) / radii[:, :1]) ** 2 + ((xx - centre[:, 1:]) / radii[:, 1:]) ** 2
    ).sqrt()
    inside = r < 1
    image = 0.55 * inside + 0.3 * (r < 0.75)
    texture = F.interpolate(torch.randn(n, 1, 8, 8, generator=gen), size=SIZE, mode="bilinear")
    image = image + 0.06 * texture * inside
    if ventricle:
        vr = (((yy - centre[:, :1]) / 0.3) ** 2 + ((xx - centre[:, 1:]) / 0.12) ** 2).sqrt()
        image = torch.where(vr < 1, torch.full_like(image, 0.15), image)
    image = image + 0.04 * torch.randn(n, 1, SIZE, SIZE, generator=gen) * inside
    return image.clamp(0, 1)


def judge(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    seed: int = 0,
    cfg: C2STConfig = CFG,
    blur_sigma: float | None = None,
) -> c2st.C2STResult:
    """C2ST with the first 3/4 of each set for training and the last 1/4 held out."""
    k_real, k_fake = 3 * len(real) // 4, 3 * len(fake) // 4
    return c2st.two_sample_auc(
        real[:k_real],
        fake[:k_fake],
        real[k_real:],
        fake[k_fake:],
        cfg=cfg,
        device=CPU,
        seed=seed,
        blur_sigma=blur_sigma,
    )


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return brains(N, seed=1)


def test_real_vs_real_is_chance(real: torch.Tensor) -> None:
    result = judge(real, brains(N, seed=2))
    assert abs(result.auc - 0.5) < 0.15, result


def test_slightly_blurred_real_is_told_apart(real: torch.Tensor) -> None:
    result = judge(real, c2st.blur(brains(N, seed=2), 0.7))
    assert result.auc > 0.9, result


def test_global_contrast_is_told_apart(real: torch.Tensor) -> None:
    """The judge is not normalised per slice right after its first layer, so contrast shows."""
    result = judge(real, brains(N, seed=2) * 0.85)
    assert result.auc > 0.9, result


def test_anatomy_variant_ignores_texture_but_sees_anatomy(real: torch.Tensor) -> None:
    """A checkerboard (a transposed-convolution artefact) is texture; a ventricle is anatomy."""
    fake = brains(N, seed=2)
    parity = (torch.arange(SIZE)[:, None] + torch.arange(SIZE)) % 2
    checkered = (fake + 0.05 * (2 * parity - 1) * (fake > 0)).clamp(0, 1)
    assert judge(real, checkered).auc > 0.9
    sigma = 1.5
    texture = judge(real, checkered, blur_sigma=sigma)
    anatomy = judge(real, brains(N, seed=2, ventricle=False), blur_sigma=sigma)
    assert texture.blur_sigma == anatomy.blur_sigma == sigma
    assert abs(texture.auc - 0.5) < 0.15, texture
    assert anatomy.auc > 0.9, anatomy


def test_deterministic_and_seeded(real: torch.Tensor) -> None:
    fake = c2st.blur(brains(128, seed=2), 0.3)
    cfg = C2STConfig(members=1, steps=60, curve_every=20, batch_size=16)
    state = torch.get_rng_state()
    first = judge(real[:128], fake, cfg=cfg, seed=3)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must be left untouched"
    assert judge(real[:128], fake, cfg=cfg, seed=3) == first
    assert judge(real[:128], fake, cfg=cfg, seed=4).curve != first.curve


def test_curve_points_and_result_dict(real: torch.Tensor) -> None:
    cfg = C2STConfig(members=2, steps=50, curve_every=20, batch_size=8)
    result = judge(real[:40], brains(24, seed=2), cfg=cfg)
    assert [step for step, _ in result.curve] == [20, 40]
    assert all(0.0 <= auc <= 1.0 for _, auc in [*result.curve, (cfg.steps, result.auc)])
    assert result.n_train == (30, 18) and result.n_test == (10, 6)
    assert json.loads(json.dumps(result.as_dict())) == {
        "auc": result.auc,
        "curve": [list(point) for point in result.curve],
        "n_train": [30, 18],
        "n_test": [10, 6],
        "blur_sigma": None,
        "member_aucs": result.member_aucs,
    }
    assert len(result.member_aucs) == 2


def test_judge_is_its_members_mean_logit(real: torch.Tensor) -> None:
    """A judge of two members reads the AUC of their mean logit; each member is the
    one-network judge of its own seed (``seed``, ``seed + 1``), and the curve is the
    judge's."""
    fake = c2st.blur(brains(128, seed=2), 0.3)
    one = C2STConfig(members=1, steps=60, curve_every=30, batch_size=16)
    two = one.model_copy(update={"members": 2})
    pair = judge(real[:128], fake, cfg=two, seed=3)
    alone = [judge(real[:128], fake, cfg=one, seed=s) for s in (3, 4)]
    assert pair.member_aucs == [a.auc for a in alone]
    assert [a.member_aucs for a in alone] == [[a.auc] for a in alone]
    k_real, k_fake = 96, 96
    prepared = {
        "real_train": real[:k_real],
        "fake_train": fake[:k_fake],
        "real_test": real[k_real:128],
    }
    readings = [c2st._train_member(prepared, [fake[k_fake:]], two, CPU, s)[1] for s in (3, 4)]
    expected = [
        c2st._auc((first[0] + second[0]) / 2, 128 - k_real)
        for first, second in zip(*readings, strict=True)
    ]
    assert [auc for _, auc in pair.curve] == expected
    assert expected[-1] == pair.auc


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"fake_test": torch.zeros(4, 1, SIZE, 16)}, "one size"),
        ({"real_train": torch.zeros(1, 1, SIZE, SIZE)}, "at least 2 slices"),
        ({"fake_train": torch.zeros(4, SIZE, SIZE)}, r"\(N, 1, H, W\)"),
        ({"real_test": torch.full((4, 1, SIZE, SIZE), 1.5)}, r"\[0, 1\]"),
    ],
)
def test_bad_inputs_raise_one_line(sets: dict[str, torch.Tensor], message: str) -> None:
    good = {
        name: torch.rand(4, 1, SIZE, SIZE)
        for name in ("real_train", "fake_train", "real_test", "fake_test")
    }
    with pytest.raises(InputError, match=message) as info:
        c2st.two_sample_auc(**(good | sets), cfg=CFG, device=CPU, seed=0)
    assert "\n" not in str(info.value)
    assert next(iter(sets)) in str(info.value)


def test_one_judge_read_on_several_sets_reads_each_as_alone() -> None:
    """A judge read on several synthetic held-out sets trains once, as for one set: its
    result on each set equals the one-set test on that set, curve included."""
    real, fake = brains(N, 0), brains(N, 1, ventricle=False)
    other, same = brains(96, 2, ventricle=False), brains(96, 3)
    k = 3 * N // 4
    common = {"cfg": CFG, "device": CPU, "seed": 0}
    both = c2st.two_sample_aucs(real[:k], fake[:k], real[k:], [other, same], **common)
    for alone, result in zip((other, same), both, strict=True):
        assert result == c2st.two_sample_auc(real[:k], fake[:k], real[k:], alone, **common)
    assert both[0].auc > 0.9 > 0.7 > both[1].auc  # no ventricle is told; a real-like set is not
    assert both[1].n_test == (N - k, 96)
    with pytest.raises(InputError, match="at least one synthetic held-out set"):
        c2st.two_sample_aucs(real[:k], fake[:k], real[k:], [], **common)


def test_blur_rejects_non_positive_sigma() -> None:
    with pytest.raises(InputError, match="sigma"):
        c2st.blur(torch.rand(2, 1, 8, 8), 0.0)


def test_strength_curve_figure() -> None:
    image = c2st.strength_curve_figure(
        {"ldm": [(100, 0.7), (200, 0.9)], "ldm/anatomy": [(100, 0.6)]}
    )
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert image.std() > 0
    with pytest.raises(InputError, match="at least one curve"):
        c2st.strength_curve_figure({})
