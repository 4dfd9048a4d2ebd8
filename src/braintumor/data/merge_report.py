"""``reports/merge/duplicates.html``: the merge's decisions as thumbnails, to check by eye in a minute.

The largest duplicate groups, the label conflicts, a seeded sample of candidate pairs just above and
just below each similarity threshold (the decisions most worth a look), and the quarantined files.
One self-contained file (thumbnails inline as PNG data), rendered by Jinja2 with autoescaping.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import cv2
import jinja2
import numpy as np
import pandas as pd

from braintumor.core.imageio import UnreadableImageError, read_grayscale
from braintumor.data.keypoints import could_be_copies

THUMBNAIL_SIDE = 96
BAND = 0.01  # "just above / below a threshold": within this much similarity of it
RESIDUAL_BAND = 0.005  # the same for the keypoint copy residual, whose threshold is about 0.03


def largest_groups(manifest: pd.DataFrame, count: int) -> list[pd.DataFrame]:
    """The ``count`` duplicate groups with the most readable members, largest first (ties: lower group id)."""
    ok = manifest[(manifest["status"] == "ok") & (manifest["group_size"] > 1)]
    sizes = ok.groupby("group").size().sort_index().sort_values(ascending=False, kind="stable")
    return [ok[ok["group"] == g].sort_values("id") for g in sizes.index[:count]]


def conflict_groups(manifest: pd.DataFrame, count: int) -> list[pd.DataFrame]:
    """Up to ``count`` duplicate groups whose members carry contradicting labels (all left out of training)."""
    conflicts = manifest[manifest["drop_reason"] == "label_conflict"]
    return [members.sort_values("id") for _, members in list(conflicts.groupby("group"))[:count]]


def pairs_near_threshold(scores: np.ndarray, threshold: float, count: int, seed: int,
                         band: float = BAND) -> tuple[np.ndarray, np.ndarray]:
    """Positions of up to ``count`` candidate pairs scoring in [t, t + band) and in [t - band, t), each
    drawn with ``seed`` and sorted by score."""
    rng = np.random.default_rng(seed)
    picked = []
    for low, high in ((threshold, threshold + band), (threshold - band, threshold)):
        inside = np.flatnonzero((scores >= low) & (scores < high))
        chosen = rng.choice(inside, size=min(count, len(inside)), replace=False) if len(inside) else inside
        picked.append(chosen[np.argsort(scores[chosen], kind="stable")])
    return picked[0], picked[1]


def thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> str | None:
    """A data URI of the image shrunk to ``side`` px on its longest edge (grey PNG), or None if unreadable."""
    try:
        gray = read_grayscale(path)
    except (UnreadableImageError, OSError):
        return None
    scale = side / max(gray.shape)
    if scale < 1:
        gray = cv2.resize(gray, (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".png", gray)
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode() if ok else None


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Merge: duplicates, conflicts, quarantine</title><style>
body{font-family:system-ui,sans-serif;margin:24px;color:#1d1d1f;max-width:1300px}h2{border-bottom:1px solid #ccc;margin-top:2em}
.row{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0 16px}figure{margin:0;width:110px;font-size:.72em;word-break:break-all}
figure img{display:block;max-width:96px;max-height:96px}.kept{outline:3px solid #0a7d32}.note{color:#555;font-size:.9em}
.pair{display:flex;gap:6px;align-items:center;border:1px solid #e3e3e3;padding:6px;border-radius:6px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:.85em;text-align:left}
</style></head><body>
<h1>Merge: duplicates, conflicts, quarantine</h1>
<p class="note">{{ summary }}</p>
{%- macro image(item) %}<figure><img src="{{ item.thumb or '' }}" alt="{{ item.id }}" class="{{ 'kept' if item.kept else '' }}">
{{ item.id }}<br>{{ item.label }}{% if item.note %}<br>{{ item.note }}{% endif %}</figure>{% endmacro %}
<h2>Largest duplicate groups</h2>
<p class="note">Copies of one slice (exact or near). The copy that goes on is framed in green; the others are
removed as its duplicates, and all stay in one split.</p>
{%- for group in groups %}<h3>group {{ group.id }}: {{ group.members|length }} files ({{ group.kind }})</h3>
<div class="row">{% for item in group.members %}{{ image(item) }}{% endfor %}</div>{% else %}<p>None.</p>{% endfor %}
<h2>Label conflicts</h2>
<p class="note">Copies of one slice filed under different classes: the whole group is left out of training and evaluation.</p>
{%- for group in conflicts %}<div class="row">{% for item in group.members %}{{ image(item) }}{% endfor %}</div>
{%- else %}<p>None.</p>{% endfor %}
{%- for band in bands %}
<h2>Pairs just {{ band.side }} {{ band.name }} ({{ "%.3f"|format(band.threshold) }})</h2>
<p class="note">{{ band.meaning }}</p>
<div class="row">{% for pair in band.pairs %}<div class="pair">{{ image(pair.a) }}{{ image(pair.b) }}<b>{{ "%.4f"|format(pair.score) }}</b></div>
{%- else %}<p>No candidate pair scored here.</p>{% endfor %}</div>
{%- endfor %}
<h2>Quarantined files ({{ quarantined|length }})</h2>
<table><tr><th>file</th><th>reason</th></tr>{% for q in quarantined %}<tr><td>{{ q.id }}</td><td>{{ q.reason }}</td></tr>{% endfor %}</table>
</body></html>
"""


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(_PAGE)


def duplicates_html(manifest: pd.DataFrame, candidate_ids: np.ndarray, candidate_scores: np.ndarray, root: Path,
                    thresholds: dict[str, float], *, detail: tuple[np.ndarray, np.ndarray, float] | None = None,
                    keypoint_residual: tuple[np.ndarray, np.ndarray, float] | None = None,
                    agreement: tuple[np.ndarray, np.ndarray, float] | None = None,
                    groups: int = 12, conflicts: int = 20, pairs: int = 6, seed: int = 0,
                    quarantined_listed: int = 200) -> str:
    """The page.

    Args:
        manifest: the merge's manifest (ids, paths relative to ``root``, status, groups, kept, drop_reason).
        candidate_ids: (M, 2) manifest ids of the verified candidate pairs; candidate_scores: (M,) their similarity.
        thresholds: ``{"copy": merge.near_duplicates.verify_similarity, "look-alike": ...related_similarity}``.
        detail: the detail check's pairs (K, 2) as manifest ids, their scores (K,) and its threshold, when it is on.
        keypoint_residual: the keypoint search's matches that could be copies (L, 2) as manifest ids, their copy
            residuals (L,) and ``keypoints.copy_residual``, when it is above 0 (at or below it: copies).
        agreement: the keypoint matches under the look-alike correlation that the agreement rule scored (A, 2) as
            manifest ids, their head-box similarity (A,) and ``keypoints.agreement_similarity``, when the rule is on.
    """
    path_of = dict(zip(manifest["id"], manifest["path"]))
    record = manifest.set_index("id")

    def item(image_id: str, note: str = "") -> dict:
        row = record.loc[image_id]
        return {"id": image_id, "label": row["label"], "kept": bool(row["kept"]), "note": note,
                "thumb": thumbnail(Path(root) / path_of[image_id])}

    group_items = [{"id": int(g["group"].iloc[0]), "kind": g["duplicate_kind"].iloc[0],
                    "members": [item(i) for i in g["id"]]} for g in largest_groups(manifest, groups)]
    conflict_items = [{"members": [item(i) for i in g["id"]]} for g in conflict_groups(manifest, conflicts)]
    meaning = {"copy": "At or above: copies of one slice (one kept). Below: not copies.",
               "look-alike": "At or above: different slices that look alike (neighbouring slices of one patient): "
                             "both kept, always in one split. Below: unrelated.",
               "detail": "Copy-level pairs compared again at 96 px after registration. At or above: copies. Below: "
                         "look-alikes (neighbouring slices): both kept, in one split.",
               "keypoint copy residual": "Keypoint matches, each slice registered onto the other and its grey "
                                         "levels mapped. At or below: copies (one kept). Above: look-alikes when "
                                         "correlated enough after warping (both kept, in one split), else unrelated.",
               "agreement": "Keypoint matches correlated under the look-alike level (but at least "
                            "keypoints.agreement_correlation), scored by the head-box search. At or above: look-alikes "
                            "(both kept, in one split). Below: apart."}
    scored = [(name, threshold, candidate_ids, np.asarray(candidate_scores), BAND) for name, threshold in thresholds.items()]
    if detail is not None:
        scored.append(("detail", detail[2], detail[0], np.asarray(detail[1]), BAND))
    if keypoint_residual is not None:
        scored.append(("keypoint copy residual", keypoint_residual[2], keypoint_residual[0],
                       np.asarray(keypoint_residual[1]), RESIDUAL_BAND))
    if agreement is not None:
        scored.append(("agreement", agreement[2], agreement[0], np.asarray(agreement[1]), BAND))
    bands = []
    for name, threshold, ids, scores, band in scored:
        above, below = pairs_near_threshold(scores, threshold, pairs, seed, band)
        for side, chosen in (("above", above), ("below", below)):
            bands.append({"name": f"the {name} threshold", "side": side, "threshold": threshold,
                          "meaning": meaning.get(name, ""),
                          "pairs": [{"a": item(ids[k][0]), "b": item(ids[k][1]), "score": float(scores[k])}
                                    for k in chosen]})
    quarantined = manifest[manifest["status"] == "quarantined"]
    summary = (f"{len(manifest)} files: {int(manifest['kept'].sum())} kept, "
               f"{int(manifest['drop_reason'].str.startswith('duplicate_of:').sum())} removed as duplicates, "
               f"{int((manifest['drop_reason'] == 'label_conflict').sum())} in label conflicts, {len(quarantined)} quarantined; "
               f"{len(candidate_scores)} candidate pairs verified.")
    return _template().render(summary=summary, groups=group_items, conflicts=conflict_items, bands=bands,
                              quarantined=quarantined[["id", "reason"]].head(quarantined_listed).to_dict("records"))


def keypoint_links(manifest: pd.DataFrame, search, keypoints) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The keypoint search's matches that could be copies (:func:`could_be_copies`) as manifest id pairs,
    their copy residuals and the copy threshold: the ``keypoint_residual`` of :func:`duplicates_html`; None
    when the search made no copies (off, or ``copy_residual`` 0)."""
    if not (keypoints.enabled and keypoints.copy_residual > 0):
        return None
    chosen = could_be_copies(search.keypoint_inliers, search.keypoint_correlation, keypoints)
    return (candidate_id_pairs(manifest, search.keypoint_candidates[chosen]), search.keypoint_residual[chosen],
            keypoints.copy_residual)


def merge_page(manifest: pd.DataFrame, search, near, root: Path) -> str:
    """``reports/merge/duplicates.html`` for a merge: :func:`duplicates_html` with every band the search's
    settings (``near``: ``merge.near_duplicates``) turned on."""
    return duplicates_html(
        manifest, candidate_id_pairs(manifest, search.candidates), search.candidate_scores, root,
        {"copy": near.verify_similarity, "look-alike": near.related_similarity},
        detail=(candidate_id_pairs(manifest, search.detail_pairs), search.detail_scores, near.detail_similarity)
        if near.detail_similarity > 0 else None,
        keypoint_residual=keypoint_links(manifest, search, near.keypoints),
        agreement=agreement_links(manifest, search, near.keypoints))


def agreement_links(manifest: pd.DataFrame, search, keypoints) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The keypoint matches the agreement rule scored, as manifest id pairs, their head-box similarity and
    ``agreement_similarity``: the ``agreement`` of :func:`duplicates_html`; None when the rule is off."""
    if not (keypoints.enabled and keypoints.agreement_correlation > 0):
        return None
    return candidate_id_pairs(manifest, search.agreement_pairs), search.agreement_scores, keypoints.agreement_similarity


def candidate_id_pairs(manifest: pd.DataFrame, candidates: np.ndarray) -> np.ndarray:
    """The search's candidate pairs (positions among the readable rows) as manifest ids, (M, 2)."""
    ok_ids = manifest.loc[manifest["status"] == "ok", "id"].to_numpy()
    return ok_ids[np.asarray(candidates, np.int64)] if len(candidates) else np.empty((0, 2), object)


__all__: Sequence[str] = ("duplicates_html", "merge_page", "agreement_links", "candidate_id_pairs", "keypoint_links", "largest_groups", "conflict_groups", "pairs_near_threshold")
