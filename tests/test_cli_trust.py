"""``edgeops keys``, ``edgeops release`` and ``edgeops releases``, as an operator runs them.

The programs run in a subprocess on the test's own data dir. Releases use real models: the
session's registry (``model_factory``: a digits MLP, and its int8 compression) is copied into
the data dir, and what the command published is read back with a real ``tuf.ngclient``
Updater, as a device would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import FetcherInterface, Updater

from device_agent.card import ModelCard
from edgeops.trust import card_of
from tests.clitools import assert_one_line_error, run_cli
from tests.fixtures.models import ModelFactory


class DirectoryFetcher(FetcherInterface):
    def __init__(self, repository_dir: Path) -> None:
        self.repository_dir = repository_dir

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.repository_dir / url.partition(":")[2]
        if not path.is_file():
            raise tuf_exceptions.DownloadHTTPError(url, 404)
        yield path.read_bytes()


def edgeops(*args: str) -> Any:
    """Run ``edgeops ARGS --json`` successfully and return its JSON document."""
    result = run_cli("edgeops", *args, "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def device_download(trust_dir: Path, home: Path, target_path: str) -> tuple[Any, bytes]:
    """Provision a device with today's root.json and let ngclient fetch and verify a target."""
    (home / "metadata").mkdir(parents=True, exist_ok=True)
    (home / "targets").mkdir(parents=True, exist_ok=True)
    repository = trust_dir / "repository"
    if not (home / "metadata" / "root.json").exists():
        shutil.copyfile(repository / "metadata" / "root.json", home / "metadata" / "root.json")
    updater = Updater(
        str(home / "metadata"),
        "dir:metadata/",
        str(home / "targets"),
        "dir:targets/",
        fetcher=DirectoryFetcher(repository),
        bootstrap=None,
    )
    updater.refresh()
    info = updater.get_targetinfo(target_path)
    assert info is not None, f"{target_path} is not a verified target"
    return info, Path(updater.download_target(info)).read_bytes()


@pytest.fixture(scope="module")
def registry_ids(model_factory: Any, int8_model_dir: Path) -> dict[str, Any]:
    """Ids of the session's float (Keras) and int8 (.tflite) model versions."""
    models = model_factory.registry.list_models()
    int8 = [m for m in models if m.format == "tflite" and m.parent_id == model_factory.keras_ref]
    keras = model_factory.registry.get_model(model_factory.keras_ref)
    return {"keras": keras, "int8": int8[0]}


@pytest.fixture
def data_dir_with_models(isolated_environment: Path, model_factory: ModelFactory) -> Path:
    """The test's data dir holding a copy of the session's registry (database + artifacts)."""
    return model_factory.copy_to(isolated_environment)


# -- keys -------------------------------------------------------------------------------------


def test_keys_init_show_and_rotate(isolated_environment: Path, tmp_path: Path) -> None:
    offline = tmp_path / "usb-stick"
    created = edgeops(
        "keys", "init", "--root-keys", "3", "--root-threshold", "2", "--root-key-dir", str(offline)
    )
    trust = isolated_environment / "trust"
    assert created["root_key_dir"] == str(offline)
    assert created["roles"]["root"]["threshold"] == 2
    assert len(created["roles"]["root"]["keyids"]) == 3
    assert sorted(p.name for p in offline.iterdir()) == ["root-1.pem", "root-2.pem", "root-3.pem"]
    for key_file in [*offline.iterdir(), *(trust / "keys" / "online").iterdir()]:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    shown = edgeops("keys", "show")
    assert {name: role["version"] for name, role in shown["roles"].items()} == {
        "root": 1, "targets": 1, "snapshot": 1, "timestamp": 1
    }  # fmt: skip
    assert edgeops("releases", "list") == []

    rotated = edgeops("keys", "rotate", "timestamp", "--root-key-dir", str(offline))
    assert rotated["versions"]["root"] == 2 and rotated["versions"]["timestamp"] == 2
    rotated = edgeops(
        "keys", "rotate", "root", "--root-key-dir", str(offline), "--root-threshold", "3"
    )
    assert rotated["versions"]["root"] == 3
    root = Metadata[Root].from_file(str(trust / "repository" / "metadata" / "root.json"))
    assert root.signed.version == 3 and root.signed.roles["root"].threshold == 3
    assert sorted(p.name for p in (offline / "retired-v2").iterdir()) == [
        "root-1.pem", "root-2.pem", "root-3.pem"
    ]  # fmt: skip
    human = run_cli("edgeops", "keys", "show")
    assert human.returncode == 0 and "timestamp" in human.stdout and "offline" in human.stdout


def test_keys_init_default_dir_warns_to_move_the_root_keys(isolated_environment: Path) -> None:
    result = run_cli("edgeops", "keys", "init")
    assert result.returncode == 0, result.stderr
    default = isolated_environment / "trust" / "offline-root-keys"
    assert (default / "root-1.pem").is_file()
    assert "warning" in result.stderr and "move that directory" in result.stderr
    assert str(default) in result.stderr


def test_keys_errors_are_one_line(isolated_environment: Path, tmp_path: Path) -> None:
    not_yet = run_cli("edgeops", "keys", "show")
    assert_one_line_error(not_yet, "no trust repository", "edgeops keys init")
    assert not_yet.returncode == 2
    impossible = run_cli("edgeops", "keys", "init", "--root-keys", "2", "--root-threshold", "3")
    assert_one_line_error(impossible, "threshold 3 is impossible with 2 key(s)")
    assert impossible.returncode == 2

    offline = tmp_path / "offline"
    assert run_cli("edgeops", "keys", "init", "--root-key-dir", str(offline)).returncode == 0
    again = run_cli("edgeops", "keys", "init", "--root-key-dir", str(tmp_path / "other"))
    assert_one_line_error(again, "already exists")
    assert again.returncode == 2
    missing = run_cli("edgeops", "keys", "rotate", "targets")  # default dir: never written
    assert_one_line_error(missing, "root key directory", "does not exist", "--root-key-dir")
    assert missing.returncode == 2
    unknown = run_cli("edgeops", "keys", "rotate", "mirror", "--root-key-dir", str(offline))
    assert_one_line_error(unknown, "unknown role 'mirror'")
    (offline / "root-1.pem").unlink()
    short = run_cli("edgeops", "keys", "rotate", "timestamp", "--root-key-dir", str(offline))
    assert_one_line_error(short, "needs 1 of its 1 keys; 0 found")
    assert short.returncode == 2


# -- releases ---------------------------------------------------------------------------------


def test_release_before_keys_init_and_of_an_unknown_model(
    isolated_environment: Path, tmp_path: Path
) -> None:
    early = run_cli("edgeops", "release", "digits-mlp")
    assert_one_line_error(early, "no trust repository", "edgeops keys init")
    assert early.returncode == 2
    assert run_cli("edgeops", "keys", "init", "--root-key-dir", str(tmp_path / "k")).returncode == 0
    unknown = run_cli("edgeops", "release", "no-such-model")
    assert_one_line_error(unknown, "no-such-model")
    assert unknown.returncode == 1
    bad_runtime = run_cli("edgeops", "release", "no-such-model", "--runtime", "tpu")
    assert bad_runtime.returncode == 2 and "Traceback" not in bad_runtime.stderr
    bad_tags = run_cli("edgeops", "release", "no-such-model", "--hardware", "arch")
    assert_one_line_error(bad_tags, "hardware tag 'arch' must be KEY=VALUE")
    assert bad_tags.returncode == 2


def test_release_litert_publishes_a_target_a_device_verifies(
    data_dir_with_models: Path, registry_ids: dict[str, Any], tmp_path: Path
) -> None:
    keras = registry_ids["keras"]
    edgeops("keys", "init", "--root-keys", "3", "--root-threshold", "2",
            "--root-key-dir", str(tmp_path / "offline"))  # fmt: skip
    released = edgeops(
        "release", keras.id, "--runtime", "litert",
        "--hardware", "arch=x86_64|aarch64,board=rpi4", "--min-free-memory", "2000000",
    )  # fmt: skip
    path = f"{keras.name}/{keras.seq}/litert/model.tflite"
    assert released["target"] == path
    assert released["versions"] == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    info, data = device_download(data_dir_with_models / "trust", tmp_path / "device", path)
    assert len(data) == released["length"] == info.length
    assert hashlib.sha256(data).hexdigest() == released["sha256"]
    assert data[4:8] == b"TFL3"
    contract = info.custom["edgeops"]
    assert contract["runtime"] == "litert"
    assert contract["hardware"] == {"arch": ["x86_64", "aarch64"], "board": ["rpi4"]}
    assert contract["min_free_memory_bytes"] == 2_000_000
    assert isinstance(contract["card"], str)  # JSON text: canonical JSON has no floats
    card = ModelCard.from_dict(card_of(info.custom))
    assert card.model_id == keras.id and card.version == str(keras.seq)
    assert card.runtime == "litert" and card.flash_bytes == len(data)
    assert card.test_vectors and card.op_set and card.preprocessing and card.reference
    listed = edgeops("releases", "list")
    assert [(r["target"], r["model_id"], r["runtime"]) for r in listed] == [
        (path, keras.id, "litert")
    ]
    human = run_cli(  # again: the same bytes; the card's measured latency differs
        "edgeops", "release", keras.id, "--runtime", "litert",
        "--hardware", "arch=x86_64|aarch64,board=rpi4", "--min-free-memory", "2000000",
    )  # fmt: skip
    assert human.returncode == 0, human.stderr
    assert f"released {path}" in human.stdout and released["sha256"] in human.stdout
    assert "targets 3, snapshot 3, timestamp 3" in human.stdout


def test_release_mcu_needs_a_full_int8_model(
    data_dir_with_models: Path, registry_ids: dict[str, Any], tmp_path: Path
) -> None:
    keras, int8 = registry_ids["keras"], registry_ids["int8"]
    assert run_cli("edgeops", "keys", "init", "--root-key-dir", str(tmp_path / "k")).returncode == 0
    float_mcu = run_cli("edgeops", "release", keras.id, "--runtime", "mcu", timeout=600)
    assert_one_line_error(float_mcu, "runtime mcu", "not a full-int8")
    assert float_mcu.returncode == 1
    int8_onnx = run_cli("edgeops", "release", int8.id, "--runtime", "onnx", timeout=600)
    assert_one_line_error(int8_onnx, f"cannot release {int8.name}:{int8.seq} for runtime onnx")
    assert int8_onnx.returncode == 1

    released = edgeops("release", int8.id, "--runtime", "mcu")
    path = f"{int8.name}/{int8.seq}/mcu/model.tflite"
    assert released["target"] == path and released["runtime"] == "mcu"
    info, data = device_download(data_dir_with_models / "trust", tmp_path / "device", path)
    card = ModelCard.from_dict(card_of(info.custom))
    assert card.runtime == "tflm" and card.quantization.mode == "int8"
    assert card.arena_bytes and card.arena_bytes > 0 and card.flash_bytes == len(data)
    assert info.custom["edgeops"]["hardware"] == {}
    assert info.custom["edgeops"]["min_free_memory_bytes"] is None


# -- the contract, in process -----------------------------------------------------------------


def test_hardware_tags_and_custom_metadata(int8_model_dir: Path) -> None:
    from edgeops.trust import HardwareTagsError, build_custom
    from edgeops.trust.release import parse_hardware, target_path

    assert parse_hardware(None) == {} and parse_hardware(" ") == {}
    assert parse_hardware("arch=x86_64|aarch64, board=rpi4") == {
        "arch": ["x86_64", "aarch64"], "board": ["rpi4"]
    }  # fmt: skip
    for bad in ("arch", "arch=", "=x", "arch=a|", "a b=c", "arch=x,arch=y"):
        with pytest.raises(HardwareTagsError):
            parse_hardware(bad)
    assert target_path("digits-mlp", 3, "mcu") == "digits-mlp/3/mcu/model.tflite"
    assert target_path("digits-mlp", 3, "onnx") == "digits-mlp/3/onnx/model.onnx"
    card = ModelCard.from_dict(json.loads((int8_model_dir / "card.json").read_text()))
    custom = build_custom(card, "litert", {"arch": ["x86_64"]}, 4096)
    assert set(custom["edgeops"]) == {"card", "hardware", "min_free_memory_bytes", "runtime"}
    assert ModelCard.from_dict(card_of(custom)).to_dict() == card.to_dict()
    assert custom["edgeops"]["hardware"] == {"arch": ["x86_64"]}
    assert custom["edgeops"]["min_free_memory_bytes"] == 4096
