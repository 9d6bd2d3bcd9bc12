"""Diffusion schedules and the guided DDIM sampler: sampling, SDEdit, inpainting, trajectories.

Schedules are MONAI's (``DDPMScheduler`` for training, ``DDIMScheduler`` and
``PNDMScheduler`` for sampling), built from one JSON-able :func:`scheduler_config` that is
saved with the model, so sampling uses the betas the model was trained with. ``clip_sample``
is off: latents are not bounded to [-1, 1]. With ``zero_terminal_snr`` every one of them gets
the betas of :func:`rescale_zero_terminal_snr` (Lin et al. 2024), so ᾱ = 0 at t = T - 1.

:func:`diffusion_loss` is the training loss, plain MSE or weighted per timestep by
:func:`min_snr_weight` (min-SNR-γ, Hang et al. 2023).

The DDIM update is written here rather than taken from ``DDIMScheduler.step``: MONAI's step
assumes the previous timestep is ``t - T // steps``, which differs from the rounded
``linspace`` timesteps of its own ``set_timesteps`` (and from the shortened schedule of
SDEdit). Here every step goes exactly to the next timestep of the schedule, and the last one
to the clean latent (ᾱ = 1).

:func:`pndm_sample` drives MONAI's ``PNDMScheduler`` (pseudo linear multistep, Liu et al.
ICLR 2022) with the same guided output: fewer steps for the same quality on our models
(``python -m benchmarks.sampling_steps``). :func:`guided_sample` picks one by name.

Classifier-free guidance runs the conditional and the null condition through the UNet in one
batched forward per step and combines ``u + w (c - u)`` (Ho & Salimans 2022); guidance is
linear in the model output, so it is the same for epsilon and v prediction. Every sampler
takes ``guidance_min_t``: below that timestep the weight is 1 (the conditional output alone, one
forward pass), so guidance shapes the layout at high noise and leaves the fine texture of the
low-noise steps to the conditional model (:func:`step_guidance`;
docs/realism_log.md, "Guidance at high noise only").

A self-conditioned UNet (``ldm.self_condition``, :func:`self_conditioned`) gets the previous
step's guided clean-latent estimate in every sampler (zeros at the first step), and
:func:`diffusion_loss` forms its estimate with a first pass without gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler, Scheduler
from torch import nn

from pipeline.core.config import LDMConfig, LossWeighting, Sampler
from pipeline.core.errors import InputError
from pipeline.models.conditioning import guide

SchedulerT = TypeVar("SchedulerT", bound=Scheduler)


@dataclass
class Trajectory:
    """Intermediate states of one sampling run, for GIFs and strip images.

    Attributes:
        timesteps: (S,) timestep of each step, descending.
        x_t: (S, B, C, h, w) latent entering each step.
        x0: (S, B, C, h, w) clean latent predicted at each step.
    """

    timesteps: torch.Tensor
    x_t: torch.Tensor
    x0: torch.Tensor


def scheduler_config(config: LDMConfig) -> dict[str, Any]:
    """The noise schedule of ``config`` as a JSON-able dict (saved in ``models/ldm.pt``).

    ``zero_terminal_snr`` is written only when on, so the schedules saved before it existed
    read the same.

    Raises:
        InputError: ``zero_terminal_snr`` without ``v_prediction``: at ᾱ = 0 the noise is
            the input itself, and the clean latent cannot be recovered from epsilon.
    """
    if config.zero_terminal_snr and config.prediction_type != "v_prediction":
        raise InputError(
            "ldm.zero_terminal_snr needs ldm.prediction_type: v_prediction (epsilon cannot "
            f"give the clean latent where ᾱ = 0), got {config.prediction_type!r}"
        )
    out: dict[str, Any] = {
        "num_train_timesteps": config.num_train_timesteps,
        "schedule": config.beta_schedule,
        "prediction_type": config.prediction_type,
    }
    if config.beta_schedule != "cosine":
        out.update(beta_start=config.beta_start, beta_end=config.beta_end)
    if config.zero_terminal_snr:
        out["zero_terminal_snr"] = True
    return out


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas with a zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1).

    sqrt(ᾱ_t) is shifted and scaled so that its last value is 0 and its first unchanged, and
    the betas are recomputed from it: the last timestep is then pure noise, as sampling from
    N(0, I) assumes. Computed in float64.

    Args:
        betas: (T,) betas in (0, 1), T >= 2.

    Returns:
        (T,) betas in (0, 1], in the dtype of ``betas``; the last is 1 (ᾱ_{T-1} = 0).
    """
    if betas.numel() < 2:
        raise InputError(f"zero_terminal_snr needs at least 2 timesteps, got {betas.numel()}")
    sqrt_alpha_bar = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    alpha_bar = ((sqrt_alpha_bar - last) * first / (first - last)) ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1 - alphas).to(betas.dtype)


def _monai_scheduler(
    cls: type[SchedulerT], config: Mapping[str, Any], **options: Any
) -> SchedulerT:
    """MONAI's scheduler ``cls`` for a :func:`scheduler_config`: every scheduler is built here.

    MONAI takes a beta schedule by name only, so with ``zero_terminal_snr`` the scheduler's
    ``betas``, ``alphas`` and ``alphas_cumprod`` are replaced after construction (the
    schedulers derive everything else from these at each call).

    Args:
        cls: ``DDPMScheduler``, ``DDIMScheduler`` or ``PNDMScheduler``.
        config: output of :func:`scheduler_config`.
        **options: further constructor arguments; they override entries of ``config``.
    """
    settings = {**config, **options}
    zero_terminal_snr = bool(settings.pop("zero_terminal_snr", False))
    scheduler = cls(**settings)
    if zero_terminal_snr:
        scheduler.betas = rescale_zero_terminal_snr(scheduler.betas)
        scheduler.alphas = 1.0 - scheduler.betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def build_scheduler(config: Mapping[str, Any], kind: Literal["ddpm", "ddim"]) -> Scheduler:
    """A MONAI scheduler for a saved :func:`scheduler_config`.

    Args:
        config: output of :func:`scheduler_config`.
        kind: ``ddpm`` for training (``add_noise``, ``get_velocity``), ``ddim`` for sampling.

    Returns:
        The scheduler, with ``clip_sample=False``.
    """
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}.get(kind)
    if cls is None:
        raise InputError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")
    return _monai_scheduler(cls, config, clip_sample=False)


def min_snr_weight(alpha_bar: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy").

    With SNR = ᾱ / (1 - ᾱ), the MSE on the model's target is weighted so that it equals
    min(SNR, γ) times the MSE on the clean latent: min(SNR, γ) / SNR for epsilon,
    min(SNR, γ) / (SNR + 1) for v. Finite at both ends: SNR = 0 (ᾱ = 0, zero terminal SNR)
    gives 1 for epsilon and 0 for v, SNR = ∞ (ᾱ = 1) gives 0 for both.

    Args:
        alpha_bar: (B,) ᾱ_t in [0, 1] of each sample's timestep.
        prediction_type: ``epsilon`` or ``v_prediction``.
        gamma: the SNR above which weights are clipped, > 0.

    Returns:
        (B,) float32 weights in [0, 1].
    """
    snr = alpha_bar.float() / (1 - alpha_bar.float())
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # min(SNR, γ) / SNR without 0 / 0 at SNR = 0
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    raise InputError(
        f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
    )


def diffusion_loss(
    unet: nn.Module,
    scheduler: Scheduler,
    latent: torch.Tensor,
    z: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    drop_mask: torch.Tensor,
    *,
    weighting: LossWeighting = "uniform",
    min_snr_gamma: float = 5.0,
    covariates: torch.Tensor | None = None,
    self_condition: bool = False,
) -> torch.Tensor:
    """DDPM training loss: MSE between the UNet output and the epsilon or v target.

    Args:
        unet: ``unet(x, t, z, drop_mask)`` (``covariates=`` too when they are given).
        scheduler: the training schedule (its ``prediction_type`` picks the target).
        latent: (B, C, h, w) clean scaled latents x_0.
        z: (B,) slice positions in [0, 1].
        noise: (B, C, h, w) standard normal noise.
        t: (B,) integer timesteps in [0, T).
        drop_mask: (B,) bool, True where z is replaced by the null condition.
        weighting: ``uniform`` (default: the MSE over all elements) or ``min_snr`` (the mean
            over the batch of each sample's MSE times :func:`min_snr_weight` at its t).
        min_snr_gamma: γ of ``min_snr`` (> 0); unused by ``uniform``.
        covariates: optional (B, n) covariate codes (NaN = unknown).
        self_condition: first run the UNet without gradients (no estimate) and give its
            clean-latent estimate to the pass that is trained (``ldm.self_condition``; the
            caller draws on which steps). False with a self-conditioned UNet trains the
            no-estimate case.

    Returns:
        Scalar (weighted) mean squared error.
    """
    if weighting not in ("uniform", "min_snr"):
        raise InputError(f"weighting must be 'uniform' or 'min_snr', got {weighting!r}")
    noisy = scheduler.add_noise(latent, noise, t)
    if scheduler.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latent, noise, t)
    else:
        target = noise
    extra: dict[str, torch.Tensor] = {} if covariates is None else {"covariates": covariates}
    if self_condition:
        with torch.no_grad():
            first = unet(noisy, t, z, drop_mask, **extra).float()
        alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[t].view(-1, *(1,) * (noisy.ndim - 1))
        x0, _ = _x0_and_eps(first, noisy.float(), alpha_bar, scheduler.prediction_type)
        extra["x0_estimate"] = x0.to(noisy.dtype)
    output, target = unet(noisy, t, z, drop_mask, **extra).float(), target.float()
    if weighting == "uniform":
        return F.mse_loss(output, target)
    per_sample = F.mse_loss(output, target, reduction="none").flatten(1).mean(dim=1)
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t]
    return (min_snr_weight(alpha_bar, scheduler.prediction_type, min_snr_gamma) * per_sample).mean()


class BoundCovariates(nn.Module):
    """A conditioned UNet with its covariates fixed: ``f(x, t, z, drop_mask)`` as every
    sampler calls it.

    The samplers pass z (and the guidance batch doubles it); the covariates of each sample
    ride along here, repeated to the batch the sampler forms (``[x, x]`` for guidance, where
    the second half is dropped to the null condition anyway).

    Args:
        unet: ``unet(x, t, z, drop_mask, covariates)``
            (:class:`~pipeline.models.unet.ZConditionedUNet`).
        covariates: (B, n) codes of the B samples (NaN = unconditioned).
    """

    def __init__(self, unet: nn.Module, covariates: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.covariates = unet, covariates
        self.self_condition = self_conditioned(unet)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        drop_mask: torch.Tensor,
        **estimate: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet output with the bound covariates (repeated to x's batch); ``estimate``:
        the ``x0_estimate`` of a self-conditioned UNet, passed on."""
        repeats = x.shape[0] // len(self.covariates)
        covariates = self.covariates.to(x.device).repeat(repeats, 1)
        return self.unet(x, t, z, drop_mask, covariates, **estimate)


def self_conditioned(unet: nn.Module) -> bool:
    """Whether ``unet`` takes an ``x0_estimate`` (``ldm.self_condition``)."""
    return bool(getattr(unet, "self_condition", False))


def guided_output(
    unet: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    guidance: float,
    x0_estimate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-free guided model output from ONE UNet forward.

    Args:
        unet: ``unet(x, t, z, drop_mask)`` as in :class:`~pipeline.models.unet.ZConditionedUNet`.
        x: (B, C, h, w) noisy latents.
        t: (B,) integer timesteps.
        z: (B,) slice positions in [0, 1].
        guidance: weight w; 1 is the plain conditional output (the null pass is skipped),
            0 the unconditional one.
        x0_estimate: (B, C, h, w) clean-latent estimate for a self-conditioned UNet (the
            previous step's, given to both halves), or None (zeros, or no self-conditioning).

    Returns:
        (B, C, h, w) ``u + w (c - u)`` with c, u the conditional and null-condition outputs.
    """
    batch = x.shape[0]
    extra = {} if x0_estimate is None else {"x0_estimate": x0_estimate}
    if guidance == 1.0:
        return unet(x, t, z, torch.zeros(batch, dtype=torch.bool, device=x.device), **extra)
    drop = torch.arange(2 * batch, device=x.device) >= batch
    if x0_estimate is not None:
        extra = {"x0_estimate": torch.cat([x0_estimate, x0_estimate])}
    out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z]), drop, **extra)
    return guide(out, guidance)


def step_guidance(t: int, guidance: float, guidance_min_t: int) -> float:
    """The guidance weight of the step at timestep ``t``.

    Args:
        t: the step's timestep, in [0, T).
        guidance: classifier-free guidance weight w.
        guidance_min_t: first timestep that is guided; below it the weight is 1 (conditional
            output only). 0 guides every step.

    Returns:
        ``guidance`` if ``t >= guidance_min_t``, else 1.
    """
    return guidance if t >= guidance_min_t else 1.0


def _x0_and_eps(
    output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted clean latent and noise from the model output at ᾱ_t.

    For v both are finite at ᾱ = 0 (zero terminal SNR: x0 = -v, eps = x); epsilon divides
    by sqrt(ᾱ), which is why :func:`scheduler_config` refuses that combination.
    """
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * x - s * output, a * output + s * x
    raise InputError(
        f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
    )


def _noise(
    shape: torch.Size | tuple[int, ...], like: torch.Tensor, gen: torch.Generator | None
) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)


def _renoise(
    x0: torch.Tensor, alpha_bar: torch.Tensor, gen: torch.Generator | None
) -> torch.Tensor:
    """q(x_t | x_0): ``sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε``."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * _noise(x0.shape, x0, gen)


def _check_steps(steps: int, scheduler: Scheduler) -> None:
    if not 1 <= steps <= scheduler.num_train_timesteps:
        raise InputError(
            f"steps must be in [1, {scheduler.num_train_timesteps}] (the training timesteps), "
            f"got {steps}"
        )


def _denoise(
    unet: nn.Module,
    scheduler: Scheduler,
    x: torch.Tensor,
    z: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    guidance: float,
    generator: torch.Generator | None,
    eta: float,
    guidance_min_t: int = 0,
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    return_trajectory: bool = False,
) -> tuple[torch.Tensor, Trajectory | None]:
    """The one DDIM loop; ``known``/``mask`` re-impose the known region after each step."""
    alphas = scheduler.alphas_cumprod.to(device=x.device, dtype=x.dtype)
    one = torch.ones((), device=x.device, dtype=x.dtype)
    xs, x0s = [], []
    estimate = None  # the previous step's x0 for a self-conditioned UNet
    for i, t in enumerate(timesteps.tolist()):
        a_t = alphas[t]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else one
        w = step_guidance(t, guidance, guidance_min_t)
        tt = torch.full((x.shape[0],), t, device=x.device)
        out = guided_output(unet, x, tt, z, w, estimate)
        x0, eps = _x0_and_eps(out, x, a_t, scheduler.prediction_type)
        estimate = x0 if self_conditioned(unet) else None
        if return_trajectory:
            xs.append(x)
            x0s.append(x0)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * _noise(x.shape, x, generator)
        if known is not None and mask is not None:
            x = mask * x + (1 - mask) * _renoise(known, a_prev, generator)
    trajectory = None
    if return_trajectory:
        trajectory = Trajectory(timesteps.cpu(), torch.stack(xs), torch.stack(x0s))
    return x, trajectory


def _schedule(start: int, steps: int, device: torch.device) -> torch.Tensor:
    """``steps`` descending integer timesteps from ``start`` to 0 (MONAI's rounded linspace)."""
    return torch.linspace(start, 0, steps, device=device).round().long()


@torch.no_grad()
def ddim_sample(
    unet: nn.Module,
    scheduler: Scheduler,
    z: torch.Tensor,
    shape: tuple[int, int, int],
    steps: int,
    guidance: float,
    generator: torch.Generator | None,
    eta: float = 0.0,
    return_trajectory: bool = False,
    guidance_min_t: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, Trajectory]:
    """Guided DDIM sampling from pure noise.

    Args:
        unet: the denoiser, in eval mode.
        scheduler: the noise schedule the UNet was trained with (its ``prediction_type`` too).
        z: (B,) slice positions in [0, 1], one per sample (validate user input with check_z).
        shape: (C, h, w) latent shape.
        steps: DDIM steps, in [1, T].
        guidance: classifier-free guidance weight w (1 = conditional only).
        generator: source of the initial noise (and of the step noise when ``eta > 0``);
            with ``eta=0`` the result is a pure function of the initial noise.
        eta: DDIM stochasticity, 0 (deterministic) to 1 (DDPM-like).
        return_trajectory: also return every x_t and predicted x0.
        guidance_min_t: steps below this timestep are not guided (:func:`step_guidance`).

    Returns:
        (B, C, h, w) sampled latents (in the scaled latent space the UNet was trained on),
        and the :class:`Trajectory` when ``return_trajectory``.
    """
    _check_steps(steps, scheduler)
    x = _noise((z.shape[0], *shape), z.float(), generator)
    timesteps = _schedule(scheduler.num_train_timesteps - 1, steps, z.device)
    out, traj = _denoise(
        unet,
        scheduler,
        x,
        z,
        timesteps,
        guidance=guidance,
        generator=generator,
        eta=eta,
        guidance_min_t=guidance_min_t,
        return_trajectory=return_trajectory,
    )
    return (out, traj) if return_trajectory else out  # type: ignore[return-value]


@torch.no_grad()
def pndm_sample(
    unet: nn.Module,
    schedule: Mapping[str, Any],
    z: torch.Tensor,
    shape: tuple[int, int, int],
    steps: int,
    guidance: float,
    generator: torch.Generator | None,
    *,
    guidance_min_t: int = 0,
) -> torch.Tensor:
    """Guided sampling from pure noise with MONAI's PNDM (PLMS) steps: ``steps + 1`` forwards.

    The guided model output is turned into epsilon at its own timestep before MONAI's
    ``PNDMScheduler`` combines the outputs of several steps: epsilon is what PLMS
    extrapolates (constant along an exact trajectory), v is not. MONAI's timesteps are
    ``k * (T // steps)``, so sampling starts at t = (steps - 1) * (T // steps) (900 for
    10 of 1000 steps), not at T - 1 as :func:`ddim_sample` does.

    Args:
        unet: the denoiser, in eval mode.
        schedule: the model's :func:`scheduler_config` (its ``prediction_type`` too).
        z: (B,) slice positions in [0, 1].
        shape: (C, h, w) latent shape.
        steps: sampling steps, in [1, T].
        guidance: classifier-free guidance weight w (1 = conditional only).
        generator: source of the initial noise; the result is a pure function of it.
        guidance_min_t: steps below this timestep are not guided (:func:`step_guidance`).

    Returns:
        (B, C, h, w) sampled latents in the scaled latent space.

    Raises:
        InputError: steps outside [1, T], or a first timestep with ᾱ = 0 (MONAI's leading
            spacing starts at (steps - 1) * (T // steps), which is T - 1 only for steps = T).
    """
    scheduler = _monai_scheduler(
        PNDMScheduler,
        schedule,
        prediction_type="epsilon",
        skip_prk_steps=True,
        set_alpha_to_one=True,
    )
    _check_steps(steps, scheduler)
    x = _noise((z.shape[0], *shape), z.float(), generator)
    alphas = scheduler.alphas_cumprod.to(device=x.device, dtype=x.dtype)
    scheduler.set_timesteps(steps, device=z.device)
    timesteps = scheduler.timesteps.tolist()
    if alphas[timesteps[0]] == 0:  # PLMS steps divide by ᾱ_t
        raise InputError(
            f"pndm cannot start at ᾱ = 0 (zero_terminal_snr with steps = T = {steps}); "
            "use fewer steps or the ddim sampler"
        )
    # PLMS warm-up (as diffusers' skip_prk_steps): the second timestep comes twice, the first
    # time as the corrector of the first step. MONAI's step counts on it, but its own
    # skip_prk_steps schedule leaves it out, which ends sampling one step short of clean.
    estimate = None  # the previous step's x0 for a self-conditioned UNet
    for t in timesteps[:2] + timesteps[1:]:
        w = step_guidance(t, guidance, guidance_min_t)
        tt = torch.full((x.shape[0],), t, device=x.device)
        out = guided_output(unet, x, tt, z, w, estimate)
        x0, eps = _x0_and_eps(out, x, alphas[t], schedule["prediction_type"])
        estimate = x0 if self_conditioned(unet) else None
        x, _ = scheduler.step(eps, t, x)
    return x


def guided_sample(
    unet: nn.Module,
    schedule: Mapping[str, Any],
    z: torch.Tensor,
    shape: tuple[int, int, int],
    *,
    sampler: Sampler,
    steps: int,
    guidance: float,
    generator: torch.Generator | None,
    guidance_min_t: int = 0,
) -> torch.Tensor:
    """Guided sampling from pure noise with the sampler named: the one entry point.

    Args:
        unet: the denoiser, in eval mode.
        schedule: the model's :func:`scheduler_config`.
        z: (B,) slice positions in [0, 1].
        shape: (C, h, w) latent shape.
        sampler: ``ddim`` (:func:`ddim_sample`, eta 0) or ``pndm`` (:func:`pndm_sample`).
        steps: sampling steps.
        guidance: classifier-free guidance weight.
        generator: source of the initial noise.
        guidance_min_t: steps below this timestep are not guided (:func:`step_guidance`).

    Returns:
        (B, C, h, w) sampled latents.

    Raises:
        ValueError: an unknown sampler or steps outside [1, T].
    """
    if sampler == "ddim":
        return ddim_sample(  # type: ignore[return-value]
            unet,
            build_scheduler(schedule, "ddim"),
            z,
            shape,
            steps,
            guidance,
            generator,
            guidance_min_t=guidance_min_t,
        )
    if sampler == "pndm":
        return pndm_sample(
            unet, schedule, z, shape, steps, guidance, generator, guidance_min_t=guidance_min_t
        )
    raise InputError(f"sampler must be 'ddim' or 'pndm', got {sampler!r}")


@torch.no_grad()
def sdedit(
    unet: nn.Module,
    scheduler: Scheduler,
    latent: torch.Tensor,
    z: torch.Tensor,
    strength: float,
    steps: int,
    guidance: float,
    generator: torch.Generator | None,
    *,
    guidance_min_t: int = 0,
) -> torch.Tensor:
    """Image-to-image (SDEdit, Meng et al. 2022): noise the latent to t = strength·T, denoise.

    Args:
        unet: the denoiser, in eval mode.
        scheduler: the noise schedule the UNet was trained with.
        latent: (B, C, h, w) scaled latents of the input slices.
        z: (B,) target slice positions in [0, 1].
        strength: in [0, 1]; 0 returns the input, 1 ignores it (pure sampling).
        steps: DDIM steps of a full schedule; ``round(steps * strength)`` (at least 1) are run.
        guidance: classifier-free guidance weight w.
        generator: source of the added noise.
        guidance_min_t: steps below this timestep are not guided (:func:`step_guidance`).

    Returns:
        (B, C, h, w) edited latents.
    """
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be in [0, 1], got {strength}")
    _check_steps(steps, scheduler)
    if strength == 0.0:
        return latent.clone()
    start = round(strength * (scheduler.num_train_timesteps - 1))
    timesteps = _schedule(start, max(1, round(steps * strength)), latent.device)
    alphas = scheduler.alphas_cumprod.to(device=latent.device, dtype=latent.dtype)
    x = _renoise(latent, alphas[start], generator)
    out, _ = _denoise(
        unet,
        scheduler,
        x,
        z,
        timesteps,
        guidance=guidance,
        generator=generator,
        eta=0.0,
        guidance_min_t=guidance_min_t,
    )
    return out


@torch.no_grad()
def inpaint(
    unet: nn.Module,
    scheduler: Scheduler,
    latent: torch.Tensor,
    mask: torch.Tensor,
    z: torch.Tensor,
    steps: int,
    guidance: float,
    generator: torch.Generator | None,
    *,
    guidance_min_t: int = 0,
) -> torch.Tensor:
    """Regenerate the region inside ``mask``; the rest follows the input (RePaint-style).

    After every DDIM step the known region is replaced by the input latent noised to the
    step's new timestep (no resampling), so the last step leaves it equal to the input.

    Args:
        unet: the denoiser, in eval mode.
        scheduler: the noise schedule the UNet was trained with.
        latent: (B, C, h, w) scaled latents of the input slices.
        mask: (B, 1, h, w) or (B, C, h, w) at latent resolution, 1 inside the region to
            generate and 0 where the input is kept (fractional values blend).
        z: (B,) slice positions in [0, 1].
        steps: DDIM steps.
        guidance: classifier-free guidance weight w.
        generator: source of the initial and re-noising noise.
        guidance_min_t: steps below this timestep are not guided (:func:`step_guidance`).

    Returns:
        (B, C, h, w) latents equal to the input outside the mask.
    """
    _check_steps(steps, scheduler)
    if mask.ndim != 4 or mask.shape[0] != latent.shape[0] or mask.shape[2:] != latent.shape[2:]:
        raise InputError(
            f"mask must have shape (B, 1, h, w) matching latent {tuple(latent.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    mask = mask.to(latent.dtype)
    timesteps = _schedule(scheduler.num_train_timesteps - 1, steps, latent.device)
    alphas = scheduler.alphas_cumprod.to(device=latent.device, dtype=latent.dtype)
    start = _renoise(latent, alphas[timesteps[0]], generator)
    x = mask * _noise(latent.shape, latent, generator) + (1 - mask) * start
    out, _ = _denoise(
        unet,
        scheduler,
        x,
        z,
        timesteps,
        guidance=guidance,
        generator=generator,
        eta=0.0,
        guidance_min_t=guidance_min_t,
        known=latent,
        mask=mask,
    )
    return out
