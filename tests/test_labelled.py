"""Labelled synthesis: covariate conditioning (unknown tokens, subsets, guidance), the schema
in model files, tissue masks decoded with their image, and ``generate``'s labelled requests."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from support import TINY_COND, TINY_LATENT_SHAPE, TINY_LDM, TINY_SCHEMA
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.errors import InputError
from pipeline.core.labels import (
    Covariate,
    covariate_codes,
    covariate_schema,
    schema_from_meta,
    schema_to_meta,
)
from pipeline.data.manifests import read_manifest
from pipeline.inference.diffusion import BoundCovariates, guided_output
from pipeline.inference.generate import generate
from pipeline.inference.sampling import Samples, load_generator, sample_slices
from pipeline.models.conditioning import Conditioner, drop_covariates
from pipeline.models.unet import ZConditionedUNet

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = math.nan


def _conditioner() -> Conditioner:
    torch.manual_seed(0)
    cond = Conditioner(TINY_COND, TINY_SCHEMA, null_token=True)
    with torch.no_grad():  # distinct unknown tokens (they start at zero)
        cond.unknown.normal_()  # type: ignore[union-attr]
        cond.null.normal_()  # type: ignore[union-attr]
    return cond


# --- schema ------------------------------------------------------------------------------


def test_schema_from_a_manifest_reads_ranges_categories_and_blanks() -> None:
    manifest = pd.DataFrame(
        {"age": [20, 71.5, None], "sex": ["F", "m", "F"], "cdr": [None, 0.5, 1.0]}
    )
    schema = covariate_schema(manifest, ["age", "sex", "cdr"])
    assert schema == (
        Covariate("age", "continuous", 20.0, 71.5),
        Covariate("sex", "categorical", categories=("F", "M")),
        Covariate("cdr", "categorical", categories=("0.5", "1"), ordered=True),
    )
    codes = covariate_codes(manifest, schema)
    np.testing.assert_array_equal(np.isnan(codes), [[0, 0, 1], [0, 0, 0], [1, 0, 0]])
    assert codes[1].tolist() == [71.5, 1.0, 0.0]
    assert schema_from_meta(schema_to_meta(schema)) == schema
    assert schema_from_meta(None) == ()  # a model file from before covariates


@pytest.mark.parametrize(
    ("names", "message"),
    [(["height"], "'height' is not a known covariate"), (["mmse"], "has no 'mmse' value")],
)
def test_schema_refuses_unknown_or_absent_covariates(names: list[str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        covariate_schema(pd.DataFrame({"age": [30.0], "mmse": [None]}), names)


# --- the Conditioner ----------------------------------------------------------------------


def test_unknown_token_serves_blanks_dropout_and_omitted_covariates() -> None:
    cond = _conditioner()
    z = torch.tensor([0.3, 0.3])
    blank = torch.full((2, 3), NAN)
    assert torch.equal(cond(z, covariates=blank), cond(z))  # NaN == not given
    given = torch.tensor([[70.0, 1.0, 2.0], [70.0, 1.0, 2.0]])
    dropped = drop_covariates(given, 1.0)
    assert torch.isnan(dropped).all()
    assert torch.equal(cond(z, covariates=dropped), cond(z))
    assert torch.equal(drop_covariates(given, 0.0), given)


def test_any_subset_conditions_and_each_covariate_moves_the_embedding() -> None:
    cond = _conditioner()
    z = torch.tensor([0.5])
    full = torch.tensor([[70.0, 1.0, 2.0]])
    base = cond(z, covariates=full)
    for j in range(3):
        subset = full.clone()
        subset[0, j] = NAN
        assert not torch.allclose(cond(z, covariates=subset), base)
    older = full.clone()
    older[0, 0] = 90.0
    assert not torch.allclose(cond(z, covariates=older), base)
    # dropping the whole condition ignores the covariates too
    drop = torch.tensor([True])
    assert torch.equal(cond(z, drop, full), cond(z, drop))


def test_ordered_categories_share_their_steps_and_old_schemas_stay_tables() -> None:
    cdr = Covariate("cdr", "categorical", categories=("0", "0.5", "1"), ordered=True)
    sex = Covariate("sex", "categorical", categories=("F", "M"))
    torch.manual_seed(0)
    cond = Conditioner(TINY_COND, (cdr, sex))
    z = torch.full((3,), 0.5)
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    emb = cond(z, covariates=codes)
    steps = cond.covariates[0].weight
    # CDR k is CDR k-1 plus the learned step k
    torch.testing.assert_close(emb[1] - emb[0], steps[1])
    torch.testing.assert_close(emb[2] - emb[1], steps[2])
    # a loss on CDR-1 slices alone also trains the step from CDR 0 to 0.5; sex stays a table
    emb[2].sum().backward()
    assert (steps.grad.abs().sum(dim=1) > 0).tolist() == [True, True, True]
    assert (cond.covariates[1].weight.grad.abs().sum(dim=1) > 0).tolist() == [True, False]
    # a model file from before ``ordered`` keeps its plain table
    meta = schema_to_meta((cdr,))
    del meta[0]["ordered"]
    assert schema_from_meta(meta) == (Covariate("cdr", "categorical", categories=cdr.categories),)


def test_classifier_free_guidance_on_covariates_is_u_plus_w_c_minus_u() -> None:
    torch.manual_seed(0)
    unet = ZConditionedUNet(TINY_LDM, TINY_COND, TINY_LATENT_SHAPE[0], TINY_SCHEMA).eval()
    x = torch.randn(2, *TINY_LATENT_SHAPE)
    t = torch.tensor([500, 500])
    z = torch.tensor([0.2, 0.8])
    cov = torch.tensor([[60.0, 0.0, NAN], [85.0, 1.0, 2.0]])
    with torch.no_grad():
        guided = guided_output(BoundCovariates(unet, cov), x, t, z, 3.0)
        c = unet(x, t, z, torch.zeros(2, dtype=torch.bool), cov)
        u = unet(x, t, z, torch.ones(2, dtype=torch.bool), cov)
    torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)


# --- model files ----------------------------------------------------------------------------


def test_model_files_keep_their_schema_and_old_files_load_on_z_alone(
    labelled_generators, tiny_generators
) -> None:
    for kind in ("ldm", "pixelcnn"):
        assert load_generator(labelled_generators[kind]).schema == TINY_SCHEMA
        old = load_generator(tiny_generators[kind])
        assert old.schema == ()
        out = sample_slices(old, torch.tensor([0.5]), 0)  # samples on z alone
        assert out.images.shape == (1, 1, 32, 32) and out.tissue is None


@pytest.mark.parametrize("kind", ["ldm", "pixelcnn"])
def test_masks_come_from_the_same_decoder_pass_as_the_image(labelled_generators, kind) -> None:
    gm = load_generator(labelled_generators[kind])
    z = torch.tensor([0.25, 0.75])
    cov = torch.tensor([[70.0, 1.0, 1.0], [NAN, 0.0, NAN]])
    with_masks = sample_slices(gm, z, 3, covariates=cov, masks=True, texture=False)
    plain = sample_slices(gm, z, 3, covariates=cov, texture=False)
    torch.testing.assert_close(with_masks.images, plain.images)  # masks change no pixel
    assert with_masks.tissue is not None
    assert with_masks.tissue.shape == (2, 32, 32) and with_masks.tissue.dtype == torch.int64
    assert set(with_masks.tissue.unique().tolist()) <= {0, 1, 2, 3}


def test_masks_from_a_model_without_a_tissue_head_are_refused(tiny_generators) -> None:
    gm = load_generator(tiny_generators["ldm"])
    with pytest.raises(InputError, match="has no masks"):
        sample_slices(gm, torch.tensor([0.5]), 0, masks=True)


# --- generate ----------------------------------------------------------------------------------


def test_generate_writes_labels_masks_and_crossed_lists(labelled_generators, tmp_path) -> None:
    out = tmp_path / "syn"
    result = generate(
        labelled_generators["ldm"],
        "1,2",
        2,
        seed=5,
        out_dir=out,
        progress=False,
        device="cpu",
        covariates={"age": "60:90", "sex": "F,M", "cdr": "1"},
        masks=True,
    )
    rows = read_manifest(result.manifest)  # type: ignore[arg-type]
    assert result.slices == len(rows) == 2 * 2 * 2  # z levels x sexes x per_z
    assert {(r["z_index"], r["sex"]) for r in rows} == {(i, s) for i in "12" for s in "FM"}
    assert all(60 <= float(r["age"]) <= 90 and r["cdr"] == "1" for r in rows)
    assert {r["mmse"] for r in rows} == {""}  # not a covariate of this model
    for row in rows:
        image = np.asarray(Image.open(out / row["file"]))
        mask = np.asarray(Image.open(out / row["mask_file"]))
        assert row["mask_file"] == row["file"].replace(".png", "_mask.png")
        assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 85, 170, 255}


def test_spec_and_validate_only(labelled_generators, tmp_path) -> None:
    spec = tmp_path / "spec.csv"
    spec.write_text("z,count,cdr,age\n1,3,1,70\n2,2,,\n")
    out = tmp_path / "syn"
    checked = generate(
        labelled_generators["pixelcnn"], seed=0, out_dir=out, spec=spec, validate_only=True,
        progress=False, device="cpu",
    )  # fmt: skip
    assert checked.slices == 5 and checked.manifest is None and not out.exists()
    result = generate(
        labelled_generators["pixelcnn"], seed=0, out_dir=out, spec=spec, progress=False,
        device="cpu",
    )  # fmt: skip
    rows = read_manifest(result.manifest)  # type: ignore[arg-type]
    assert [(r["z_index"], r["cdr"], r["age"]) for r in rows] == [
        *[("1", "1", "70.0")] * 3,
        *[("2", "", "")] * 2,
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--age", "250"], "age 250 is outside the model's training range (18 to 96)"),
        (["--cdr", "3"], "cdr '3' is not one the model was trained on (allowed: 0, 0.5, 1"),
        (["--sex", "X"], "sex 'X' is not a sex code"),
        (["--covariate", "mmse=28"], "not trained on covariate 'mmse'"),
        (["--covariate", "mmse"], "expected NAME=VALUE"),
    ],
)
def test_bad_labelled_requests_are_one_line_and_write_nothing(
    labelled_generators, tmp_path, args: list[str], message: str
) -> None:
    out = tmp_path / "syn"
    result = CliRunner().invoke(
        app,
        ["generate", "--checkpoint", str(labelled_generators["ldm"]), "--z", "1", "--out",
         str(out), "--device", "cpu", *args],
    )  # fmt: skip
    assert result.exit_code != 0
    assert message in result.output and result.output.strip().count("\n") == 0, result.output
    assert not out.exists()


def test_masks_and_covariates_from_an_old_model_say_why(tiny_generators, tmp_path) -> None:
    runner = CliRunner()
    base = ["generate", "--checkpoint", str(tiny_generators["ldm"]), "--z", "1", "--out",
            str(tmp_path / "syn"), "--device", "cpu"]  # fmt: skip
    masks = runner.invoke(app, [*base, "--masks"])
    assert masks.exit_code != 0 and "has no masks" in masks.output
    age = runner.invoke(app, [*base, "--age", "70"])
    assert age.exit_code != 0 and "covariate 'age'" in age.output


def test_sdedit_and_inpaint_take_one_value_per_covariate(labelled_generators, tmp_path) -> None:
    from pipeline.data.slice_files import write_png16
    from pipeline.inference.edit import inpaint_file, sdedit_file

    slice_path, mask_path = tmp_path / "in.png", tmp_path / "mask.png"
    image = np.zeros((32, 32), np.float32)
    image[8:24, 8:24] = 0.6
    write_png16(image, slice_path)
    Image.fromarray((image > 0).astype(np.uint8) * 255).save(mask_path)
    model = labelled_generators["ldm"]
    kw = {"device": "cpu", "steps": 2}
    sdedit_file(model, slice_path, tmp_path / "a.png", "1", covariates={"age": "80"}, **kw)
    inpaint_file(model, slice_path, mask_path, tmp_path / "b.png", "1",
                 covariates={"sex": "F", "cdr": "0.5"}, **kw)  # fmt: skip
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()
    for bad, message in (({"age": "60:90"}, "one value"), ({"mmse": "28"}, "covariate 'mmse'")):
        with pytest.raises(InputError, match=message):
            sdedit_file(model, slice_path, tmp_path / "c.png", "1", covariates=bad, **kw)
    assert not (tmp_path / "c.png").exists()


def test_match_draws_covariates_from_agreeing_training_subjects(labelled_generators, tmp_path):
    result = generate(
        labelled_generators["pixelcnn"], "1,2", 6, seed=0, out_dir=tmp_path / "syn",
        progress=False, device="cpu", covariates={"cdr": "1", "age": "match", "sex": "match"},
    )  # fmt: skip
    rows = read_manifest(result.manifest)  # type: ignore[arg-type]
    pairs = {(float(r["age"]), r["sex"]) for r in rows}
    assert pairs <= {(78.0, "F"), (84.0, "M")} and len(pairs) == 2  # jointly, CDR-1 subjects
    assert {r["cdr"] for r in rows} == {"1"}
    with pytest.raises(InputError, match="no training subject with sex F, cdr 0 has a known age"):
        generate(
            labelled_generators["pixelcnn"], "1", 1, out_dir=tmp_path / "none", progress=False,
            device="cpu", covariates={"sex": "F", "cdr": "0", "age": "match"},
        )  # fmt: skip


def test_unknown_covariates_train_without_skipped_steps(tmp_path) -> None:
    """Blank covariates (young subjects' CDR) reach the model as NaN codes, but batches stay
    finite: the loop skips any batch holding a non-finite float."""
    from support import TINY_PRIOR, quiet_fit

    from pipeline.core.config import TrainConfig
    from pipeline.models.conditioning import batch_covariates
    from pipeline.models.pixelcnn import GatedPixelCNN
    from pipeline.training.prior import CodeSet, PriorTask

    codes = torch.randint(0, 16, (8, 8, 8))
    cov = torch.tensor([[30.0, 0.0, NAN], [80.0, 1.0, 2.0]] * 4)
    data = CodeSet(codes, torch.linspace(0, 1, 8), cov)
    item = data[0]
    assert torch.isfinite(item["covariates"]).all() and item["covariates_known"].tolist() == [
        True, True, False,
    ]  # fmt: skip
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in item}
    torch.testing.assert_close(batch_covariates(batch), cov[:2], equal_nan=True)
    prior = GatedPixelCNN(16, TINY_PRIOR, TINY_COND, schema=TINY_SCHEMA)
    cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=1, ckpt_every=3, eval_every=3)
    result = quiet_fit(PriorTask(prior, cfg, covariate_dropout=0.2), data, cfg, tmp_path)
    assert result.skipped_steps == 0 and result.step == 3


def test_label_fidelity_scores_real_matched_shuffled_and_masks(labelled_generators) -> None:
    from pipeline.core.config import SegmenterConfig
    from pipeline.data.datasets import EvalData
    from pipeline.evaluation.label_fidelity import fidelity_summary, label_fidelity
    from pipeline.models.probes import CovariateProbe, tissue_segmenter
    from pipeline.training.probes import CovariateLabels

    n = 12
    tissue = torch.zeros(n, 32, 32, dtype=torch.long)
    tissue[:, 8:24, 8:24] = 3
    test = EvalData(
        image=tissue[:, None].float() / 3,
        mask=(tissue > 0)[:, None].float(),
        z=torch.linspace(0, 1, n),
        z_index=torch.arange(n) % 4,
        tissue=tissue,
    )
    manifest = pd.DataFrame(
        {"age": np.linspace(30, 90, n), "sex": ["F", "F", "M"] * 4, "cdr": ["0", "1"] * 6}
    )
    torch.manual_seed(0)
    probe = CovariateProbe((4, 8), ("age", "cdr", "sex"), age_mean=60.0, age_std=20.0).eval()
    segmenter = tissue_segmenter(SegmenterConfig(features=(4, 4, 8, 8, 8, 4))).eval()
    train_labels = CovariateLabels.from_manifest(pd.DataFrame({"age": [40.0, 50.0, 90.0]}))
    report, figures = label_fidelity(
        load_generator(labelled_generators["ldm"]), test, manifest,
        probe=probe, segmenter=segmenter, n=8, seed=0, train_labels=train_labels,
    )  # fmt: skip
    asked = CovariateLabels.from_manifest(manifest.iloc[test.spread_over_z(8).numpy()]).age
    assert report["chance"]["age_mae"] == pytest.approx(np.abs(asked - 50.0).mean())  # median
    assert report["chance"]["cdr_auc"] == 0.5
    assert report["covariates"] == ["age", "sex", "cdr"] and report["n"] == 8
    for arm in ("real", "matched", "shuffled"):
        assert {"age_mae", "cdr_auc", "sex_auc"} <= set(report[arm]), report[arm]
    assert 0 <= report["mask_dice"]["dice_mean"] <= 1 and "real_mask_dice" in report
    summary = fidelity_summary(report)
    assert {"matched_age_mae", "shuffled_age_mae", "mask_dice", "real_mask_dice"} <= set(summary)
    assert figures["pairs"].shape[1] == 8 * 34 + 2 and figures["covariates"].ndim == 3
    no_probe, _ = label_fidelity(
        load_generator(labelled_generators["ldm"]), test, manifest,
        probe=None, segmenter=None, n=4, seed=0,
    )  # fmt: skip
    assert set(no_probe["skipped"]) == {"covariates", "masks"}
    # slices made beforehand (one per test slice) are read, not re-sampled: handing in the
    # real slices themselves must score exactly as the real slices do
    given = Samples(test.image, test.z, None, test.tissue)
    reused, _ = label_fidelity(
        load_generator(labelled_generators["ldm"]), test, manifest,
        probe=probe, segmenter=segmenter, n=None, seed=0, matched=given,
    )  # fmt: skip
    assert reused["n"] == n and reused["matched"] == reused["real"]
    assert reused["mask_dice"] == reused["real_mask_dice"]
    with pytest.raises(ValueError, match="one slice per test slice"):
        label_fidelity(
            load_generator(labelled_generators["ldm"]), test, manifest,
            probe=probe, segmenter=segmenter, n=None, seed=0,
            matched=Samples(test.image[:3], test.z[:3], None, test.tissue[:3]),
        )  # fmt: skip


def test_the_tissue_head_never_trains_the_image_path() -> None:
    from support import TINY_AE

    from pipeline.models.autoencoder import Autoencoder

    torch.manual_seed(0)
    model = Autoencoder(TINY_AE.model_copy(update={"tissue_weight": 1.0}), TINY_COND, "vaegan")
    out = model(torch.rand(2, 1, 32, 32), torch.tensor([0.2, 0.7]))
    torch.nn.functional.cross_entropy(
        out.tissue_logits, torch.randint(0, 4, (2, 32, 32))
    ).backward()
    assert model.decoder.tissue[-1].weight.grad.abs().sum() > 0  # the head learns
    for name, param in model.named_parameters():
        if not name.startswith("decoder.tissue"):
            assert param.grad is None or not param.grad.any(), name  # nothing else does
