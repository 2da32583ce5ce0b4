"""Broker configuration: frozen, validated, secure by default.

Loaded from an optional TOML file (``airlock-broker serve --config FILE``)::

    [broker]
    state_root = "/var/lib/airlock"  # 0700, the broker's alone; --state-dir, AIRLOCK_STATE_DIR
    max_concurrent_jobs = 2
    max_artifact_bytes = 17179869184    # 16 GiB per file (a model directory: per shard)
    unix_socket = "/run/airlock/broker.sock"   # local clients; "none": off (local_listeners.py)
    max_jobs_per_principal = 10      # default: max_concurrent_jobs + half of max_queued_jobs
    answer_drain_seconds = 600       # a caller not done reading its answer by then is cut off

    [sandbox]          # SandboxPolicy fields; weakening one is a visible diff here
    runtime = "runsc"
    memory_bytes = 8589934592
    host_account_check = "refuse"   # a host account on the sandbox uid:gid stops the broker

    [output]           # OutputLimits fields
    max_onnx_bytes = 268435456

    [onnx_validator]   # ValidatorSettings: the processes that parse ONNX outputs, not the broker
    processes = 2
    timeout_seconds = 60.0

    [pools]            # PoolSettings fields; min_warm = 0 turns warm pools off
    min_warm = 1

    [provenance]       # the ECDSA P-256 key that signs every output's provenance
    key_path = "/var/lib/airlock/provenance-signing-key.pem"   # default: in the state root

    [idempotency]      # IdempotencySettings fields; ttl_seconds = 0 turns de-duplication off
    ttl_seconds = 600
    max_entries = 1024
    max_bytes = 1073741824

    [local_transfer]   # LocalTransferSettings: same-host fast path (descriptors on a Unix socket)
    enabled = true
    socket_path = "/run/airlock/transfer.sock"    # default: beside the Unix socket
    allowed_filesystems = ["ext4", "xfs", "btrfs", "tmpfs", "overlay"]   # never FUSE/NFS
    output_filesystems = ["ext4", "xfs", "btrfs"]   # disk only: tmpfs pages are the broker's

    [spool]            # SpoolSettings (input_room.py): inputs that fit go to a RAM spool
    ram_bytes = 4294967296          # default: a quarter of the host's memory, at most 8 GiB; 0: off

    [upload]           # UploadLimits: minimum rate and total deadline, spool free-space reserve
    min_bytes_per_second = 1048576
    grace_seconds = 10.0
    spool_min_free_bytes = 1073741824

    [auth]             # AuthConfig (auth_config.py): TLS, mutual TLS, hashed bearer tokens
    tls_cert = "server.crt"

    [rpc]              # RpcLimits (exposure.py): the gRPC server's own bounds
    max_concurrent_rpcs = 256
    max_streams_per_connection = 256
    max_open_streams = 16              # Health.Watch and reflection streams (open to anyone)
    max_connection_age_seconds = 3600
    connection_age_grace_seconds = 1800
    max_stuck_answers_per_peer = 64    # answers a peer did not let out, counted for age + grace

    [observability]    # for measuring, not for production: off by default
    trace_events = "/var/lib/airlock/events.jsonl"   # each job step's begin, end (tracing.py)

Without ``[auth]`` the broker accepts anyone, so it may listen only on loopback
(``check_listen``); ``insecure_no_auth`` lifts that, visibly. Metrics, too, are served on
loopback only, unless ``metrics_public`` (``--metrics-public``) says otherwise.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from airlock_broker.conversion.idempotency import IdempotencySettings
from airlock_broker.conversion.input_room import SpoolSettings
from airlock_broker.conversion.output_room import OutputRooms
from airlock_broker.conversion.upload_limits import UploadLimits
from airlock_broker.fastpath.local_transfer import LocalTransferSettings
from airlock_broker.sandboxes.pool_settings import PoolSettings
from airlock_broker.security.auth_config import AuthConfig, check_listen
from airlock_broker.security.exposure import (
    RpcLimits,
    check_metrics_listen,
    check_unix_socket,
    default_unix_socket,
    unix_socket_setting,
)
from airlock_broker.security.keys import KEY_FILE_NAME
from airlock_broker.security.state_dirs import SOCKETS_DIR, default_state_root
from airlock_broker.security.trusted_files import read_trusted_file
from airlock_broker.validation.limits import OutputLimits
from airlock_broker.validation.onnx_pool import ValidatorSettings
from airlock_sandbox.policy import GiB, MiB, SandboxPolicy

DEFAULT_LISTEN = "127.0.0.1:50051"


def _default_state_root() -> Path:
    if "AIRLOCK_SPOOL_DIR" in os.environ:  # the old, /tmp-based setting: say what replaced it
        raise ValueError("AIRLOCK_SPOOL_DIR is no longer read: the spool lives in the state "
                         "root (AIRLOCK_STATE_DIR, --state-dir or [broker] state_root; default "
                         "/var/lib/airlock as root), which must be the broker's alone. Unset it")
    return default_state_root()


@dataclass(frozen=True)
class BrokerConfig:
    """Everything the broker needs to know; every limit has a finite default."""

    listen: str = DEFAULT_LISTEN
    #: Prometheus metrics endpoint (``HOST:PORT``); None: not served.
    metrics_listen: str | None = None
    #: Serve metrics beyond loopback (they show load and failure reasons). A weakening.
    metrics_public: bool = False
    #: Local clients' socket, each caller named by its uid; None: none. Default
    #: ``/run/airlock/broker.sock`` as root (AIRLOCK_SOCKET overrides; "none" turns it off).
    unix_socket: Path | None = field(default_factory=default_unix_socket)
    #: Everything the broker keeps: spool, results, slots, audit log, key (state_dirs.py).
    #: Root-owned 0700 ``/var/lib/airlock`` as root, ``$XDG_STATE_HOME/airlock`` otherwise;
    #: ``AIRLOCK_STATE_DIR`` / ``--state-dir`` override. Checked at start-up.
    state_root: Path = field(default_factory=_default_state_root)
    max_concurrent_jobs: int = 2
    #: Jobs that may wait for a slot; beyond this a request is refused with BUSY.
    max_queued_jobs: int = 16
    #: One input file (a model directory sends each weights file as its own job). The spool
    #: is disk, its reserve checked before an upload starts (spool_space.py), or for inputs
    #: that fit ``[spool] ram_bytes`` the RAM spool (input_room.py); what a job can
    #: *output* is bounded by ``sandbox.output_bytes`` (RAM) instead: ``job_output_limits``.
    max_artifact_bytes: int = 16 * GiB
    #: Response chunk size; well under gRPC's 4 MiB message cap.
    chunk_bytes: int = 1 * MiB
    #: Largest request chunk accepted.
    max_request_chunk_bytes: int = 2 * MiB
    #: A client that sends nothing for this long loses its job.
    upload_idle_seconds: float = 60.0
    #: Ceiling for a caller's ``timeout_seconds`` (the policy's deadline is the default).
    max_job_seconds: float = 600.0
    #: Jobs one principal may have admitted at once (BUSY beyond). None: every sandbox and
    #: half of the queue, so one caller can keep the sandboxes busy and others still queue.
    max_jobs_per_principal: int | None = None
    #: How long an answer may take to reach its caller once the job is done (sandboxes
    #: already released); then the call is cancelled (DEADLINE_EXCEEDED) and its copy removed.
    #: 10 minutes: a 2 GiB output at 3.5 MB/s, a slow WAN link (on the same host the answer
    #: is a kernel copy into the caller's file: GiB per second).
    answer_drain_seconds: float = 600.0
    #: On SIGTERM: how long health says NOT_SERVING (and new jobs are refused) while the
    #: listener stays open, so load balancers notice before connections are refused.
    shutdown_drain_seconds: float = 2.0
    #: Then: how long jobs in flight may take to finish before they are cancelled.
    shutdown_grace_seconds: float = 30.0
    #: Read zip checkpoints a second time, executing nothing, and compare (DESIGN §5).
    verify_integrity: bool = True
    #: Run the isolation self-test before serving (health stays NOT_SERVING until it passes).
    selftest_on_start: bool = True
    #: One JSON line per job; default ``<state_root>/audit.jsonl`` (AIRLOCK_AUDIT_LOG overrides).
    audit_log: Path | None = None
    #: Provenance signing key; default ``<state_root>/provenance-signing-key.pem``
    #: (AIRLOCK_PROVENANCE_KEY overrides).
    provenance_key: Path | None = None
    #: ``[observability] trace_events``: append a JSON line at each job step's begin and end
    #: there (tracing.py; what ``bench.profile`` reads). None: off, the hooks cost nothing.
    trace_events: Path | None = None
    sandbox: SandboxPolicy = field(default_factory=SandboxPolicy)
    output: OutputLimits = field(default_factory=OutputLimits)
    onnx_validator: ValidatorSettings = field(default_factory=ValidatorSettings)
    pools: PoolSettings = field(default_factory=PoolSettings)
    idempotency: IdempotencySettings = field(default_factory=IdempotencySettings)
    auth: AuthConfig = field(default_factory=AuthConfig)
    local_transfer: LocalTransferSettings = field(default_factory=LocalTransferSettings)
    upload: UploadLimits = field(default_factory=UploadLimits)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    rpc: RpcLimits = field(default_factory=RpcLimits)

    def __post_init__(self) -> None:
        check_listen(self.listen, self.auth)
        check_metrics_listen(self.metrics_listen, self.metrics_public)
        check_unix_socket(self.unix_socket)
        for name in ("max_concurrent_jobs", "max_artifact_bytes", "chunk_bytes",
                     "max_request_chunk_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_queued_jobs < 0:
            raise ValueError("max_queued_jobs must be >= 0")
        if self.chunk_bytes > 3 * MiB or self.max_request_chunk_bytes > 3 * MiB:
            raise ValueError("chunks must stay well under gRPC's 4 MiB message limit")
        if self.upload_idle_seconds <= 0 or self.max_job_seconds <= 0 \
                or self.answer_drain_seconds <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_jobs_per_principal is not None and self.max_jobs_per_principal < 1:
            raise ValueError("max_jobs_per_principal must be at least 1")

    @property
    def jobs_per_principal(self) -> int:
        """The effective ``max_jobs_per_principal``."""
        if self.max_jobs_per_principal is not None:
            return self.max_jobs_per_principal
        return self.max_concurrent_jobs + (self.max_queued_jobs + 1) // 2

    @property
    def output_rooms(self) -> OutputRooms:
        """What each job's output room is decided from (conversion/output_room.py): the
        validator's caps, the sandbox's output tmpfs and its largest disk-backed output. The
        worker gets its job's cap in the job spec (and refuses a larger output before writing
        it, with both numbers); the broker checks it again on what the dead sandbox left."""
        return OutputRooms(self.output, tmpfs_bytes=self.sandbox.output_bytes,
                           disk_max_bytes=self.sandbox.disk_output_bytes)

    @property
    def job_output_limits(self) -> OutputLimits:
        """The caps of a job whose output fits the sandbox's output tmpfs: ``output`` with
        ``max_output_bytes`` no larger than it. ONNX keeps its own, lower ``max_onnx_bytes``."""
        return self.output_rooms.tmpfs.limits

    @property
    def spool_root(self) -> Path:
        """Where uploads/, results/ and slots/ live: the state root itself (and the RAM
        spool, when mounted, at its ``ram/``)."""
        return self.state_root

    @property
    def audit_path(self) -> Path:
        env = os.environ.get("AIRLOCK_AUDIT_LOG")
        return self.audit_log or (Path(env) if env else self.state_root / "audit.jsonl")

    @property
    def provenance_key_path(self) -> Path:
        env = os.environ.get("AIRLOCK_PROVENANCE_KEY")
        return self.provenance_key or (Path(env) if env else self.state_root / KEY_FILE_NAME)

    @property
    def transfer_socket_path(self) -> Path:
        """The fast path's socket: configured, else beside the Unix socket, else in the
        state root's ``sockets/`` (reachable by the broker's own user only)."""
        if self.local_transfer.socket_path is not None:
            return self.local_transfer.socket_path
        if self.unix_socket is not None:
            return self.unix_socket.parent / "transfer.sock"
        return self.state_root / SOCKETS_DIR / "transfer.sock"

    @classmethod
    def load(cls, path: Path | None = None, *, insecure_no_auth: bool = False,
             **overrides: Any) -> BrokerConfig:
        """Defaults, then the TOML file (if any), then explicit overrides.

        ``insecure_no_auth`` is ``airlock-broker serve --insecure-no-auth``; it is applied
        before the listen address is checked, which happens once, on the final configuration.
        """
        doc: dict[str, Any] = {}
        if path is not None:
            doc = tomllib.loads(read_trusted_file(path, "the configuration file").decode())
        unknown = set(doc) - {"broker", "sandbox", "output", "onnx_validator", "pools",
                              "provenance", "auth", "idempotency", "local_transfer", "upload",
                              "spool", "rpc", "observability"}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        broker = dict(doc.get("broker", {}))
        for key in ("state_root", "audit_log"):
            if key in broker:
                broker[key] = Path(broker[key])
        if "unix_socket" in broker:
            broker["unix_socket"] = unix_socket_setting(broker["unix_socket"])
        _check_keys(cls, broker, "broker", skip={"sandbox", "output", "onnx_validator", "pools",
                                                 "provenance_key", "auth", "idempotency",
                                                 "local_transfer", "upload", "spool",
                                                 "rpc", "trace_events"})
        observability = dict(doc.get("observability", {}))
        if set(observability) - {"trace_events"}:
            raise ValueError("unknown keys in [observability]: "
                             f"{sorted(set(observability) - {'trace_events'})}")
        if "trace_events" in observability:
            broker["trace_events"] = Path(observability["trace_events"])
        upload_doc = dict(doc.get("upload", {}))
        _check_keys(UploadLimits, upload_doc, "upload")
        spool_doc = dict(doc.get("spool", {}))
        _check_keys(SpoolSettings, spool_doc, "spool")
        local_doc = dict(doc.get("local_transfer", {}))
        _check_keys(LocalTransferSettings, local_doc, "local_transfer")
        if "socket_path" in local_doc:
            local_doc["socket_path"] = Path(local_doc["socket_path"])
        idem_doc = dict(doc.get("idempotency", {}))
        _check_keys(IdempotencySettings, idem_doc, "idempotency")
        rpc_doc = dict(doc.get("rpc", {}))
        _check_keys(RpcLimits, rpc_doc, "rpc")
        provenance_doc = dict(doc.get("provenance", {}))
        unknown_prov = set(provenance_doc) - {"key_path"}
        if unknown_prov:
            raise ValueError(f"unknown keys in [provenance]: {sorted(unknown_prov)}")
        if "key_path" in provenance_doc:
            broker["provenance_key"] = Path(provenance_doc["key_path"])
        pools_doc = dict(doc.get("pools", {}))
        _check_keys(PoolSettings, pools_doc, "pools")
        if "profiles" in pools_doc:
            pools_doc["profiles"] = tuple(pools_doc["profiles"])
        sandbox_doc = doc.get("sandbox", {})
        _check_keys(SandboxPolicy, sandbox_doc, "sandbox")
        output_doc = dict(doc.get("output", {}))
        _check_keys(OutputLimits, output_doc, "output")
        validator_doc = dict(doc.get("onnx_validator", {}))
        if "max_jobs_per_process" in validator_doc:
            raise ValueError("[onnx_validator] max_jobs_per_process is gone: every ONNX "
                             "validator now serves one validation; remove the line")
        _check_keys(ValidatorSettings, validator_doc, "onnx_validator")
        if "allowed_onnx_domains" in output_doc:
            output_doc["allowed_onnx_domains"] = frozenset(output_doc["allowed_onnx_domains"])
        if "security_opts" in sandbox_doc:
            sandbox_doc = {**sandbox_doc, "security_opts": tuple(sandbox_doc["security_opts"])}
        auth = AuthConfig.from_toml(dict(doc.get("auth", {})),
                                    path.parent if path is not None else Path.cwd())
        if insecure_no_auth:
            auth = replace(auth, insecure_no_auth=True)
        return cls(sandbox=SandboxPolicy(**sandbox_doc), output=OutputLimits(**output_doc),
                   onnx_validator=ValidatorSettings(**validator_doc),
                   pools=PoolSettings(**pools_doc), auth=auth,
                   idempotency=IdempotencySettings(**idem_doc),
                   local_transfer=LocalTransferSettings(**local_doc),
                   upload=UploadLimits(**upload_doc), spool=SpoolSettings(**spool_doc),
                   rpc=RpcLimits(**rpc_doc),
                   **{**broker, **overrides})


def _check_keys(cls: type, doc: dict[str, Any], section: str, skip: set[str] | None = None) -> None:
    known = {f.name for f in fields(cls)} - (skip or set())
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"unknown keys in [{section}]: {sorted(unknown)}")


__all__ = ["DEFAULT_LISTEN", "BrokerConfig", "MiB"]
