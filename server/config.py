"""One Settings object, read from CACHEASIDE_* environment variables (see the README's table)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./cacheaside.db"
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_FAMILY_TIERS = (
    "trending=hot,archived=cold,post=warm,user=warm,posts_by_author=warm,comments_by_author=warm"
)


class Tier(StrEnum):
    """A TTL class; each key family belongs to one."""

    HOT = "hot"
    WARM = "warm"
    COLD = "cold"


class Settings(BaseSettings):
    """Every knob of the service. Units are in the names; the README documents each."""

    model_config = SettingsConfigDict(env_prefix="CACHEASIDE_", extra="ignore", frozen=True)

    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    database_schema: str = ""
    db_timeout_ms: int = Field(default=2000, gt=0)
    db_pool_size: int = Field(default=10, gt=0)
    redis_url: str = ""
    redis_timeout_ms: int = Field(default=100, gt=0)
    redis_cluster: bool = False
    redis_max_connections: int = Field(default=64, gt=0)
    redis_breaker_failures: int = Field(default=3, gt=0)
    redis_breaker_cooldown_ms: int = Field(default=1000, gt=0)
    key_prefix: str = Field(default="cacheaside", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ttl_hot_s: int = Field(default=60, gt=0)
    ttl_warm_s: int = Field(default=300, gt=0)
    ttl_cold_s: int = Field(default=1800, gt=0)
    ttl_negative_s: int = Field(default=5, ge=0)
    ttl_jitter_pct: float = Field(default=10.0, ge=0, lt=50)
    family_tiers: Annotated[dict[str, Tier], NoDecode] = Field(
        default_factory=lambda: _parse_tiers(DEFAULT_FAMILY_TIERS)
    )
    leases: bool = True
    lease_ttl_ms: int = Field(default=3000, gt=0)
    max_stale_s: int = Field(default=600, ge=0)
    db_error_backoff_ms: int = Field(default=1000, ge=0)
    xfetch_beta_hot: float = Field(default=1.0, ge=0)
    xfetch_beta_warm: float = Field(default=1.0, ge=0)
    xfetch_beta_cold: float = Field(default=1.0, ge=0)
    near_cache_entries: int = Field(default=10_000, ge=0)
    near_cache_ttl_ms: int = Field(default=1000, gt=0)
    near_cache_answer_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    auto_invalidate: bool = True
    outbox_poll_ms: int = Field(default=1000, gt=0)
    outbox_batch: int = Field(default=500, gt=0)
    warm_on_start: bool = True
    warm_interval_s: int = Field(default=0, ge=0)
    warm_posts: int = Field(default=20, gt=0)
    warm_users: int = Field(default=50, gt=0)
    warm_active_within_s: int = Field(default=86400, gt=0)
    warm_batch: int = Field(default=50, gt=0, le=1000)
    warm_concurrency: int = Field(default=2, gt=0)
    warm_rate_per_s: float = Field(default=2000, gt=0)
    # Warm in a child process at idle CPU priority, so warming only ever uses CPU live calls leave.
    warm_worker: bool = True
    # The warm worker's Redis timeout. At idle priority it reads Redis's replies only when a core is
    # free, so on a busy server the live path's timeout would fail warms when they matter most. Below
    # the default lease TTL, so a fill delayed this long still holds its lease, and below the worker's
    # stop timeout (warm_worker.py), so a release on a hung Redis never outlasts a stop.
    warm_redis_timeout_ms: int = Field(default=2000, gt=0)
    shutdown_grace_s: float = Field(default=5.0, ge=0)
    log_level: str = "INFO"
    # Platform: health, metrics, logs, workers, auth and TLS (the README's table documents each).
    health_interval_ms: int = Field(default=1000, gt=0)
    reflection: bool = True
    metrics_listen: str = ""
    health_listen: str = ""
    log_format: Literal["json", "text"] = "json"
    workers: int = Field(default=1, ge=1, le=64)
    # Off by default: in a container limited by CPU quota rather than a cpuset, every replica sees
    # the whole host's CPUs and pinning would stack them all on the same few.
    pin_workers: bool = False
    event_loop: Literal["asyncio", "uvloop"] = "uvloop"
    admin_token: SecretStr = SecretStr("")
    read_token: SecretStr = SecretStr("")
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Bounds and the consistency audit (the README's "Bounded and audited" section explains each).
    max_receive_message_bytes: int = Field(default=1_048_576, ge=1024)
    max_send_message_bytes: int = Field(default=4_194_304, ge=1024)
    max_concurrent_rpcs: int = Field(default=1000, ge=0)
    max_pending_rpcs: int = Field(default=1000, ge=1)
    max_concurrent_loads: int = Field(default=10, ge=0)
    load_queue_ms: int = Field(default=200, ge=0)
    max_waiting_misses: int = Field(default=500, ge=0)
    audit_interval_s: float = Field(default=60, ge=0)
    audit_samples: int = Field(default=10, gt=0, le=1000)
    audit_grace_ms: int = Field(default=1000, ge=0)

    @model_validator(mode="after")
    def _lease_outlives_a_load(self) -> Settings:
        # A lease shorter than a load would let a second instance take over a live holder's key.
        if self.lease_ttl_ms <= self.db_timeout_ms:
            raise ValueError(
                f"CACHEASIDE_LEASE_TTL_MS ({self.lease_ttl_ms}) must exceed CACHEASIDE_DB_TIMEOUT_MS "
                f"({self.db_timeout_ms}), or a slow load would be taken over while it still runs"
            )
        return self

    @model_validator(mode="after")
    def _probe_port_apart(self) -> Settings:
        # With workers the ports are bound with SO_REUSEPORT: the same address would not fail to bind,
        # it would split the service's connections between it and the health-only server.
        if self.health_listen and self.health_listen == self.listen:
            raise ValueError(
                f"CACHEASIDE_HEALTH_LISTEN ({self.health_listen}) must differ from CACHEASIDE_LISTEN: the "
                "probe port serves health alone"
            )
        return self

    @field_validator("family_tiers", mode="before")
    @classmethod
    def _tiers_from_text(cls, value: object) -> object:
        if isinstance(value, str):
            return {**_parse_tiers(DEFAULT_FAMILY_TIERS), **_parse_tiers(value)}
        return value

    def ttl_s(self, tier: Tier) -> int:
        """The base TTL of a tier, before jitter."""
        return {Tier.HOT: self.ttl_hot_s, Tier.WARM: self.ttl_warm_s, Tier.COLD: self.ttl_cold_s}[tier]

    def xfetch_beta(self, tier: Tier) -> float:
        """How eagerly keys of a tier are refreshed before expiry (0: never early)."""
        return {
            Tier.HOT: self.xfetch_beta_hot,
            Tier.WARM: self.xfetch_beta_warm,
            Tier.COLD: self.xfetch_beta_cold,
        }[tier]

    def tier_of(self, family: str) -> Tier:
        """The tier a key family is cached in."""
        return self.family_tiers[family]


def _parse_tiers(text: str) -> dict[str, Tier]:
    tiers: dict[str, Tier] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, tier = item.partition("=")
        if not sep:
            raise ValueError(f"CACHEASIDE_FAMILY_TIERS entry {item!r} must look like family=tier")
        tiers[name.strip()] = Tier(tier.strip())
    return tiers
