"""Loss terms of the first stage: KL with cyclical annealing, adversarial losses, VQGAN weight.

The perceptual (LPIPS) term lives in :mod:`pipeline.metrics.perceptual`; this module holds the rest:

- :func:`kl_weight`: cyclical annealing schedule of Fu et al. (NAACL 2019), a pure function
  of the step;
- :func:`discriminator_loss` / :func:`generator_loss`: hinge or least-squares GAN losses on
  PatchGAN logits;
- :func:`adaptive_weight`: the VQGAN (Esser et al., CVPR 2021) balance between the
  reconstruction and the adversarial gradient at the decoder's last layer;
- :func:`ssim_loss`: ``1 - SSIM`` with the window the evaluation's SSIM uses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.core import distributed
from pipeline.core.errors import InputError
from pipeline.metrics.quality import local_ssim

AdversarialLoss = Literal["hinge", "lsq"]


def kl_weight(
    step: int, total_steps: int, *, cycles: int, ramp_ratio: float, max_weight: float
) -> float:
    """Cyclical KL annealing weight (Fu et al. 2019).

    Training is split into ``cycles`` equal periods. Within each period the weight rises
    linearly from 0 to ``max_weight`` over the first ``ramp_ratio`` of the period and then
    stays at ``max_weight`` until the period ends.

    Args:
        step: current optimisation step, >= 0 (steps past ``total_steps`` stay in the last
            period's plateau).
        total_steps: steps of the whole run, >= 1.
        cycles: number of periods, >= 1.
        ramp_ratio: fraction of each period spent ramping, in (0, 1].
        max_weight: weight on the plateau, >= 0.

    Returns:
        The KL weight for ``step``, in [0, max_weight].

    Raises:
        ValueError: an argument is out of range (the message names it).
    """
    if total_steps < 1 or cycles < 1 or step < 0:
        raise InputError(
            f"need step >= 0, total_steps >= 1, cycles >= 1; got step={step}, "
            f"total_steps={total_steps}, cycles={cycles}"
        )
    if not 0 < ramp_ratio <= 1:
        raise InputError(f"ramp_ratio must lie in (0, 1]; got {ramp_ratio}")
    if step >= total_steps:
        return max_weight
    period = total_steps / cycles
    tau = (step % period) / period
    return max_weight * min(1.0, tau / ramp_ratio)


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: AdversarialLoss = "hinge"
) -> torch.Tensor:
    """Discriminator loss on PatchGAN logits.

    Args:
        real_logits: (B, 1, h, w) logits of real images.
        fake_logits: (B, 1, h, w) logits of reconstructions (detached from the generator).
        kind: ``hinge`` (mean relu(1 - real) + relu(1 + fake)) or ``lsq`` (least squares,
            targets 1 for real and 0 for fake).

    Returns:
        Scalar loss, halved so both kinds weigh real and fake equally.
    """
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    if kind == "lsq":
        return 0.5 * ((real_logits - 1.0).pow(2).mean() + fake_logits.pow(2).mean())
    raise InputError(f"adversarial loss kind must be 'hinge' or 'lsq'; got {kind!r}")


def generator_loss(fake_logits: torch.Tensor, kind: AdversarialLoss = "hinge") -> torch.Tensor:
    """Adversarial loss of the generator (the decoder) on PatchGAN logits of its outputs.

    Args:
        fake_logits: (B, 1, h, w) logits of reconstructions.
        kind: ``hinge`` (-mean logits, as in VQGAN) or ``lsq`` (mean (logits - 1)^2).

    Returns:
        Scalar loss.
    """
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "lsq":
        return (fake_logits - 1.0).pow(2).mean()
    raise InputError(f"adversarial loss kind must be 'hinge' or 'lsq'; got {kind!r}")


def adaptive_weight(
    rec_loss: torch.Tensor,
    adv_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """VQGAN adaptive weight ||grad rec|| / (||grad adv|| + 1e-4) at the decoder's last layer.

    Both gradients are taken with ``retain_graph=True`` so the caller can still backpropagate
    the total loss. Under torchrun they are averaged over the ranks first, so the weight is
    the global batch's (and the same on every rank).

    Args:
        rec_loss: scalar reconstruction loss (L1 + perceptual) of the generator.
        adv_loss: scalar adversarial generator loss.
        last_layer: weight of the decoder's output layer (part of both graphs).
        max_weight: upper clamp of the ratio.

    Returns:
        Detached scalar tensor in [0, max_weight]; multiply it with the configured weight.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    rec_grad = distributed.sum_(rec_grad.contiguous()) / distributed.world_size()
    adv_grad = distributed.sum_(adv_grad.contiguous()) / distributed.world_size()
    ratio = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    return ratio.clamp(0.0, max_weight).detach()


def ssim_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - SSIM``, averaged over pixels and samples; differentiable in ``recon``.

    The same local SSIM (:func:`pipeline.metrics.quality.local_ssim`) as the reported test figure,
    so the term optimises what is measured. ``recon`` may leave [0, 1] during training.

    Args:
        recon: (B, 1, H, W) reconstructions.
        target: (B, 1, H, W) images in [0, 1].

    Returns:
        Scalar in [0, 2]; 0 for identical images.
    """
    return 1 - local_ssim(target, recon).mean()
