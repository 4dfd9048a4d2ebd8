"""Stage merge: label, quarantine and deduplicate every used source into one manifest.

Params: download.use, merge (but merge.workers), preprocess.head_threshold
Inputs: data/raw/<name>/ for each name in download.use
Outputs: data/interim/manifest.csv, data/interim/boxes.csv (tumor boxes, raw pixels), reports/data/merge.json (metrics),
         reports/data/quarantine.csv, reports/data/conflicts.csv,
         reports/merge/duplicates.html (the largest groups, conflicts, pairs near each threshold, quarantine, as thumbnails)
"""

from __future__ import annotations

import json

from braintumor.core import atomic
from braintumor.core.config import PhantomSource, load_params
from braintumor.core.logs import setup_logging
from braintumor.data.merge import MANIFEST_COLUMNS, fetched_class_root, merge_json, merge_sources
from braintumor.core.paths import ProjectPaths
from braintumor.data.merge_report import merge_page


def main() -> dict:
    log = setup_logging("merge")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    sources = [(name, fetched_class_root(paths.raw_source(name))) for name in params.download.use]

    box_formats = {name: (params.download.sources[name].boxes, params.download.sources[name].boxes_csv)
                   for name in params.download.use if hasattr(params.download.sources[name], "boxes")}
    manifest, search, skipped, boxes = merge_sources(
        sources,
        params.merge.folder_to_label(),
        root=paths.root,
        head_threshold=params.preprocess.head_threshold,
        max_colour_share=params.merge.max_colour_share,
        keep=params.merge.keep,
        near=params.merge.near_duplicates,
        workers=params.merge.workers,
        boxes=box_formats,
    )
    planted = {name: json.loads((paths.raw_source(name) / "planted.json").read_text()) for name in params.download.use
               if isinstance(params.download.sources[name], PhantomSource)}
    report = merge_json(manifest, search, planted, skipped)
    for name, count in boxes.assign(source=boxes["id"].str.split("/").str[0]).groupby("source")["id"].nunique().items():
        report["per_source"][name]["images_with_boxes"] = int(count)

    atomic.write_csv(paths.manifest, manifest[MANIFEST_COLUMNS])
    atomic.write_csv(paths.boxes_csv, boxes)
    atomic.write_csv(paths.data_reports / "quarantine.csv", manifest.loc[manifest["status"] == "quarantined", ["id", "path", "reason"]])
    conflicts = manifest[manifest["drop_reason"] == "label_conflict"]
    atomic.write_csv(paths.data_reports / "conflicts.csv", conflicts[["group", "id", "path", "folder", "label"]])
    atomic.write_json(paths.data_reports / "merge.json", report)
    atomic.write_text(paths.reports / "merge" / "duplicates.html",
                      merge_page(manifest, search, params.merge.near_duplicates, paths.root))
    log.info("where the time went: %s", ", ".join(f"{part} {seconds:.1f} s" for part, seconds in search.seconds.items()))
    log.info(
        "%d files: %d kept, %d removed as duplicates, %d in %d label conflicts, %d quarantined",
        report["files"], report["kept"], report["duplicates"]["removed_as_duplicates"],
        report["conflicts"]["images"], report["conflicts"]["groups"], report["quarantined"],
    )
    return report


if __name__ == "__main__":
    main()
