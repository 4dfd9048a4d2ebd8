"""``make demo``: the whole pipeline, offline, on the built-in phantom source.

The committed ``params.yaml`` describes the real Kaggle run, so the demo does not edit it: it runs a
DVC experiment (``dvc exp run``) with the overrides listed in ``demo.yaml`` passed as ``-S`` flags,
then puts ``params.yaml`` back byte for byte. The outputs stay in the workspace (``data/``,
``reports/``) and the run is listed, with its overrides, in ``dvc exp show``.

Before any stage runs, the backbone's weights are resolved (:mod:`braintumor.model.weights`): found on disk,
or downloaded by Keras; offline with nothing on disk, the demo stops in seconds with one message.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from braintumor.core.config import Params, dump_yaml, parse_params, read_yaml
from braintumor.core.paths import ProjectPaths
from braintumor.core.quiet import run_quietly
from braintumor.model.weights import WeightsUnavailableError, resolve_weights


def load_overrides(path: Path) -> dict[str, object]:
    """The flat ``dotted.key: value`` overrides of a demo file."""
    overrides = read_yaml(path.read_text()) or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{path} must map dotted params keys to values")
    return overrides


def apply_overrides(raw: dict, overrides: dict[str, object]) -> dict:
    """A copy of a params mapping with dotted-key overrides applied (each key must already exist)."""
    result = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = result
        for key in parents:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"override {dotted!r}: no key {key!r} in params.yaml")
            node = node[key]
        if leaf not in node:
            raise KeyError(f"override {dotted!r}: no key {leaf!r} in params.yaml")
        node[leaf] = value
    return result


def set_param_flags(overrides: dict[str, object]) -> list[str]:
    """``-S key=value`` flags for ``dvc exp run``, values in flow-style YAML (``[phantom]``, ``0.5``)."""
    flags = []
    for key, value in overrides.items():
        flags += ["-S", f"{key}={dump_yaml(value, flow=True)}"]
    return flags


def overridden_params(root: Path, overrides: dict[str, object]) -> Params:
    """params.yaml with the overrides applied, validated: a bad demo file fails here, not mid-pipeline."""
    raw = read_yaml((root / "params.yaml").read_text())
    return parse_params(apply_overrides(raw, overrides), origin="params.yaml + demo overrides")


def run_experiment(root: Path, overrides: dict[str, object], name: str, targets: tuple[str, ...] = ()) -> None:
    """``dvc exp run`` with the overrides (up to ``targets``, default every stage), restoring
    ``params.yaml`` whatever happens."""
    params_file = root / "params.yaml"
    original = params_file.read_bytes()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = ["dvc", "exp", "run", "--name", name, *set_param_flags(overrides), *targets]
    print("$", " ".join(command), flush=True)
    try:
        status = run_quietly(command, cwd=root, env=env)  # without TensorFlow's and DVC's start-up chatter
        if status:
            raise subprocess.CalledProcessError(status, command)
    finally:
        params_file.write_bytes(original)


def summary(root: Path) -> str:
    """The demo's closing summary, from the reports the stages wrote."""
    paths = ProjectPaths(root)
    merge = json.loads((paths.data_reports / "merge.json").read_text())
    split = json.loads((paths.data_reports / "split.json").read_text())
    lines = [
        "",
        "== demo summary ==",
        f"raw files: {merge['files']}, kept: {merge['kept']}, removed as duplicates: "
        f"{merge['duplicates']['removed_as_duplicates']}, label conflicts: {merge['conflicts']['images']} images, "
        f"quarantined: {merge['quarantined']}",
    ]
    for source, scores in merge.get("planted", {}).items():
        lines.append(f"planted duplicates found in {source}: recall {scores['recall']}, false merges {scores['false_merges']}")
    lines.append(f"split ({split['strategy']}): {split['per_split']}, leakage {split['leakage']}")
    for stage, model in (("train_base", "base"), ("finetune", "fine-tuned")):
        metrics_file = paths.reports / stage / "metrics.json"
        if metrics_file.is_file():
            m = json.loads(metrics_file.read_text())
            # The training stages score one pass per slice; the table below is the evaluate stage's, with
            # evaluate.tta, so the two test accuracies differ and each line says which it is.
            lines.append(f"{model} model, as its training stage scored it (no flip averaging): test accuracy "
                         f"{m['test_accuracy']:.3f}, best val accuracy {m['best_val_accuracy']:.3f}, {m['epochs_run']} epochs")
    if paths.metrics_json.is_file():
        from braintumor.evaluate.metrics import comparison_table

        lines += ["", "test split, base vs fine-tuned (95% bootstrap intervals):",
                  comparison_table(json.loads(paths.metrics_json.read_text())), ""]
    sanity_file = paths.reports / "gradcam" / "sanity.json"
    if sanity_file.is_file():
        sanity = json.loads(sanity_file.read_text())
        for name, scores in sanity["randomisation"]["models"].items():
            lines.append(f"Grad-CAM {name}: randomisation rank correlation {scores['rank_correlation']:.2f} "
                         f"(low = the maps depend on the trained weights)")
        for name, groups in sanity["localisation"].get("models", {}).items():
            overall = groups["all"]
            lines.append(f"Grad-CAM {name}: peak inside the tumor {overall['pointing_game']:.0%} of the time "
                         f"(chance {overall['chance']:.1%}), within {sanity['localisation']['tolerance_px']} px "
                         f"{overall['pointing_game_tolerant']:.0%} (chance {overall['chance_tolerant']:.1%})")
    lines += ["", "== where to look ==",
              f"evaluation report: {(paths.reports / 'evaluation.md').relative_to(root)}",
              f"Grad-CAM report:   {(paths.reports / 'gradcam' / 'index.html').relative_to(root)} (open in a browser)",
              "MLflow runs:       make mlflow-ui   (http://127.0.0.1:5000)",
              "experiments:       make exp-show    (this run beside earlier ones)",
              "the model, live:   make app         (http://127.0.0.1:7860)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overrides", default="demo.yaml", help="file of dotted-key overrides (default: demo.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="one more override (YAML value)")
    parser.add_argument("--name", default=datetime.now().strftime("demo-%Y%m%d-%H%M%S"), help="experiment name")
    args = parser.parse_args(argv)
    root = ProjectPaths.discover().root
    overrides = load_overrides(root / args.overrides)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = read_yaml(value)
    params = overridden_params(root, overrides)
    try:
        weights = resolve_weights(params.model.backbone, params.model.weights, root)
    except (WeightsUnavailableError, FileNotFoundError) as exc:
        # The one thing a fresh machine may lack: say it plainly, before any stage has written anything.
        print(f"make demo cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"backbone {params.model.backbone}: weights {weights.path or 'random'} ({weights.source})", flush=True)
    run_experiment(root, overrides, args.name)
    print(summary(root))


if __name__ == "__main__":
    main()
