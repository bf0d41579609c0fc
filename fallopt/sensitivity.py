"""`python -m fallopt.sensitivity`: which layers can take pruning, and which int8 hurts.

Composed by Hydra exactly like `python -m fallopt.run` (same groups and overrides), it trains
or reuses the baseline stage, then records one MLflow run (tag `fallopt.kind=sensitivity`):

- each prunable layer in `sensitivity.scope` magnitude-pruned alone to each of
  `sensitivity.sparsities`, without fine-tuning, and the validation accuracy it loses
  (`sensitivity.csv`, `sensitivity.png`);
- each int8 op's quantization error, rmse / scale from TFLite's QuantizationDebugger
  (`quant_error.csv`);
- the proposal (`proposal.txt`, tag `fallopt.proposal`): `prune.per_layer={...}`, each layer
  at the highest sparsity that loses at most `--max-drop` (`sensitivity.max_drop`), and
  `quant.float_layers=[...]`, the layers above `sensitivity.float_threshold`. Both are
  overrides `python -m fallopt.run` accepts as printed.

Exit codes as `fallopt.run`: 0 done, 2 bad config or data (one line), 1 unexpected.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from fallopt import config
from fallopt.run import CONF_DIR, user_errors_exit

log = logging.getLogger("fallopt")
config.register_configs()

MAX_DROP_FLAG = "--max-drop"


def _translate_flags(argv: list[str]) -> list[str]:
    """`--max-drop 0.02` (or `--max-drop=0.02`) as the override `sensitivity.max_drop=0.02`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == MAX_DROP_FLAG:
            if i + 1 >= len(argv):
                sys.exit(f"{MAX_DROP_FLAG} needs a value, e.g. {MAX_DROP_FLAG} 0.02")
            out.append(f"sensitivity.max_drop={argv[i + 1]}")
            i += 2
            continue
        if arg.startswith(MAX_DROP_FLAG + "="):
            arg = f"sensitivity.max_drop={arg.split('=', 1)[1]}"
        out.append(arg)
        i += 1
    return out


def overrides(per_layer: dict[str, float], float_layers: list[str]) -> list[str]:
    """The proposal as `python -m fallopt.run` overrides (shell-quoted by the caller)."""
    found = []
    if per_layer:
        found.append("prune.per_layer={" + ", ".join(f"{k}: {v:g}" for k, v in per_layer.items())
                     + "}")  # fmt: skip
    if float_layers:
        found.append(f"quant.float_layers=[{','.join(float_layers)}]")
    return found


def analyse(cfg: config.FalloptConfig) -> dict[str, Any]:
    """Train or reuse the baseline, measure both sensitivities, log one MLflow run.

    Returns the proposal: `per_layer`, `float_layers`, and `overrides` (their command-line
    form). Checks the scope, the tracking store and the data before the run opens.
    """
    from fallopt import stages, track
    from fallopt.backend import keras
    from fallopt.compress.prune import select_layers
    from fallopt.compress.quant_error import (
        error_table,
        layer_errors,
        propose_float_layers,
        weight_layers,
    )
    from fallopt.compress.quantize import representative_images
    from fallopt.compress.sensitivity import (
        heatmap_png,
        propose_per_layer,
        sensitivity_table,
        weight_sensitivity,
    )
    from fallopt.data import InputRule, load_dataset
    from fallopt.models import build_model
    from fallopt.stage_store import stage_cache

    s = cfg.sensitivity
    experiment_id = track.connect(cfg.tracking)
    data = load_dataset(cfg.dataset, cfg.train.val_split, cfg.seed)
    log.info("[data] %s", data.describe())
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    layers = select_layers(model, s.scope, "sensitivity.scope")
    rule = InputRule(*cfg.model.input_range)
    representative = representative_images(
        data.train, cfg.quant.representative_samples, cfg.seed, rule
    )
    tags = {
        "fallopt.kind": "sensitivity",
        "fallopt.dataset": data.name,
        "fallopt.model": cfg.model.name,
        "fallopt.figures": "sensitivity.*: the baseline stage's model.keras, each layer pruned "
        "alone without fine-tuning, on the validation split; quant_error.csv: that model "
        "converted to int8",
        **track.owner_tags(),
    }
    run_name = cfg.tracking.run_name or f"sensitivity: {cfg.model.name} on {data.name}"
    start = time.perf_counter()
    with track.tracked_run(experiment_id, run_name, tags), tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        track.log_params(config.flatten(config.as_dict(cfg)))
        base = stages.baseline(stage_cache(cfg.tracking), data, cfg.model, cfg.train, cfg.seed,
                               track.epoch_logger(1))  # fmt: skip
        log.info("[baseline] %s, %s", cfg.model.name, base.status)
        model = keras().models.load_model(base.model_file, compile=False)
        log.info("[sensitivity] %d layers x %d sparsities on %d validation images",
                 len(layers), len(s.sparsities), len(data.val))  # fmt: skip
        accuracy, rows = weight_sensitivity(model, data.val, layers, s.sparsities, rule)
        per_layer = propose_per_layer(rows, s.max_drop)
        title = (f"{cfg.model.name} on {data.name}: validation accuracy lost, each layer pruned "
                 f"alone (baseline {accuracy:.3f}, {len(data.val)} images)")  # fmt: skip
        artifacts = [
            sensitivity_table(rows, out / "sensitivity.csv"),
            heatmap_png(rows, out / "sensitivity.png", title),
        ]
        log.info("[quant_error] QuantizationDebugger on %d calibration images",
                 len(representative))  # fmt: skip
        errors = layer_errors(model, representative)
        float_layers = propose_float_layers(errors, s.float_threshold)
        artifacts.append(error_table(errors, out / "quant_error.csv"))
        proposal = overrides(per_layer, float_layers)
        (out / "proposal.txt").write_text("\n".join(proposal) + "\n")
        artifacts.append(out / "proposal.txt")
        track.log_artifacts(artifacts)
        track.log_metrics(
            {
                "baseline_val_accuracy": accuracy,
                "n_val": len(data.val),
                "seconds_run": time.perf_counter() - start,
                **{f"proposed_sparsity_{k}": v for k, v in per_layer.items()},
                **_worst_errors(errors, weight_layers(model)),
            }
        )
        track.set_tags({"fallopt.proposal": " ".join(proposal) or "none"})
    _report(per_layer, float_layers, proposal, s.max_drop)
    return {"per_layer": per_layer, "float_layers": float_layers, "overrides": proposal}


def _worst_errors(errors: list[Any], layers: list[str]) -> dict[str, float]:
    """Each weight layer's worst int8 op error, rmse / scale, as `quant_error_<layer>`.

    Only layers `quant.float_layers` can name; the others are in `quant_error.csv`.
    """
    worst: dict[str, float] = {}
    for e in errors:
        if e.layer in layers:
            worst[e.layer] = max(worst.get(e.layer, 0.0), e.rmse_over_scale)
    return {f"quant_error_{k}": v for k, v in worst.items()}


def _report(per_layer: dict[str, float], float_layers: list[str], proposal: list[str],
            max_drop: float) -> None:  # fmt: skip
    if per_layer:
        log.info("[proposal] prune.per_layer: %s (each loses at most %.3f alone)",
                 per_layer, max_drop)  # fmt: skip
    else:
        log.info("[proposal] no layer can be pruned to any tested sparsity within %.3f", max_drop)
    log.info("[proposal] quant.float_layers: %s", float_layers or "none above the threshold")
    if proposal:
        quoted = " ".join(f"'{o}'" for o in proposal)
        log.info("[proposal] python -m fallopt.run %s", quoted)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Validate the composed config and analyse it."""
    with user_errors_exit(cfg):
        analyse(config.validate(cfg))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *_translate_flags(sys.argv[1:])]
    main()
