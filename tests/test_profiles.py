"""Device profiles: the built-in ones, user extensions, malformed files, fit checks, Pareto."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeops.compress import (
    Candidate,
    DeviceProfile,
    Needs,
    ProfileError,
    UnknownProfileError,
    get_profile,
    load_profiles,
    mark_candidates,
    pareto_front,
)
from edgeops.errors import ConfigError

BUILT_IN = ("cortex-m0plus-32k", "cortex-m4-256k", "cortex-m7-1m", "rpi4-linux")


def test_built_in_profiles_load_with_budgets_runtime_and_ops() -> None:
    profiles = load_profiles()
    assert set(BUILT_IN) <= set(profiles)
    for name in BUILT_IN:
        profile = profiles[name]
        assert profile.flash_bytes > 0 and profile.ram_bytes > 0
        assert profile.runtime in ("tflm", "litert")
        assert profile.modes
    assert profiles["cortex-m0plus-32k"].ram_bytes <= 32 * 1024
    assert "CONV_2D" in (profiles["cortex-m4-256k"].ops or set())
    assert profiles["rpi4-linux"].ops is None  # any builtin operator
    assert profiles["cortex-m0plus-32k"].modes == ("int8",)


def test_user_file_adds_and_replaces_profiles(tmp_path: Path) -> None:
    extra = tmp_path / "boards.toml"
    extra.write_text(
        """
[profiles.my-esp32]
runtime = "tflm"
flash_bytes = 2_000_000
ram_bytes = 300_000
ops = ["CONV_2D", "FULLY_CONNECTED", "RESHAPE", "SOFTMAX"]
vendor = "espressif"

[profiles.rpi4-linux]
runtime = "litert"
flash_bytes = 1000
ram_bytes = 2000
modes = ["float16"]
latency_budget_ms = 5
"""
    )
    profiles = load_profiles(extra)
    mine = profiles["my-esp32"]
    assert mine.ops == frozenset({"CONV_2D", "FULLY_CONNECTED", "RESHAPE", "SOFTMAX"})
    assert mine.modes == ("int8",)  # the runtime's default
    assert mine.extra == {"vendor": "espressif"}  # unknown fields kept
    assert mine.source == str(extra)
    assert profiles["rpi4-linux"].flash_bytes == 1000  # replaced
    assert profiles["rpi4-linux"].latency_budget_ms == 5.0
    assert "cortex-m4-256k" in profiles  # built-ins stay
    assert get_profile("my-esp32", extra) == mine


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("this is = not [toml", "is not valid TOML"),
        ("[other]\nx = 1\n", "has no [profiles.NAME] tables"),
        ('[profiles.b]\nruntime = "tflm"\nram_bytes = 10\n', "missing field 'flash_bytes'"),
        (
            '[profiles.b]\nruntime = "tflm"\nflash_bytes = -5\nram_bytes = 10\n',
            "flash_bytes must be a positive integer",
        ),
        (
            '[profiles.b]\nruntime = "zephyr"\nflash_bytes = 5\nram_bytes = 10\n',
            "runtime must be one of tflm, litert",
        ),
        (
            '[profiles.b]\nruntime = "tflm"\nflash_bytes = 5\nram_bytes = 10\nops = "CONV_2D"\n',
            "ops must be a list of names",
        ),
        (
            '[profiles.b]\nruntime = "tflm"\nflash_bytes = 5\nram_bytes = 10\nmodes = ["int4"]\n',
            "modes must be a non-empty list",
        ),
        (
            '[profiles.b]\nruntime = "litert"\nflash_bytes = 5\nram_bytes = 10\n'
            "latency_budget_ms = -1\n",
            "latency_budget_ms must be a positive number",
        ),
    ],
)
def test_malformed_profile_file_names_the_file_and_field(
    tmp_path: Path, text: str, needle: str
) -> None:
    bad = tmp_path / "bad-profiles.toml"
    bad.write_text(text)
    with pytest.raises(ProfileError) as caught:
        load_profiles(bad)
    message = str(caught.value)
    assert str(bad) in message and needle in message, message
    assert isinstance(caught.value, ConfigError)  # the CLI exits 2, as for configuration


def test_missing_profile_file_and_unknown_profile_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"cannot read profile file .*nope\.toml"):
        load_profiles(tmp_path / "nope.toml")
    with pytest.raises(UnknownProfileError, match=r"'esp-eye'.*known profiles: cortex-m0plus-32k"):
        get_profile("esp-eye")


def test_misfits_name_flash_ram_ops_and_latency() -> None:
    profile = DeviceProfile(
        name="tiny",
        runtime="tflm",
        flash_bytes=1000,
        ram_bytes=500,
        ops=frozenset({"CONV_2D", "SOFTMAX"}),
        latency_budget_ms=1.0,
    )
    assert profile.misfits(Needs(1000, 500, ("CONV_2D",), 0.5)) == []
    reasons = profile.misfits(Needs(1001, 501, ("CONV_2D", "MEAN"), 2.0))
    assert reasons == [
        "flash 1001 B > 1000 B",
        "RAM 501 B > 500 B",
        "ops not supported: MEAN",
        "latency 2.000 ms > 1.0 ms",
    ]
    assert "cannot plan its memory" in profile.misfits(Needs(10, None, ()))[0]


def test_pareto_front_keeps_non_dominated_points() -> None:
    points = [(1.0, 1.0), (2.0, 0.5), (2.0, 2.0), (0.5, 3.0), (1.0, 1.0)]
    assert pareto_front(points) == [0, 1, 3, 4]
    assert pareto_front([]) == []


def _candidate(accuracy: float, flash: int, ram: int | None, latency: float) -> Candidate:
    return Candidate(
        width=1.0,
        sparsity=0.0,
        quantization="int8",
        accuracy=accuracy,
        test_accuracy=accuracy,
        flash_bytes=flash,
        gzip_bytes=flash // 2,
        ram_bytes=ram,
        arena_bytes=ram,
        latency_ms=latency,
        macs=None,
        ops=["CONV_2D"],
    )


def test_mark_candidates_sets_front_and_fit() -> None:
    profile = DeviceProfile("mcu", "tflm", flash_bytes=5000, ram_bytes=2000)
    candidates = [
        _candidate(0.95, 9000, 3000, 1.0),  # most accurate, too big: front, no fit
        _candidate(0.90, 4000, 1500, 0.5),  # front, fits
        _candidate(0.85, 4500, 1800, 0.6),  # fits, but dominated by the one above
        _candidate(0.80, 2000, None, 0.2),  # TFLM cannot plan it: does not fit
    ]
    mark_candidates(candidates, profile)
    assert [c.on_front for c in candidates] == [True, True, False, True]
    assert [c.fits for c in candidates] == [False, True, True, False]
    assert candidates[0].misfits == ["flash 9000 B > 5000 B", "RAM 3000 B > 2000 B"]
