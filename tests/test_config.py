"""params.yaml loading and validation: errors name the key and what is allowed."""

from __future__ import annotations

import copy

import pydantic
import pytest
import yaml

from braintumor.core.config import CLASS_NAMES, ParamsError, load_params, parse_params

from conftest import REPO


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _invalid(raw: dict, edit) -> str:
    bad = copy.deepcopy(raw)
    edit(bad)
    with pytest.raises(ParamsError) as info:
        parse_params(bad)
    return str(info.value)


def test_committed_params_load_and_describe_the_real_kaggle_run():
    params = load_params(REPO / "params.yaml")
    assert [params.download.sources[n].kind for n in params.download.use] == ["kaggle", "kaggle"]
    assert set(params.merge.label_map) == {*CLASS_NAMES, "tumor"}
    assert params.merge.folder_to_label()["notumor"] == "no_tumor"
    assert params.merge.folder_to_label()["no"] == "no_tumor"  # a bare `no` would be YAML false


def test_params_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(pydantic.ValidationError, match="Instance is frozen"):
        params.split.seed = 1
    assert params.split.seed == load_params(REPO / "params.yaml").split.seed


def test_unknown_key_is_named(raw):
    message = _invalid(raw, lambda r: r["preprocess"].update(imagesize=3))
    assert "preprocess.imagesize: unknown key" in message


def test_bad_choice_lists_allowed_values(raw):
    message = _invalid(raw, lambda r: r["merge"].update(keep="best"))
    assert "merge.keep" in message and "'largest'" in message and "'first_source'" in message


def test_bad_source_kind_lists_kinds(raw):
    message = _invalid(raw, lambda r: r["download"]["sources"]["phantom"].update(kind="phantm"))
    assert "download.sources.phantom" in message
    assert all(kind in message for kind in ("'kaggle'", "'local'", "'phantom'"))


def test_used_source_must_be_defined(raw):
    message = _invalid(raw, lambda r: r["download"].update(use=["nickparvar", "nope"]))
    assert "'nope'" in message and "download.sources" in message


def test_unknown_label_in_label_map(raw):
    message = _invalid(raw, lambda r: r["merge"]["label_map"].update(astrocytoma=["astro"]))
    assert "astrocytoma" in message and "glioma" in message


def test_folder_mapped_to_two_labels(raw):
    message = _invalid(raw, lambda r: r["merge"]["label_map"]["glioma"].append("pituitary"))
    assert "'pituitary'" in message and "both" in message


def test_split_fractions_must_sum_to_one(raw):
    message = _invalid(raw, lambda r: r["split"].update(train=0.8))
    assert "split.train + split.val + split.test" in message


def test_external_sources_are_checked_against_the_fetched_ones(raw):
    message = _invalid(raw, lambda r: r["split"].update(external=["sartaj_testing"]))
    assert "split.external names ['sartaj_testing']" in message and "download.use" in message
    message = _invalid(raw, lambda r: r["split"].update(external=["nickparvar", "bilalakgz"]))
    assert "leaves no source to train on" in message
    message = _invalid(raw, lambda r: r["split"].update(external=["bilalakgz", "bilalakgz"]))
    assert "lists a source twice" in message
    fine = copy.deepcopy(raw)
    fine["split"]["external"] = ["bilalakgz"]
    assert parse_params(fine).split.external == ("bilalakgz",)


def test_out_of_range_number_names_key_and_bound(raw):
    message = _invalid(raw, lambda r: r["preprocess"].update(image_size=8))
    assert "preprocess.image_size" in message and "32" in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("download: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_bare_no_reads_as_a_folder_name_like_dvc_writes_it(tmp_path):
    # `dvc exp run -S` rewrites params.yaml in YAML 1.2 and drops the quotes around "no".
    text = (REPO / "params.yaml").read_text().replace('"no"', "no")
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").merge.folder_to_label()["no"] == "no_tumor"


def test_dump_yaml_round_trips_under_yaml_1_2_and_1_1():
    import yaml

    from braintumor.core.config import dump_yaml, read_yaml

    value = {"use": ["phantom"], "word": "no", "flag": True, "none": None, "rate": 1.5e-05, "n": 3, "empty": ""}
    for flow in (False, True):
        text = dump_yaml(value, flow=flow)
        assert read_yaml(text) == value == yaml.safe_load(text)
    assert dump_yaml(["phantom"], flow=True) == "[phantom]" and dump_yaml(0.5, flow=True) == "0.5"
    assert dump_yaml("no", flow=True) == "'no'" and list(read_yaml(dump_yaml(value))) == list(value)
