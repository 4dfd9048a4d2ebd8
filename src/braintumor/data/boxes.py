"""Tumor bounding boxes that come with a source: read once by the merge, in the raw image's pixels.

Two formats, as detection datasets export them (``download.sources.<name>.boxes``):

- ``yolo``: beside each image ``N.jpg`` a ``N.txt``, one line per box, ``class x_centre y_centre
  width height``, the last four normalised to the image's width and height (the class id is the
  exporting repository's own and is ignored: the class folder is the label);
- ``csv``: one file (``boxes_csv``, below the folder that holds the class folders) with columns
  ``path`` (as below that folder, e.g. ``glioma/12.jpg``), ``x0, y0, x1, y1`` in pixels.

The merge writes ``data/interim/boxes.csv`` (:data:`BOX_COLUMNS`, one row per box, pixels of the raw
image, end-exclusive); ``braintumor.preprocess.slices.box_to_slice`` then carries a box through the
same crop, pad and resize as the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pandas as pd

BOX_COLUMNS = ["id", "x0", "y0", "x1", "y1"]
YOLO_SUFFIX = ".txt"
# Exporters round; a normalised coordinate a hair outside [0, 1] is clipped, a larger excess is an error.
_SLACK = 0.01


class BoxFileError(ValueError):
    """A box annotation that cannot be read, named with its file and line."""


def parse_yolo_boxes(text: str, width: int, height: int, where: str) -> list[tuple[float, float, float, float]]:
    """Pixel boxes (x0, y0, x1, y1) from the text of a YOLO label file of a ``width`` x ``height`` image.

    Blank lines are skipped; a file without boxes gives ``[]``.

    Raises:
        BoxFileError: a line without five numbers, a non-positive size, or a box outside the image;
            the message names ``where`` and the line.
    """
    boxes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            _, xc, yc, w, h = (float(f) for f in fields)
        except ValueError:
            raise BoxFileError(f"{where} line {number}: expected 'class x_centre y_centre width height', got {line!r}") from None
        x0, x1, y0, y1 = xc - w / 2, xc + w / 2, yc - h / 2, yc + h / 2
        if w <= 0 or h <= 0 or min(x0, y0) < -_SLACK or max(x1, y1) > 1 + _SLACK:
            raise BoxFileError(f"{where} line {number}: box {line.strip()!r} is empty or outside the image "
                               "(coordinates are normalised to 0..1)")
        # to a thousandth of a pixel: exact enough, and free of float noise in boxes.csv
        pixels = (max(x0, 0.0) * width, max(y0, 0.0) * height, min(x1, 1.0) * width, min(y1, 1.0) * height)
        boxes.append(tuple(round(v, 3) for v in pixels))
    return boxes


def yolo_label_path(image_relpath: str) -> str:
    """The YOLO label file of an image: same folder, same stem, ``.txt``."""
    return str(PurePosixPath(image_relpath).with_suffix(YOLO_SUFFIX))


def yolo_box_table(images: pd.DataFrame, label_files: dict[str, Path]) -> pd.DataFrame:
    """Boxes of the images of one YOLO source.

    Args:
        images: manifest rows of the source's readable images: ``id``, ``relpath`` (below the class
            root), ``width``, ``height``.
        label_files: relpath of each label file of the source -> its path on disk.

    Returns:
        :data:`BOX_COLUMNS`, one row per box; an image without a label file has none.
    """
    rows = []
    for record in images.itertuples(index=False):
        label = label_files.get(yolo_label_path(record.relpath))
        if label is None:
            continue
        for box in parse_yolo_boxes(label.read_text(), int(record.width), int(record.height), str(label)):
            rows.append((record.id, *box))
    return pd.DataFrame(rows, columns=BOX_COLUMNS)


def csv_box_table(images: pd.DataFrame, csv_path: Path) -> pd.DataFrame:
    """Boxes of the images of one source from its CSV (path, x0, y0, x1, y1 in pixels).

    Raises:
        BoxFileError: a missing column, a path that is not a readable image of the source, or a box that
            is empty or outside its image; the message names the CSV and the rows.
    """
    if not csv_path.is_file():
        raise BoxFileError(f"box CSV {csv_path} is missing")
    table = pd.read_csv(csv_path, keep_default_na=False)
    missing = [c for c in ("path", "x0", "y0", "x1", "y1") if c not in table.columns]
    if missing:
        raise BoxFileError(f"{csv_path}: columns {missing} are missing (expected path, x0, y0, x1, y1)")
    by_path = images.set_index("relpath")
    unknown = sorted(set(table["path"]) - set(by_path.index))
    if unknown:
        raise BoxFileError(f"{csv_path}: {len(unknown)} paths are not readable images of the source, e.g. {unknown[:5]}")
    table = table.join(by_path[["id", "width", "height"]], on="path")
    bad = table[(table["x1"] <= table["x0"]) | (table["y1"] <= table["y0"]) | (table["x0"] < 0) | (table["y0"] < 0)
                | (table["x1"] > table["width"]) | (table["y1"] > table["height"])]
    if len(bad):
        raise BoxFileError(f"{csv_path}: rows {(bad.index + 2).tolist()[:10]} (file lines) are empty boxes or outside "
                           "their image")
    return table[BOX_COLUMNS].astype({c: float for c in BOX_COLUMNS[1:]}).reset_index(drop=True)


def annotation_files(relpaths: Sequence[str], fmt: str, boxes_csv: str) -> set[str]:
    """The files of a source that are box annotations, not images: its YOLO label files (a ``.txt`` with an
    image of the same stem beside it) or its box CSV."""
    if fmt == "csv":
        return {str(PurePosixPath(boxes_csv))} & set(relpaths)
    if fmt == "yolo":
        stems = {str(PurePosixPath(r).with_suffix("")) for r in relpaths if PurePosixPath(r).suffix.lower() != YOLO_SUFFIX}
        return {r for r in relpaths if PurePosixPath(r).suffix.lower() == YOLO_SUFFIX
                and str(PurePosixPath(r).with_suffix("")) in stems}
    return set()
