"""Relay configuration: one frozen, typed object per process, loaded from TOML.

pydantic does the validation so an error names the key and the problem;
:func:`load_config` adds the file. Unknown keys are errors (a typo must not
silently fall back to a default). Relative paths in a file are taken
relative to that file. Units are in the names.

Example (config/relay.example.toml has every key)::

    [relay]
    region = "eu"
    name = "eu-1"
    port = 3340
    http_port = 3341
    key_file = "eu-1.key"

    [admission]
    policy = "token"
    tokens_file = "tokens.txt"

    [limits]
    send_queue_packets = 512
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from region.model import format_validation_error

__all__ = [
    "AdmissionConfig",
    "ConfigError",
    "EtcdConfig",
    "HealthConfig",
    "LimitsConfig",
    "MeshConfig",
    "PublicConfig",
    "RelayConfig",
    "RelaySection",
    "TLSConfig",
    "load_config",
    "load_mesh_key",
]


class ConfigError(Exception):
    """A configuration problem, worded for the operator: file, key, problem."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RelaySection(_Frozen):
    region: str = Field("local", min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")
    name: str = Field("relay-1", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    listen_host: str = "127.0.0.1"
    #: WebSocket data plane (path /derp). 0 picks a free port.
    port: int = Field(3340, ge=0, le=65535)
    #: HTTP API (health, metrics). 0 picks a free port.
    http_port: int = Field(3341, ge=0, le=65535)
    #: Answer STUN binding requests (UDP) on stun_port.
    stun: bool = True
    #: 0 picks a free port.
    stun_port: int = Field(3478, ge=0, le=65535)
    #: The relay's private key; created (mode 0600) if missing. None: a new key each start.
    key_file: Path | None = None
    #: On SIGTERM: the time from Restarting to the last 1001 close, after which the relay
    #: exits whatever is left (clients that have not moved, unflushed queues).
    shutdown_deadline_s: float = Field(5.0, gt=0, le=600)


class AdmissionConfig(_Frozen):
    #: open: any client that proves its key. token: it must also present a listed token.
    policy: Literal["open", "token"] = "open"
    #: One token per line; blank lines and lines starting with # are ignored.
    tokens_file: Path | None = None

    @model_validator(mode="after")
    def _tokens_for_token_policy(self) -> AdmissionConfig:
        if self.policy == "token" and self.tokens_file is None:
            raise ValueError("policy 'token' needs tokens_file")
        return self


class LimitsConfig(_Frozen):
    #: From TCP accept to a valid ClientInfo (the WebSocket upgrade included).
    handshake_timeout_s: float = Field(5.0, gt=0)
    #: Connections still in their upgrade or handshake. A new one over the cap sheds the oldest.
    max_preauth_connections: int = Field(1000, ge=1, le=1_000_000)
    #: A client whose socket accepts nothing for this long is dropped.
    write_timeout_s: float = Field(5.0, gt=0)
    keepalive_interval_s: float = Field(30.0, gt=0)
    #: Packets queued per client before the oldest is dropped.
    send_queue_packets: int = Field(512, ge=1, le=1_000_000)
    #: Bytes queued per client (frames, headers included) before the oldest are dropped.
    send_queue_bytes: int = Field(2 * 1024 * 1024, ge=70 * 1024, le=1024**3)
    #: Bytes queued for all clients together; over it new packets are dropped.
    total_queue_bytes: int = Field(256 * 1024 * 1024, ge=70 * 1024, le=64 * 1024**3)
    #: Control frames (pong, peer gone, health) queued per client.
    control_queue_frames: int = Field(64, ge=1, le=100_000)
    #: The writer coalesces queued frames into WebSocket messages of at most this size
    #: (a single frame that is larger goes alone).
    max_message_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: The largest WebSocket message accepted from a peer once its handshake is done.
    max_receive_message_bytes: int = Field(1024 * 1024, ge=70 * 1024, le=64 * 1024 * 1024)
    receive_buffer_bytes: int = Field(64 * 1024, ge=4096, le=16 * 1024 * 1024)
    #: Per-client receive rate; 0 means unlimited. Over it the reader slows, nothing is dropped.
    rate_bytes_per_s: int = Field(0, ge=0)
    #: Bytes a client may send at once above the rate; 0 means one second of rate.
    rate_burst_bytes: int = Field(0, ge=0)
    #: Against the rate, a frame counts as at least this many bytes (tiny frames cost work).
    rate_frame_min_bytes: int = Field(64, ge=0, le=65_536)
    #: Frames that deliver nothing (KeepAlive, Ping, unknown types, packets for keys not
    #: here) a client may send per second, a second's worth at once; over it its reader
    #: pauses like for rate_bytes_per_s. 0 means unlimited. Mesh peers are not limited.
    noop_frames_per_s: int = Field(1000, ge=0)
    #: A reader handles at most this many frames (and max_message_bytes) of a message
    #: before it lets the other connections run.
    frames_per_turn: int = Field(64, ge=1, le=1_000_000)
    #: A sender is told a destination is gone at most this often per destination.
    peer_gone_interval_s: float = Field(1.0, ge=0)


class MeshConfig(_Frozen):
    #: etcd client URLs. Empty: no shared state (a lone relay), unless `relaymesh up` gives one.
    etcd_endpoints: list[str] = []
    #: A file holding the secret all relays of the mesh share (or env RELAYMESH_MESH_KEY).
    mesh_key_file: Path | None = None
    prefix: str = Field("/relaymesh/v1/", pattern=r"^/.*/$")
    lease_ttl_s: int = Field(8, ge=2, le=3600)
    keepalive_interval_s: float = Field(2.0, gt=0)
    #: How long a peer whose relay died is remembered as LOST before it is forgotten.
    lost_grace_s: float = Field(30.0, ge=0)
    #: Links to other regions close after this long unused.
    link_idle_s: float = Field(60.0, gt=0)
    link_queue_packets: int = Field(4096, ge=1, le=1_000_000)
    #: Bytes queued per mesh link; over it (or link_queue_packets) new packets are dropped.
    link_queue_bytes: int = Field(16 * 1024 * 1024, ge=70 * 1024, le=16 * 1024**3)
    #: The host others use to reach this relay (default: the listen host, or 127.0.0.1).
    advertise_host: str | None = None
    #: `relaymesh relay` exits with an error if it is not registered in etcd this soon.
    start_timeout_s: float = Field(10.0, gt=0, le=3600)
    #: CA bundle (PEM) that other relays' certificates are verified with, for mesh links
    #: and health probes to wss:// and https:// relays. None: the system's trust store.
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _keepalive_within_ttl(self) -> MeshConfig:
        if self.keepalive_interval_s >= self.lease_ttl_s:
            raise ValueError("keepalive_interval_s must be shorter than lease_ttl_s")
        return self


class TLSConfig(_Frozen):
    """The relay's certificate: with both files set it serves wss:// and https:// only."""

    #: PEM certificate chain (leaf first) for both ports.
    cert_file: Path | None = None
    #: PEM private key of that certificate.
    key_file: Path | None = None
    #: How often the two files are checked for a change (reloaded when they change; SIGHUP
    #: reloads at once). 0: only on SIGHUP.
    reload_check_interval_s: float = Field(5.0, ge=0, le=3600)
    #: A TLS handshake longer than this is cut (the pre-auth deadline,
    #: [limits] handshake_timeout_s, bounds it too).
    handshake_timeout_s: float = Field(5.0, gt=0, le=600)

    @model_validator(mode="after")
    def _both_files(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class EtcdConfig(_Frozen):
    """How the relay reaches etcd ([mesh] etcd_endpoints): TLS and authentication."""

    #: CA bundle that etcd's server certificate is verified with; set it to use TLS.
    ca_file: Path | None = None
    #: Client certificate and key, for an etcd started with --client-cert-auth.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: etcd user (etcd's own auth, `etcdctl user add`); needs password_file.
    user: str | None = Field(None, min_length=1)
    #: A file holding that user's password (whitespace around it ignored).
    password_file: Path | None = None

    @model_validator(mode="after")
    def _pairs(self) -> EtcdConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("a client certificate needs ca_file (TLS)")
        if (self.user is None) != (self.password_file is None):
            raise ValueError("user and password_file go together")
        return self


class RegionMapConfig(_Frozen):
    #: The operator's region map (TOML, see config/regions.toml). None: built from the registry.
    file: Path | None = None
    #: An Ed25519 signing key (64 hex digits, the seed) to sign the served map. None: unsigned.
    signing_key_file: Path | None = None


class PublicConfig(_Frozen):
    """Where clients reach this relay, when that differs from where other relays do.

    ``[mesh] advertise_host`` and the listening ports are the mesh address: what
    other relays, the mesh monitor and Prometheus use inside the network. Behind
    a NAT, a container runtime's published ports or a load balancer, clients
    need another address: a public host name or IP and the published ports.
    The relay registers both; the region map it serves lists the public one.
    Unset values fall back to the mesh address.
    """

    #: The host name or IP clients connect to. None: the mesh address's host.
    host: str | None = Field(None, min_length=1)
    #: The published WebSocket port. None: the port the relay listens on.
    ws_port: int | None = Field(None, ge=1, le=65535)
    #: The published HTTP port. None: the HTTP port the relay listens on.
    http_port: int | None = Field(None, ge=1, le=65535)
    #: The published STUN port (UDP). None: the STUN port the relay listens on.
    stun_port: int | None = Field(None, ge=1, le=65535)

    @property
    def configured(self) -> bool:
        return any(v is not None for v in (self.host, self.ws_port, self.http_port, self.stun_port))


class HealthConfig(_Frozen):
    """The mesh-wide health view (relay/monitor.py, docs/health.md)."""

    #: Collect the mesh's status and run the probes (needs shared state).
    enabled: bool = True
    #: Seconds between collection rounds: every relay's status, one probe per path.
    interval_s: float = Field(5.0, ge=0.2, le=3600)
    #: A probe not answered within this is a failure.
    probe_timeout_s: float = Field(2.0, gt=0, le=60)
    #: Consecutive failed probes before a path is reported.
    probe_failures: int = Field(2, ge=1, le=100)
    #: At most this many relays are probed from here (cost bound); the rest are not probed.
    max_probe_targets: int = Field(128, ge=0, le=10_000)
    #: A relay whose status is older than this is down. 0: three intervals.
    stale_after_s: float = Field(0.0, ge=0)
    #: Dropped packets/s on one relay above which drops_high is reported.
    drops_high_per_s: float = Field(100.0, ge=0)
    #: A relay gone from the registry is shown as down for this long, then forgotten.
    forget_after_s: float = Field(600.0, ge=0)


class RelayConfig(_Frozen):
    relay: RelaySection = RelaySection()
    admission: AdmissionConfig = AdmissionConfig()
    limits: LimitsConfig = LimitsConfig()
    mesh: MeshConfig = MeshConfig()
    region_map: RegionMapConfig = RegionMapConfig()
    health: HealthConfig = HealthConfig()
    tls: TLSConfig = TLSConfig()
    etcd: EtcdConfig = EtcdConfig()
    public: PublicConfig = PublicConfig()


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for section, key in (
        ("relay", "key_file"),
        ("admission", "tokens_file"),
        ("mesh", "mesh_key_file"),
        ("region_map", "file"),
        ("region_map", "signing_key_file"),
        ("mesh", "ca_file"),
        ("tls", "cert_file"),
        ("tls", "key_file"),
        ("etcd", "ca_file"),
        ("etcd", "cert_file"),
        ("etcd", "key_file"),
        ("etcd", "password_file"),
    ):
        sec = raw.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            p = Path(sec[key]).expanduser()
            sec[key] = str(p if p.is_absolute() else base / p)


def _merge(raw: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section, values in overrides.items():
        sec = out.setdefault(section, {})
        if not isinstance(sec, dict):
            continue  # validation reports the bad section
        sec.update({k: v for k, v in values.items() if v is not None})
    return out


def load_config(
    path: Path | None = None, *, overrides: dict[str, dict[str, Any]] | None = None
) -> RelayConfig:
    """The configuration from ``path`` (or defaults) with ``overrides`` (CLI flags) on top."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        _resolve_paths(raw, path.parent)
    merged = _merge(raw, overrides or {})
    try:
        return RelayConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def load_tokens(path: Path) -> frozenset[str]:
    """Admission tokens from a file: one a line; ``#`` comments and blank lines ignored."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read tokens file: {exc.strerror}") from None
    tokens = frozenset(
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise ConfigError(f"{path}: tokens file lists no token")
    return tokens


def load_mesh_key(cfg: MeshConfig) -> bytes | None:
    """The mesh secret from ``mesh_key_file`` or ``RELAYMESH_MESH_KEY``; None if neither is set.

    Whitespace around it is ignored. It is never logged.
    """
    import os

    if cfg.mesh_key_file is not None:
        try:
            secret = cfg.mesh_key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"{cfg.mesh_key_file}: cannot read mesh key: {exc.strerror}"
            ) from None
        source = str(cfg.mesh_key_file)
    elif os.environ.get("RELAYMESH_MESH_KEY"):
        secret = os.environ["RELAYMESH_MESH_KEY"].strip().encode()
        source = "RELAYMESH_MESH_KEY"
    else:
        return None
    if len(secret) < 16:
        raise ConfigError(f"{source}: the mesh key must be at least 16 bytes")
    return secret
