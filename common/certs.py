"""Certificates and keys for a real federation: a private CA, the SuperLink's TLS
certificate, and one SuperNode authentication key pair per hospital.

Why each piece exists:

- TLS (CA + server certificate) lets a hospital's node know it is talking to the
  coordinator's SuperLink and encrypts adapter updates in transit. Hospitals receive only
  ``ca.pem``; the CA's private key stays with the coordinator.
- SuperNode authentication keys let the SuperLink accept only registered hospitals. Flower
  expects an ECDSA key on a NIST curve, the private key in OpenSSH format (read by
  ``flower-supernode --auth-supernode-private-key``) and the public key in OpenSSH format
  (read by ``flwr supernode register``). A hospital should make its own pair and send only
  the ``.pub`` file; the private key never needs to leave the site.

Files are never silently overwritten: replacing a CA or a node key breaks every node
that trusts or registered the old one.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privatune.common.durable import write_atomically

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.pem", "superlink.key"
NODE_KEY_SUFFIX, NODE_PUB_SUFFIX = ".key", ".pub"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CertError(ValueError):
    """A certificate or key could not be made or read; the message names the file."""


@dataclass(frozen=True)
class CertificateAuthority:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertificate:
    cert: Path
    key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class NodeKeyPair:
    name: str
    private_key: Path
    public_key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, *, secret: bool, overwrite: bool) -> None:
    """Write atomically; secrets are created 0600 so no other local user can read them."""
    if path.exists() and not overwrite:
        raise CertError(f"{path}: already exists; refusing to overwrite it (pass overwrite to "
                        "replace it, then redistribute or re-register what depended on it)")
    write_atomically(path, data, 0o600 if secret else 0o644)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_ca(ca: CertificateAuthority) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    except (OSError, ValueError) as err:
        raise CertError(f"{ca.cert}: cannot read the CA certificate ({err})") from err
    try:
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise CertError(f"{ca.key}: cannot read the CA private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{ca.key}: expected an EC private key")
    return cert, key


def make_ca(out_dir: Path, common_name: str = "privatune federation CA", days: int = 3650,
            overwrite: bool = False) -> CertificateAuthority:
    """A self-signed CA that signs only the SuperLink certificate of this federation."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    out_dir = Path(out_dir)
    ca = CertificateAuthority(out_dir / CA_CERT, out_dir / CA_KEY)
    for path in (ca.cert, ca.key):
        if path.exists() and not overwrite:
            raise CertError(f"{path}: already exists; refusing to make a new CA over it "
                            "(every node trusts the old one)")
    _write(ca.key, _private_pem(key), secret=True, overwrite=overwrite)
    _write(ca.cert, cert.public_bytes(serialization.Encoding.PEM), secret=False,
           overwrite=overwrite)
    return ca


def server_hosts(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """localhost and 127.0.0.1 (the SuperLink's own ServerApp process connects there) plus
    the names hospitals use to reach the SuperLink; duplicates removed, order kept."""
    hosts: list[str] = []
    for host in (*DEFAULT_HOSTS, *extra):
        host = host.strip()
        if not host:
            continue
        if any(c in host for c in " /:") and not _is_ip(host):
            raise CertError(f"host name {host!r}: give a bare DNS name or IP address "
                            "(no scheme, port or path)")
        if host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_server_cert(ca: CertificateAuthority, out_dir: Path, hosts: Sequence[str] = (),
                     days: int = 825, overwrite: bool = False) -> ServerCertificate:
    """The SuperLink's TLS certificate, valid for every name in ``server_hosts(hosts)``.

    A node checks the name it dials against these SANs, so every address hospitals use
    (DNS name or IP) must be listed here.
    """
    ca_cert, ca_key = _load_ca(ca)
    names = server_hosts(hosts)
    san = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h)
           for h in names]
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    out_dir = Path(out_dir)
    server = ServerCertificate(out_dir / SERVER_CERT, out_dir / SERVER_KEY, names)
    _write(server.key, _private_pem(key), secret=True, overwrite=overwrite)
    _write(server.cert, cert.public_bytes(serialization.Encoding.PEM), secret=False,
           overwrite=overwrite)
    return server


def check_node_name(name: str) -> str:
    """Hospital names become file names: letters, digits, '.', '_' and '-' only."""
    if not _NAME.match(name):
        raise CertError(f"hospital name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return name


def make_node_keys(out_dir: Path, name: str, overwrite: bool = False) -> NodeKeyPair:
    """One hospital's SuperNode authentication key pair (ECDSA P-384, OpenSSH format).

    ``<name>.key`` stays at the hospital; ``<name>.pub`` goes to the coordinator, who
    registers it with ``flwr supernode register``.
    """
    check_node_name(name)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    out_dir = Path(out_dir)
    pair = NodeKeyPair(name, out_dir / f"{name}{NODE_KEY_SUFFIX}",
                       out_dir / f"{name}{NODE_PUB_SUFFIX}")
    for path in (pair.private_key, pair.public_key):
        if path.exists() and not overwrite:
            raise CertError(f"{path}: already exists; refusing to overwrite a node key "
                            "(the coordinator may have registered it)")
    _write(pair.private_key, private, secret=True, overwrite=overwrite)
    _write(pair.public_key, public + f" privatune-{name}\n".encode(), secret=False,
           overwrite=overwrite)
    return pair


def check_node_private_key(path: Path) -> None:
    """Fail early, naming the file, if Flower could not use this key for authentication."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except OSError as err:
        raise CertError(f"{path}: cannot read the node's private key ({err.strerror or err})") from err
    except (ValueError, TypeError) as err:
        raise CertError(f"{path}: not an unencrypted OpenSSH private key ({err}); make one "
                        "with 'privatune certs --keys-only --hospital NAME'") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: Flower's node authentication needs an ECDSA key, got "
                        f"{type(key).__name__}")


def check_node_public_key(path: Path) -> None:
    """Fail early, naming the file, if ``flwr supernode register`` would reject this key."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except OSError as err:
        raise CertError(f"{path}: cannot read the node's public key ({err.strerror or err})") from err
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertError(f"{path}: not an OpenSSH public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"{path}: Flower's node authentication needs an ECDSA key, got "
                        f"{type(key).__name__}")


def check_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate, or fail naming the file."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as err:
        raise CertError(f"{path}: cannot read certificate ({err.strerror or err})") from err
    except ValueError as err:
        raise CertError(f"{path}: not a PEM certificate ({err})") from err


def certificate_hosts(path: Path) -> tuple[str, ...]:
    """The DNS names and IP addresses a certificate is valid for (its SANs)."""
    cert = check_certificate(path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return (*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))


def fingerprint(path: Path) -> str:
    """SHA-256 fingerprint of a certificate, for checking ``ca.pem`` out of band."""
    digest = check_certificate(path).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)
