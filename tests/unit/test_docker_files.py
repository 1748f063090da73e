"""The docker/ deployment files: services, images, flags, mounts, TLS and SuperNode auth on.

No docker engine is needed: the compose files are read as YAML, ``${VAR:-default}`` is filled in
the way compose does, and every certificate path a service is given is checked against what
docker/generate_certs.py makes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
ONE_MACHINE = DOCKER / "compose.yml"
SERVER = DOCKER / "server" / "compose.yml"
HOSPITAL = DOCKER / "hospital" / "compose.yml"
GPU = DOCKER / "gpu.override.yml"
HOSPITAL_GPU = DOCKER / "hospital" / "gpu.override.yml"
OFFLINE = DOCKER / "offline.override.yml"
PRODUCTION = [ONE_MACHINE, SERVER, HOSPITAL, GPU, HOSPITAL_GPU, OFFLINE, DOCKER / "Dockerfile"]
BASES = [ONE_MACHINE, SERVER, HOSPITAL]
BASE_IDS = ["one", "server", "hosp"]
# What a hospital machine's .env would say, for the files that require it.
ENV = {
    "SUPERLINK_ADDRESS": "fl.example.org",
    "HOSPITAL": "dataset1",
    "HOSPITAL_DATA": "/srv/wbc",
    "SUPERLINK": "fl.example.org:8000",
}
REMOVED_FLAGS = (
    "--fleet-api-address",
    "--control-api-address",
    "--serverappio-api-address",
    "--clientappio-api-address",
    "--appio-api-address",
    "--plugin-type",
    "--auth-list-public-keys",
    "--auth-supernode-public-key",
)
# Flags that name a certificate, key or secret file.
CERT_FLAGS = (
    "--ssl-ca-certfile",
    "--ssl-certfile",
    "--ssl-keyfile",
    "--root-certificates",
    "--auth-supernode-private-key",
    "--superexec-auth-secret-file",
)
HOSPITAL_SERVICES = [
    f"{kind}-{n}" for n in (1, 2, 3) for kind in ("supernode", "clientapp", "posttrain")
]
# Run by hand, once: no healthcheck to keep, so theirs is disabled.
ONE_SHOT = ("setup", "posttrain")


def interpolate(value, env=ENV):
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``, over a parsed file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name} is required: {default}")
        return default or ""

    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", fill, value)


def load(path: Path) -> dict:
    return interpolate(yaml.safe_load(path.read_text()))


def args(service: dict) -> list[str]:
    """The process's arguments: entrypoint flags (an image's own entrypoint dropped) + command."""
    entrypoint = service.get("entrypoint", [])
    return [*entrypoint[1:], *service.get("command", [])]


def flag(service: dict, name: str) -> str:
    values = [a.split("=", 1)[1] for a in args(service) if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times: {args(service)}"
    return values[0]


def mounts(service: dict) -> list[dict]:
    """Volumes in long form: {type, source, target, read_only}."""
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            result.append(volume)
            continue
        source, target, *mode = volume.split(":")
        kind = "bind" if source.startswith((".", "/")) else "volume"
        read_only = mode == ["ro"]
        result.append({"type": kind, "source": source, "target": target, "read_only": read_only})
    return result


def host_path(compose_file: Path, service: dict, container_path: str) -> Path:
    """Where a file a service is given lives on the host, through the mount that holds it."""
    path = PurePosixPath(container_path)
    for mount in mounts(service):
        target = PurePosixPath(mount["target"])
        if mount["type"] == "bind" and (path == target or target in path.parents):
            return (compose_file.parent / mount["source"] / path.relative_to(target)).resolve()
    raise AssertionError(f"{container_path} is not inside any bind mount of {service}")


def script(name: str):
    """A docker/ script as a module: they are run by path, not installed."""
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generate_certs():
    return script("generate_certs").main


@pytest.fixture(scope="module")
def check_containers():
    return script("check_containers")


@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: str(p.relative_to(DOCKER)))
def test_no_production_file_turns_tls_off(path):
    assert "--insecure" not in path.read_text()


@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: str(p.relative_to(DOCKER)))
def test_no_flag_that_flower_1_42_removed_or_deprecated(path):
    text = path.read_text()
    assert [f for f in REMOVED_FLAGS if f in text] == []


def test_one_machine_has_the_federation_services():
    services = load(ONE_MACHINE)["services"]
    assert sorted(services) == sorted(["setup", "superlink", "serverapp", *HOSPITAL_SERVICES])
    assert services["setup"]["profiles"] == ["setup"]


@pytest.mark.parametrize("path", [ONE_MACHINE, SERVER, HOSPITAL], ids=["one", "server", "hosp"])
def test_images_are_flower_1_42_or_the_app_image(path):
    for name, service in load(path)["services"].items():
        image = service["image"]
        if name.startswith(("superlink", "supernode")):
            assert re.fullmatch(rf"flwr/{name.split('-')[0]}:1\.42\.\d+", image), image
        else:
            assert re.fullmatch(r"fl-w3s:1\.42\.\d+-cpu", image), image
            assert service["build"]["dockerfile"] == "docker/Dockerfile"
            assert (path.parent / service["build"]["context"] / "docker/Dockerfile").is_file()


def test_dockerfile_builds_on_flower_superexec_1_42_and_runs_as_app():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG FLWR_VERSION=1\.42\.\d+$", text, re.M)
    # Flower's image by default; a stand-in (docker/build_offline_base.sh) by build argument.
    assert re.search(
        r"^ARG BASE_IMAGE=flwr/superexec:\$\{FLWR_VERSION\}-py\$\{PYTHON_VERSION\}-ubuntu24\.04$",
        text,
        re.M,
    )
    assert re.findall(r"^FROM .*$", text, re.M) == ["FROM ${BASE_IMAGE}"]
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    users = re.findall(r"^USER (\w+)$", text, re.M)
    assert users[-1] == "app"
    assert re.search(r"^ENTRYPOINT \[\"flower-superexec\"\]$", text, re.M)


def test_dockerfile_pulls_no_frontend_and_bakes_in_no_certificate():
    text = (DOCKER / "Dockerfile").read_text()
    # A "# syntax=" line makes every build pull docker/dockerfile from Docker Hub.
    assert not re.search(r"^#\s*syntax=", text, re.M)
    # pip's CA bundle arrives as a BuildKit secret for the RUN that needs it, never as a layer.
    assert not re.search(r"^(COPY|ADD) .*(\.crt|\.pem|certs)", text, re.M)
    assert text.count("--mount=type=secret,id=pip_cert") == text.count("pip install")


def test_build_context_leaves_keys_data_and_outputs_out():
    ignored = (DOCKER.parent / ".dockerignore").read_text().split()
    for path in ("docker/certs", "docker/server/certs", "docker/hospital/certs", "docker/data"):
        assert path in ignored, path


def test_offline_override_swaps_images_and_nothing_else():
    services = load(OFFLINE)["services"]
    assert set(services) <= set(load(ONE_MACHINE)["services"])
    assert set(services) >= {"superlink", "serverapp", *HOSPITAL_SERVICES, "setup"}
    for name, service in services.items():
        assert list(service) == ["image"], name


def hardened_services() -> list[tuple[str, str, dict]]:
    return [
        (path.parent.name, name, service)
        for path in BASES
        for name, service in load(path)["services"].items()
    ]


@pytest.mark.parametrize(
    ("where", "name", "service"), hardened_services(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_container_runs_hardened(where, name, service):
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert any(m.split(":")[0] == "/tmp" for m in service["tmpfs"])
    assert re.fullmatch(r"\d+[mg]", str(service["mem_limit"]))
    # Flower's telemetry and update check would reach flower.ai from any container with a route.
    assert service["environment"]["FLWR_TELEMETRY_ENABLED"] == "0"
    assert service["environment"]["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert int(service["pids_limit"]) > 0
    if name.startswith(ONE_SHOT):
        assert service["profiles"] and service["healthcheck"] == {"disable": True}
        # Only the root setup job may add capabilities, and only file ownership ones.
        assert set(service.get("cap_add", [])) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER"}
        assert service.get("network_mode") == "none"
    else:
        assert "cap_add" not in service
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and "/health" in test[-1]
        assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("path", BASES, ids=BASE_IDS)
def test_no_port_is_published_beyond_loopback_by_default(path):
    ports = [p for s in load(path)["services"].values() for p in s.get("ports", [])]
    assert all(p.startswith("127.0.0.1:") for p in ports), ports


def test_the_split_superlink_opens_its_port_only_on_request():
    raw = yaml.safe_load(SERVER.read_text())
    (port,) = raw["services"]["superlink"]["ports"]
    assert port.startswith("${SUPERLINK_BIND:-127.0.0.1}:")
    opened = interpolate(raw, {**ENV, "SUPERLINK_BIND": "10.8.0.1"})
    assert opened["services"]["superlink"]["ports"] == ["10.8.0.1:8000:8000"]


@pytest.mark.parametrize("path", [ONE_MACHINE, SERVER], ids=["one", "server"])
def test_no_container_mounts_the_ca_key_folder(path):
    ca = (path.parent / "certs" / "ca").resolve()
    for name, service in load(path)["services"].items():
        for mount in mounts(service):
            if mount["type"] != "bind":
                continue
            source = (path.parent / mount["source"]).resolve()
            # Neither the CA folder (certs/ca), nor anything inside it, nor a folder above it.
            assert source != ca and source not in ca.parents, (name, mount)
            assert ca not in source.parents, (name, mount)


def test_posttrain_has_no_network_its_images_read_only_and_its_own_output_folder():
    compose = load(ONE_MACHINE)
    outputs = []
    for n in (1, 2, 3):
        posttrain = compose["services"][f"posttrain-{n}"]
        assert posttrain["network_mode"] == "none"
        assert posttrain["entrypoint"] == []
        targets = {m["target"]: m for m in mounts(posttrain)}
        assert sorted(targets) == ["/app/outputs", "/data"]
        assert targets["/data"]["read_only"] and not targets["/app/outputs"]["read_only"]
        clientapp = compose["services"][f"clientapp-{n}"]
        assert targets["/data"]["source"] == mounts(clientapp)[0]["source"]
        outputs.append(targets["/app/outputs"]["source"])
    assert len(set(outputs)) == 3
    # The setup job hands each output folder to the images' user.
    setup_sources = [m["source"] for m in mounts(compose["services"]["setup"])]
    assert set(outputs) <= set(setup_sources)


@pytest.mark.parametrize("path", [ONE_MACHINE, SERVER], ids=["one", "server"])
def test_superlink_serves_tls_with_supernode_auth_and_keeps_its_state(path):
    compose = load(path)
    link = compose["services"]["superlink"]
    assert "--enable-supernode-auth" in args(link)
    for name in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert flag(link, name).startswith("/app/certs/")
    assert flag(link, "--host") == "0.0.0.0"
    assert flag(link, "--isolation") == "process"
    database = PurePosixPath(flag(link, "--database"))
    state = [m for m in mounts(link) if m["type"] == "volume"]
    assert [m["target"] for m in state] == [str(database.parent)]
    assert state[0]["source"] in compose["volumes"]
    assert flag(link, "--port") == "8000"
    assert [p.split(":")[-1] for p in link["ports"]] == ["8000"]
    assert [p.split(":")[0] for p in link["ports"]] == ["127.0.0.1"]


@pytest.mark.parametrize("path", [ONE_MACHINE, SERVER], ids=["one", "server"])
def test_serverapp_reaches_the_superlink_over_tls_and_writes_to_a_named_volume(path):
    compose = load(path)
    serverapp = compose["services"]["serverapp"]
    assert flag(serverapp, "--runtime-api-address") == "superlink:8000"
    assert flag(serverapp, "--root-certificates") == "/app/certs/ca.crt"
    assert flag(serverapp, "--superexec-auth-secret-file")
    # The ServerApp arrives with each run: it sees the CA certificate, never a private key.
    targets = {m["target"]: m for m in mounts(serverapp)}
    assert sorted(targets) == ["/app/certs/ca.crt", "/app/certs/superexec.secret", "/app/outputs"]
    assert targets["/app/outputs"]["type"] == "volume"
    assert targets["/app/outputs"]["source"] in compose["volumes"]


def supernodes(path: Path) -> dict[str, dict]:
    return {n: s for n, s in load(path)["services"].items() if n.startswith("supernode")}


@pytest.mark.parametrize("path", [ONE_MACHINE, HOSPITAL], ids=["one", "hosp"])
def test_each_supernode_authenticates_names_its_hospital_and_serves_its_clientapp_over_tls(path):
    names = []
    for supernode in supernodes(path).values():
        assert flag(supernode, "--root-certificates") == "/app/certs/ca.crt"
        assert flag(supernode, "--auth-supernode-private-key") == "/app/certs/supernode.key"
        node_config = flag(supernode, "--node-config")
        match = re.fullmatch(r'hospital="(\w+)" data-root="/data"', node_config)
        assert match, node_config
        names.append(match.group(1))
        assert flag(supernode, "--isolation") == "process"
        for name in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"):
            assert flag(supernode, name).startswith("/app/certs/")
        assert all(m["read_only"] for m in mounts(supernode))
    assert len(set(names)) == len(names) >= 1
    superlink = {flag(s, "--superlink") for s in supernodes(path).values()}
    assert superlink == ({"superlink:8000"} if path == ONE_MACHINE else {ENV["SUPERLINK"]})


def clientapps(path: Path) -> dict[str, dict]:
    return {n: s for n, s in load(path)["services"].items() if n.startswith("clientapp")}


def dns_names(compose: dict, network: str) -> dict[str, set[str]]:
    """Which service answers to which name on ``network``: its own name and its aliases."""
    names = {}
    for name, service in compose["services"].items():
        networks = service.get("networks", [])
        if network in networks:
            settings = networks[network] if isinstance(networks, dict) else None
            names[name] = {name, *((settings or {}).get("aliases", []))}
    return names


@pytest.mark.parametrize("path", [ONE_MACHINE, HOSPITAL], ids=["one", "hosp"])
def test_clientapps_read_data_read_only_and_talk_to_their_supernode_only(path):
    compose = load(path)
    for name, clientapp in clientapps(path).items():
        assert flag(clientapp, "--runtime-api-address") == "supernode:9094"
        assert flag(clientapp, "--root-certificates") == "/app/certs/runtime-ca.crt"
        # It runs code that arrives with each run: the images read-only, no SuperNode key.
        targets = {m["target"]: m for m in mounts(clientapp)}
        assert sorted(targets) == [
            "/app/certs/runtime-ca.crt",
            "/app/certs/superexec.secret",
            "/data",
        ]
        assert all(m["read_only"] for m in targets.values())
        (network,) = clientapp["networks"]
        assert compose["networks"][network] == {"internal": True}
        answering = [
            n for n, aliases in dns_names(compose, network).items() if "supernode" in aliases
        ]
        assert answering == [name.replace("clientapp", "supernode")]


def test_hospital_file_is_parameterised_by_name_data_and_superlink_address():
    raw = HOSPITAL.read_text()
    for variable in ("HOSPITAL", "HOSPITAL_DATA", "SUPERLINK"):
        assert f"${{{variable}:?" in raw
    other = {"HOSPITAL": "raabin", "HOSPITAL_DATA": "/mnt/r", "SUPERLINK": "10.0.0.5:8000"}
    compose = interpolate(yaml.safe_load(raw), other)
    supernode, clientapp = compose["services"]["supernode"], compose["services"]["clientapp"]
    assert flag(supernode, "--superlink") == "10.0.0.5:8000"
    assert flag(supernode, "--node-config").startswith('hospital="raabin"')
    assert [m["source"] for m in mounts(clientapp) if m["target"] == "/data"] == ["/mnt/r"]


def test_split_files_run_the_same_flags_as_the_one_machine_file():
    one = load(ONE_MACHINE)["services"]
    server, hospital = load(SERVER)["services"], load(HOSPITAL)["services"]

    def names(service):
        return sorted(a.split("=")[0] for a in args(service))

    assert names(server["superlink"]) == names(one["superlink"])
    assert names(server["serverapp"]) == names(one["serverapp"])
    assert names(hospital["supernode"]) == names(one["supernode-1"])
    assert names(hospital["clientapp"]) == names(one["clientapp-1"])


@pytest.mark.parametrize(
    ("override", "base"), [(GPU, ONE_MACHINE), (HOSPITAL_GPU, HOSPITAL)], ids=["one", "hosp"]
)
def test_gpu_override_reserves_a_gpu_for_every_clientapp_and_nothing_else(override, base):
    services = load(override)["services"]
    assert sorted(services) == sorted(clientapps(base))
    for service in services.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert service["build"]["args"]["TORCH_VARIANT"].startswith("cu")
        assert service["image"].endswith(service["build"]["args"]["TORCH_VARIANT"])


def generator_args(setup: dict) -> list[str]:
    """The generate_certs.py arguments of a setup service (run through sh -c); [] if none."""
    assert setup["entrypoint"] == ["/bin/sh", "-c"]
    argv = shlex.split(setup["command"][0].split("&&")[0])
    if "/opt/generate_certs.py" not in argv:
        return []
    return argv[argv.index("/opt/generate_certs.py") + 1 :]


@pytest.mark.parametrize("path", BASES, ids=BASE_IDS)
def test_every_certificate_path_is_a_file_that_setup_makes(path, generate_certs, tmp_path):
    """The documented host step, then the setup service's, then follow every service's mounts."""
    compose = load(path)
    setup = compose["services"]["setup"]
    argv = [a for a in generator_args(setup) if not a.startswith(("--owner", "--out"))]
    if path != HOSPITAL:
        # On the host, where the CA stays: `python docker/generate_certs.py server --out ...`.
        generate_certs(["server", f"--out={tmp_path}", "--san=fl.example.org"])
    else:
        # The SuperNode's ca.crt comes from the federation operator on a hospital machine.
        generate_certs(["server", f"--out={tmp_path}", f"--ca-dir={tmp_path / 'operator'}"])
    if argv:
        generate_certs([*argv, f"--out={tmp_path}"])
    if path == HOSPITAL:
        hospital = tmp_path / "hospitals" / ENV["HOSPITAL"]
        (hospital / "ca.crt").write_bytes((tmp_path / "server" / "ca.crt").read_bytes())
    certs = (path.parent / "certs").resolve()
    checked = 0
    for name, service in compose["services"].items():
        for arg in args(service):
            key, _, value = arg.partition("=")
            if key in CERT_FLAGS:
                on_host = host_path(path, service, value)
                relative = on_host.relative_to(certs)
                assert (tmp_path / relative).is_file(), (name, arg)
                assert relative.parts[0] != "ca", (name, arg)
                checked += 1
    assert checked >= 4


def inspected(user: str = "app", mounts: list[dict] | None = None) -> dict:
    """The part of a ``docker inspect`` record that check_containers.check reads."""
    return {
        "HostConfig": {},
        "Config": {"User": user, "Healthcheck": {"Test": ["NONE"]}},
        "State": {},
        "Mounts": mounts or [],
    }


def outcome(check_containers, container: dict, what: str) -> tuple[bool, str]:
    """(passed, what was seen) of one check of check_containers.check."""
    (result,) = [r[1:] for r in check_containers.check(container, set(), set()) if r[0] == what]
    return result


@pytest.mark.parametrize(
    ("user", "root"),
    [
        ("", True),
        ("root", True),
        ("0", True),
        ("root:root", True),
        ("0:49999", True),
        ("root:app", True),
        ("app", False),
        ("49999:49999", False),
        ("app:0", False),
    ],
)
def test_check_containers_fails_a_root_user_whatever_its_group(check_containers, user, root):
    assert outcome(check_containers, inspected(user), "not root")[0] is not root


def test_check_containers_fails_a_mount_with_a_folder_it_cannot_list(
    check_containers, tmp_path, monkeypatch
):
    certs, sealed = tmp_path / "certs", tmp_path / "certs" / "sealed"
    (sealed / "old").mkdir(parents=True)
    (certs / "ca.crt").touch()
    holds = check_containers.holds_ca_key
    assert holds(str(certs)) is False
    assert holds(str(certs / "ca.crt")) is False
    assert holds(str(tmp_path / "gone")) is None
    (sealed / "old" / "ca.key").touch()
    assert holds(str(certs)) is True
    assert holds(str(sealed / "old" / "ca.key")) is True

    # Tests run as root, whom chmod 000 does not stop: fail the listing as it fails for others.
    scandir = os.scandir

    def denied(path):
        if Path(path) == sealed:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    assert holds(str(certs)) is None
    mount = {"Type": "bind", "Source": str(certs), "Destination": "/app/certs"}
    passed, seen = outcome(check_containers, inspected(mounts=[mount]), "no CA key")
    assert not passed and "cannot read ['/app/certs']" in seen
