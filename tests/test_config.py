"""params.yaml loading: profiles, unknown keys, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", ["demo", "workstation", "tiny"])
def test_shipped_params_load_for_every_profile(profile: str) -> None:
    params = load_params(ROOT / "params.yaml", profile=profile)
    assert params.profile == profile
    assert params.prepare.image_size in (32, 64, 128, 256)


def test_profile_overrides_only_what_it_names() -> None:
    raw = {
        "prepare": {"image_size": 64, "n_slices": 32},
        "profiles": {"big": {"prepare": {"image_size": 128}}},
    }
    params = params_from_dict(raw, profile="big")
    assert params.prepare.image_size == 128
    assert params.prepare.n_slices == 32


def test_unknown_key_is_rejected_with_its_path() -> None:
    with pytest.raises(ConfigError, match=r"autoencoder\.vq\.num_kodes"):
        params_from_dict({"autoencoder": {"vq": {"num_kodes": 12}}})


def test_unknown_profile_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'gpu'"):
        params_from_dict({"profiles": {"workstation": {}}}, profile="gpu")


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"ldm: .*attention_levels"):
        params_from_dict({"ldm": {"channels": [8, 8], "attention_levels": [True]}})
    with pytest.raises(ConfigError, match=r"prepare: .*percentiles"):
        params_from_dict({"prepare": {"percentiles": [99, 1]}})
    for bad in (-0.1, float("nan"), "half"):
        with pytest.raises(ConfigError, match=r"ldm.*decode_posterior_std"):
            params_from_dict({"ldm": {"decode_posterior_std": bad}})
    with pytest.raises(ConfigError, match=r"ldm.*posterior_samples"):
        params_from_dict({"ldm": {"posterior_samples": "sometimes"}})
    with pytest.raises(ConfigError, match=r"ldm.*decode_noise"):
        params_from_dict({"ldm": {"decode_noise": "everywhere"}})
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"ldm.*dropout"):
            params_from_dict({"ldm": {"dropout": bad}})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
