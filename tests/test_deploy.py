"""Publishing desired twins and ``edgeops devices deploy`` / ``twin``, on a private Mosquitto.

The last test is the whole path: a real agent (the ``edgeops-agent`` program, provisioned
with the hub's trust root and release 1) receives ``edgeops devices deploy`` through the
retained desired document, downloads and verifies release 2 over MQTT, ends on it, and the
hub's ``devices twin --json`` shows no difference once it committed.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.link import Message, MqttEndpoint, MqttLink
from device_agent.protocol import Channel, device_topic
from device_agent.updater.service import parse_release
from edgeops.db import Database
from edgeops.errors import BrokerError
from edgeops.fleet import FleetService, IdentityService
from edgeops.hub import DesiredPublisher
from edgeops.trust import TrustRepository
from tests.clitools import assert_one_line_error, run_cli
from tests.fixtures.mqtt import next_message
from tests.fixtures.trust import AgentProcess, TrustHub, wait_for

NAME = "toy"
CARD_V1 = '{"model_id":"m-00000000000a"}'
CARD_V2 = '{"model_id":"m-00000000000b"}'


def edgeops(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("edgeops", *args, env=env)


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    started: list[MqttLink] = []
    yield started
    for link in started:
        link.stop()


def subscriber(links: list[MqttLink], url: str, topic_filter: str) -> MqttLink:
    """A new client subscribed to ``topic_filter`` (it gets the retained messages there)."""
    link = MqttLink(MqttEndpoint.parse(url), client_id=f"test-sub-{len(links)}")
    link.subscribe(topic_filter, 1)
    link.start(wait_s=10)
    links.append(link)
    return link


def retained_desired(link: MqttLink, device_id: str, *, live: bool = False) -> dict[str, Any]:
    """The next desired document of ``device_id`` on ``link``: retained (the broker's copy,
    sent on subscribing), or ``live`` (published while the link was subscribed)."""
    message = next_message(link, device_topic(device_id, Channel.DESIRED), timeout_s=10)
    assert isinstance(message, Message), f"no desired document for {device_id}"
    assert message.retain is not live and message.qos == 1
    document = json.loads(message.payload)
    assert isinstance(document, dict)
    return document


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the publisher ----------------------------------------------------------------------------


def test_desired_state_is_published_retained_and_the_agent_parses_it(
    mosquitto_url: str, tmp_path: Path, links: list[MqttLink]
) -> None:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    try:
        IdentityService(database).enroll("press-1")
        fleet = FleetService(database)
        target = f"{NAME}/2/litert/model.tflite"
        view = fleet.set_desired("press-1", {"release": {"target": target, "model_id": "m-b"}})
        with DesiredPublisher(MqttEndpoint.parse(mosquitto_url)) as publisher:
            publisher.publish(view)
        # a device that subscribes afterwards (it was offline) gets the document from the broker
        document = retained_desired(
            subscriber(links, mosquitto_url, "edgeops/v1/dev/+/desired"), "press-1"
        )
        assert document["schema"] == 1 and document["type"] == "desired"
        assert document["device_id"] == "press-1" and document["version"] == 1
        assert parse_release(document["release"]) == target
        assert document["release"]["model_id"] == "m-b" and document["challenger"] is None

        # the agent's own updater service takes it (no download: the trust source is absent)
        from device_agent.config import AgentSettings
        from device_agent.updater.service import UpdateService
        from device_agent.updater.updater import ChampionHealth

        settings = AgentSettings(device_id="press-1", data_dir=tmp_path / "agent")
        service = UpdateService(
            settings,
            {},
            swap=lambda _: None,
            health=lambda: ChampionHealth(None, 0),
            report=lambda _: None,
            send_fetch=lambda _: None,
        )
        service.updater.stop_event.set()  # parse and remember, start nothing
        assert service.on_desired(document) is False
        assert service._wanted == target

        later = fleet.set_desired("press-1", {"release": None})
        with DesiredPublisher(MqttEndpoint.parse(mosquitto_url)) as publisher:
            assert publisher.publish_many([later]) == []
        again = retained_desired(
            subscriber(links, mosquitto_url, "edgeops/v1/dev/+/desired"), "press-1"
        )
        assert again["version"] == 2 and again["release"] is None
    finally:
        database.dispose()


def test_publisher_names_an_unreachable_broker() -> None:
    endpoint = MqttEndpoint.parse(f"mqtt://127.0.0.1:{free_port()}")
    with pytest.raises(BrokerError, match="cannot connect to MQTT broker"):
        DesiredPublisher(endpoint).start(wait_s=1)


# -- the command line, on a small release repository -----------------------------------------


@pytest.fixture
def toy_repository(isolated_environment: Path) -> TrustRepository:
    """The CLI's release repository (<data dir>/trust) with two versions of ``toy``, version
    2 released for two runtimes."""
    repository = TrustRepository(isolated_environment / "trust")
    repository.init()
    for path, card in (
        (f"{NAME}/1/litert/model.tflite", CARD_V1),
        (f"{NAME}/2/litert/model.tflite", CARD_V2),
        (f"{NAME}/2/onnx/model.onnx", CARD_V2),
    ):
        runtime = path.split("/")[2]
        repository.add_target(path, path.encode(), {"edgeops": {"card": card, "runtime": runtime}})
    return repository


def desired_versions(*device_ids: str) -> list[int]:
    shown = [json.loads(edgeops("devices", "show", d, "--json").stdout) for d in device_ids]
    return [device["desired_version"] for device in shown]


def test_cli_deploy_checks_everything_first(toy_repository: TrustRepository) -> None:
    for name in ("cam-1", "cam-2"):
        assert edgeops("devices", "enroll", name).returncode == 0
    target = f"{NAME}/1/litert/model.tflite"

    no_broker = edgeops("devices", "deploy", target, "--device", "cam-1")
    assert no_broker.returncode == 2
    assert_one_line_error(no_broker, "no broker configured", "EDGEOPS_MQTT_URL")

    down = {"EDGEOPS_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}"}
    # the connection is refused at once: no need to wait the default 10 s for it
    unreachable = edgeops(
        "devices", "deploy", target, "-d", "cam-1", "--connect-timeout", "1", env=down
    )
    assert unreachable.returncode == 1
    assert_one_line_error(unreachable, "cannot connect to MQTT broker", "nothing was deployed")

    ghost = edgeops("devices", "deploy", target, "-d", "cam-1", "-d", "ghost", env=down)
    assert ghost.returncode == 1
    assert_one_line_error(ghost, "unknown device: 'ghost'", "nothing was deployed")

    for release, needle in [
        (f"{NAME}/9/litert/model.tflite", "is not in the release repository"),
        ("other", "no released target of 'other'"),
        (f"{NAME}:7", f"no released target of '{NAME}:7'"),
    ]:
        missing = edgeops("devices", "deploy", release, "-d", "cam-1", env=down)
        assert missing.returncode == 1
        assert_one_line_error(missing, needle)
    ambiguous = edgeops("devices", "deploy", NAME, "-d", "cam-1", env=down)
    assert ambiguous.returncode == 2
    assert_one_line_error(ambiguous, "is released as 2 targets", "--runtime")
    bad_name = edgeops("devices", "deploy", target, "-d", "a/b")
    assert bad_name.returncode == 2 and "Invalid value for '--device'" in bad_name.stderr

    assert desired_versions("cam-1", "cam-2") == [0, 0]  # nothing half-done


def test_cli_deploy_publishes_and_twin_shows_the_difference(
    toy_repository: TrustRepository, mosquitto_url: str, links: list[MqttLink]
) -> None:
    hub_env = {"EDGEOPS_MQTT_URL": mosquitto_url}
    for name in ("cam-1", "cam-2"):
        assert edgeops("devices", "enroll", name).returncode == 0

    deployed = edgeops(
        "devices", "deploy", NAME, "--runtime", "onnx", "-d", "cam-1", "-d", "cam-2", "--json",
        env=hub_env,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    result = json.loads(deployed.stdout)
    new = f"{NAME}/2/onnx/model.onnx"
    assert (result["target"], result["model_id"], result["runtime"]) == (
        new,
        "m-00000000000b",
        "onnx",
    )
    assert [(d["device_id"], d["desired_version"], d["changed"]) for d in result["devices"]] == [
        ("cam-1", 1, True),
        ("cam-2", 1, True),
    ]
    watcher = subscriber(links, mosquitto_url, "edgeops/v1/dev/+/desired")
    documents = {d: retained_desired(watcher, d) for d in ("cam-1", "cam-2")}
    for device_id, document in documents.items():
        assert document["release"] == {"target": new, "model_id": "m-00000000000b"}
        assert document["device_id"] == device_id and document["version"] == 1

    # by model version and by target; the same release again changes nothing but re-publishes
    old = f"{NAME}/1/litert/model.tflite"
    by_version = edgeops("devices", "deploy", f"{NAME}:1", "-d", "cam-1", env=hub_env)
    assert by_version.returncode == 0, by_version.stderr
    assert f"deployed {old} (m-00000000000a)" in by_version.stdout
    again = edgeops("devices", "deploy", old, "-d", "cam-1", "--json", env=hub_env)
    assert json.loads(again.stdout)["devices"][0] == {
        "device_id": "cam-1",
        "desired_version": 2,
        "changed": False,
        "published": True,
    }
    assert retained_desired(watcher, "cam-1", live=True)["release"]["target"] == old
    fresh = subscriber(links, mosquitto_url, "edgeops/v1/dev/cam-1/desired")
    assert retained_desired(fresh, "cam-1") == retained_desired(watcher, "cam-1", live=True)

    twin = edgeops("devices", "twin", "cam-2", "--json")
    assert twin.returncode == 0, twin.stderr
    document = json.loads(twin.stdout)
    assert document["desired"]["release"]["target"] == new and document["desired_version"] == 1
    assert document["in_sync"] is False
    assert [(d["field"], d["desired"], d["reported"]) for d in document["differences"]] == [
        ("release", new, None)
    ]
    table = edgeops("devices", "twin", "cam-2")
    assert table.returncode == 0, table.stderr
    assert new in table.stdout and "differences:" in table.stdout
    assert "has not reported yet" in table.stdout
    unknown = edgeops("devices", "twin", "ghost")
    assert unknown.returncode == 1
    assert_one_line_error(unknown, "device 'ghost' not found")


# -- the whole path ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_agent_ends_on_the_release_deploy_names(trust_hub: TrustHub, tmp_path: Path) -> None:
    hub = trust_hub
    old, new = hub.releases["old"], hub.releases["new"]
    name = old.path.split("/", 1)[0]
    hub.serve()
    agent = AgentProcess.provision(
        tmp_path / "devices",
        device_id="edge-1",
        mqtt_url=hub.url,
        data_dir=tmp_path / "device-data",
        trust_root=hub.root_json,
        champion=hub.bundle(old.path, tmp_path / "champion"),
        champion_target=old.path,
    )
    # the operator's CLI on the hub's own database, release repository and broker
    hub_env = {
        "EDGEOPS_DATA_DIR": str(hub.workdir),
        "EDGEOPS_DATABASE_URL": f"sqlite:///{hub.workdir / 'hub.db'}",
        "EDGEOPS_MQTT_URL": hub.url,
    }

    def twin() -> dict[str, Any]:
        shown = edgeops("devices", "twin", "edge-1", "--json", env=hub_env)
        assert shown.returncode == 0, shown.stderr
        document = json.loads(shown.stdout)
        assert isinstance(document, dict)
        return document

    agent.start()
    try:
        wait_for(
            lambda: (
                hub.fleet.get_device("edge-1").reported.get("slots", {}).get("champion")
                if hub.fleet.list_devices()
                else None
            ),
            timeout=60,
            what="the hub knows the device and its champion",
        )
        assert twin()["in_sync"] is True  # nothing desired yet

        # the model name: its newest released version, release 2
        deployed = edgeops("devices", "deploy", name, "--device", "edge-1", "--json", env=hub_env)
        assert deployed.returncode == 0, deployed.stderr
        result = json.loads(deployed.stdout)
        assert (result["target"], result["model_id"]) == (new.path, new.model_id)

        wait_for(
            lambda: (
                agent.active_target() == new.path
                and agent.champion_id() == new.model_id
                and agent.update_state().get("state") == "committed"
            ),
            timeout=120,
            what="the agent runs release 2",
        )
        document = wait_for(
            lambda: (shown := twin())["in_sync"] and shown,
            timeout=30,
            what="the hub's twin shows no difference",
        )
        assert document["desired"]["release"] == {"target": new.path, "model_id": new.model_id}
        assert document["update_state"] == "committed"
        slots = document["reported"]["slots"]
        assert slots[slots["active"]] == {"target": new.path, "model_id": new.model_id}
        assert agent.stop() == 0
    finally:
        agent.kill9()
