"""A run's device figures for its `.tflite` file: arena, MACs, flash, TFLM's answers, the fit.

All of them describe `model.tflite` as logged. The offline ones (`macs`,
`peak_activation_bytes`, `flash_bytes`) always exist; TFLM's (`tflm_*`) only where TFLM
runs and accepts the model, else the tag `fallopt.tflm` says why not and the run goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from fallopt import target as budgets
from fallopt import tflm
from fallopt.config import TargetConfig
from fallopt.data import InputRule
from fallopt.data.dataset import Split
from fallopt.deploy import DeploySettings
from fallopt.litert import TFLiteModel
from fallopt.tflite_graph import Graph

log = logging.getLogger(__name__)


@dataclass
class DeviceFigures:
    """What `measure` found: metrics and tags to log, and what the deploy bundle needs."""

    graph: Graph
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    arena_bytes: int | None = None  # TFLM's minimal arena, if measured
    unsupported: str | None = None  # why TFLM cannot run the file, if it cannot
    sample: int | None = None  # a test image's index, and the class TFLM gave it
    sample_class: int | None = None

    @property
    def arena_to_declare(self) -> int:
        """The measured arena, else the offline lower bound (the bundle says which)."""
        return self.arena_bytes or self.graph.peak_activation_bytes


def _samples(n_test: int, cap: int, seed: int) -> np.ndarray:
    """The test images run on TFLM: all, or `cap` drawn at random (sorted)."""
    if cap >= n_test:
        return np.arange(n_test)
    return np.sort(np.random.default_rng(seed).choice(n_test, cap, replace=False))


def measure(
    content: bytes,
    litert: TFLiteModel,
    test: Split,
    litert_classes: np.ndarray,
    target: TargetConfig,
    seed: int,
) -> DeviceFigures:
    """Measure the file offline and on TFLM, and judge it against `target`.

    `litert_classes` are LiteRT's predictions for the whole test split, for `tflm_agreement`.
    """
    graph = Graph.from_bytes(content)
    found = DeviceFigures(graph)
    found.metrics = {
        "macs": graph.macs,
        "peak_activation_bytes": graph.peak_activation_bytes,
        "flash_bytes": budgets.flash_needed(len(content), target),
    }
    why = tflm.unavailable()
    if why is None:
        try:
            found.arena_bytes = tflm.minimal_arena(content, graph)
        except tflm.TflmUnsupported as e:
            why = found.unsupported = str(e)
    if found.arena_bytes is None:
        found.tags["fallopt.tflm"] = f"skipped: {why}"
        log.warning("[tflm] skipped: %s; macs and peak_activation_bytes are from the file", why)
    else:
        found.metrics["tflm_arena_bytes"] = found.arena_bytes
        found.tags["fallopt.tflm"] = _run_on_tflm(found, content, litert, test, litert_classes,
                                                   target.tflm_samples, seed)  # fmt: skip
    found.tags["fallopt.target"] = target.name
    if target.is_board:
        fit = budgets.verdict(found.arena_bytes, found.metrics["flash_bytes"], target,
                              why or "", found.unsupported)  # fmt: skip
        found.tags["fallopt.fits"] = fit.text
        log.info("[target] %s: fits %s", target.name, fit.text)
    return found


def _run_on_tflm(
    found: DeviceFigures,
    content: bytes,
    litert: TFLiteModel,
    test: Split,
    litert_classes: np.ndarray,
    cap: int,
    seed: int,
) -> str:
    """Predict sampled test images on TFLM in the minimal arena; returns the tag's text."""
    arena = found.arena_bytes
    assert arena is not None
    g = found.graph
    measured = (f"tflm_arena_bytes: minimal arena to {tflm.ARENA_STEP} B (bisection, TFLM's "
                "recording allocator on the host)")  # fmt: skip
    line = (f"[tflm] arena {budgets.kib(arena)} ({arena:,} B, minimal), peak activations "
            f"{budgets.kib(g.peak_activation_bytes)}, {g.macs / 1e6:.1f} M MACs, flash "
            f"{budgets.kib(found.metrics['flash_bytes'])}")  # fmt: skip
    index = _samples(len(test), cap, seed)
    if not len(index):
        log.info("%s; no test image run (target.tflm_samples=0)", line)
        return measured
    start = time.perf_counter()
    predicted = tflm.classes(content, arena, litert.model_input(test.x[index]))
    found.metrics.update(
        {
            "tflm_test_accuracy": float(np.mean(predicted == test.y[index])),
            "tflm_agreement": float(np.mean(predicted == litert_classes[index])),
            "tflm_samples_used": len(index),
        }
    )
    found.sample, found.sample_class = int(index[0]), int(predicted[0])
    log.info(
        "%s; %d test images on TFLM in that arena (%.1f s): accuracy %.3f, same class as "
        "LiteRT on %.1f%%",
        line, len(index), time.perf_counter() - start, found.metrics["tflm_test_accuracy"],
        100 * found.metrics["tflm_agreement"],
    )  # fmt: skip
    return (f"{measured}; tflm_test_accuracy, tflm_agreement: {len(index)} test images drawn "
            "with the run's seed, run in that arena")  # fmt: skip


def deploy_settings(
    found: DeviceFigures,
    class_names: tuple[str, ...],
    rule: InputRule,
    test: Split,
    target: TargetConfig,
) -> DeploySettings:
    """What the deploy bundle declares: the arena with the target's margin, a checked sample."""
    arena = found.arena_to_declare
    if found.arena_bytes is not None:
        source = f"{arena:,} B, the minimal arena TFLM's Python interpreter allocated on the host"
    else:
        source = (f"{arena:,} B, the file's peak activation bytes: a lower bound, as TFLM did "
                  f"not run ({found.tags['fallopt.tflm'].removeprefix('skipped: ')})")  # fmt: skip
    sample = found.sample
    return DeploySettings(
        class_names=class_names,
        rule=rule,
        arena_bytes=budgets.recommended_arena(arena, target),
        arena_note=f"{source}, + {target.arena_margin:.0%} margin (target.arena_margin), "
        "rounded up to whole KiB",
        sample=None if sample is None else test.x[sample],
        sample_label=None if sample is None else int(test.y[sample]),
        sample_expected=found.sample_class,
        # deploy says "TFLM cannot run this model: <why>" itself
        unsupported=found.unsupported
        and found.unsupported.removeprefix(f"{budgets.TFLM_REFUSED}: "),
    )
