"""Stage download@<name>: fetch one raw source.

Params: download.sources.<name>
Outputs: data/raw/<name>/ (images/ as published, source.json; phantom: masks/, planted.json)
"""

from __future__ import annotations

import argparse

from braintumor.core.config import load_params
from braintumor.data.download import fetch_source
from braintumor.core.logs import setup_logging
from braintumor.core.paths import ProjectPaths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a source name from download.sources")
    args = parser.parse_args(argv)
    log = setup_logging(f"download@{args.name}")
    paths = ProjectPaths.discover()
    params = load_params(paths.params)
    if args.name not in params.download.sources:
        parser.error(f"unknown source {args.name!r}; download.sources has {sorted(params.download.sources)}")
    source = params.download.sources[args.name]
    record = fetch_source(args.name, source, paths.raw_source(args.name), paths.main_root)
    log.info("%s (%s): %d files, file-list sha256 %s", args.name, source.kind, record["file_count"], record["file_list_sha256"][:12])
    return record


if __name__ == "__main__":
    main()
