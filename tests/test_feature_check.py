"""The feature-space out-of-distribution check: class Gaussians, Mahalanobis scores, the threshold set on
validation, detection summaries and the file the app reads."""

from __future__ import annotations

import numpy as np
import pytest

from braintumor.evaluate.feature_check import (FeatureCheck, detection_summary, energy_scores, fit_class_gaussians,
                                               fit_feature_check, load_feature_checks, mahalanobis_scores,
                                               save_feature_checks, threshold_for_flag_share)

MEANS = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0]])
SCALES = np.array([1.0, 0.5, 2.0])  # a shared, anisotropic covariance: diag(1, 0.25, 4)


def sample(rng: np.random.Generator, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(4), per_class)
    return MEANS[labels] + rng.normal(size=(len(labels), 3)) * SCALES, labels


def test_fitted_gaussians_recover_the_class_means_and_the_shared_covariance():
    features, labels = sample(np.random.default_rng(0), 2000)
    means, precision = fit_class_gaussians(features, labels, 4)
    np.testing.assert_allclose(means, MEANS, atol=0.1)
    np.testing.assert_allclose(np.linalg.inv(precision), np.diag(SCALES ** 2), atol=0.15)


def test_scores_are_the_squared_distance_to_the_nearest_class_in_the_covariance_metric():
    precision = np.diag(1 / SCALES ** 2)
    points = np.array([[0.0, 0.0, 0.0], [6.0, 1.0, 0.0], [0.0, 0.0, 8.0], [3.0, 0.0, 0.0]])
    # nearest class: 0 (distance 0); 1 (1 / 0.25 = 4); 3 (2^2 / 4 = 1); 0 and 1 tie at 3^2 / 1 = 9.
    np.testing.assert_allclose(mahalanobis_scores(MEANS, precision, points), [0.0, 4.0, 1.0, 9.0])
    with pytest.raises(ValueError, match="fitted on 3"):
        mahalanobis_scores(MEANS, precision, np.zeros((2, 4)))
    # The check scores through the Cholesky factor of the precision: the same numbers.
    check = FeatureCheck("layer", MEANS, precision, 1.0, 0.01, 0.01)
    np.testing.assert_allclose(check.scores(points), [0.0, 4.0, 1.0, 9.0], atol=1e-9)
    random_points = np.random.default_rng(5).normal(size=(50, 3)) * 4
    np.testing.assert_allclose(check.scores(random_points), mahalanobis_scores(MEANS, precision, random_points))


def test_training_like_features_score_low_and_features_of_another_kind_high():
    rng = np.random.default_rng(1)
    train, labels = sample(rng, 500)
    val, _ = sample(rng, 250)
    test, _ = sample(rng, 250)
    other = rng.normal(size=(300, 3)) * 2.0 + np.array([-6.0, -6.0, 0.0])  # nowhere near any class
    check = fit_feature_check("layer", train, labels, val, 4, flag_share=0.01)
    summary = detection_summary(check.scores(test), check.scores(other), check.threshold)
    assert np.median(check.scores(test)) < 3.0 < 30.0 < np.median(check.scores(other))
    assert summary["auroc"] > 0.99 and summary["flag_rate"] > 0.95 and summary["in_distribution_flag_rate"] < 0.05
    assert summary["n"] == 300


@pytest.mark.parametrize("flag_share", [0.0, 0.01, 0.05, 0.2])
def test_the_threshold_flags_the_requested_share_of_validation(flag_share):
    rng = np.random.default_rng(2)
    train, labels = sample(rng, 200)
    val, _ = sample(rng, 500)  # 2,000 validation images
    check = fit_feature_check("layer", train, labels, val, 4, flag_share)
    flagged = check.flags(val).mean()
    assert check.val_flag_rate == pytest.approx(flagged)
    assert flag_share - 1 / len(val) <= flagged <= flag_share  # quantile "higher": never more than asked
    assert check.threshold in check.scores(val)  # a validation score: the boundary image itself is kept


def test_threshold_rejects_a_share_outside_zero_to_one():
    with pytest.raises(ValueError, match=r"flag_share must be in \[0, 1\)"):
        threshold_for_flag_share(np.arange(10.0), 1.0)


def test_every_class_needs_training_features():
    features, labels = sample(np.random.default_rng(3), 5)
    with pytest.raises(ValueError, match="every class id in \\[0, 4\\) needs training images"):
        fit_class_gaussians(features[labels < 3], labels[labels < 3], 4)
    with pytest.raises(ValueError, match="finite"):
        fit_class_gaussians(np.full((4, 3), np.nan), np.arange(4), 4)


def test_energy_score_is_minus_logsumexp():
    np.testing.assert_allclose(energy_scores(np.array([[0.0, 0.0], [1000.0, 1000.0], [3.0, -50.0]])),
                               [-np.log(2), -1000 - np.log(2), -3.0], atol=1e-9)


def test_saved_checks_load_back_identically(tmp_path):
    features, labels = sample(np.random.default_rng(4), 50)
    checks = {name: fit_feature_check(f"layer_{name}", features, labels, features, 4, 0.1) for name in ("base", "finetuned")}
    path = tmp_path / "models" / "ood.npz"
    save_feature_checks(path, checks)
    loaded = load_feature_checks(path)
    assert list(loaded) == ["base", "finetuned"]
    for name, check in checks.items():
        assert loaded[name].layer == f"layer_{name}" and loaded[name].threshold == check.threshold
        np.testing.assert_allclose(loaded[name].scores(features), check.scores(features), rtol=1e-5)
    assert not list(path.parent.glob(".*"))  # written atomically: no temporary file left


def test_unusable_files_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro evaluate"):
        load_feature_checks(tmp_path / "ood.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        load_feature_checks(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", **{"finetuned/means": np.zeros((4, 3)), "finetuned/layer": np.array("x")})
    with pytest.raises(ValueError, match=r"finetuned: missing arrays \['precision', 'threshold'"):
        load_feature_checks(tmp_path / "partial.npz")
    bad = FeatureCheck("x", np.zeros((4, 3)), np.eye(2), 1.0, 0.01, 0.01).arrays()
    np.savez(tmp_path / "shape.npz", **{f"finetuned/{k}": v for k, v in bad.items()})
    with pytest.raises(ValueError, match="precision \\(d, d\\)"):
        load_feature_checks(tmp_path / "shape.npz")
