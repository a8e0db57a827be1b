"""Credentials for a deployment: a CA, the SuperLink's TLS certificate, SuperNode key pairs.

:func:`generate` writes, with ``cryptography`` only, everything ``flower-superlink`` (TLS),
``flower-supernode`` (``--root-certificates``, ``--auth-supernode-private-key``) and
``flwr supernode register`` expect in Flower 1.41, and each node's update-signing key
(``sign-updates``, :mod:`fedlora.privacy.signed_wire`)::

    DIR/ca.crt                 CA certificate (PEM)            -> SuperNodes, flwr CLI
    DIR/ca.key                 CA private key (PEM, 0600)      -> keep offline (signs new certs)
    DIR/server.pem             SuperLink certificate (PEM), signed by the CA, with SANs
    DIR/server.key             its private key (PEM, 0600)
    DIR/supernode-<i>.key      SuperNode i's EC P-384 private key (OpenSSH, 0600)
    DIR/supernode-<i>.pub      its public key (OpenSSH), registered on the SuperLink
    DIR/signing-<i>.key        SuperNode i's Ed25519 update-signing key (OpenSSH, 0600)
                               -> node config signing-key of SuperNode i only
    DIR/signing-<i>.pub        its public key -> the server's signing-keys directory

The TLS and SuperNode keys are EC P-384: Flower's SuperNode loader takes any EC key in OpenSSH
format and ``flwr supernode register`` only NIST curves; uvicorn serves EC certificates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.errors import FedLoraError

LOOPBACK = ("127.0.0.1", "localhost")
CURVE = ec.SECP384R1


class CertsError(FedLoraError):
    """Credentials are missing, would be overwritten, or are invalid."""


@dataclass(frozen=True)
class Credentials:
    """Paths of one credentials directory (see the module docstring for the layout)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]
    node_public_keys: tuple[Path, ...]
    signing_keys: tuple[Path, ...]
    signing_public_keys: tuple[Path, ...]

    @classmethod
    def at(cls, directory: str | Path, nodes: int) -> Credentials:
        """The paths for ``nodes`` SuperNodes in ``directory`` (whether or not they exist)."""
        d = Path(directory).expanduser().resolve()
        return cls(d, d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key",
                   tuple(d / f"supernode-{i}.key" for i in range(nodes)),
                   tuple(d / f"supernode-{i}.pub" for i in range(nodes)),
                   tuple(d / f"signing-{i}.key" for i in range(nodes)),
                   tuple(d / f"signing-{i}.pub" for i in range(nodes)))

    def files(self) -> list[Path]:
        """Every file of the credentials (CA, server, node and signing keys), for checks."""
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key,
                *self.node_keys, *self.node_public_keys, *self.signing_files()]

    def signing_files(self) -> list[Path]:
        """The nodes' update-signing private and public keys."""
        return [*self.signing_keys, *self.signing_public_keys]

    def require(self, *, tls: bool, auth: bool, signing: bool = False) -> None:
        """Raise :class:`CertsError` naming every file a launch with these options lacks.

        The CA's private key is never needed to run, so it may be kept elsewhere.
        """
        needed = [self.ca_cert, self.server_cert, self.server_key] if tls or auth else []
        if auth:
            needed += [*self.node_keys, *self.node_public_keys]
        if signing:
            needed += self.signing_files()
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise CertsError(
                f"missing credential file(s): {', '.join(missing)}; create them with "
                f"`fedlora certs {self.directory} --nodes {len(self.node_keys)}` (add --force "
                f"to replace an incomplete set)")
        if auth:
            for key, pub in zip(self.node_keys, self.node_public_keys, strict=True):
                check_key_pair(key, pub)


def check_key_pair(private_key: Path, public_key: Path) -> None:
    """Raise :class:`CertsError` unless the files are a SuperNode key pair Flower accepts: an
    EC private key in OpenSSH format and its own public key (what gets registered)."""
    try:
        key = serialization.load_ssh_private_key(private_key.read_bytes(), None)
        pub = serialization.load_ssh_public_key(public_key.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertsError(f"{private_key} / {public_key} are not an OpenSSH EC key pair "
                         f"without passphrase ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{private_key} is not an EC key; Flower authenticates SuperNodes "
                         f"with EC keys (create them with `fedlora certs`)")
    ssh = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if key.public_key().public_bytes(*ssh) != pub.public_bytes(*ssh):
        raise CertsError(f"{public_key} is not the public key of {private_key}: the SuperLink "
                         f"would refuse that SuperNode; use a matching pair")


def generate(directory: str | Path, hosts: Sequence[str] = (), nodes: int = 2,
             force: bool = False, days: int = 365) -> Credentials:
    """Write a CA, a SuperLink certificate and ``nodes`` SuperNode key pairs into ``directory``.

    Parameters
    ----------
    directory
        Created with mode 0700 (an existing directory is made 0700 too).
    hosts
        Names and IP addresses SuperNodes use to reach the SuperLink; 127.0.0.1 and
        localhost are always included. IP addresses become IP SANs, the rest DNS SANs.
    nodes
        SuperNode key pairs to create (``supernode-0`` .. ``supernode-<nodes-1>``), and as
        many update-signing key pairs (``signing-0`` ..).
    force
        Replace existing files; without it, any existing target file is an error.
    days
        Validity of the CA and server certificates.
    """
    if nodes < 0:
        raise CertsError(f"--nodes must be >= 0; got {nodes}")
    creds = Credentials.at(directory, nodes)
    existing = [str(p) for p in creds.files() if p.exists() or p.is_symlink()]
    if existing and not force:
        raise CertsError(f"refusing to overwrite {', '.join(existing)}; pass --force "
                         f"(force=True) to replace them")
    sans = subject_alt_names(hosts)
    creds.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    creds.directory.chmod(0o700)

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew
    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedlora deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, "fedlora SuperLink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(creds.ca_key, _pem_key(ca_key), private=True, force=force)
    _write(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), force=force)
    _write(creds.server_key, _pem_key(server_key), private=True, force=force)
    _write(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM),
           force=force)
    for key_path, pub_path in zip(creds.node_keys, creds.node_public_keys, strict=True):
        _write_openssh_pair(ec.generate_private_key(CURVE()), key_path, pub_path, force)
    _write_signing_keys(creds, force)
    return creds


def generate_signing_keys(directory: str | Path, nodes: int, force: bool = False
                          ) -> Credentials:
    """Write only the ``nodes`` update-signing key pairs (``signing-<i>.key/.pub``)."""
    creds = Credentials.at(directory, nodes)
    existing = [str(p) for p in creds.signing_files() if p.exists() or p.is_symlink()]
    if existing and not force:
        raise CertsError(f"refusing to overwrite {', '.join(existing)}; pass --force "
                         f"(force=True) to replace them")
    creds.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    creds.directory.chmod(0o700)
    _write_signing_keys(creds, force)
    return creds


def _write_signing_keys(creds: Credentials, force: bool) -> None:
    for key_path, pub_path in zip(creds.signing_keys, creds.signing_public_keys, strict=True):
        _write_openssh_pair(Ed25519PrivateKey.generate(), key_path, pub_path, force)


def _write_openssh_pair(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey, key_path: Path,
                        pub_path: Path, force: bool) -> None:
    """``key`` in OpenSSH format (private, 0600) and its public key, commented with the name."""
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), private=True, force=force)
    _write(pub_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH)
           + f" {key_path.stem}\n".encode(), force=force)


def git_work_tree(path: str | Path) -> Path | None:
    """The git work tree ``path`` lies in (a parent holding ``.git``), or ``None``."""
    p = Path(path).expanduser().resolve()
    for parent in (p, *p.parents):
        if (parent / ".git").exists():
            return parent
    return None


def git_ignores(work_tree: Path, path: Path) -> bool | None:
    """Does git ignore ``path`` in ``work_tree``? ``None`` when git cannot tell (not installed)."""
    import subprocess

    try:
        done = subprocess.run(["git", "-C", str(work_tree), "check-ignore", "-q", str(path)],
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {0: True, 1: False}.get(done.returncode)


def work_tree_warning(directory: str | Path) -> str | None:
    """A warning when private keys would be written inside a git work tree (they could be
    committed and pushed), saying whether git ignores them and where to put them instead."""
    d = Path(directory).expanduser().resolve()
    tree = git_work_tree(d)
    if tree is None:
        return None
    ignored = git_ignores(tree, d / "ca.key")
    status = ("git ignores them here, but a copy of the tree, an archive or `git add -f` "
              "would carry them" if ignored else
              "git does NOT ignore them: `git add .` would commit them" if ignored is False
              else "git could not say whether it ignores them")
    return (f"{d} holds private keys (ca.key, server.key, supernode-*.key, signing-*.key) and "
            f"is inside the git work tree {tree}; {status}. Keep credentials outside any "
            f"checkout, e.g. `fedlora certs ~/fedlora-creds ...`")


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """IP SANs for addresses, DNS SANs for names; loopback first, duplicates dropped."""
    names: list[x509.GeneralName] = []
    for host in (*LOOPBACK, *hosts):
        host = host.strip()
        if not host:
            continue
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in host):
                raise CertsError(f"--hosts entry {host!r} is neither an IP address nor a DNS "
                                 f"name") from None
            name = x509.DNSName(host)
        if name not in names:
            names.append(name)
    return names


def san_text(names: Sequence[x509.GeneralName]) -> str:
    """``127.0.0.1, localhost, …``: the SANs as written into the certificate."""
    return ", ".join(str(n.value) for n in names)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False,
                         key_agreement=not cert_sign, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, *, private: bool = False, force: bool = False) -> None:
    """Write ``data`` into a file this call creates: ``O_EXCL | O_NOFOLLOW``, so a file or a
    symlink planted at ``path`` is never written through; with ``force`` the old entry (a
    symlink itself, never its target) is removed first. Private files are 0600 from their
    creation on (never world-readable)."""
    mode = 0o600 if private else 0o644
    if force:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise CertsError(f"refusing to write {path}: something is already there (a file or a "
                         f"symlink); remove it or pass --force (force=True)") from None
    os.fchmod(fd, mode)  # the umask may have narrowed it
    with os.fdopen(fd, "wb") as f:
        f.write(data)
