"""The int8 fallback policy, as pure functions over measured attempts.

Full-integer int8 is what microcontrollers run, so it is tried first. If it loses more than
``max_loss_pp`` percentage points against the float model — measured on the validation split
on the device runtime (LiteRT, or tflite-micro when compressing for an MCU profile) —
quantization-aware training is tried (int8 again, after fine-tuning with fake quantization),
then 16x8 (int16 activations). The first variant within the limit is chosen; if none is, the
most accurate one is kept and the reason says so. Other requested modes are taken as they
are: there is nothing to fall back to that would keep their size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Attempt", "Decision", "decide", "next_variant"]


@dataclass(frozen=True)
class Attempt:
    """One quantized variant and how it scored on the validation split."""

    mode: str
    qat: bool
    score: float  # accuracy (or AUC) in [0, 1], on the device runtime
    loss_pp: float  # float score minus this score, in percentage points
    size_bytes: int

    @property
    def label(self) -> str:
        return f"QAT {self.mode}" if self.qat else self.mode

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantization": self.mode,
            "qat": self.qat,
            "val_score": round(self.score, 6),
            "loss_pp": round(self.loss_pp, 4),
            "size_bytes": self.size_bytes,
        }


@dataclass(frozen=True)
class Decision:
    """The chosen attempt and why."""

    chosen: Attempt
    reason: str
    within_limit: bool


def _plan(requested: str, qat: bool) -> list[tuple[str, bool]]:
    plan = [(requested, qat)]
    if requested == "int8":
        if not qat:
            plan.append(("int8", True))
        plan.append(("int16x8", False))
    return plan


def next_variant(
    requested: str, qat: bool, attempts: list[Attempt], max_loss_pp: float
) -> tuple[str, bool] | None:
    """The next (mode, qat) to try, or None when the last attempt is good enough or the
    plan is exhausted."""
    if attempts and attempts[-1].loss_pp <= max_loss_pp:
        return None
    plan = _plan(requested, qat)
    return plan[len(attempts)] if len(attempts) < len(plan) else None


def decide(
    attempts: list[Attempt],
    max_loss_pp: float,
    metric: str = "accuracy",
    runtime: str = "LiteRT",
) -> Decision:
    """Which attempt to keep, with a one-sentence reason naming every measurement and the
    runtime that measured it."""
    if not attempts:
        raise ValueError("decide() needs at least one attempt")
    measured = "; ".join(f"{a.label} loses {a.loss_pp:.2f} pp" for a in attempts)
    where = f"{metric} on the validation split, {runtime}"
    last = attempts[-1]
    if last.loss_pp <= max_loss_pp:
        if len(attempts) == 1:
            reason = f"{measured} ({where}), within the {max_loss_pp:g} pp limit"
        else:
            reason = (
                f"{measured} ({where}); chose {last.label}, the first within the "
                f"{max_loss_pp:g} pp limit"
            )
        return Decision(last, reason, within_limit=True)
    best = max(attempts, key=lambda a: (a.score, -a.size_bytes))
    reason = (
        f"{measured} ({where}); none is within the {max_loss_pp:g} pp limit, "
        f"kept the most accurate, {best.label}"
    )
    return Decision(best, reason, within_limit=False)
