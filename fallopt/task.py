"""One run: data -> baseline -> prune -> evaluate -> quantize -> sizes -> MLflow, logged."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

import fallopt
from fallopt import device, stages, timing, track
from fallopt.cache import StageCache
from fallopt.compress.cluster import select_clusterable, verify_tflite
from fallopt.compress.outcome import write_table
from fallopt.compress.pruners import PRUNERS
from fallopt.compress.quant_error import check_float_layers, convert_with_float_layers, float_ops
from fallopt.compress.quantize import (
    AWARE,
    FULL_INTEGER,
    check_quantizable,
    convert,
    quantization_aware_fine_tune,
    representative_images,
)
from fallopt.compress.schedule import Schedule
from fallopt.config import (
    FALL_OBJECTIVES,
    ClusterMethod,
    FalloptConfig,
    PruneMethod,
    QuantMode,
    as_dict,
    flatten,
)
from fallopt.data import Dataset, InputRule, load_dataset
from fallopt.deploy import write_bundle
from fallopt.errors import ConfigError
from fallopt.evaluate import Evaluation, evaluate_keras, evaluate_probabilities
from fallopt.identity import digest
from fallopt.litert import TFLiteModel, host_cpu
from fallopt.memo import Memo
from fallopt.models import build_model
from fallopt.plots import confusion_matrix_png, training_curves_png
from fallopt.size import Measuring, file_size, load_saved, nonzero_params
from fallopt.stage_store import stage_cache

log = logging.getLogger(__name__)

SIZE_FILE = "model/model.keras"  # the artifact the keras_* size metrics measure


def _preflight(cfg: FalloptConfig, data: Dataset) -> tuple[Schedule | None, np.ndarray | None]:
    """Checks that need the data: fail before an MLflow run is opened.

    Returns the pruning schedule (None without one) and the int8 calibration images.
    """
    fall_only = [name for name in cfg.objectives if name in FALL_OBJECTIVES]
    positive = None if data.positive is None else data.class_names[data.positive]
    if fall_only and positive != "fall":
        raise ConfigError(
            f"objectives={cfg.objectives} names {fall_only}, which only data sets whose "
            f"positive class is 'fall' have; {data.name}'s is {positive!r} (classes "
            f"{list(data.class_names)}). Choose other objectives"
        )
    schedule = _check_model(cfg, data)
    representative = None
    if cfg.quant.mode is QuantMode.int8:
        representative = representative_images(
            data.train, cfg.quant.representative_samples, cfg.seed, _rule(cfg)
        )
        if len(representative) < cfg.quant.representative_samples:
            log.warning(
                "[quant] quant.representative_samples=%d but the training split has %d images: "
                "int8 is calibrated on all %d",
                cfg.quant.representative_samples, len(data.train), len(representative),
            )  # fmt: skip
    return schedule, representative


# What the jobs of a sweep in one process share: the data set (0.2 s to load at 96x96 and
# 2,000 images), the model built for the checks before a run (0.1-0.3 s; the checks only read
# it) and each check's answer, by everything it reads.
_shared: Memo[str, Any] = Memo(64)
_data: Memo[str, Dataset] = Memo(1)  # one data set at a time: a sweep's jobs share one


def _once(key: list[Any], make: Callable[[], Any]) -> Any:
    """`make()`, computed once per process for each `key` (a JSON-able description)."""
    return _shared.get(digest(key), make)


def _load_data(cfg: FalloptConfig) -> Dataset:
    """The run's data set, loaded and split once per process (runs only read it).

    Known by every field of its config, paths included (the runs log where the data came
    from), and by the content of its files.
    """
    d = cfg.dataset
    key = digest([repr(d), d.sources(), cfg.train.val_split, cfg.seed])
    return _data.get(key, lambda: load_dataset(d, cfg.train.val_split, cfg.seed))


def _check_model(cfg: FalloptConfig, data: Dataset) -> Schedule | None:
    """Check what the run will do to the model, before any training.

    Building `cfg.model` for `data` checks the shape; then quantization-aware wrapping, float
    layers, clustering and pruning scopes are checked. Returns the pruning schedule (None
    without pruning).
    """
    shape = [repr(cfg.model), cfg.model.sources(), data.input_shape, data.num_classes]
    model = _once(["model", *shape],
                  lambda: build_model(cfg.model, data.input_shape, data.num_classes))  # fmt: skip
    q = cfg.quant
    if q.mode in AWARE:
        _once(["qat", *shape, q.mode.value], lambda: check_quantizable(model, q.mode))
    if q.float_layers:
        _once(["float", *shape, q.float_layers],
              lambda: check_float_layers(model, q.float_layers))  # fmt: skip
    if cfg.cluster.method is not ClusterMethod.none:
        _once(["cluster", *shape, repr(cfg.cluster)],
              lambda: select_clusterable(model, cfg.cluster))  # fmt: skip
    if cfg.prune.method is PruneMethod.none:
        return None
    pruner = PRUNERS[cfg.prune.method]
    return _once(["prune", *shape, repr(cfg.prune), repr(cfg.train), data.fingerprint()],
                 lambda: pruner.check(model, cfg.prune, data, cfg.train))  # fmt: skip


def _rule(cfg: FalloptConfig) -> InputRule:
    """How pixels enter this run's model (`model.input_range`)."""
    return InputRule(*cfg.model.input_range)


def _epochs(history: dict[str, list[float]]) -> int:
    """How many epochs a history holds (a source's baseline may train more than train.epochs)."""
    return len(next(iter(history.values()), []))


def _joined(first: dict[str, list[float]], then: dict[str, list[float]]) -> dict[str, list[float]]:
    """Two trainings' histories as one, epoch after epoch (either may be empty)."""
    return {k: first.get(k, []) + then.get(k, []) for k in {**first, **then}}


def _sizes(
    base: stages.StageResult, model: Any, keras_file: Measuring, tflite_file: Measuring
) -> dict[str, float]:
    """Sizes of the final model's files, against the baseline's, and the `[size]` line.

    The final `.keras` file (saved without optimizer, as the baseline's) and `model.tflite`
    were measured meanwhile (see `size.Measuring`); the baseline's files once per process.
    """
    base_file, final_file = file_size(base.model_file), keras_file.result()
    reference, tflite = file_size(base.reference_tflite), tflite_file.result()
    base_nonzero = base.entry.meta["nonzero_params"]
    final_nonzero = nonzero_params(model)
    sizes = {
        "keras_size_bytes": final_file.raw_bytes,
        "keras_gzip_bytes": final_file.gzip_bytes,
        "nonzero_params": final_nonzero,
        "baseline_keras_size_bytes": base_file.raw_bytes,
        "baseline_keras_gzip_bytes": base_file.gzip_bytes,
        "baseline_nonzero_params": base_nonzero,
        "size_ratio_to_baseline": final_file.raw_bytes / base_file.raw_bytes,
        "gzip_ratio_to_baseline": final_file.gzip_bytes / base_file.gzip_bytes,
        "nonzero_ratio_to_baseline": final_nonzero / base_nonzero,
        # against the unpruned baseline as float32 TFLite
        "tflite_size_bytes": tflite.raw_bytes,
        "tflite_gzip_bytes": tflite.gzip_bytes,
        "tflite_size_ratio_to_baseline": tflite.raw_bytes / reference.raw_bytes,
        "tflite_gzip_ratio_to_baseline": tflite.gzip_bytes / reference.gzip_bytes,
    }
    log.info(
        "[size] %s: %s bytes, gzip %s (%.2fx baseline), %s non-zero parameters; "
        "model.tflite: %s bytes, gzip %s (%.2fx baseline float32 TFLite)",
        SIZE_FILE, f"{final_file.raw_bytes:,}", f"{final_file.gzip_bytes:,}",
        sizes["gzip_ratio_to_baseline"], f"{final_nonzero:,}", f"{tflite.raw_bytes:,}",
        f"{tflite.gzip_bytes:,}", sizes["tflite_gzip_ratio_to_baseline"],
    )  # fmt: skip
    return sizes


def _baseline(
    cfg: FalloptConfig, cache: StageCache, data: Dataset
) -> tuple[stages.StageResult, dict[str, float]]:
    base = stages.baseline(cache, data, cfg.model, cfg.train, cfg.seed, track.epoch_logger(1))
    if base.reused:  # streamed while training; replayed so every run shows its curves
        track.log_history(base.history, first_step=1)
    track.set_tags(
        {
            "fallopt.stage.baseline": base.status,
            "fallopt.baseline_key": base.entry.meta["key"],
            "fallopt.baseline_threads": str(base.entry.meta["threads"]),
            "fallopt.baseline_from": base.origin,
        }
    )
    source = cfg.model.source_file()
    if source is not None:  # the user's file: its own size, and what the baseline_* sizes are
        track.set_tags(
            {"fallopt.baseline_file": f"baseline_* sizes: {source} re-saved without optimizer "
             "state (the baseline stage's model.keras); source_file_bytes: the file itself"}
        )  # fmt: skip
    metrics = {
        "baseline_train_accuracy": base.entry.meta["train_accuracy"],
        "baseline_val_accuracy": base.entry.meta["val_accuracy"],
        "baseline_test_accuracy": base.entry.meta["test_accuracy"],
    }
    if source is not None:
        metrics["source_file_bytes"] = source.stat().st_size
    log.info(
        "[baseline] %s, %s parameters, %s (%d epochs): val_accuracy %.3f, test_accuracy %.3f",
        cfg.model.name,
        f"{base.entry.meta['params_total']:,}",
        base.status,
        _epochs(base.history),
        metrics["baseline_val_accuracy"],
        metrics["baseline_test_accuracy"],
    )
    return base, metrics


# A prune method's per-layer table, `<name>_per_layer.csv` (magnitude methods: `sparsity`).
_TABLES = {PruneMethod.channels: "channels"}


def _compress(
    stage: stages.StageResult, kind: str, table: str, first_epoch: int, output_dir: Path
) -> dict[str, float]:
    """Log a prune or cluster stage on this run: its fine-tune, table, metrics and summary.

    `kind` names the log line (`[prune]`) and the threads tag (`fallopt.pruned_threads`).
    """
    if stage.reused:
        track.log_history(stage.history, first_step=first_epoch)
    tag = {"prune": "pruned"}.get(kind, kind)
    track.set_tags({f"fallopt.{tag}_threads": str(stage.entry.meta["threads"]),
                    f"fallopt.{tag}_from": stage.origin})  # fmt: skip
    outcome = stages.outcome(stage)
    track.log_artifacts([write_table(outcome.rows, output_dir / f"{table}_per_layer.csv")])
    log.info("[%s] %s, %d fine-tune epochs: %s", kind, stage.status, _epochs(stage.history),
             outcome.summary)  # fmt: skip
    return outcome.metrics


def _evaluate(
    cfg: FalloptConfig, data: Dataset, base: stages.StageResult, final: stages.StageResult
) -> tuple[Any, Evaluation, dict[str, float]]:
    model = load_saved(final.model_file)  # loaded once per process (the stage's own, if built)
    evaluation = evaluate_keras(model, data.test, _rule(cfg))
    metrics = evaluation.metrics(data.class_names, "test", data.positive)
    event = ""
    if data.positive is not None:
        name = data.class_names[data.positive]
        event = (f", {name} recall {metrics[f'test_{name}_recall']:.3f}, false alarms "
                 f"{metrics['test_false_alarm_rate']:.3f}")  # fmt: skip
    log.info("[evaluate] test_accuracy %.3f%s", evaluation.accuracy, event)
    params = {
        "params_total": model.count_params(),
        "baseline_params_total": base.entry.meta["params_total"],
        "params_ratio_to_baseline": model.count_params() / base.entry.meta["params_total"],
    }
    return model, evaluation, {**metrics, **params}


def _quantize(
    cfg: FalloptConfig,
    data: Dataset,
    base: stages.StageResult,
    final: stages.StageResult,
    final_model: Any,
    keras_eval: Evaluation,
    representative: np.ndarray | None,
    output_dir: Path,
    first_epoch: int,
) -> tuple[dict[str, float], dict[str, list[float]], Measuring]:
    """Convert the final model, evaluate exactly that file with LiteRT, log it and its C array.

    A quantization-aware fine-tune's epochs are logged from `first_epoch` on. Returns the
    metrics, that fine-tune's history (empty without) and the file's sizes being measured.
    """
    q = cfg.quant
    history: dict[str, list[float]] = {}
    source_eval = keras_eval  # of the Keras model the .tflite is converted from
    if q.mode in AWARE:
        model, history = quantization_aware_fine_tune(
            final.model_file, q.mode, data.train, data.val, cfg.train, q.fine_tune_epochs,
            cfg.seed, track.epoch_logger(first_epoch), _rule(cfg),
        )  # fmt: skip
        source_eval = evaluate_keras(model, data.test, _rule(cfg))
    else:
        model = final_model
    if q.float_layers:
        content = convert_with_float_layers(model, representative, q.float_layers)
        track.set_tags({"fallopt.float_ops": ", ".join(float_ops(content, model)) or "none"})
    else:
        content = convert(model, q.mode, representative, q.sparse_weights)
    tflite_file = output_dir / "model.tflite"
    tflite_file.write_bytes(content)
    measuring = Measuring(tflite_file)
    if cfg.cluster.method is not ClusterMethod.none:  # the file must keep what clustering made
        clustered = [row["layer"] for row in stages.outcome(final).rows]
        found = verify_tflite(content, final_model, clustered, cfg.cluster.clusters,
                              keep_zeros=cfg.cluster.preserve_sparsity)  # fmt: skip
        cluster_counts = {f"tflite_clusters_{name}": float(n) for name, n in found.items()}
        cluster_counts["tflite_clusters_achieved"] = float(max(found.values()))
    else:
        cluster_counts = {}
    # XNNPACK's int8 arithmetic is not TFLite's reference arithmetic, which TFLM (and
    # CMSIS-NN) reproduce bit for bit: measured up to 21 LSB apart in the output, flipping
    # 2% of classes. Full-integer files are evaluated as the device computes them.
    xnnpack = not q.sparse_weights and q.mode not in FULL_INTEGER
    tflite = TFLiteModel(content, q.threads, xnnpack=xnnpack, rule=_rule(cfg))
    start = time.perf_counter()
    probs = tflite.predict(data.test.x)
    seconds = time.perf_counter() - start
    evaluation = evaluate_probabilities(data.test.y, probs)
    metrics = evaluation.metrics(data.class_names, "tflite_test", data.positive)
    metrics.update(
        {
            "tflite_sparsity": tflite.weight_sparsity(),
            "tflite_disagreement": float(
                np.mean(evaluation.predictions != source_eval.predictions)
            ),
            "tflite_latency_ms": tflite.latency_ms(data.test.x[0], q.latency_repeats),
            "tflite_throughput_ips": len(data.test) / seconds,  # the evaluation pass itself
            "baseline_macs": base.entry.meta["macs"],
            **cluster_counts,
        }
    )
    if representative is not None:
        metrics["representative_samples_used"] = len(representative)
    cm_json = output_dir / "tflite_confusion_matrix.json"
    cm_json.write_text(json.dumps(evaluation.confusion.tolist()))
    track.log_artifacts([tflite_file, cm_json])
    track.set_tags(
        {
            "fallopt.stage.quant": q.mode.value,
            "fallopt.host_cpu": host_cpu(),
            "fallopt.latency": "tflite_latency_ms: 1 thread, batch 1, median after warm-up, "
            "on the host CPU, not the device",
            "fallopt.litert_kernels": "XNNPACK"
            if xnnpack
            else "LiteRT built-in kernels "
            "(sparse weights, or int8 evaluated with TFLite's reference arithmetic)",
        }
    )
    log.info(
        "[quant] %s: model.tflite %s bytes, test_accuracy %.3f, %.1f%% predictions differ "
        "from Keras, weight sparsity %.3f, %.2f ms per image on %s",
        q.mode.value,
        f"{len(content):,}",
        evaluation.accuracy,
        100 * metrics["tflite_disagreement"],
        metrics["tflite_sparsity"],
        metrics["tflite_latency_ms"],
        host_cpu(),
    )
    metrics.update(_device(cfg, data, content, tflite, evaluation, output_dir))
    return metrics, history, measuring


def _device(
    cfg: FalloptConfig,
    data: Dataset,
    content: bytes,
    tflite: TFLiteModel,
    evaluation: Evaluation,
    output_dir: Path,
) -> dict[str, float]:
    """The file on TFLM and against the target board; its C++ bundle for the device."""
    figures = device.measure(content, tflite, data.test, evaluation.predictions, cfg.target,
                             cfg.seed)  # fmt: skip
    track.set_tags(figures.tags)
    if not cfg.deploy:
        return figures.metrics
    settings = device.deploy_settings(figures, data.class_names, _rule(cfg), data.test,
                                      cfg.target)  # fmt: skip
    try:
        bundle = write_bundle(content, output_dir / "deploy", settings)
    except ValueError as e:  # a model the bundle cannot describe: the run's figures stand
        log.warning("[deploy] no deploy/ bundle: %s", e)
        track.set_tags({"fallopt.deploy": f"not written: {e}"[: track.MAX_TAG]})
    else:
        track.log_artifacts(bundle, "deploy")
        log.info("[deploy] deploy/: %s; arena declared %s", ", ".join(p.name for p in bundle),
                 f"{settings.arena_bytes:,} B")  # fmt: skip
    return figures.metrics


def _log_figures(
    cfg: FalloptConfig,
    data: Dataset,
    evaluation: Evaluation,
    history: dict[str, list[float]],
    phases: dict[str, int],
    output_dir: Path,
) -> None:
    cm_json = output_dir / "confusion_matrix.json"
    cm_json.write_text(json.dumps(evaluation.confusion.tolist()))
    title = (
        f"{cfg.model.name} on {data.name}\n"
        f"{SIZE_FILE} on the test set, accuracy {evaluation.accuracy:.1%}"
    )
    cm_png = confusion_matrix_png(
        evaluation.confusion, data.class_names, output_dir / "confusion_matrix.png", title
    )
    figures = [cm_json, cm_png]
    if history:
        figures.append(training_curves_png(history, output_dir / "training_curves.png", phases))
    track.log_artifacts(figures)


def _figures_tag(cfg: FalloptConfig) -> str:
    """Which model each logged figure describes (tag `fallopt.figures`)."""
    before_qat = ", before quantization-aware training" if cfg.quant.mode in AWARE else ""
    last = "the quantization-aware fine-tune's" if cfg.quant.mode in AWARE else "the"
    return (
        f"test_*, keras_*, params_*, confusion_matrix.*: {SIZE_FILE} (the final Keras "
        f"model{before_qat}); tflite_*, tflm_*, macs, peak_activation_bytes, flash_bytes: "
        "model.tflite; baseline_*: the baseline before pruning (baseline_macs: its float32 "
        "TFLite file); sparsity_*, channels_*, clusters_*: the prune and cluster stages' "
        f"models; train_* and val_*: {last} last training epoch"
    )


def _one_class(evaluation: Evaluation, class_names: tuple[str, ...], what: str) -> str | None:
    """A warning when a model predicts a single class for every test image."""
    predicted = np.unique(evaluation.predictions)
    if len(predicted) != 1 or len(class_names) < 2:
        return None
    return (
        f"{what} predicts {class_names[predicted[0]]!r} for every test image: its accuracy "
        "is that class's share, it has learned nothing"
    )


def _log_time(run_seconds: float) -> None:
    spent = timing.seconds()
    track.log_metrics({f"seconds_{k}": v for k, v in spent.items()} | {"seconds_run": run_seconds})
    log.info(
        "[time] %.1f s: %s, other %.1f (data, caching, tracking, plots)",
        run_seconds,
        ", ".join(f"{k} {v:.1f}" for k, v in spent.items()),
        run_seconds - sum(spent.values()),
    )


def run_experiment(
    cfg: FalloptConfig,
    config_hash: str,
    output_dir: Path,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, float]:
    """Train (or reuse), prune, evaluate and track one configuration; `tags`: more for its run.

    Data, shapes, the pruning schedule and scope are checked, and the tracking store opened,
    before the MLflow run starts, so bad input leaves no run behind. Once started, the run
    always ends FINISHED, FAILED or KILLED. Returns the run's final metrics, equal to the
    latest values it logged (so a sweeper sees the same objectives fresh or resumed).
    """
    start = time.perf_counter()
    timing.reset()
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("[config] hash %s, outputs in %s", config_hash, output_dir)
    experiment_id = track.connect(cfg.tracking)
    data = _load_data(cfg)
    log.info("[data] %s", data.describe())
    schedule, representative = _preflight(cfg, data)

    tags = {
        **(tags or {}),
        "fallopt.version": fallopt.__version__,
        "fallopt.config_hash": config_hash,
        "fallopt.dataset": data.name,
        "fallopt.model": cfg.model.name,
        "fallopt.classes": ",".join(data.class_names),
        "fallopt.positive_class": "" if data.positive is None else data.class_names[data.positive],
        "fallopt.data": data.describe()[: track.MAX_TAG],  # how it was read and split
        "fallopt.size_file": f"{SIZE_FILE}: final model, pruning stripped, no optimizer state",
        "fallopt.figures": _figures_tag(cfg),
        **track.owner_tags(),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_name = cfg.tracking.run_name or f"{cfg.model.name} on {data.name}"
    if cfg.deploy is None:  # a single run writes its bundle; a sweep's jobs only when asked
        cfg.deploy = parent_run_id is None
    resolved = as_dict(cfg)  # as it runs: e.g. quant.threads after the cap for parallel jobs
    with track.tracked_run(experiment_id, run_name, tags) as run_id:
        track.log_params(flatten(resolved))
        track.log_datasets(data.name, data.origin, {k: v.digest for k, v in data.splits().items()})
        config_file = output_dir / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(resolved))
        track.log_artifacts([config_file])
        counts = {"n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test)}

        cache = stage_cache(cfg.tracking)
        base, summary = _baseline(cfg, cache, data)
        final, history, phases = base, base.history, {}
        if cfg.prune.method is not PruneMethod.none:
            first = _epochs(history) + 1  # a fine-tune's epochs continue the run's count
            final = stages.pruned(cache, data, base, cfg.prune, schedule, cfg.train, cfg.seed,
                                  _rule(cfg), track.epoch_logger(first))  # fmt: skip
            table = _TABLES.get(cfg.prune.method, "sparsity")
            summary.update(_compress(final, "prune", table, first, output_dir))
            history = _joined(history, final.history)
            phases["pruning fine-tune"] = first
        track.set_tags({"fallopt.stage.prune": final.status if final is not base else "none"})
        clustered = None
        if cfg.cluster.method is not ClusterMethod.none:
            first = _epochs(history) + 1
            clustered = stages.clustered(cache, data, final, cfg.cluster, cfg.train, cfg.seed,
                                         _rule(cfg), track.epoch_logger(first))  # fmt: skip
            summary.update(_compress(clustered, "cluster", "cluster", first, output_dir))
            if clustered.history:
                history = _joined(history, clustered.history)
                phases["clustering fine-tune"] = first
            final = clustered
        track.set_tags({"fallopt.stage.cluster": clustered.status if clustered else "none"})

        keras_size = Measuring(final.model_file)  # meanwhile, while TensorFlow leaves a core
        model, evaluation, final_metrics = _evaluate(cfg, data, base, final)
        summary.update(final_metrics)
        quant_metrics, qat_history, tflite_size = _quantize(
            cfg, data, base, final, model, evaluation, representative, output_dir,
            _epochs(history) + 1,
        )  # fmt: skip
        summary.update(quant_metrics)
        if qat_history:
            phases["quantization-aware fine-tune"] = _epochs(history) + 1
            history = _joined(history, qat_history)
        if not history:  # a model file taken as it is: nothing was trained epoch by epoch
            summary["train_accuracy"] = base.entry.meta["train_accuracy"]
            summary["val_accuracy"] = base.entry.meta["val_accuracy"]
        warning = _one_class(evaluation, data.class_names, SIZE_FILE)
        if warning:
            log.warning("[evaluate] %s", warning)
            track.set_tags({"fallopt.warning": warning})
        _log_figures(cfg, data, evaluation, history, phases, output_dir)
        track.log_artifacts([final.model_file], "model")
        summary.update(_sizes(base, model, keras_size, tflite_size))
        # train_/val_ accuracy and loss were logged epoch by epoch; the rest once.
        track.log_metrics({**summary, **counts})
        _log_time(time.perf_counter() - start)
        log.info(
            "[track] run %s in experiment %r at %s",
            run_id,
            cfg.tracking.experiment,
            cfg.tracking.uri,
        )
    last_epoch = {track.metric_name(k): v[-1] for k, v in history.items()}
    return {**summary, **counts, **last_epoch}
