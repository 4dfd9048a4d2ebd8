"""Stage split: stratified, leak-free train/val/test (or a source's own folders, leaky or made clean).

Params: split
Inputs: data/interim/manifest.csv, data/processed/index.csv
Outputs: data/split/split.csv (row in images.npy, id, label, group, split, training weight),
    data/split/external.csv (the external sources' images new to the others, split.external),
    data/split/external_removed.csv (the external images left out, with the reason and the image they match),
    reports/data/split.json (metrics)
"""

from __future__ import annotations

import pandas as pd

from braintumor.core import atomic
from braintumor.core.config import load_params
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.split.partition import (external_report, separate_external, split_by_strategy, split_fingerprint,
                                        split_report, with_cache_rows)


def main() -> dict:
    log = setup_logging("split")
    paths = ProjectPaths.discover()
    params = load_params(paths.params).split
    manifest = pd.read_csv(paths.manifest, keep_default_na=False)
    internal, external, removed = separate_external(manifest, params.external)
    rows, clean_test = split_by_strategy(internal, params)
    index = pd.read_csv(paths.images_index, keep_default_na=False)
    table = with_cache_rows(rows, index)[["row", "id", "source", "label", "group", "split_group", "split", "weight"]]
    external_table = with_cache_rows(external, index)[["row", "id", "source", "label", "group", "split_group"]]
    report = split_report(table, params.strategy)
    if params.external:
        report["external"] = external_report(external, removed, params.external)
        log.info("external sets (never trained on): %s", {s: (e["n"], e["removed"]) for s, e in report["external"].items()})
    report["fingerprint"] = split_fingerprint(table)
    if clean_test is not None:
        report["clean_test"] = clean_test
        log.info("%s's %s folder: %s", params.test_source, params.test_folder, clean_test)
    leaks = report["leakage"]["duplicate_groups_spanning_splits"] + report["leakage"]["related_groups_spanning_splits"]
    if params.strategy != "source_folders" and leaks:
        raise AssertionError(f"leak_free split leaks {report['leakage']} across splits")
    if leaks:
        log.warning("LEAKY split (%s): %d duplicate groups span train/val/test; numbers on it are inflated", params.strategy, leaks)
    atomic.write_csv(paths.split_csv, table)
    atomic.write_csv(paths.external_csv, external_table)
    atomic.write_csv(paths.external_removed_csv, removed[["id", "source", "label", "reason", "matches"]])
    atomic.write_json(paths.data_reports / "split.json", report)
    log.info("%s: %s (training: %d images of %d groups), %d groups span splits", params.strategy,
             report["per_split"], report["train_images"], report["train_groups"], leaks)
    return report


if __name__ == "__main__":
    main()
