"""TLS for Fleetwatch's clients (the alert receivers, the MQTT clients, Kafka, the DCGM source): the CA a
setting names, and for mutual TLS a client certificate (for the receivers and MQTT) read again from disk
when it is renewed, for the next connection."""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("fleetwatch")


def ca_context(key: str, ca_file: str) -> ssl.SSLContext:
    """A client context that verifies servers against `ca_file` (PEM), or the system's CAs where it is
    empty; a ConfigError naming the setting `key` where the file is no usable CA bundle."""
    from pipeline.config import ConfigError
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"config error: {key} = {ca_file!r}: not a usable CA bundle ({e}); give a PEM file, or "
                          f"leave it empty for the system's") from None


def load_client_cert(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """A client certificate and its key (key_file empty: in cert_file) into an ssl.SSLContext. Raises
    ssl.SSLError or OSError where they are not a PEM certificate and its key, and ValueError for an
    encrypted key: OpenSSL would ask its passphrase on the terminal (a daemon's start, a reload: a
    hang). Every client's mutual TLS: the receivers', the MQTT clients', Kafka's."""
    def no_passphrase() -> bytes:
        raise ValueError("the key is encrypted: give it unencrypted, in a file only fleetwatch may read")
    context.load_cert_chain(cert_file, key_file or None, password=no_passphrase)


@dataclass(eq=False)
class ClientCert:
    """A mutual-TLS client's certificate (a receiver's, an MQTT client's) and the SSL context that
    holds it, made again when its files change on disk (a renewed certificate: cert-manager, an ACME
    client) for the next connection. A context is swapped in only once the new files load: a renewal half written, or
    with a key of another certificate, keeps the one before (said once)."""
    cert_file: str
    key_file: str
    make_context: Callable[[], ssl.SSLContext] = field(repr=False)  # the client's CA and verification
    context: ssl.SSLContext | None = field(default=None, repr=False)
    loaded: tuple[int, int] = (0, 0)  # the files' mtimes when loaded
    said: tuple[int, int] = (0, 0)

    def stamp(self) -> tuple[int, int]:
        return tuple(os.stat(f).st_mtime_ns if f else 0 for f in (self.cert_file, self.key_file))  # type: ignore

    def load(self) -> None:
        """A context with the files' certificate and key (ssl.SSLError, OSError or ValueError where they
        are not a certificate and its unencrypted key); the one before stays where they are not."""
        stamp = self.stamp()
        context = self.make_context()
        load_client_cert(context, self.cert_file, self.key_file)
        self.context, self.loaded = context, stamp

    def refresh(self, who: str) -> None:
        """Before a connection: the files again, where they changed (`who` names the client in the log)."""
        try:
            if self.stamp() == self.loaded:
                return
            self.load()
            log.info("%s: the client certificate %s changed on disk: loaded", who, self.cert_file)
        except (ssl.SSLError, OSError, ValueError) as e:
            try:
                stamp = self.stamp()
            except OSError:
                stamp = (-1, -1)
            if stamp != self.said:
                self.said = stamp
                log.error("%s: the client certificate %s changed but does not load (%s): the one loaded "
                          "before is used", who, self.cert_file, e)
