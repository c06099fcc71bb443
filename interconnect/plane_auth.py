"""Who may talk on the gRPC plane: per-sender credentials derived from the run's secret, checked
on every call before a byte of its messages is read, and (off loopback) TLS with a per-run CA.

Every member of a run holds the run secret (Ray hands it to the socket actors). A sender proves
its name with `HMAC(run_secret, name)` in the call's metadata; the server recomputes it for the
claimed name and compares in constant time, so a process that only knows a port (or a name learnt
elsewhere) cannot open a stream, ask for Health or Stats, or claim another sender's name. The raw
secret itself is never sent by `PeerClient`. On a cluster the plane runs over mutual TLS with a
certificate made for this run only, so the credential never travels in clear text either.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SENDER_KEY", "AUTH_KEY", "TLS_SERVER_NAME", "sender_credential", "call_metadata", "check_credential",
           "secrets_equal", "is_loopback", "PlaneTLS", "make_run_tls"]

SENDER_KEY = "rdu-sender"
AUTH_KEY = "rdu-auth"
TLS_SERVER_NAME = "rdu-interconnect"   # the one name in every run certificate (servers move between IPs)
_CREDENTIAL_CONTEXT = b"rdu-interconnect/sender/v1\0"
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
CERT_VALIDITY_DAYS = 7                 # a run certificate outliving any run; the CA key is discarded


def _as_bytes(value: str | bytes) -> bytes | None:
    """Secrets and credentials compared as bytes (a non-ASCII str must not raise in compare_digest)."""
    if isinstance(value, bytes):
        return value
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        return None   # lone surrogates: no credential can match


def secrets_equal(given: str | bytes, expected: str | bytes) -> bool:
    """Constant-time comparison that is simply False for values that are not valid text."""
    a, b = _as_bytes(given), _as_bytes(expected)
    return a is not None and b is not None and hmac.compare_digest(a, b)


def sender_credential(run_secret: str, sender: str) -> str:
    """The proof that `sender` belongs to the run: HMAC-SHA256(run_secret, sender), hex."""
    if not run_secret:
        raise ValueError("the interconnect needs a run secret: refusing to derive an empty credential")
    key = _as_bytes(run_secret) or b""
    return hmac.new(key, _CREDENTIAL_CONTEXT + sender.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def call_metadata(run_secret: str, sender: str) -> tuple[tuple[str, str], ...]:
    """The metadata a sender attaches to each call (stream, Health, Stats)."""
    return ((SENDER_KEY, sender), (AUTH_KEY, sender_credential(run_secret, sender)))


def check_credential(run_secret: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The authenticated sender name of a call, None if it carries no credential at all; raises
    PermissionError when it carries a wrong one (a guessed, forged or another run's credential)."""
    values = {key: value for key, value in (metadata or ()) if key in (SENDER_KEY, AUTH_KEY)}
    if AUTH_KEY not in values and SENDER_KEY not in values:
        return None
    sender, proof = values.get(SENDER_KEY, ""), values.get(AUTH_KEY, "")
    if isinstance(sender, bytes):
        sender = sender.decode("utf-8", "replace")
    if not sender or not proof or not secrets_equal(proof, sender_credential(run_secret, sender)):
        raise PermissionError(f"bad credential for sender {sender[:64]!r}")
    return sender


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    return host in _LOOPBACK_HOSTS


@dataclass(frozen=True)
class PlaneTLS:
    """One run's TLS material: its CA certificate and the certificate + key every socket uses
    both as a server and as a client (mutual TLS: only holders of the run certificate connect)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    server_name: str = TLS_SERVER_NAME

    def server_credentials(self):
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel_credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    @property
    def channel_options(self) -> list[tuple[str, str]]:
        """Verify the server against the run's name, whatever IP it happens to listen on."""
        return [("grpc.ssl_target_name_override", self.server_name)]


def make_run_tls(run_label: str = "rdu run") -> PlaneTLS:
    """A fresh self-signed CA and one certificate signed by it, for this run only. The CA key is
    dropped once the certificate is signed, so no further certificate can ever join the run."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:  # a dependency of the project: only a broken install lacks it
        raise RuntimeError("TLS for the interconnect needs the 'cryptography' package") from exc

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=CERT_VALIDITY_DAYS)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{run_label} CA"[:64])])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    leaf_cert = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_SERVER_NAME)]))
                 .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(start).not_valid_after(end)
                 .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), critical=False)
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                       ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                 .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return PlaneTLS(ca_pem=ca_cert.public_bytes(pem), cert_pem=leaf_cert.public_bytes(pem),
                    key_pem=leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
