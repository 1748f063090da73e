"""server_app/launch (w3s-simulate): relative paths pinned, one SuperNode per hospital."""

import contextlib
import os
import socket
import sys

import pytest

from common.config import CONF_DIR, compose_config
from common.errors import JobError
from common.network import LOCAL_SUPERLINK_PORTS, free_ports
from server_app.launch import (
    absolute_path_overrides,
    check_training_config,
    flwr_command,
    run_and_check,
    simulate,
    usable_cores,
)


def test_launcher_pins_relative_paths_and_sizes_the_federation(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cwd = tmp_path / "José's data (copy), v=2"
    overrides = [
        "data=matek19",
        "data.root=rel/data",
        "+data.hospitals.matek.mask_root=rel/masks",
        "output_root='~/runs'",
        "site_state_dir=rel/state",
    ]
    cfg = compose_config(overrides)
    pinned = compose_config([*overrides, *absolute_path_overrides(cfg, cwd)])
    assert pinned.data.root == str(cwd / "rel/data")
    assert pinned.data.hospitals.matek.root == str(cwd / "rel/data")
    assert pinned.data.hospitals.matek.mask_root == str(cwd / "rel/masks")
    assert pinned.output_root == str(tmp_path / "home" / "runs")
    assert pinned.site_state_dir == str(cwd / "rel/state")
    command = flwr_command(CONF_DIR.parent, cfg, tmp_path / "rc.toml")
    assert command[1:3] == ["run", str(CONF_DIR.parent)]
    assert "num-supernodes=1" in command[command.index("--federation-config") + 1]


def test_auto_client_cpus_share_the_usable_cores_among_the_hospitals(monkeypatch, tmp_path):
    # Ray gives each ClientApp as many threads as CPUs: 1 each left most of a larger machine idle.
    def resources(overrides: list[str]) -> str:
        command = flwr_command(CONF_DIR.parent, compose_config(overrides), tmp_path / "rc.toml")
        return command[command.index("--federation-config") + 1]

    monkeypatch.setattr("server_app.launch.usable_cores", lambda: 16)
    assert "client-resources-num-cpus=5 " in resources([])  # 3 hospitals
    assert "client-resources-num-cpus=8 " in resources(["data=wbc_zxaoyou"])
    assert "client-resources-num-cpus=1.5 " in resources(["federation.client_cpus=1.5"])
    assert "client-resources-num-cpus=2 " in resources(["federation.client_cpus='2'"])
    monkeypatch.setattr("server_app.launch.usable_cores", lambda: 2)
    assert "client-resources-num-cpus=1 " in resources([])


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [("max 100000\n", None), ("150000 100000\n", 1), ("50000 100000\n", 1), ("", None)],
)
def test_usable_cores_are_capped_by_a_containers_quota(tmp_path, cpu_max, cap):
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text(cpu_max)
    expected = affinity if cap is None else min(affinity, cap)
    assert usable_cores(tmp_path / "cpu.max") == expected
    assert usable_cores(tmp_path / "absent") == affinity  # no cgroup v2 file: affinity only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy=server_clip", "strategy=fedmedian"], "needs strategy=fedavg"),
        (["federation.guards.max_update_norm_ratio=0"], "federation.guards.max_update_norm_ratio"),
        (["federation.round_wait_for_nodes_s=-1"], "round_wait_for_nodes_s"),
        (["federation.client_cpus=all"], "client_cpus=all: expected a number >= 0 or auto"),
        (["resume=true"], "resume=true continues a run: give its folder as output_dir"),
        (
            ["train.augment.randaugment_ops=2", "train.augment.randaugment_magnitude=15"],
            "randaugment_magnitude=15: expected",
        ),
        (  # at one hospital, as its ClientApp would build it
            [
                "train.augment.randaugment_ops=2",
                "+train.per_hospital.hospital_a.augment.randaugment_magnitude=9.5",
            ],
            "randaugment_magnitude=9.5: expected a whole number",
        ),
        (["data.split.folds=5", "data.split.fold=5"], "data.split: fold must be in 0..4"),
        (
            ["model.foreground_head=false"],
            "train.levers.foreground.contrast=1.0, localization.source=foreground need the head",
        ),
        (
            ["model.foreground_head=false", "localization=fused"],
            "train.levers.foreground.contrast=1.0 need the head",
        ),
        (
            [
                "experiment=paper",
                "+train.per_hospital.hospital_b.levers.foreground.area=0.1",
            ],
            "train.levers.foreground.area=0.1 need the head",
        ),
        (  # switched off at one hospital, still on at the others
            [
                "experiment=paper",
                "train.levers.foreground.compact=1",
                "+train.per_hospital.hospital_a.levers.foreground.compact=0",
            ],
            "train.levers.foreground.compact=1 need the head",
        ),
        (
            ["train.levers.foreground.size_bounds=[0.5,0.2]"],
            r"train.levers.foreground.size_bounds=\[0.5, 0.2\]: expected \[low, high\]",
        ),
        (
            ["train.levers.foreground.size_bounds=0.2"],
            r"train.levers.foreground.size_bounds=0.2: expected \[low, high\]",
        ),
        (
            ["train.levers.foreground.size_bounds=[0.2]"],
            r"train.levers.foreground.size_bounds=\[0.2\]: expected \[low, high\]",
        ),
        (
            ["+train.per_hospital.hospital_b.levers.foreground.size_bounds=[0.2,1.5]"],
            r"hospital hospital_b: train.levers.foreground.size_bounds=\[0.2, 1.5\]",
        ),
        (["train.levers.copy_paste=1.5"], r"train.levers.copy_paste=1.5: expected a share"),
        (
            ["+train.per_hospital.hospital_b.levers.copy_paste=-0.5"],
            r"hospital hospital_b: train.levers.copy_paste=-0.5",
        ),
        (
            ["experiment=paper", "train.levers.copy_paste=0.5"],
            "train.levers.copy_paste=0.5 need the head",
        ),
        (["federation.rounds=abc"], "federation.rounds=abc: expected a whole number"),
        (["federation.rounds=1.0"], r"federation.rounds=1.0: expected a whole number"),
        (["device=gpu"], "device=gpu: expected"),
        (["device=cuda:64"], "device=cuda:64: this machine has"),
        (["+localization.note=mine"], "localization.note: no such setting"),
        (["resume=no"], "resume=no: expected true or false"),
        (["train.batch_size=0"], "train.batch_size=0: expected a whole number >= 1"),
        (["train.lr=abc"], "train.lr=abc: expected a number"),
        (["train.proximal_mu=-1"], "train.proximal_mu=-1: expected a number >= 0"),
        (["+train.per_hospital.hospital_a.lr=abc"], "hospital hospital_a: train.lr=abc"),
        (["pretrain.batch_size=0"], "pretrain.batch_size=0: expected a whole number >= 1"),
        (["pretrain.rounds=-1"], "pretrain.rounds=-1: expected a whole number >= 0"),
        (["model.img_size=abc"], "model.img_size=abc: expected a whole number"),
        (["model.img_size=100"], "model=mct_tiny_patch8_96: img_size=100 is not divisible by"),
        (["federation.round_timeout_s=abc"], "federation.round_timeout_s=abc: expected a number"),
        (["strategy=fedtrimmedavg", "strategy.beta=0.9"], r"strategy.beta=0.9: expected a share"),
        (["model.standardise_input=bogus"], "model.standardise_input=bogus: expected one of"),
        (["localization.source=bogus"], "localization.source='bogus': expected one of"),
        (["localization.last_k_layers=abc"], "localization.last_k_layers=abc: expected a whole"),
        (["localization.scales=abc"], "localization.scales=abc: expected a list of numbers"),
        (["localization.hflip=maybe"], "localization.hflip=maybe: expected true or false"),
        (["localization.thresholds=[0.5,2]"], r"localization.thresholds=\[0.5, 2\]: expected"),
        (
            ["privacy=client_clip", "privacy.clipping_norm=abc"],
            "privacy.clipping_norm=abc: expected",
        ),
        (["federation.min_replies=2O"], "federation.min_replies=2O: expected a whole number"),
        (["data.split.fractions=[1.2,-0.1,-0.1]"], "need three non-negative split fractions"),
        (["train.local_epochs=1.5"], "train.local_epochs=1.5: expected a whole number"),
        (["federation.guards.max_update_model_ratio=big"], "ratio=big: expected a number"),
        (["pretrain=masked", "pretrain.mask_ratio=half"], "pretrain.mask_ratio=half: expected"),
        (["pretrain=instance", "pretrain.method=jigsaw"], "pretrain.method=jigsaw: expected one"),
        (["pretrain=masked", "pretrain.mask_ratio=1.2"], r"pretrain=masked: mask_ratio=1.2 must"),
        (["pretrain=masked", "pretrain.mask_block=0"], "mask_block=0 be a whole number"),
        (["privacy=server_clip", "pretrain=masked"], "pretrain and privacy together"),
        (
            ["+train.per_hospital.hospital_z.lr=0.1"],
            "train.per_hospital.hospital_z: no such hospital in data=synthetic",
        ),
        (["+train.per_hospital.hospital_a.augmnt.hflip=false"], "hospital_a: Key 'augmnt'"),
        (
            ["+model.per_hospital.hospital_z.standardise_input=channels"],
            "model.per_hospital.hospital_z: no such hospital in data=synthetic",
        ),
        (
            ["+model.per_hospital.hospital_a.img_size=64"],
            r"model.per_hospital.hospital_a: only standardise_input may differ.*img_size",
        ),
        (
            ["+model.per_hospital.hospital_a.standardise_input=stain"],
            "model.per_hospital.hospital_a.standardise_input='stain'",
        ),
        (
            ["+model.per_hospital.hospital_a.standardise_input=both"],
            "'both' has six input channels",
        ),
    ],
)
def test_training_config_refuses_bad_strategy_privacy_and_guard_values(overrides, message):
    with pytest.raises(JobError, match=message):
        check_training_config(compose_config(overrides))
    check_training_config(compose_config(["strategy=fedtrimmedavg"]))
    check_training_config(compose_config(["train.per_hospital=null"]))
    check_training_config(compose_config(["privacy=client_clip"]))
    check_training_config(compose_config(["experiment=paper"]))
    # The deployed server sets the hospitals' device, which its own machine need not have.
    check_training_config(compose_config(["device=cuda:64"]), hospitals_here=False)
    with pytest.raises(JobError, match="device=gpu: expected"):
        check_training_config(compose_config(["device=gpu"]), hospitals_here=False)
    check_training_config(compose_config(["+train.per_hospital.hospital_a.augment.hflip=false"]))
    check_training_config(
        compose_config(["+train.per_hospital.hospital_a.levers.foreground.size_bounds=[0.25,0.5]"])
    )
    check_training_config(
        compose_config(["+model.per_hospital.hospital_a.standardise_input=channels"])
    )


def test_each_run_gets_its_own_local_superlink_ports_unless_the_user_chose_them(monkeypatch):
    # flwr run reuses a SuperLink on its default ports, and the first run to end stops it.
    seen = []
    with contextlib.ExitStack() as superlinks:

        def run_and_check(command, env):
            seen.append(env)
            for port in LOCAL_SUPERLINK_PORTS:  # the run's SuperLink listens on its ports
                listener = superlinks.enter_context(socket.socket())
                listener.bind(("127.0.0.1", int(env[port])))
                listener.listen()
            return 0, ""

        monkeypatch.setattr("server_app.launch.run_and_check", run_and_check)
        cfg = compose_config([])
        for port in LOCAL_SUPERLINK_PORTS:
            monkeypatch.delenv(port, raising=False)
        assert simulate(cfg, []) == 0 and simulate(cfg, []) == 0
    first, second = ([env[port] for port in LOCAL_SUPERLINK_PORTS] for env in seen)
    assert len({*first, *second}) == 4
    monkeypatch.setenv(LOCAL_SUPERLINK_PORTS[0], "47001")
    monkeypatch.setattr(
        "server_app.launch.run_and_check", lambda command, env: (seen.append(env), (0, ""))[1]
    )
    simulate(cfg, [])
    assert seen[-1][LOCAL_SUPERLINK_PORTS[0]] == "47001"


def test_a_clientapp_share_larger_than_the_machine_is_refused_before_flower_starts(monkeypatch):
    # Ray would start no ClientApp, and Flower ended the run in tracebacks.
    monkeypatch.setattr("server_app.launch.usable_cores", lambda: 2)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(JobError, match=r"client_cpus=4: this machine lets the run use 2 cores"):
        check_training_config(compose_config(["federation.client_cpus=4"]))
    with pytest.raises(JobError, match=r"client_gpus=0.5: this machine has 0 CUDA device"):
        check_training_config(compose_config(["federation.client_gpus=0.5"]))
    check_training_config(compose_config(["federation.client_cpus=2"]))
    with pytest.raises(JobError, match=r"client_cpus=3: this machine"):  # a quoted number too
        check_training_config(compose_config(["federation.client_cpus='3'"]))
    # The deployed ServerApp's machine runs no ClientApp.
    check_training_config(compose_config(["federation.client_cpus=4"]), hospitals_here=False)


def test_ports_chosen_together_are_distinct():
    # Probed one at a time, the kernel may hand a released port out again, and a SuperLink
    # given one port for both of its APIs fails to start.
    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(0 < port < 65536 for port in ports)


def test_flower_contacts_no_one_unless_the_user_turned_it_back_on(monkeypatch):
    seen = []
    monkeypatch.setattr(
        "server_app.launch.run_and_check", lambda command, env: (seen.append(env), (0, ""))[1]
    )
    for key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
        monkeypatch.delenv(key, raising=False)
    simulate(compose_config([]), [])
    assert seen[-1]["FLWR_TELEMETRY_ENABLED"] == "0"
    assert seen[-1]["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    simulate(compose_config([]), [])
    assert seen[-1]["FLWR_TELEMETRY_ENABLED"] == "1"


@pytest.mark.parametrize(
    "variable",
    [
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",  # else a ClientApp with no GPU share sees no GPU
        "RAY_DEDUP_LOGS",  # else "dataset1" and "dataset2" lines are printed as one
    ],
)
def test_ray_settings_for_clientapps_hold_unless_the_user_set_them(monkeypatch, variable):
    seen = []
    monkeypatch.setattr(
        "server_app.launch.run_and_check", lambda command, env: (seen.append(env), (0, ""))[1]
    )
    monkeypatch.delenv(variable, raising=False)
    simulate(compose_config([]), [])
    assert seen[-1][variable] == "0"
    monkeypatch.setenv(variable, "1")
    simulate(compose_config([]), [])
    assert seen[-1][variable] == "1"


@pytest.mark.parametrize("terminal", [False, True])
def test_colour_codes_are_shown_only_on_a_terminal(capsys, monkeypatch, terminal):
    printed = [
        "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation",
        "\x1b[36m(ClientAppActor pid=7)\x1b[0m x",
    ]
    script = "; ".join(f"print({line!r})" for line in printed)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)
    _, output = run_and_check([sys.executable, "-c", script], dict(os.environ))
    shown = capsys.readouterr().out
    assert output == "".join(f"{line}\n" for line in printed)  # the returned output keeps them
    if terminal:
        assert shown == output
    else:
        assert shown == "INFO :      Starting Flower Simulation\n(ClientAppActor pid=7) x\n"


def test_flowers_hint_to_resize_the_federation_is_not_shown(capsys):
    # The launcher sizes the federation from the data config; Flower prints the hint regardless.
    printed = [
        "WARNING :   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
        "INFO :      Federation `@none/default` (3 simulated SuperNodes)",
        "INFO :      To change federation size, use the following command:",
        "INFO :      \tflwr federation simulation-config @none/default <superlink> ...",
    ]
    script = "; ".join(f"print({line!r})" for line in printed)
    code, output = run_and_check([sys.executable, "-c", script], dict(os.environ))
    shown = capsys.readouterr().out
    assert code == 1  # no run started
    assert "(3 simulated SuperNodes)" in shown
    assert "changed from 10 to 2" not in shown and "federation size" not in shown
    assert "simulation-config" not in shown
    assert output.count("\n") == 4  # the returned output keeps every line
