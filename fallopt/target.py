"""Does a model fit a board? Budgets from `conf/target/`, one verdict for runs and reports.

RAM needed is TFLM's tensor arena plus what the application reserves; flash needed is the
`.tflite` file plus TFLM's runtime code. Both figures are the run's own (`tflm_arena_bytes`,
`flash_bytes`), so a report can judge old runs against any board.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fallopt.config import KIB, TargetConfig
from fallopt.errors import ConfigError

CONF = Path(__file__).parent / "conf" / "target"


def kib(n: float) -> str:
    """Bytes as KiB for people: `534 KiB`, `2.3 KiB`."""
    value = n / KIB
    return f"{value:,.0f} KiB" if value >= 10 else f"{value:.1f} KiB"


def names() -> list[str]:
    """The packaged target options (`target=<name>`)."""
    return sorted(p.stem for p in CONF.glob("*.yaml"))


def load(name: str, **overrides: int | float | None) -> TargetConfig:
    """A packaged target option by name with `overrides`, validated, outside Hydra.

    Raises:
        ConfigError: naming the option and the packaged ones, or a bad override.
    """
    path = CONF / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--target {name!r}: no such board; choose from {names()}")
    try:
        node = OmegaConf.load(path)
        node.pop("defaults", None)  # Hydra's: it extends TargetConfig, merged here instead
        merged = OmegaConf.merge(OmegaConf.structured(TargetConfig), node, overrides)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None


TFLM_REFUSED = "TFLM cannot run this model"  # how a refusal starts, in tags and messages


def ram_needed(arena_bytes: int, target: TargetConfig) -> int:
    """RAM for the arena and what the application reserves besides it."""
    return arena_bytes + target.ram_reserved_bytes


def flash_needed(tflite_bytes: int, target: TargetConfig) -> int:
    """Flash for the model file and TFLM's runtime code (`flash_bytes`)."""
    return tflite_bytes + target.runtime_flash_bytes


def recommended_arena(arena_bytes: int, target: TargetConfig) -> int:
    """The arena to declare on the device: the measured one plus the margin, in whole KiB."""
    return math.ceil(arena_bytes * (1 + target.arena_margin) / KIB) * KIB


@dataclass(frozen=True)
class Fit:
    """A verdict: `yes`, `no: <what binds>`, or `unknown: <why>` (no arena was measured)."""

    fits: bool | None
    text: str
    binding: tuple[str, ...] = ()  # "TFLM", "RAM", "arena", "flash": what rules it out


def verdict(
    arena_bytes: int | None,
    flash_bytes: int,
    target: TargetConfig,
    why_unknown: str = "",
    unsupported: str | None = None,
) -> Fit:
    """Check the RAM (arena + reserve, and the arena against the largest block) and flash.

    `arena_bytes` None means no arena was measured (`why_unknown` says why): the run cannot
    be said to fit, but a flash overrun still says it does not. `unsupported` (TFLM's reason
    for refusing the file) means it does not run on the board at all.
    """
    over = [("TFLM", unsupported)] if unsupported else []
    if target.flash_bytes is not None and flash_bytes > target.flash_bytes:
        over.append(("flash", f"flash {kib(flash_bytes)} > {kib(target.flash_bytes)}"))
    if arena_bytes is not None:
        ram = ram_needed(arena_bytes, target)
        if target.ram_bytes is not None and ram > target.ram_bytes:
            reserve = f" (arena + {kib(target.ram_reserved_bytes)} reserved)"
            reserved = reserve if target.ram_reserved_bytes else ""
            over.insert(0, ("RAM", f"RAM {kib(ram)}{reserved} > {kib(target.ram_bytes)}"))
        block = target.arena_max_bytes
        if block is not None and arena_bytes > block:
            over.insert(0, ("arena", f"arena {kib(arena_bytes)} > {kib(block)} largest RAM block"))
    if over:
        return Fit(False, "no: " + "; ".join(text for _, text in over), tuple(k for k, _ in over))
    if arena_bytes is None:
        return Fit(None, f"unknown: {why_unknown or 'no TFLM arena measured'}")
    return Fit(True, "yes")
