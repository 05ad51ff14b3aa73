"""Conformance of foresight's one-step extraction and DA3 teacher to the released code's fixtures
(tests/reference/svam_tiny §1 and tests/reference/da3_tiny), through foresight's own code paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from foresight.pipelines.conformance import check_fixture, group_arrays, load_fixture
from foresight.pipelines.conformance import extract as extract_group

REFERENCE = Path(__file__).resolve().parent / "reference"
SVAM, DA3 = REFERENCE / "svam_tiny", REFERENCE / "da3_tiny"
EXTRACT_ARRAYS = set(extract_group.TOLERANCES) - {"text_hidden"}  # an input: the text encoder is not shipped


@pytest.fixture(scope="module")
def svam():
    io, config = load_fixture(SVAM)
    model = extract_group.load_fixture_svd(SVAM, config["extract"])
    return io, config, model


def recompute(svam, **onestep_update):
    io, config, model = svam
    params = extract_group.release_params(config["extract"])
    if onestep_update:
        params = params.model_copy(update={"onestep": params.onestep.model_copy(update=onestep_update)})
    return extract_group.recompute(model, params, extract_group.fixture_inputs(group_arrays(io, "extract")))


def test_every_extract_array_matches_the_release():
    results = check_fixture(SVAM, ["extract"])
    assert {r.name for r in results} == EXTRACT_ARRAYS  # every computed array is compared
    failed = [(r.name, r.max_abs_err, r.atol) for r in results if not r.passed]
    assert not failed
    exact = {r.name: r.max_abs_err for r in results if r.atol == r.rtol == 0}
    assert exact == {"token_ids": 0.0, "attention_mask": 0.0, "added_time_ids": 0.0}


def test_release_settings_map_onto_foresight_settings(svam):
    _, config, _ = svam
    params = extract_group.release_params(config["extract"])
    assert params.feature_blocks == [0, 1] and params.text_position_encoding is False
    assert (params.onestep.fps_id, params.onestep.noise_aug_strength, params.onestep.schedule_steps) == ("fps", 0.0, 20)
    last_only = extract_group.release_params({**config["extract"], "use_all_layer": False})
    assert last_only.feature_blocks == [1]


def test_derived_cases_of_spec_1_4(svam):
    """k = 1 last layer only and k = 0 are slices of the stored features (SPEC.md §1.4)."""
    io, config, model = svam
    inputs = extract_group.fixture_inputs(group_arrays(io, "extract"))
    features = io["extract.features"]
    for blocks, expected in (([1], features[:, :, 64:]), ([0], features[:, :, :64, ::2, ::2])):
        params = extract_group.release_params(config["extract"]).model_copy(update={"feature_blocks": blocks})
        got = extract_group.recompute(model, params, inputs)["features"]
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("quirk, update, broken", [
    ("fps - 1 instead of fps as is", {"fps_id": "fps-1"}, "added_time_ids"),
    ("stock noise augmentation 0.02", {"noise_aug_strength": 0.02}, "aug_emb"),
])
def test_each_release_quirk_is_a_setting_that_matters(svam, quirk, update, broken):
    io = svam[0]
    got = recompute(svam, **update)
    assert not np.allclose(got[broken], io[f"extract.{broken}"], atol=1e-5), quirk
    assert not np.allclose(got["features"], io["extract.features"], atol=2e-4, rtol=1e-4), quirk


def test_text_position_encoding_on_changes_the_features(svam):
    io, config, model = svam
    params = extract_group.release_params(config["extract"]).model_copy(update={"text_position_encoding": True})
    got = extract_group.recompute(model, params, extract_group.fixture_inputs(group_arrays(io, "extract")))
    assert not np.allclose(got["features"], io["extract.features"], atol=2e-4, rtol=1e-4)


def test_every_da3_array_matches_the_official_code():
    results = check_fixture(DA3)
    assert results and all(r.group == "da3" for r in results)
    failed = [(r.name, r.max_abs_err) for r in results if not r.passed]
    assert not failed
    io, _ = load_fixture(DA3)
    compared = {r.name.removesuffix("_forward") for r in results}
    assert compared == set(io) - {"input_multiview", "input_single", "refsel_multiview_cls_in",
                                  "refsel_threeview_cls_in"}


def test_a_group_without_a_module_fails_as_not_implemented(tmp_path, monkeypatch):
    import foresight.pipelines.conformance as conformance

    monkeypatch.setattr(conformance, "GROUP_MODULES", ("nosuch", "da3"))
    np.savez(tmp_path / "io.npz", **{"nosuch.array": np.zeros(2, np.float32)})
    (tmp_path / "config.json").write_text("{}")
    (result,) = conformance.check_fixture(tmp_path)
    assert (result.group, result.passed) == ("nosuch", False) and "not implemented" in result.detail


def test_shipped_text_encoder_weights_are_run_through_foresights_text_path(tmp_path):
    """A fixture generated with the text encoder's weights: ``text_hidden`` is recomputed by
    foresight's tokeniser call and ``embed_texts`` and compared (here against transformers' own
    CLIPTextModelWithProjection on the recorded ids and mask)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    io, config = load_fixture(SVAM)
    settings = config["extract"]
    torch.manual_seed(0)
    release = CLIPTextModelWithProjection(CLIPTextConfig(**settings["text_encoder_config"])).eval()
    save_file({k: v.contiguous() for k, v in release.state_dict().items()}, str(tmp_path / "model_text_encoder.safetensors"))
    with torch.no_grad():
        reference = release(input_ids=torch.from_numpy(io["extract.token_ids"]),
                            attention_mask=torch.from_numpy(io["extract.attention_mask"])).last_hidden_state.numpy()
    got = extract_group.text_hidden(tmp_path / "model_text_encoder.safetensors", settings)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-5)
    shipped = {**config, "extract": {**settings, "text_encoder_weights_shipped": True},
               "weights_files": {**config["weights_files"], "model_text_encoder.safetensors": {}}}
    assert extract_group.text_encoder_weights(tmp_path, shipped) == tmp_path / "model_text_encoder.safetensors"
    assert extract_group.text_encoder_weights(tmp_path, config) is None
