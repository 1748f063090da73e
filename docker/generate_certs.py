#!/usr/bin/env python3
"""Make the federation's TLS certificates, SuperNode keys and SuperExec secrets.

Only what is missing is made (and a SuperLink certificate that lacks a requested name or comes
from an older CA, or expires within RENEW_DAYS days, or whose key is missing; and a hospital's
runtime certificate that expires within RENEW_DAYS days or whose key is missing), so running it
again is safe; the rotation steps of docker/README.md say which files to delete to renew.

  server                 the federation CA (its key and certificate -> CA_DIR, default OUT/ca/),
                         the SuperLink certificate, a copy of ca.crt and the ServerApp SuperExec
                         secret                                           -> OUT/server/
  hospital NAME          a SuperNode's authentication key pair, TLS for its Runtime API (the
                         link to its ClientApp SuperExec), that SuperExec's secret
                                                                          -> OUT/hospitals/NAME/
  hospitals --hospital NAME ...    each hospital, with a copy of OUT/server/ca.crt; never reads
                         the CA key, so it can run in a container that does not see CA_DIR
  federation --hospital NAME ...   server and hospitals, for one machine

The CA key signs SuperLink certificates and nothing else, so it lives apart from everything a
container mounts: run ``server`` on the host (any Python 3.11+ with Flower installed) and keep
CA_DIR off every compose file. A ca.key left in OUT/server/ by an earlier version is refused
with the command that moves it.

Needs only ``cryptography``, which every Flower install brings. The SuperLink certificate always
names ``superlink`` (the compose service), ``localhost`` and ``127.0.0.1``; add with --san every
name or address the hospitals dial. A re-issued certificate keeps the names of the one it
replaces, so a renewal without --san still serves them; the names are printed.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")
SUPERLINK_SANS = ("superlink", *DEFAULT_SANS)
# The ClientApp SuperExec dials its SuperNode by this name on the hospital's own network.
RUNTIME_SANS = ("supernode", *DEFAULT_SANS)
CA_DAYS = 3650
# A SuperLink or runtime certificate this close to its end is re-issued when the script runs again.
RENEW_DAYS = 30


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; secrets are created 0600 so no other user ever sees them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
    print(f"wrote {path}")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _canonical(name: str) -> str:
    """An IP address as a certificate stores it (2001:0db8::1 -> 2001:db8::1); a DNS name as is.

    Compared as typed, a requested address in another spelling is never found in the
    certificate, which would then be re-issued (a new key) on every run.
    """
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may only sign end-entity certificates."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: Sequence[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate valid for every name in ``sans`` (the first is its CN)."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in sans]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def load_cert(path: Path) -> x509.Certificate | None:
    """The certificate in ``path``; None if the file is missing or does not parse (re-issue it)."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def cert_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses ``cert`` is valid for, IPs in canonical form.

    An empty list without a SAN extension: a certificate made elsewhere, then re-issued.
    """
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *sans.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
    ]


def cert_is_current(
    cert: x509.Certificate | None, ca_cert: x509.Certificate, names: Iterable[str]
) -> bool:
    """Whether ``cert`` exists, was signed by ``ca_cert`` and is valid for every name.

    It must also stay valid RENEW_DAYS more days, so a run before the expiry renews it.
    """
    if cert is None or cert.not_valid_after_utc < _now() + datetime.timedelta(days=RENEW_DAYS):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return set(names) <= set(cert_names(cert))


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _secret(path: Path) -> None:
    """A SuperExec shared secret: read by Flower as raw bytes, so no trailing newline."""
    if not path.exists():
        _write(path, secrets.token_hex(32).encode(), private=True)


def server(out: Path, ca_dir: Path, extra_sans: Sequence[str], days: int) -> None:
    """CA in ``ca_dir``; SuperLink certificate, ca.crt and ServerApp SuperExec secret in ``out``.

    The CA is kept once made: hospitals trust its ca.crt. The SuperLink certificate is
    re-issued when it lacks a requested name, was signed by another (an older) CA, ends within
    RENEW_DAYS days or has lost its key; only then is the CA key read. The new one keeps the
    names of the old one: hospitals dial what it was first made for, and a renewal without the
    original --san must not drop it. A deleted certificate leaves nothing to keep, hence the
    printed list.
    """
    stray = out / "ca.key"
    if stray.exists():
        raise SystemExit(
            f"{stray}: the CA key must not sit where the SuperLink container mounts it; "
            f"move it with: mkdir -p {ca_dir} && mv {stray} {out / 'ca.crt'} {ca_dir}/"
        )
    ca_key_file, ca_file = ca_dir / "ca.key", ca_dir / "ca.crt"
    if ca_file.exists() != ca_key_file.exists():
        raise SystemExit(f"{ca_dir}: ca.crt and ca.key must both exist or both be absent")
    if not ca_file.exists():
        ca_key, ca_cert = make_ca("FL-W3S federation CA")
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(ca_key_file, _pem_key(ca_key), private=True)
        _write(ca_file, _pem_cert(ca_cert), private=False)
    ca_pem = ca_file.read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    if not (out / "ca.crt").exists() or (out / "ca.crt").read_bytes() != ca_pem:
        _write(out / "ca.crt", ca_pem, private=False)

    sans = _unique([*SUPERLINK_SANS, *map(_canonical, extra_sans)])
    cert_file = out / "superlink.crt"
    previous = load_cert(cert_file)
    if not (out / "superlink.key").exists() or not cert_is_current(previous, ca_cert, sans):
        sans = _unique([*sans, *(cert_names(previous) if previous else [])])
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        key, cert = make_server_cert(ca_key, ca_cert, sans, days)
        _write(out / "superlink.key", _pem_key(key), private=True)
        _write(cert_file, _pem_cert(cert), private=False)
        print(f"{cert_file} is valid for: {', '.join(sans)} (add what hospitals dial with --san)")
    _secret(out / "superexec.secret")


def hospital(out: Path, name: str, days: int) -> None:
    """A SuperNode's auth key pair, its Runtime API TLS and its SuperExec secret in ``out``.

    The auth key is an OpenSSH EC P-384 key: ``flwr supernode register`` reads the .pub,
    ``flower-supernode --auth-supernode-private-key`` the private half. The Runtime API
    certificate is signed by a throwaway CA whose key is never written: the link stays on
    the hospital's machine, so CA, key and certificate are made anew together, when one is
    missing or the certificate ends within RENEW_DAYS days (deleting runtime-ca.crt forces it).
    """
    if not (out / "supernode.key").exists():
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(out / "supernode.key", private, private=True)
        _write(out / "supernode.pub", public + f" {name}\n".encode(), private=False)
    runtime_ca = load_cert(out / "runtime-ca.crt")
    if (
        runtime_ca is None
        or not (out / "runtime.key").exists()
        or not cert_is_current(load_cert(out / "runtime.crt"), runtime_ca, RUNTIME_SANS)
    ):
        ca_key, ca_cert = make_ca(f"FL-W3S {name} runtime CA")
        key, cert = make_server_cert(ca_key, ca_cert, RUNTIME_SANS, days)
        _write(out / "runtime.key", _pem_key(key), private=True)
        _write(out / "runtime.crt", _pem_cert(cert), private=False)
        _write(out / "runtime-ca.crt", _pem_cert(ca_cert), private=False)
    _secret(out / "superexec.secret")


def hospitals(out: Path, names: Sequence[str], days: int) -> None:
    """Each hospital's files, with a copy of the federation's public ca.crt; no CA key needed."""
    ca_file = out / "server" / "ca.crt"
    if not ca_file.exists():
        raise SystemExit(
            f"{ca_file} is missing: make it first, on the host: "
            f"python docker/generate_certs.py server --out <certs folder>"
        )
    for name in names:
        folder = out / "hospitals" / name
        hospital(folder, name, days)
        if not (folder / "ca.crt").exists() or (folder / "ca.crt").read_bytes() != (
            ca_file.read_bytes()
        ):
            shutil.copyfile(ca_file, folder / "ca.crt")


def chown_tree(out: Path, owner: str) -> None:
    """Hand OUT/server and OUT/hospitals to ``UID:GID``: Flower's images run as app (49999).

    The CA folder is not handed over (no container reads it), nor is OUT itself: in the setup
    containers it is a directory of the read-only root file system, with the two folders
    mounted inside it.
    """
    uid, gid = (int(part) for part in owner.split(":"))
    for folder in (out / "server", out / "hospitals"):
        if folder.exists():
            for item in [folder, *folder.rglob("*")]:
                os.chown(item, uid, gid)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["server", "hospital", "hospitals", "federation"])
    parser.add_argument("name", nargs="?", help="the hospital's name (command 'hospital')")
    parser.add_argument("--out", type=Path, default=Path("certs"), help="default: ./certs")
    parser.add_argument(
        "--ca-dir", type=Path, help="the CA's key and certificate (default: OUT/ca); host only"
    )
    parser.add_argument("--san", action="append", default=[], help="extra SuperLink name/IP")
    parser.add_argument(
        "--hospital", action="append", default=[], help="(commands 'hospitals', 'federation')"
    )
    parser.add_argument("--days", type=int, default=825, help="validity of server certificates")
    parser.add_argument("--owner", help="UID:GID to own everything written (needs root)")
    args = parser.parse_args(argv)

    if args.command == "hospital":
        if not args.name:
            parser.error("hospital needs the hospital's name")
        hospital(args.out / "hospitals" / args.name, args.name, args.days)
    if args.command in ("hospitals", "federation") and not args.hospital:
        parser.error(f"{args.command} needs at least one --hospital NAME")
    if args.command in ("server", "federation"):
        server(args.out / "server", args.ca_dir or args.out / "ca", args.san, args.days)
    if args.command in ("hospitals", "federation"):
        hospitals(args.out, args.hospital, args.days)
    if args.owner:
        chown_tree(args.out, args.owner)


if __name__ == "__main__":
    main()
