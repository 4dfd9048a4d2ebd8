"""The Grad-CAM report: which test images to show, their PNG overlays, and one HTML page that opens from disk.

``reports/gradcam/index.html`` links its images by relative paths (``overlays/<file>.png``) and
carries its CSS inline: no server, no network, no script. It shows the sanity checks first (with how
to read them), then per class the chosen test images: the preprocessed slice, the overlay of each
model, the true label, and each model's prediction with its class probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import jinja2
import numpy as np

from braintumor.explain.gradcam import overlay

OVERLAYS_FOLDER = "overlays"


@dataclass(frozen=True)
class Example:
    """One test image of the report.

    Args:
        row: its row in ``data/processed/images.npy``.
        label: true class id.
        correct: whether the reference model (the fine-tuned one) classified it correctly.
    """

    row: int
    label: int
    correct: bool


def select_examples(labels: np.ndarray, predicted: np.ndarray, rows: np.ndarray, per_class: int,
                    seed: int) -> list[Example]:
    """Up to ``per_class`` correctly and up to ``per_class`` wrongly classified images of each class.

    Drawn at random (seeded) among the candidates; ordered by class, correct ones first, then by row.

    Args:
        labels: (N,) true class ids.
        predicted: (N,) predicted class ids.
        rows: (N,) image rows, aligned with ``labels``.
        per_class: how many of each kind per class (fewer when fewer exist).
        seed: seeds the draw.
    """
    labels, predicted, rows = np.asarray(labels), np.asarray(predicted), np.asarray(rows)
    if not labels.shape == predicted.shape == rows.shape or labels.ndim != 1:
        raise ValueError(f"select_examples: labels {labels.shape}, predicted {predicted.shape} and rows "
                         f"{rows.shape} must be aligned 1-D arrays")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        for correct in (True, False):
            candidates = np.flatnonzero((labels == label) & ((predicted == labels) == correct))
            picked = rng.choice(candidates, size=min(per_class, len(candidates)), replace=False)
            chosen += [Example(int(rows[i]), int(label), correct) for i in sorted(picked, key=lambda i: rows[i])]
    return chosen


def sample_positions(eligible: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted positions of up to ``count`` entries drawn (seeded, without replacement) where ``eligible`` is true."""
    candidates = np.flatnonzero(np.asarray(eligible, bool))
    return np.sort(np.random.default_rng(seed).choice(candidates, size=min(count, len(candidates)), replace=False))


def encode_png(rgb_or_grey: np.ndarray) -> bytes:
    """PNG bytes of an RGB (H, W, 3) or grey (H, W) uint8 image."""
    image = rgb_or_grey if rgb_or_grey.ndim == 2 else cv2.cvtColor(rgb_or_grey, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {rgb_or_grey.shape} dtype {rgb_or_grey.dtype} as PNG")
    return data.tobytes()


@dataclass
class ReportItem:
    """What the page shows for one image: file names below ``overlays/`` and each model's prediction.

    Args:
        example: the image.
        image_file: the preprocessed slice.
        overlays: model name -> overlay file.
        predicted: model name -> the class id its overlay explains (the model's prediction).
        probabilities: model name -> (C,) class probabilities shown (calibrated).
    """

    example: Example
    image_file: str
    overlays: dict[str, str] = field(default_factory=dict)
    predicted: dict[str, int] = field(default_factory=dict)
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)


def report_items(examples: list[Example], images: np.ndarray,
                 explanations: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                 alpha: float) -> tuple[list[ReportItem], dict[str, bytes]]:
    """The page's items and their PNG files (name -> bytes): each slice, and its overlay for each model.

    Args:
        examples: the chosen images.
        images: (E, S, S) uint8, the slices of ``examples`` in order.
        explanations: model name -> (heatmaps (E, S, S), explained class ids (E,), probabilities to
            show (E, C)) of those slices.
        alpha: overlay opacity (see :func:`braintumor.explain.gradcam.overlay`).
    """
    items = [ReportItem(example, f"{example.row}_slice.png") for example in examples]
    pngs = {item.image_file: encode_png(image) for item, image in zip(items, images)}
    for model, (heatmaps, explained, probabilities) in explanations.items():
        for item, image, heatmap, label, probs in zip(items, images, heatmaps, explained, probabilities):
            item.overlays[model] = f"{item.example.row}_{model}.png"
            item.predicted[model] = int(label)
            item.probabilities[model] = probs
            pngs[item.overlays[model]] = encode_png(overlay(image, heatmap, alpha))
    return items, pngs


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;max-width:1200px}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{margin-bottom:.3em}
table.sanity{border-collapse:collapse;margin:.5em 0}
table.sanity td,table.sanity th{border:1px solid #ccc;padding:4px 8px;text-align:right}
table.sanity th:first-child,table.sanity td:first-child{text-align:left}
.verdict-pass{color:#0a7d32;font-weight:600}.verdict-fail{color:#b3261e;font-weight:600}
.item{display:flex;gap:12px;align-items:flex-start;margin:12px 0;padding:8px;border:1px solid #e3e3e3;border-radius:6px}
.item.wrong{border-color:#e6a0a0;background:#fff7f7}
figure{margin:0;width:200px;text-align:center;font-size:.85em}
figure img{display:block;width:200px;height:200px;image-rendering:auto}
.pred{font-size:.85em;min-width:230px}.bar{display:flex;align-items:center;gap:6px;margin:2px 0}
.bar span.name{width:90px}.bar span.track{width:100px;height:10px;background:#eee;display:inline-block}
.bar span.fill{height:10px;background:#4a78c2;display:block}.bar.top span.fill{background:#d9822b}
.note{color:#555;font-size:.9em}
"""


def _number(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# One page, autoescaped: every value below is text, only the constant CSS is marked safe.
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ css|safe }}</style></head><body>
<h1>{{ title }}</h1>
{%- for note in notes %}<p class="note">{{ note }}</p>{% endfor %}
{%- set r = sanity["randomisation"] %}
<h2>Sanity checks</h2>
<h3>Model randomisation test (Adebayo et al., 2018)</h3>
<p class="note">Grad-CAM maps of each trained model compared with those of the same model with its top
layers re-initialised, for the same {{ r["images"] }} test images and their true class. A map
that reflects what the model learnt must change: low similarity is good (1 = unchanged). Pass: mean
Spearman rank correlation below {{ r["max_rank_correlation"] }}.</p>
<table class="sanity"><tr><th>model</th><th>re-initialised layers</th><th>Spearman rank correlation</th><th>SSIM</th><th>verdict</th></tr>
{%- for model, s in r["models"].items() %}
{%- set verdict = "pass" if s["passed"] else "fail" %}
<tr><td>{{ model }}</td><td>{{ s["randomised_layers"] }} (from <code>{{ s["first_randomised_layer"] }}</code>)</td>
<td>{{ s["rank_correlation"]|number }}</td><td>{{ s["ssim"]|number }}</td><td class="verdict-{{ verdict }}">{{ verdict }}</td></tr>
{%- endfor %}
</table>
{%- set verdict = "pass" if r["passed"] else "fail" %}
<p>Overall: <span class="verdict-{{ verdict }}">{{ verdict }}</span></p>
{%- set loc = sanity["localisation"] %}
<h3>Localisation on known tumor masks</h3>
{%- if not loc["applicable"] %}
<p class="note">Not applicable: {{ loc["reason"] }}</p>
{%- else %}
{%- set tol = "%g"|format(loc["tolerance_px"]) %}
<p class="note">On {{ loc["images"] }} test images with a tumor mask (sources: {{ loc["sources"]|join(", ") }}),
Grad-CAM of the true class. <b>Pointing game</b>: share of maps whose peak lies inside the mask (and within
{{ tol }} px of it, the usual tolerance for coarse maps). <b>Energy inside</b>: share of the map's mass inside
the mask. <b>Chance</b>: what a map that knows nothing scores (the mask's share of the image). <b>Centre
prior</b>: a fixed Gaussian at the image centre, which knows only that tumors tend to sit near the middle.</p>
<table class="sanity"><tr><th>model / class</th><th>images</th><th>pointing game</th><th>within {{ tol }} px</th>
<th>energy inside</th><th>chance (pointing, energy)</th><th>chance within {{ tol }} px</th>
<th>centre prior pointing</th><th>centre prior energy</th></tr>
{%- for model, groups in loc["models"].items() %}{% for group, s in groups.items() %}
<tr><td>{{ model }} / {{ group }}</td><td>{{ s["images"] }}</td>
<td>{{ s["pointing_game"]|number }}</td><td>{{ s["pointing_game_tolerant"]|number }}</td>
<td>{{ s["energy_inside"]|number }}</td><td>{{ s["chance"]|number }}</td><td>{{ s["chance_tolerant"]|number }}</td>
<td>{{ s["centre_prior_pointing_game"]|number }}</td><td>{{ s["centre_prior_energy_inside"]|number }}</td></tr>
{%- endfor %}{% endfor %}
</table>
{%- endif %}
{%- set bx = sanity.get("boxes", {"applicable": False, "reason": "not computed"}) %}
<h3>Localisation on real tumor boxes</h3>
{%- if not bx["applicable"] %}
<p class="note">Not applicable: {{ bx["reason"] }}</p>
{%- else %}
{%- set tol = "%g"|format(bx["tolerance_px"]) %}
<p class="note">Grad-CAM of the true class against the tumor boxes the sources carry, carried through the same
crop, padding and resize as the pixels. <b>Pointing game</b>: share of maps whose peak lies inside a box (and within
{{ tol }} px, {{ "%g"|format(100 * bx["tolerance_share"]) }}% of the side). <b>Energy inside</b>: share of the map's mass
inside the boxes. Baselines that never look at the image: <b>box area</b> (a random pixel), the <b>image centre</b>
and the <b>head-box centre</b> as fixed points. Images whose copy or look-alike was in the training data are scored
too (where a map points does not need an unseen label) and counted.</p>
{%- for set_name, s in bx["sets"].items() %}
<h4>{{ set_name }}: {{ s["images"] }} images with a box, {{ s["images_seen_in_training"] }} of them with a copy or look-alike in the training data</h4>
<table class="sanity"><tr><th>model / class</th><th>images</th><th>pointing game</th><th>within {{ tol }} px</th>
<th>energy inside</th><th>box area (chance)</th><th>image centre</th><th>head-box centre</th><th>centres within {{ tol }} px</th></tr>
{%- for model, groups in s["models"].items() %}{% for group, g in groups.items() %}
{%- set c = s["chance"][group] %}
<tr><td>{{ model }} / {{ group }}</td><td>{{ g["images"] }}</td>
<td>{{ g["pointing_game"]|number }}</td><td>{{ g["pointing_game_tolerant"]|number }}</td><td>{{ g["energy_inside"]|number }}</td>
<td>{{ c["area"]|number }}</td><td>{{ c["centre"]|number }}</td><td>{{ c["head_centre"]|number }}</td>
<td>{{ c["centre_tolerant"]|number }}, {{ c["head_centre_tolerant"]|number }}</td></tr>
{%- endfor %}{% endfor %}
</table>
{%- endfor %}
{%- if box_figures %}
<p class="note">{{ box_figures|length }} examples ({{ box_figures[0]["set"] }}): the {{ first_model }} model's map of the
true class, the tumor box in green, the map's peak as a white cross.</p>
<div style="display:flex;flex-wrap:wrap;gap:8px">
{%- for f in box_figures %}
<figure><img src="{{ folder }}/{{ f["file"] }}" alt="{{ f["label"] }} row {{ f["row"] }}">{{ f["label"] }} (row {{ f["row"] }}):
{{ "hit" if f["hit"] else "miss" }}, energy {{ "%.2f"|format(f["energy_inside"]) }}{{ ", seen in training" if f["seen"] else "" }}</figure>
{%- endfor %}
</div>
{%- endif %}
{%- endif %}
{%- for name, group in groups_by_class %}
{%- set correct = group|selectattr("example.correct")|list|length %}
<h2>True class: {{ name }} ({{ correct }} correct, {{ group|length - correct }} misclassified by the fine-tuned model)</h2>
{%- for item in group %}
{%- set truth = class_names[item.example.label] %}
<div class="item{{ "" if item.example.correct else " wrong" }}">
<figure><img src="{{ folder }}/{{ item.image_file }}" alt="slice {{ item.example.row }}">slice (row {{ item.example.row }})</figure>
{%- for model, file in item.overlays.items() %}
<figure><img src="{{ folder }}/{{ file }}" alt="{{ model }} Grad-CAM">{{ model }}: Grad-CAM of {{ class_names[item.predicted[model]] }}</figure>
{%- endfor %}
<div class="pred"><div>true: <b>{{ truth }}</b></div>
{%- for model in item.overlays %}
{%- set top = item.predicted[model] %}
<div><b>{{ model }}</b>: {{ class_names[top] }} ({{ "correct" if class_names[top] == truth else "wrong" }})
{%- for value in item.probabilities[model] -%}
<div class="bar{{ " top" if loop.index0 == top else "" }}"><span class="name">{{ class_names[loop.index0] }}</span><span class="track"><span class="fill" style="width:{{ "%.1f"|format(100 * value) }}%"></span></span><span>{{ "%.3f"|format(value) }}</span></div>
{%- endfor %}</div>
{%- endfor %}</div></div>
{%- else %}
<p class="note">No test images.</p>
{%- endfor %}
{%- endfor %}
</body></html>
"""


@lru_cache(maxsize=1)
def _page_template() -> jinja2.Template:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["number"] = _number
    return environment.from_string(_PAGE)


def render_report_html(items: list[ReportItem], sanity: dict, class_names: tuple[str, ...], title: str,
                       notes: list[str], box_figures: list[dict] = ()) -> str:
    """The whole page as one string: inline CSS, images by relative path, no script, no external URL.

    Rendered by Jinja2 with autoescaping, so names, notes and layer names are always shown as text.

    Args:
        items: the images, in display order (grouped by class by :func:`select_examples`).
        sanity: the content of ``sanity.json``.
        class_names: names of the class ids.
        title: the page title.
        notes: short paragraphs shown under the title (layer, calibration, counts).
        box_figures: overlays with tumor boxes (file, set, row, label, hit, energy_inside, seen).
    """
    # Probabilities as Python floats, which the page formats with "%.3f".
    shown = [ReportItem(item.example, item.image_file, item.overlays, item.predicted,
                        {model: [float(v) for v in values] for model, values in item.probabilities.items()})
             for item in items]
    groups_by_class = [(name, [item for item in shown if item.example.label == label])
                       for label, name in enumerate(class_names)]
    return _page_template().render(title=title, css=_CSS, notes=notes, sanity=sanity, class_names=class_names,
                                   groups_by_class=groups_by_class, folder=OVERLAYS_FOLDER,
                                   box_figures=list(box_figures), first_model=next(iter(items[0].overlays), "") if items else "")
