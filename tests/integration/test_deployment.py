"""Loopback deployment: docker/compose.yml's topology as real processes, TLS and node auth on.

One SuperLink (TLS, ``--enable-supernode-auth``, ServerApp in a separate SuperExec), and per
hospital a SuperNode with its own ``--node-config`` plus the SuperExec that runs its ClientApp,
reached over TLS. Certificates and keys come from docker/generate_certs.py, every key is
registered with ``flwr supernode register``, ports are free loopback ports picked at runtime.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.config import compose_config
from common.data import split_digest
from support.flower_processes import (
    BIN,
    flower_env,
    free_port,
    metrics_rows,
    run,
    stop_processes,
)
from tests.conftest import WBC_DEV

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONNECTION = "loopback"

# Two real imaging domains, each SuperNode pointing at its own folder of images (data-root in its
# node config; the run's data.root points nowhere, so only that can find them), and a synthetic
# hospital, which reads no files and names only itself.
REAL = {"dataset1": "Dataset 1", "dataset2": "Dataset 2"}
SYNTHETIC = "hospital_c"
HOSPITALS = (*REAL, SYNTHETIC)
# A hospital's folder holds its first 40 labelled images: enough for three splits, few enough
# for 2 CPU cores.
IMAGES_PER_DISK = 40
OVERRIDES = [
    "data=wbc_zxaoyou",
    "data.root=/nonexistent/on/the/server",
    "pretrain=none",
    f"+data.hospitals.{SYNTHETIC}="
    "{format:synthetic,domain:c,num_images:24,image_size:128,seed:303}",
    "train.batch_size=16",
]


@dataclass
class Loopback:
    """A SuperLink with TLS and SuperNode auth, its ServerApp SuperExec, and the flwr CLI."""

    root: Path
    env: dict[str, str]
    port: int
    certs: Path
    node_ids: dict[str, int] = field(default_factory=dict)
    supernodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    runtime_ports: dict[str, int] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start a long-running Flower process, its output in logs/<name>.log."""
        with (self.root / "logs" / f"{name}.log").open("a") as log:
            return subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=self.env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return run([str(BIN / "flwr"), *args], self.env, timeout_s, self.root)

    def hospital_dir(self, hospital: str) -> Path:
        return self.certs / "hospitals" / hospital

    def register(self, hospital: str) -> int:
        """Register a hospital's public key, as the operator does; return its node id."""
        pub = self.hospital_dir(hospital) / "supernode.pub"
        result = self.flwr("supernode", "register", str(pub), CONNECTION, "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        self.node_ids[hospital] = int(json.loads(result.stdout)["node-id"])
        return self.node_ids[hospital]

    def node_status(self) -> dict[int, str]:
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        return {int(n["node-id"]): n["status"] for n in json.loads(result.stdout)["nodes"]}


def generate_certs(*args: str) -> None:
    subprocess.run(
        [str(BIN / "python"), str(REPO / "docker" / "generate_certs.py"), *args], check=True
    )


@pytest.fixture(scope="module")
def link(tmp_path_factory) -> Iterator[Loopback]:
    root = tmp_path_factory.mktemp("deployment")
    (root / "logs").mkdir()
    certs = root / "certs"
    home = root / "flwr_home"
    home.mkdir()
    generate_certs("federation", "--out", str(certs), *(f"--hospital={h}" for h in HOSPITALS))
    loopback = Loopback(root=root, env=flower_env(home), port=free_port(), certs=certs)
    # The operator's connection: TLS verified against the federation CA (absolute path).
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{loopback.port}"\n'
        f'root-certificates = "{certs / "server" / "ca.crt"}"\n'
    )
    server = certs / "server"
    try:
        # Same flags as docker/compose.yml's superlink and serverapp services.
        loopback.start(
            "superlink",
            "flower-superlink",
            "--host=127.0.0.1",
            f"--port={loopback.port}",
            f"--ssl-ca-certfile={server / 'ca.crt'}",
            f"--ssl-certfile={server / 'superlink.crt'}",
            f"--ssl-keyfile={server / 'superlink.key'}",
            "--enable-supernode-auth",
            f"--database={root / 'state.db'}",
            "--isolation=process",
            f"--superexec-auth-secret-file={server / 'superexec.secret'}",
        )
        loopback.start(
            "serverapp",
            "flower-superexec",
            f"--runtime-api-address=127.0.0.1:{loopback.port}",
            f"--root-certificates={server / 'ca.crt'}",
            f"--superexec-auth-secret-file={server / 'superexec.secret'}",
        )
        ready = "Application startup complete"
        wait_for(lambda: ready in loopback.log("superlink"), 60, "SuperLink serving")
        yield loopback
    finally:
        stop_processes(str(home))


def wait_for(condition, timeout_s: float, what: str) -> None:
    """Poll ``condition`` once a second; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout_s:.0f}s")
        time.sleep(1.0)


def start_supernode(link: Loopback, hospital: str) -> None:
    """A hospital's SuperNode with the flags of docker/compose.yml's supernode services."""
    certs = link.hospital_dir(hospital)
    node_config = f'hospital="{hospital}"'
    if hospital in REAL:
        node_config += f' data-root="{link.root / "disks" / hospital}"'
    link.supernodes[hospital] = link.start(
        f"supernode-{hospital}",
        "flower-supernode",
        f"--superlink=127.0.0.1:{link.port}",
        f"--root-certificates={certs / 'ca.crt'}",
        f"--auth-supernode-private-key={certs / 'supernode.key'}",
        f"--node-config={node_config}",
        "--isolation=process",
        "--host=127.0.0.1",
        f"--port={link.runtime_ports[hospital]}",
        f"--ssl-certfile={certs / 'runtime.crt'}",
        f"--ssl-keyfile={certs / 'runtime.key'}",
        f"--ssl-ca-certfile={certs / 'runtime-ca.crt'}",
        f"--superexec-auth-secret-file={certs / 'superexec.secret'}",
    )


def hospital_disk(disk: Path, subset: str, count: int) -> None:
    """A hospital's own disk: the first ``count`` labelled images of one zxaoyou domain."""
    (disk / subset).mkdir(parents=True)
    labels = f"Class Labels of {subset}.csv"
    header, *rows = (WBC_DEV / labels).read_text(encoding="utf-8-sig").splitlines()
    (disk / labels).write_text("\n".join([header, *rows[:count]]) + "\n")
    for row in rows[:count]:
        for suffix in (".bmp", ".png"):
            name = f"{int(row.split(',')[0]):03d}{suffix}"
            (disk / subset / name).symlink_to(WBC_DEV / subset / name)


@pytest.fixture(scope="module")
def federation(link) -> Loopback:
    """Three hospitals joined to ``link``: registered keys, SuperNodes and ClientApp SuperExecs."""
    if not WBC_DEV.is_dir():
        pytest.skip(f"real dev data not found at {WBC_DEV}")
    for hospital, subset in REAL.items():
        hospital_disk(link.root / "disks" / hospital, subset, IMAGES_PER_DISK)
    for hospital in HOSPITALS:
        link.register(hospital)
        link.runtime_ports[hospital] = free_port()
        start_supernode(link, hospital)
        certs = link.hospital_dir(hospital)
        link.start(
            f"clientapp-{hospital}",
            "flower-superexec",
            f"--runtime-api-address=127.0.0.1:{link.runtime_ports[hospital]}",
            f"--root-certificates={certs / 'runtime-ca.crt'}",
            f"--superexec-auth-secret-file={certs / 'superexec.secret'}",
        )
    # A SuperNode logs its id once the SuperLink has accepted its key.
    wait_for(
        lambda: all("SuperNode ID:" in link.log(f"supernode-{h}") for h in HOSPITALS),
        120,
        "all three SuperNodes joined",
    )
    return link


def start_run(link: Loopback, overrides: list[str], output: Path) -> subprocess.Popen:
    """``flwr run`` of this app against the loopback SuperLink, streaming into ``output``."""
    run_config = output.with_suffix(".toml")
    run_config.write_text(f"overrides = {json.dumps(shlex.join(overrides))}\n")
    with output.open("w") as stream:
        return subprocess.Popen(
            [
                str(BIN / "flwr"),
                "run",
                str(REPO),
                CONNECTION,
                "--stream",
                "--run-config",
                str(run_config),
            ],
            env=link.env,
            cwd=link.root,
            stdout=stream,
            stderr=subprocess.STDOUT,
        )


def run_status(link: Loopback, output: Path) -> str:
    """The SuperLink's verdict on the run: ``flwr run --stream`` exits 0 even when it failed."""
    run_id = re.search(r"Successfully started run (\d+)", output.read_text()).group(1)
    result = link.flwr("list", CONNECTION, "--run-id", run_id, "--format", "json")
    return json.loads(result.stdout)["runs"][0]["status"]


def test_three_hospitals_train_two_rounds_over_tls(federation, tmp_path):
    run_dir = tmp_path / "run"
    output = tmp_path / "flwr-run.log"
    overrides = [*OVERRIDES, "federation.rounds=2", f"output_dir={run_dir}"]
    start_run(federation, overrides, output).wait(timeout=600)

    assert run_status(federation, output) == "finished:completed", output.read_text()[-4000:]
    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["replies"] == 3 and not r["failed_nodes"] and not r["rejected"] for r in rows)
    # Each SuperNode answered as the hospital its node config names.
    assert sorted(rows[-1]["hospitals"]) == sorted(HOSPITALS)
    final = load_checkpoint(run_dir / "final_model.pt")
    latest = load_checkpoint(run_dir / "checkpoints" / "round_002.pt")
    assert final["round"] == 2
    for key, tensor in final["state_dict"].items():
        assert torch.equal(tensor, latest["state_dict"][key])
        assert torch.isfinite(tensor).all()
    # Each site's split fingerprint, sent from its SuperNode's data-root, is the one that
    # post-training at the site computes from its data config (w3s-postprocess checks it).
    for hospital in HOSPITALS:
        disk = federation.root / "disks" / hospital
        pinned = [f"data.hospitals.{hospital}.root={disk}"] if hospital in REAL else []
        data = compose_config([*OVERRIDES, *pinned]).data
        assert final["splits"][hospital] == [split_digest(data, hospital)], hospital


def _try_to_join(link, certs: Path, *extra: str) -> subprocess.CompletedProcess:
    """Start one SuperNode that gives up after one failed attempt to join."""
    return run(
        [
            str(BIN / "flower-supernode"),
            f"--superlink=127.0.0.1:{link.port}",
            *extra,
            f"--auth-supernode-private-key={certs / 'supernode.key'}",
            '--node-config=hospital="dataset1"',
            "--isolation=process",
            f"--port={free_port()}",
            "--max-retries=1",
        ],
        link.env,
        120,
        link.root,
    )


def test_supernode_without_the_ca_certificate_cannot_join(link):
    # A registered key, so that only the missing CA certificate can keep it out.
    generate_certs("hospital", "no_ca", "--out", str(link.certs))
    node_id = link.register("no_ca")
    result = _try_to_join(link, link.hospital_dir("no_ca"))
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]
    assert link.node_status()[node_id] == "registered"


def test_supernode_with_an_unregistered_key_is_refused(link):
    generate_certs("hospital", "unregistered", "--out", str(link.certs))
    result = _try_to_join(
        link,
        link.hospital_dir("unregistered"),
        f"--root-certificates={link.certs / 'server' / 'ca.crt'}",
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "Failed to activate SuperNode" in log, log[-3000:]
    assert "No SuperNode found with the given public key" in link.log("superlink")


def test_supernode_killed_mid_round_is_reported_and_trains_again_after_a_restart(
    federation, tmp_path
):
    run_dir = tmp_path / "run"
    output = tmp_path / "flwr-run.log"
    overrides = [
        *OVERRIDES,
        "federation.rounds=2",
        "federation.min_replies=2",
        f"output_dir={run_dir}",
    ]
    flwr_run = start_run(federation, overrides, output)
    wait_for(lambda: "round 1: training on" in output.read_text(), 300, "round 1 training started")
    victim = SYNTHETIC
    os.kill(federation.supernodes[victim].pid, signal.SIGKILL)

    # The SuperLink declares the node gone after two missed 30 s heartbeats and answers its
    # message with an error; the server logs it and closes the round on the two others.
    wait_for(lambda: "Node Unavailable" in output.read_text(), 180, "the killed node reported")
    # The hospital comes back, as its restart policy would bring it, under the same registered
    # key and so the same node id; every round samples the nodes online when it starts. It is
    # back within seconds, while round 1 still evaluates on the two others (a ClientApp process
    # per message), so round 2 samples it.
    start_supernode(federation, victim)
    flwr_run.wait(timeout=600)

    assert run_status(federation, output) == "finished:completed", output.read_text()[-4000:]
    rows = metrics_rows(run_dir)
    assert rows[0]["replies"] == 2
    assert rows[0]["failed_nodes"] == [federation.node_ids[victim]]
    assert load_checkpoint(run_dir / "final_model.pt")["round"] == 2
    assert federation.node_status()[federation.node_ids[victim]] == "online"
    # The restarted hospital trains again in round 2, with the two others.
    assert rows[1]["replies"] == 3 and not rows[1]["failed_nodes"]
    assert "train-loss" in rows[1]["hospitals"][victim]
