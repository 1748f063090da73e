"""docker/generate_certs.py: certificates that verify, keys that Flower accepts, safe re-runs."""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
)
from cryptography.x509.oid import NameOID
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "generate_certs.py"


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location("generate_certs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def names(certificate: x509.Certificate) -> set[str]:
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(sans.get_values_for_type(x509.DNSName)) | {
        str(ip) for ip in sans.get_values_for_type(x509.IPAddress)
    }


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def federation(generate, tmp_path) -> Path:
    generate(["federation", f"--out={tmp_path}", "--hospital=a", "--hospital=b", "--san=fl.org"])
    return tmp_path


def test_superlink_certificate_is_signed_by_the_ca_for_every_name_nodes_dial(federation):
    ca, superlink = cert(federation / "server/ca.crt"), cert(federation / "server/superlink.crt")
    superlink.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert names(superlink) == {"superlink", "localhost", "127.0.0.1", "fl.org"}
    ip = superlink.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ip.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_each_hospital_gets_the_federation_ca_and_its_own_runtime_tls(federation):
    ca = (federation / "server/ca.crt").read_bytes()
    runtime_cas = set()
    for hospital in ("a", "b"):
        folder = federation / "hospitals" / hospital
        assert (folder / "ca.crt").read_bytes() == ca
        runtime_ca = cert(folder / "runtime-ca.crt")
        cert(folder / "runtime.crt").verify_directly_issued_by(runtime_ca)
        assert "supernode" in names(cert(folder / "runtime.crt"))
        runtime_cas.add(runtime_ca.fingerprint(runtime_ca.signature_hash_algorithm))
        assert not (folder / "runtime-ca.key").exists()
    assert len(runtime_cas) == 2


def test_flower_accepts_the_supernode_key_pair(federation):
    folder = federation / "hospitals" / "a"
    public = try_load_public_key(folder / "supernode.pub")
    private = load_ssh_private_key((folder / "supernode.key").read_bytes(), None)
    assert public_key_to_bytes(private.public_key()) == public
    assert (folder / "supernode.pub").read_text().rstrip().endswith(" a")


def test_private_files_are_readable_by_their_owner_only(federation):
    private = {"ca.key", "superlink.key", "supernode.key", "runtime.key", "superexec.secret"}
    found = [p for p in federation.rglob("*") if p.name in private]
    assert len(found) == 3 + 2 * 3
    for path in found:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_superexec_secret_is_exact_bytes_without_a_newline(federation):
    secret = (federation / "server/superexec.secret").read_bytes()
    assert re.fullmatch(rb"[0-9a-f]{64}", secret), secret  # no newline, no whitespace


def test_running_again_changes_nothing(generate, federation):
    before = snapshot(federation)
    generate(["federation", f"--out={federation}", "--hospital=a", "--hospital=b", "--san=fl.org"])
    assert snapshot(federation) == before


def test_a_new_name_or_a_new_ca_reissues_the_superlink_certificate_only(generate, federation):
    key = (federation / "hospitals/a/supernode.key").read_bytes()
    generate(["server", f"--out={federation}", "--san=fl.org", "--san=10.0.0.7"])
    assert "10.0.0.7" in names(cert(federation / "server/superlink.crt"))

    (federation / "ca/ca.crt").unlink()
    (federation / "ca/ca.key").unlink()
    generate(["server", f"--out={federation}", "--san=fl.org"])
    new_ca = cert(federation / "ca/ca.crt")
    cert(federation / "server/superlink.crt").verify_directly_issued_by(new_ca)
    # The SuperLink's copy follows the new CA; hospitals get it on the next `hospitals` run.
    assert cert(federation / "server/ca.crt") == new_ca
    assert (federation / "hospitals/a/supernode.key").read_bytes() == key
    generate(["hospitals", f"--out={federation}", "--hospital=a"])
    assert cert(federation / "hospitals/a/ca.crt") == new_ca


def test_a_missing_key_or_a_certificate_near_its_end_reissues_the_superlink_pair(
    generate, federation
):
    server = federation / "server"
    (server / "superlink.key").unlink()
    generate(["server", f"--out={federation}", "--san=fl.org"])
    assert (server / "superlink.key").is_file()
    reissued = cert(server / "superlink.crt")
    assert (
        reissued.public_key()
        == load_pem_private_key((server / "superlink.key").read_bytes(), password=None).public_key()
    )

    generate(["server", f"--out={federation}", "--san=fl.org", "--days=10"])  # still current
    assert cert(server / "superlink.crt") == reissued
    (server / "superlink.crt").unlink()
    generate(["server", f"--out={federation}", "--san=fl.org", "--days=10"])
    short = cert(server / "superlink.crt")
    generate(["server", f"--out={federation}", "--san=fl.org"])  # 10 days left: renewed
    assert cert(server / "superlink.crt").not_valid_after_utc > short.not_valid_after_utc


def test_a_reissued_superlink_certificate_keeps_the_names_of_the_one_it_replaces(
    generate, federation, capsys
):
    """The README's renewal and CA rotation rerun `server` without the --san hospitals dial."""
    server, ca = federation / "server", federation / "ca"
    dialled = {"superlink", "localhost", "127.0.0.1", "fl.org"}
    (server / "superlink.key").unlink()  # a renewal before the certificate's end
    generate(["server", f"--out={federation}"])
    assert names(cert(server / "superlink.crt")) == dialled

    (ca / "ca.crt").unlink()
    (ca / "ca.key").unlink()
    generate(["server", f"--out={federation}"])
    assert names(cert(server / "superlink.crt")) == dialled

    generate(["server", f"--out={federation}", "--san=10.0.0.7", "--days=10"])
    short = cert(server / "superlink.crt")
    generate(["server", f"--out={federation}"])  # 10 days left: renewed
    renewed = cert(server / "superlink.crt")
    assert renewed.not_valid_after_utc > short.not_valid_after_utc
    assert names(renewed) == dialled | {"10.0.0.7"}

    (server / "superlink.crt").unlink()  # nothing left to keep: the printed list shows it
    capsys.readouterr()
    generate(["server", f"--out={federation}"])
    printed = capsys.readouterr().out
    assert "superlink.crt is valid for: superlink, localhost, 127.0.0.1 (" in printed


def test_a_superlink_certificate_made_elsewhere_without_names_is_reissued(generate, federation):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")])
    now = datetime.datetime.now(datetime.UTC)
    plain = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=400))
        .sign(key, hashes.SHA256())
    )
    (federation / "server" / "superlink.crt").write_bytes(
        plain.public_bytes(serialization.Encoding.PEM)
    )
    generate(["server", f"--out={federation}"])
    assert names(cert(federation / "server" / "superlink.crt")) == {
        "superlink",
        "localhost",
        "127.0.0.1",
    }


def test_a_requested_address_in_another_spelling_reissues_nothing(generate, tmp_path):
    """The certificate stores 2001:db8::1; compared as typed, every run made a new key."""
    generate(["server", f"--out={tmp_path}", "--san=2001:0DB8::1"])
    assert "2001:db8::1" in names(cert(tmp_path / "server/superlink.crt"))
    before = snapshot(tmp_path)
    generate(["server", f"--out={tmp_path}", "--san=2001:0DB8::1"])
    assert snapshot(tmp_path) == before


def test_runtime_tls_is_made_anew_near_its_end_or_when_a_file_is_lost(generate, tmp_path):
    """The SuperNode <-> ClientApp link must not expire because nobody deleted runtime-ca.crt."""
    folder = tmp_path / "hospitals" / "a"
    generate(["hospital", "a", f"--out={tmp_path}", "--days=10"])
    short = cert(folder / "runtime.crt")
    generate(["hospital", "a", f"--out={tmp_path}"])  # 10 days left: renewed
    assert cert(folder / "runtime.crt").not_valid_after_utc > short.not_valid_after_utc
    for lost in ("runtime.key", "runtime.crt"):
        (folder / lost).unlink()
        generate(["hospital", "a", f"--out={tmp_path}"])
        runtime = cert(folder / "runtime.crt")
        runtime.verify_directly_issued_by(cert(folder / "runtime-ca.crt"))
        key = load_pem_private_key((folder / "runtime.key").read_bytes(), password=None)
        assert key.public_key() == runtime.public_key()


def test_a_ca_without_its_key_is_refused(generate, federation):
    (federation / "ca/ca.key").unlink()
    with pytest.raises(SystemExit, match="both exist or both be absent"):
        generate(["server", f"--out={federation}"])


def test_the_ca_key_lies_outside_every_folder_a_container_mounts(federation):
    # Containers mount OUT/server (the SuperLink) and OUT/hospitals/<name> (SuperNodes, setup).
    assert (federation / "ca/ca.key").is_file()
    mounted = [federation / "server", *(federation / "hospitals").iterdir()]
    assert [p for folder in mounted for p in folder.rglob("*.key") if p.name == "ca.key"] == []
    assert cert(federation / "server/ca.crt") == cert(federation / "ca/ca.crt")


def test_a_ca_key_left_in_the_server_folder_is_refused_with_the_move(generate, federation):
    # The layout of earlier versions: ca.key beside the SuperLink's files.
    (federation / "ca/ca.key").rename(federation / "server/ca.key")
    with pytest.raises(SystemExit, match=r"must not sit where the SuperLink container mounts it"):
        generate(["server", f"--out={federation}"])


def test_a_custom_ca_dir_keeps_the_key_there(generate, tmp_path):
    generate(["server", f"--out={tmp_path / 'certs'}", f"--ca-dir={tmp_path / 'vault'}"])
    assert (tmp_path / "vault/ca.key").is_file()
    assert not (tmp_path / "certs/ca").exists()
    cert(tmp_path / "certs/server/superlink.crt").verify_directly_issued_by(
        cert(tmp_path / "vault/ca.crt")
    )


def test_hospitals_never_read_the_ca_key(generate, tmp_path):
    """The setup container runs `hospitals` without the CA folder: it needs only ca.crt."""
    generate(["server", f"--out={tmp_path}", f"--ca-dir={tmp_path / 'vault'}"])
    (tmp_path / "vault/ca.key").unlink()
    generate(["hospitals", f"--out={tmp_path}", "--hospital=a"])
    assert (tmp_path / "hospitals/a/ca.crt").read_bytes() == (
        tmp_path / "server/ca.crt"
    ).read_bytes()


def test_hospitals_without_a_server_ca_certificate_say_what_to_run(generate, tmp_path):
    with pytest.raises(SystemExit, match="generate_certs.py server"):
        generate(["hospitals", f"--out={tmp_path}", "--hospital=a"])
