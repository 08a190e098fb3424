"""Certificates and node keys for a deployment across institutions (`fedllm certs`).

One folder holds everything a SuperLink operator hands out or keeps:

    ca.crt, ca.key          the certificate authority (keep ca.key offline; give ca.crt to everyone)
    server.pem, server.key  the SuperLink's TLS certificate, signed by the CA, for the given hosts
    nodes/node<i>           SuperNode i's authentication key (give it to institution i only)
    nodes/node<i>.pub       its public key, registered with `flwr supernode register`

Key types: the CA and the server use elliptic-curve keys (P-384 and P-256) because they are
generated in milliseconds (RSA-4096 takes seconds), are smaller, and every TLS stack Flower uses
(uvicorn/`ssl` on the SuperLink, the HTTPS clients of SuperNodes, SuperExec and the CLI) accepts
them. SuperNode keys must be NIST EC keys in OpenSSH format: Flower 1.42 rejects ed25519.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825
# The SuperLink's own SuperExec reaches it over loopback (Flower turns a bind address of 0.0.0.0
# into 127.0.0.1), so the server certificate must always cover the loopback names too.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class CertsError(ValueError):
    """A bad argument, or a file that would be overwritten without --force."""


@dataclass(frozen=True)
class KeyFile:
    """One file to write: its path relative to the output folder, its bytes, and whether it is secret."""

    name: str
    data: bytes
    private: bool


def parse_hosts(text: str) -> list[x509.GeneralName]:
    """`"name,ip,..."` -> SAN entries (IP addresses by `ipaddress`, the rest DNS names), loopback added."""
    given = [h.strip() for h in text.split(",") if h.strip()]
    if not given:
        raise CertsError("--hosts is empty: give the SuperLink's DNS names and/or IP addresses, e.g. "
                         "--hosts superlink.example.org,203.0.113.7")
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*given, *LOOPBACK_HOSTS]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            if any(c in host for c in " /:@") or host.startswith(".") or host.endswith("."):
                raise CertsError(f"--hosts: {host!r} is neither an IP address nor a DNS name") from None
            entry = x509.DNSName(host.lower())
        key = str(entry.value)
        if key not in seen:
            seen.add(key)
            names.append(entry)
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedllm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))


def make_ca(common_name: str = "fedllm federation CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (P-384): CA=True, may sign certificates and CRLs, nothing else."""
    key = ec.generate_private_key(ec.SECP384R1())
    builder = _validity(x509.CertificateBuilder(), CA_DAYS)
    cert = (
        builder.subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[x509.GeneralName],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate (P-256), signed by the CA, valid for `hosts`, serverAuth only."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = _validity(x509.CertificateBuilder(), SERVER_DAYS)
    cert = (
        builder.subject_name(_name(str(hosts[0].value))).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keys(index: int) -> tuple[bytes, bytes]:
    """SuperNode `index`'s authentication key pair: EC P-384, OpenSSH private and public formats."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" fedllm-node{index}\n".encode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write `data` to a new file created with `mode`; with `force`, atomically replace `path`.

    The file is created with its final permissions (never readable by others, not even briefly):
    a temporary file beside `path` is opened with O_EXCL and `mode`, then renamed over `path`.
    """
    if path.exists() and not force:
        raise CertsError(f"{path} already exists; pass --force to overwrite it")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode & 0o044:  # public files: 0644 whatever the umask
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes, force: bool = False) -> None:
    """A secret key: mode 0600 from creation."""
    _write(path, data, 0o600, force)


def write_public(path: Path, data: bytes, force: bool = False) -> None:
    """A certificate or public key: mode 0644."""
    _write(path, data, 0o644, force)


def planned_files(nodes: int) -> list[str]:
    """Every file `fedllm certs` writes, relative to the output folder."""
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    for i in range(nodes):
        names += [f"nodes/node{i}", f"nodes/node{i}.pub"]
    return names


def check_free(out: Path, names: Iterable[str]) -> None:
    """Refuse before writing anything if any target file exists (the error names them)."""
    taken = [str(out / n) for n in names if (out / n).exists() or (out / n).is_symlink()]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise CertsError(f"{taken[0]} already exists{more}; pass --force to overwrite")


def generate(hosts: str, nodes: int) -> list[KeyFile]:
    """Everything in memory first: the CA, the server certificate and `nodes` node key pairs."""
    if nodes < 1:
        raise CertsError(f"--nodes must be at least 1 (one key pair per SuperNode), got {nodes}")
    san = parse_hosts(hosts)
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, san)
    files = [KeyFile("ca.crt", _cert_pem(ca_cert), False), KeyFile("ca.key", _key_pem(ca_key), True),
             KeyFile("server.pem", _cert_pem(server_cert), False), KeyFile("server.key", _key_pem(server_key), True)]
    for i in range(nodes):
        private, public = make_node_keys(i)
        files += [KeyFile(f"nodes/node{i}", private, True), KeyFile(f"nodes/node{i}.pub", public, False)]
    return files


def write_all(out: Path, files: list[KeyFile], force: bool) -> list[Path]:
    """Write the files under `out` (key folders 0700); returns the paths written."""
    if not force:
        check_free(out, (f.name for f in files))
    for folder in sorted({out, *((out / f.name).parent for f in files)}, key=lambda p: len(p.parts)):
        if not folder.exists():  # parents first, so none is created implicitly with the default mode
            folder.mkdir(mode=0o700, parents=True)
    written = []
    for f in files:
        (write_private if f.private else write_public)(out / f.name, f.data, force)
        written.append(out / f.name)
    return written


def create_certs(out: Path, hosts: str, nodes: int, force: bool = False) -> list[Path]:
    """`fedllm certs`: the CA, the SuperLink certificate and the node keys under `out`."""
    files = generate(hosts, nodes)
    return write_all(out, files, force)


def next_steps(out: Path, hosts: str, nodes: int) -> str:
    """The commands to run next, with this folder's absolute paths filled in."""
    d = out.resolve()
    host = [h.strip() for h in hosts.split(",") if h.strip()][0]
    host = f"[{host}]" if ":" in host else host
    lines = [
        "Next (see docs/deploy.md):",
        "  # on the SuperLink machine",
        "  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flower-superlink --host 0.0.0.0 --port 9200 \\",
        f"      --ssl-ca-certfile {d}/ca.crt --ssl-certfile {d}/server.pem --ssl-keyfile {d}/server.key \\",
        f"      --enable-supernode-auth --database {d.parent}/state.db",
        "  # $FLWR_HOME/config.toml (default ~/.flwr/config.toml) on the machine you run `flwr` from:",
        "  #   [superlink.federation]",
        f'  #   address = "{host}:9200"',
        f'  #   root-certificates = "{d}/ca.crt"',
    ]
    lines += [f"  flwr supernode register {d}/nodes/node{i}.pub federation --name node{i}" for i in range(nodes)]
    lines += [
        "  # at institution i: copy ca.crt and nodes/node<i> there, then",
        f"  flower-supernode --superlink {host}:9200 --root-certificates ca.crt --auth-supernode-private-key node<i> \\",
        f"      --port 9094 --node-config \"partition-id=<i> num-partitions={nodes} data-path='/data/mine.jsonl'\"",
        f"  flwr run . federation --stream --run-config \"min-clients={nodes} output-dir='/srv/fedllm/runs/run1'\"",
        "  # flwr run exits 0 even if the run failed: check that output-dir/summary.json exists",
    ]
    return "\n".join(lines)
