"""Stage preprocess: every readable image -> one cached uint8 array.

All readable images are cached, duplicates included, so that the leaky `source_folders` split can be
built from the same cache; the leak-free split uses only the kept ones.
Params: preprocess
Inputs: data/interim/manifest.csv, data/raw/
Outputs: data/processed/images.npy (N, S, S) uint8, data/processed/index.csv (row -> manifest id)
"""

from __future__ import annotations

import pandas as pd

from braintumor.core import atomic
from braintumor.core.config import load_params
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths
from braintumor.preprocess.slices import preprocess_to_array


def main() -> dict:
    log = setup_logging("preprocess")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    manifest = pd.read_csv(paths.manifest, keep_default_na=False)
    rows = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    stats = preprocess_to_array([paths.root / p for p in rows["path"]], params.preprocess, paths.images_npy)
    index = rows[["id", "label", "source", "source_split", "group", "split_group", "kept"]].copy()
    index.insert(0, "row", range(len(index)))
    atomic.write_csv(paths.images_index, index)
    log.info("%d images -> %s in %.1f s (%.0f images/s, %d workers)", stats["images"], paths.images_npy.relative_to(paths.root),
             stats["seconds"], stats["images_per_second"], stats["workers"])
    return stats


if __name__ == "__main__":
    main()
