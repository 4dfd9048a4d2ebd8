"""Every real-data number in the README, from one command: the pipeline on the shared datasets.

    .venv/bin/python benchmarks/real_data.py --sources nickparvar          # or nickparvar,sartaj
    .venv/bin/python benchmarks/real_data.py --sources nickparvar --external sartaj_testing --boxes figshare --skip-clean
    .venv/bin/python benchmarks/real_data.py --sources nickparvar --skip-leak-free   # step 3 and the peers only

1. A clone of this repository's HEAD in ``--workdir`` (reused on a rerun, so DVC skips what is
   already built; uncommitted changes are not in it).
2. The whole pipeline (``dvc exp run``, params.yaml plus the data sources below) on the leak-free
   split of the chosen sources: the base and fine-tuned test metrics with 95% bootstrap intervals.
3. The same configuration trained again with ``split.strategy: source_folders_clean``: Nickparvar's
   Training folder (plus the other sources, minus anything related to a test image) for training,
   its Testing folder minus every image with a copy or look-alike in Training as test. Up to the
   evaluate stage (no Grad-CAM report, no exports: those come from step 2).
4. The published PyPI models (``benchmarks/peers.py``) and that model on the same clean images, and
   on the whole Testing folder (which the peers' and our training folders overlap).

Progress goes to the terminal; the last line is one JSON object: ``leak_free.{base,finetuned}.
{accuracy,macro_f1}[_ci]``, ``clean_testing.n``, ``clean_testing.{base,finetuned}.*``,
``clean_testing.peers.<name>.*``, ``testing.*``, the split sizes, the machine and ``minutes``; with
``--external``/``--boxes`` also ``external.<name>.{n,removed_overlaps,accuracy[_ci],macro_f1[_ci]}`` and
``boxes.{n,finetuned.pointing_game,finetuned.energy_inside,chance.area,chance.centre,...}``.

This script may name ``../shared`` (the datasets beside the repository on the project's machines);
nothing a user runs does. ``-S key=value`` adds an override to both trainings (e.g. ``-S
split.train_copies=all``); ``--name`` prefixes the DVC experiment names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
from braintumor.core.config import read_yaml  # noqa: E402
from braintumor.core.quiet import rerun_filtered  # noqa: E402
from braintumor.demo import overridden_params, run_experiment  # noqa: E402
from braintumor.model.weights import resolve_weights  # noqa: E402

SHARED_DATASETS = REPO.parent / "shared" / "datasets"
SHARED_WEIGHTS = REPO.parent / "shared" / "weights"  # the ImageNet files, for machines that cannot download them
# --sources name -> (params source, folder under ../shared/datasets)
SOURCES = {"nickparvar": ("local_nickparvar", "nickparvar-224"), "sartaj": ("local_sartaj", "sartaj")}
TEST_SOURCE = "local_nickparvar"  # whose Testing folder the clean comparison uses (the peers trained on its Training)
# --external name -> (params source, folder): held out of training, evaluated apart (split.external)
EXTERNAL = {"sartaj_testing": ("local_sartaj_testing", "sartaj/Testing")}
# --boxes name -> (params source, folder): slices with tumor boxes, an external localisation set
BOXES = {"figshare": ("local_figshare", "figshare-boxes")}


def held_out_overrides(external: list[str], boxes: list[str], used: list[str], datasets: Path) -> dict[str, object]:
    """params overrides that add the named external and box sets as external sources (after ``used``)."""
    unknown = [n for n in external if n not in EXTERNAL] + [n for n in boxes if n not in BOXES]
    if unknown:
        raise ValueError(f"unknown --external / --boxes names {unknown}: choose from {sorted(EXTERNAL)} and {sorted(BOXES)}")
    chosen = [EXTERNAL[n] for n in external] + [BOXES[n] for n in boxes]
    if not chosen:
        return {}
    overrides: dict[str, object] = {"download.use": [*used, *(source for source, _ in chosen)],
                                    "split.external": [source for source, _ in chosen]}
    for source, folder in chosen:
        if not (datasets / folder).is_dir():
            raise FileNotFoundError(f"{datasets / folder} is missing: this benchmark needs the shared datasets beside the repository")
        overrides[f"download.sources.{source}.path"] = str(datasets / folder)
    return overrides


def held_out_results(workdir: Path, external: list[str], boxes: list[str]) -> dict:
    """``external.<name>`` (n, removed overlaps, the fine-tuned model's accuracy and macro-F1 with intervals)
    and ``boxes`` (images, the fine-tuned and base models' localisation, the baselines)."""
    metrics = read_json(workdir / "reports" / "metrics.json")
    result: dict = {}
    for name in [*external, *boxes]:
        source = (EXTERNAL.get(name) or BOXES[name])[0]
        entry = metrics["finetuned"]["external"][source]
        result.setdefault("external", {})[name] = {
            "n": entry["n"], "removed_overlaps": entry["removed_overlaps"], **scores_of(entry),
            "base": scores_of(metrics["base"]["external"][source])}
    if boxes:
        scored = read_json(workdir / "reports" / "gradcam" / "sanity.json")["boxes"]["sets"][BOXES[boxes[0]][0]]
        chance = scored["chance"]["all"]
        result["boxes"] = {"n": scored["images"], "seen_in_training": scored["images_seen_in_training"],
                           **{model: {k: v for k, v in scored["models"][model]["all"].items() if k != "images"}
                              for model in ("finetuned", "base")},
                           "chance": {"area": chance["area"], "area_tolerant": chance["area_tolerant"],
                                      "centre": chance["centre"], "centre_tolerant": chance["centre_tolerant"],
                                      "head_centre": chance["head_centre"],
                                      "head_centre_tolerant": chance["head_centre_tolerant"]},
                           "per_class": scored["models"]["finetuned"], "chance_per_class": scored["chance"]}
    return result


def source_overrides(names: list[str], datasets: Path) -> dict[str, object]:
    """params overrides that merge the named shared datasets as local sources; ValueError naming what is missing."""
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names or names[0] != "nickparvar":
        raise ValueError(f"--sources must start with nickparvar and name only {sorted(SOURCES)}, got {names}")
    overrides: dict[str, object] = {"download.use": [SOURCES[n][0] for n in names], "split.test_source": TEST_SOURCE}
    for name in names:
        source, folder = SOURCES[name]
        path = datasets / folder
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is missing: this benchmark needs the shared datasets beside the repository")
        overrides[f"download.sources.{source}.path"] = str(path)
    return overrides


# Disk per experiment (data, the activation cache and DVC's copy of it, models), measured 2026-12-06 at 224 px
# with three cached copies and rounded up: a Nickparvar work folder after one experiment 12 GB, Nickparvar +
# SARTAJ 18 GB before its model was saved. The whole benchmark runs two experiments (leak-free, clean Testing).
GB_PER_SOURCE = {"nickparvar": 13, "sartaj": 6}


def check_free_space(workdir: Path, names: list[str], experiments: int) -> None:
    """Stop before an hour of work if the work folder's disk cannot hold the run.

    Raises:
        OSError: naming the disk, the space needed and free, and how to make room.
    """
    folder = next(p for p in (workdir, *workdir.parents) if p.exists())
    per_experiment = sum(GB_PER_SOURCE[n] for n in names)
    needed = per_experiment * experiments * 10**9
    if workdir.exists():  # a rerun in the same folder reuses what it already holds
        needed -= sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file() and not f.is_symlink())
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(f"{folder}: {free / 1e9:.1f} GB free, this run needs about {needed / 1e9:.1f} GB more "
                      f"({experiments} experiment(s) of --sources {','.join(names)}, about {per_experiment} GB each); "
                      "remove earlier work folders or pass --workdir on a larger disk")


def prepare_workdir(workdir: Path) -> str:
    """A clone of this repository at its HEAD commit (created, or moved to HEAD if it exists); the commit."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print(f"note: uncommitted changes in {REPO} are not part of this run (it runs commit {head[:10]})", flush=True)
    if not (workdir / ".git").is_dir():
        workdir.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(workdir)], check=True)
    subprocess.run(["git", "fetch", "--quiet", str(REPO), head], cwd=workdir, check=True)
    subprocess.run(["git", "checkout", "--quiet", "--force", "--detach", head], cwd=workdir, check=True)
    return head


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def scores_of(entry: dict) -> dict:
    """accuracy and macro-F1 with their [low, high] intervals, from one model's entry of reports/metrics.json,
    and the validation scores (what the configuration was chosen on)."""
    return {"accuracy": entry["accuracy"], "accuracy_ci": [entry["accuracy_ci95"]["low"], entry["accuracy_ci95"]["high"]],
            "macro_f1": entry["macro_f1"], "macro_f1_ci": [entry["macro_f1_ci95"]["low"], entry["macro_f1_ci95"]["high"]],
            "validation": entry["validation"]}


def run_results(workdir: Path) -> dict:
    """What one pipeline run measured: split sizes, both models' test scores, training summaries."""
    metrics = read_json(workdir / "reports" / "metrics.json")
    split = read_json(workdir / "reports" / "data" / "split.json")
    result = {"split": {k: split[k] for k in ("strategy", "per_split", "train_images", "train_groups", "leakage")},
              **{model: scores_of(metrics[model]) for model in ("base", "finetuned")}}
    for stage in ("train_base", "finetune"):
        summary = read_json(workdir / "reports" / stage / "metrics.json")
        result[f"{stage}_summary"] = {k: summary[k] for k in ("best_val_accuracy", "best_epoch", "epochs_run",
                                                               "train_images_per_second", "feature_cache_seconds")
                                      if k in summary}
    activations = read_json(workdir / "reports" / "activations" / "metrics.json")
    result["activations_summary"] = {k: activations[k] for k in ("train_maps", "megabytes", "seconds") if k in activations}
    if "clean_test" in split:
        result["split"]["clean_test"] = split["clean_test"]
    return result


def pipeline(workdir: Path, overrides: dict[str, object], name: str, targets: tuple[str, ...] = ()) -> dict:
    """Validate the overrides, resolve the weights, run the experiment, read its results."""
    params = overridden_params(workdir, overrides)
    weights = resolve_weights(params.model.backbone, params.model.weights, workdir)
    print(f"== {name}: {params.model.backbone} ({weights.source}), {params.preprocess.image_size} px, "
          f"split {params.split.strategy}, training copies {params.split.train_copies}", flush=True)
    run_experiment(workdir, overrides, name, targets)
    return run_results(workdir)


def compare_with_peers(workdir: Path, peers_venv: Path) -> tuple[dict, dict]:
    """(clean Testing, whole Testing): the peers and our clean-trained fine-tuned model on the same files."""
    import peers
    import pandas as pd

    sets = peers.image_sets(workdir, TEST_SOURCE, "Testing")
    pipeline_test = pd.read_csv(workdir / "data" / "split" / "split.csv").query("split == 'test'")
    if sorted(pipeline_test["id"]) != sorted(sets["clean"]["id"]):
        raise AssertionError("the peers' clean image set differs from the pipeline's source_folders_clean test split")
    paths = [str(workdir / p) for p in sets["testing"]["path"]]
    predicted = peers.peer_predictions(peers.peers_python(peers_venv), paths)
    predicted["ours"] = peers.our_predictions(str(workdir / "models" / "finetuned.keras"), workdir, paths)
    scored = peers.score_image_sets(workdir, sets, paths, predicted)
    clean, testing = ({"n": entry.pop("n"), "ours_through_the_app": entry.pop("ours"), "peers": entry}
                      for entry in (scored["clean"], scored["testing"]))
    return clean, testing


def copy_box_overlays(workdir: Path, folder: Path) -> None:
    """The report's tumor-box overlays as one 4-column sheet for the README (``docs/real-data/gradcam_boxes.png``)."""
    import cv2
    import numpy as np

    files = sorted((workdir / "reports" / "gradcam" / "overlays").glob("box_*.png"))
    tiles = [cv2.imread(str(f)) for f in files]
    if not tiles:
        return
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 4)
    sheet = np.vstack([np.hstack(tiles[i:i + 4]) for i in range(0, len(tiles), 4)])
    folder.mkdir(parents=True, exist_ok=True)
    # 256 colours: the sheet is a README figure kept in git, where a file over 1 MiB does not belong
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(sheet[..., ::-1])).quantize(colors=256, dither=Image.Dither.NONE).save(
        folder / "gradcam_boxes.png", optimize=True)
    print(f"wrote {folder / 'gradcam_boxes.png'} ({len(files)} overlays)", flush=True)


def main() -> int:
    # TensorFlow runs in this process too (our model's predictions): its start-up chatter is filtered
    # like the stages' (braintumor.core.quiet), and so is everything this process starts.
    if (status := rerun_filtered([__file__, *sys.argv[1:]])) is not None:
        return status
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", default="nickparvar", help="nickparvar | nickparvar,sartaj")
    parser.add_argument("--workdir", type=Path, help="clone to run in (default ~/.cache/braintumor/real-data/<sources>)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="one more override (YAML value)")
    parser.add_argument("--name", default="real", help="prefix of the DVC experiment names")
    parser.add_argument("--peers-venv", type=Path, default=Path.home() / ".cache" / "braintumor" / "peers-venv")
    parser.add_argument("--skip-clean", action="store_true", help="only the leak-free run (no clean-Testing training, no peers)")
    parser.add_argument("--skip-leak-free", action="store_true",
                        help="only the clean-Testing training and the peers (no leak-free run, so no --external or --boxes)")
    parser.add_argument("--external", default="", help=f"external sets, comma-separated: {', '.join(EXTERNAL)}")
    parser.add_argument("--boxes", default="", help=f"a set with tumor boxes (external, localisation): {', '.join(BOXES)}")
    args = parser.parse_args()
    if args.skip_leak_free and (args.skip_clean or args.external or args.boxes):
        parser.error("--skip-leak-free leaves only the clean-Testing run: it cannot go with --skip-clean, --external or --boxes")
    started = time.perf_counter()
    names = [n.strip() for n in args.sources.split(",") if n.strip()]
    external = [n.strip() for n in args.external.split(",") if n.strip()]
    boxes = [n.strip() for n in args.boxes.split(",") if n.strip()]
    overrides = source_overrides(names, SHARED_DATASETS)
    overrides.update(held_out_overrides(external, boxes, overrides["download.use"], SHARED_DATASETS))
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = read_yaml(value)
    workdir = args.workdir or Path.home() / ".cache" / "braintumor" / "real-data" / "-".join(names + external + boxes)
    check_free_space(workdir, names, experiments=(not args.skip_leak_free) + (not args.skip_clean))
    commit = prepare_workdir(workdir)
    os.environ["PYTHONPATH"] = str(workdir / "src")  # the stages import the clone's code, not this checkout's
    if "BRAINTUMOR_WEIGHTS_DIR" not in os.environ and SHARED_WEIGHTS.is_dir():
        os.environ["BRAINTUMOR_WEIGHTS_DIR"] = str(SHARED_WEIGHTS)
    tag = "-".join(names)
    result: dict = {"sources": names, "overrides": {k: v for k, v in overrides.items() if ".path" not in k},
                    "commit": commit, "workdir": str(workdir)}
    if not args.skip_leak_free:
        result["leak_free"] = pipeline(workdir, overrides, f"{args.name}-{tag}-leak-free")
        print(f"leak-free: base {result['leak_free']['base']['accuracy']:.3f}, fine-tuned "
              f"{result['leak_free']['finetuned']['accuracy']:.3f} {result['leak_free']['finetuned']['accuracy_ci']}",
              flush=True)
        result.update(held_out_results(workdir, external, boxes))
    for name, entry in result.get("external", {}).items():
        print(f"external {name}: n={entry['n']} ({entry['removed_overlaps']} removed as overlaps), fine-tuned accuracy "
              f"{entry['accuracy']:.3f} {entry['accuracy_ci']}, macro-F1 {entry['macro_f1']:.3f}", flush=True)
    if boxes:
        b = result["boxes"]
        print(f"tumor boxes: n={b['n']}, fine-tuned pointing game {b['finetuned']['pointing_game']:.3f} (box-area chance "
              f"{b['chance']['area']:.3f}, centre {b['chance']['centre']:.3f}), energy inside {b['finetuned']['energy_inside']:.3f}",
              flush=True)
        copy_box_overlays(workdir, REPO / "docs" / "real-data")
    if not args.skip_clean:
        # No exports: this run reports the Keras models against the peers; the leak-free run scores the exports.
        clean = pipeline(workdir, {**overrides, "split.strategy": "source_folders_clean", "export.formats": []},
                         f"{args.name}-{tag}-clean-testing", targets=("evaluate",))
        clean_peers, testing = compare_with_peers(workdir, args.peers_venv)
        result["clean_testing"] = {"n": clean["split"]["clean_test"]["test"], **clean, **clean_peers}
        result["testing"] = testing
        for name, entry in {"ours": clean["finetuned"], **clean_peers["peers"]}.items():
            print(f"clean Testing (n={result['clean_testing']['n']}): {name:26s} accuracy {entry['accuracy']:.3f} "
                  f"{entry['accuracy_ci']}", flush=True)
    from machine import machine

    result["machine"] = machine()
    result["minutes"] = round((time.perf_counter() - started) / 60, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
