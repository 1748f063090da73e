#!/usr/bin/env python3
"""Check the containers of a compose project against the hardening docker/compose.yml promises.

A compose file says what Docker should do; ``docker inspect`` says what it did. This reads the
second, for every container of the project (running or not), and prints one line per container
and check, so that a hospital's IT person (or docker/smoke_test.sh) sees the doors closed on the
machine itself:

  no capabilities   HostConfig.CapDrop is ALL (CapAdd may name only what --allow-caps lists)
  no privilege gain HostConfig.SecurityOpt holds no-new-privileges:true
  read-only root    HostConfig.ReadonlyRootfs
  memory, pids      HostConfig.Memory and HostConfig.PidsLimit set
  healthcheck       Config.Healthcheck set and, for a running container, State.Health healthy
                    (a container whose healthcheck the file disables, a one-shot job, is exempt)
  not root          Config.User names a user other than root
  loopback only     every published port bound to 127.0.0.1 (or to an address --public allows)
  no CA key         no mount holds a file named ca.key

  python docker/check_containers.py fl-w3s          # exit 0: all pass; 1: a check failed
  python docker/check_containers.py fl-w3s --service clientapp-1   # one service only

Needs only the docker CLI (and root, or read access to the volumes' folders, to look inside
named volumes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1")


def inspect_project(docker: str, project: str, services: Sequence[str] = ()) -> list[dict]:
    """``docker inspect`` of every container (running or stopped) of one compose project.

    With ``services``, only the containers of those compose services.
    """
    filters = ["--filter", f"label=com.docker.compose.project={project}"]
    ids = []
    for service in services or [None]:
        where = [*filters, "--filter", f"label=com.docker.compose.service={service}"]
        ids += subprocess.run(
            [docker, "ps", "-aq", *(where if service else filters)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    if not ids:
        return []
    out = subprocess.run([docker, "inspect", *ids], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _raise(error: OSError) -> None:
    """os.walk's onerror: a folder it cannot list ends the walk instead of being skipped."""
    raise error


def holds_ca_key(source: str) -> bool | None:
    """Whether a mount's host path is or contains a file named ca.key; None: not all readable.

    A folder that cannot be listed may hold the key, so its error ends the walk with None
    (Path.rglob skipped such folders silently and passed them as holding no key).
    """
    path = Path(source)
    try:
        if path.is_file():
            return path.name == "ca.key"
        return any("ca.key" in files for _, _, files in os.walk(path, onerror=_raise))
    except OSError:
        return None


def check(container: dict, allow_caps: set[str], public: set[str]) -> list[tuple[str, bool, str]]:
    """(check, passed, what was seen) for one ``docker inspect`` record."""
    host, config, state = container["HostConfig"], container["Config"], container["State"]
    results = []
    cap_add = set(host.get("CapAdd") or [])
    results.append(
        (
            "no capabilities",
            (host.get("CapDrop") or []) == ["ALL"] and cap_add <= allow_caps,
            f"CapDrop={host.get('CapDrop')} CapAdd={sorted(cap_add)}",
        )
    )
    security = host.get("SecurityOpt") or []
    results.append(
        ("no privilege gain", "no-new-privileges:true" in security, f"SecurityOpt={security}")
    )
    results.append(
        ("read-only root", bool(host.get("ReadonlyRootfs")), f"tmpfs={host.get('Tmpfs')}")
    )
    memory, pids = host.get("Memory") or 0, host.get("PidsLimit") or 0
    results.append(("memory, pids", memory > 0 and pids > 0, f"Memory={memory} PidsLimit={pids}"))
    health = config.get("Healthcheck") or {}
    disabled = health.get("Test") == ["NONE"]
    if disabled:
        results.append(("healthcheck", True, "disabled (one-shot job)"))
    else:
        status = (state.get("Health") or {}).get("Status")
        ok = bool(health.get("Test")) and (not state.get("Running") or status == "healthy")
        results.append(("healthcheck", ok, f"State.Health={status}"))
    user = config.get("User") or ""
    # USER:GROUP; the group does not matter, a root user does ("0:49999" runs as root).
    root = user.partition(":")[0] in ("", "root", "0")
    results.append(("not root", not root, f"User={user or 'root'}"))
    bindings = [
        (b.get("HostIp") or "0.0.0.0", b.get("HostPort"), port)
        for port, binds in (host.get("PortBindings") or {}).items()
        for b in binds or []
    ]
    exposed = [b for b in bindings if b[0] not in LOOPBACK and b[0] not in public]
    results.append(
        (
            "loopback only",
            not exposed,
            ", ".join(f"{ip}:{hp}->{p}" for ip, hp, p in bindings) or "no published port",
        )
    )
    key_mounts, unreadable = [], []
    for mount in container.get("Mounts", []):
        if mount.get("Type") == "tmpfs":
            continue
        found = holds_ca_key(mount["Source"])
        if found is None:
            unreadable.append(mount["Destination"])
        elif found:
            key_mounts.append(mount["Destination"])
    seen = f"{len(container.get('Mounts', []))} mounts"
    if key_mounts:
        seen += f", ca.key under {key_mounts}"
    if unreadable:
        seen += f", cannot read {unreadable}"
    results.append(("no CA key", not key_mounts and not unreadable, seen))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Print every check of every container of the project; 1 if any failed or none ran."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", help="compose project name (docker compose ls)")
    parser.add_argument("--docker", default=os.environ.get("DOCKER", "docker"))
    parser.add_argument(
        "--allow-caps", default="", help="comma-separated capabilities a container may add"
    )
    parser.add_argument(
        "--public", default="", help="comma-separated host addresses a port may be bound to"
    )
    parser.add_argument(
        "--service", action="append", default=[], help="only this compose service (repeatable)"
    )
    args = parser.parse_args(argv)
    containers = inspect_project(args.docker, args.project, args.service)
    if not containers:
        print(f"no container in compose project {args.project}", file=sys.stderr)
        return 1
    allow_caps = {c for c in args.allow_caps.split(",") if c}
    public = {a for a in args.public.split(",") if a}
    failed = 0
    for container in sorted(containers, key=lambda c: c["Name"]):
        name = container["Name"].lstrip("/")
        for what, ok, seen in check(container, allow_caps, public):
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:<32} {what:<18} {seen}")
    print(f"{len(containers)} containers, {failed} failed checks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
