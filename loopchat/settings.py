"""One settings object for the whole service.

Values come from, highest priority first: constructor arguments, LOOPCHAT_* environment
variables, a YAML file named by LOOPCHAT_CONFIG_FILE, then the defaults below.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from loopchat.names import ALIAS_MODEL

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
# The alias clients use to get whichever model version is active (A/B routing plugs in here).

_PLACEHOLDER_SECRETS = {
    "",
    "changeme",
    "change-me",
    "secret",
    "admin",
    "password",
    "token",
    "test",
    "replace_me",
    "replace-me",
    "replaceme",
}


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only: 127.0.0.0/8, ::1, localhost."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False  # another host name (or "" for every address): assume the network sees it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class EngineSettings(BaseSettings):
    """vLLM engine options. `None` means: pick the default for the hardware found."""

    model_config = SettingsConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), float32 "
        "on other CPUs (where bf16 is emulated, 3-10x slower).",
    )
    max_model_len: int | None = Field(
        4096, ge=64, description="Context length in tokens; None uses the model's own."
    )
    enforce_eager: bool | None = Field(
        None,
        description="True: no compilation (a faster start, a slower engine). None: vLLM's default, "
        "torch.compile on CPU (about 10% more tokens/s here, about 50 s more for a first start; "
        "later starts reuse the compile cache), CUDA graphs on GPU.",
    )
    kv_cache_space_gib: int = Field(
        1, ge=1, description="CPU only: whole GiB reserved for the KV cache (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU only.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over.")
    max_num_seqs: int = Field(64, ge=1, description="Concurrent sequences the scheduler runs.")
    merge_active: bool = Field(
        True,
        description="Fold the active version's adapter into the engine's weights (reloaded in place "
        "at promotion), so it serves at the base model's speed; every other version is served as "
        "its exact LoRA delta over them. False: the base weights stay, each version is its adapter.",
    )
    lora: Literal["auto", "on_demand", "always"] = Field(
        "auto",
        description="on_demand: the engine runs without LoRA (at the base model's speed) while no "
        "adapter is needed, and a replacement engine sized to the adapters in use (a canary, an "
        "unmerged active version, versions requested by name) is built beside it when one is, then "
        "swapped in without failing an answer; dropped again after lora_idle_s unused. Needs room "
        "for two engines while switching (CPU). always: LoRA room of max_loras x max_lora_rank from "
        "the start. auto: on_demand on CPUs, always on GPUs.",
    )
    lora_idle_s: float = Field(
        600, gt=0, description="on_demand: seconds without a LoRA request before LoRA is dropped."
    )
    cpu_lora_ops: Literal["grouped", "vllm"] = Field(
        "grouped",
        description="CPU only. grouped: each step computes LoRA only for the tokens of requests with an "
        "adapter, one matrix product per adapter (serving/engine/cpu_lora.py); a step without any costs "
        "nothing; an engine with LoRA stays compiled. vllm: vLLM's own CPU ops, which cost every step of "
        "an engine with LoRA room and run it eagerly.",
    )
    max_loras: int = Field(
        4,
        ge=1,
        description="Most adapters resident in one batch (on_demand: an upper bound, the room is "
        "sized to the adapters in use). On CPU every batch costs in proportion to the LoRA room "
        "(slots x rank), used or not.",
    )
    max_lora_rank: int = Field(64, ge=1, description="Largest adapter rank accepted.")
    max_cpu_loras: int | None = Field(None, description="Adapters cached in host memory.")
    seed: int = 0
    sampled_logprobs: bool = Field(
        True, description="Ask the engine for the sampled tokens' log-probabilities (confidence)."
    )
    warmup: bool = Field(True, description="Run one short request before reporting ready.")
    engine_cpu_nice: int | None = Field(
        None,
        ge=0,
        le=19,
        description="Nice value of the engine's own processes. None: 10 on CPU (the API process, "
        "which parses requests, streams tokens and stores ratings, goes first when both want a "
        "core), 0 on GPU. Has no effect while a core is free.",
    )


class OpenAISettings(BaseSettings):
    """vLLM's OpenAI serving layer: the options `vllm serve` takes for chat and completions."""

    model_config = SettingsConfigDict(extra="forbid")

    chat_template: Path | None = Field(
        None,
        description="Jinja chat template file (vLLM's --chat-template). None: the model's own (the "
        "embedded model's renders tools in the Hermes format).",
    )
    tool_call_parser: str | None = Field(
        "hermes",
        description="vLLM tool-call parser for `tool_choice: auto` (e.g. hermes, llama3_json, mistral, "
        "pythonic); None refuses auto tool choice. Named and required tool choices need no parser.",
    )
    vllm_args: list[str] = Field(
        default_factory=list,
        description="Further `vllm serve` frontend flags, as on its command line "
        '(e.g. ["--chat-template-content-format", "openai"]).',
    )


class FeedbackSettings(BaseSettings):
    """Conversation logging, ratings and PII redaction."""

    model_config = SettingsConfigDict(extra="forbid")

    log_completions: bool = Field(True, description="Record every completion in the database.")
    redact: Literal["storage", "export"] = Field(
        "storage",
        description="storage: PII is replaced before anything is written; export: stored as sent, "
        "replaced when exported.",
    )
    custom_patterns: dict[str, str] = Field(
        default_factory=dict,
        description="Extra PII patterns, name -> regular expression (placeholder <NAME>).",
    )
    batch_size: int = Field(256, ge=1, le=10_000, description="Most records the writer commits at once.")
    flush_interval_ms: float = Field(
        20, ge=0, le=10_000, description="Longest a record waits for its batch to fill."
    )
    queue_size: int = Field(
        100_000, ge=100, description="Records held in memory before logging spills to the spool."
    )
    queue_bytes: int = Field(
        256 * 2**20,
        ge=2**20,
        description="Bytes of text held in memory before logging spills to the spool (with queue_size).",
    )
    redact_workers: int = Field(
        2, ge=1, le=64, description="Threads that redact records before they are queued."
    )
    max_spool_bytes: int = Field(
        2**30,
        ge=2**20,
        description="Size cap of the on-disk spool; past it ratings get 503 and log records are dropped "
        '(counted in loopchat_feedback_records_total{outcome="dropped"}).',
    )
    rejected_retention_days: float = Field(
        30,
        gt=0,
        description="How long records the database refused stay in spool/rejected/ for inspection.",
    )
    retry_interval_s: float = Field(
        5, gt=0, description="How often the writer retries the database after an outage."
    )
    max_comment_chars: int = Field(2000, ge=1)
    max_correction_chars: int = Field(8000, ge=1)
    max_tags: int = Field(16, ge=0)


class ABSettings(BaseSettings):
    """The model registry and A/B experiments."""

    model_config = SettingsConfigDict(extra="forbid")

    poll_interval_s: float = Field(
        2.0, gt=0, le=3600, description="How often a process checks the registry for changes."
    )
    evaluate: bool = Field(True, description="Evaluate the running experiment in this process.")
    evaluation_interval_s: float = Field(
        30.0, gt=0, description="How often the running experiment is evaluated (promote / roll back / ramp)."
    )
    experiments_file: Path | None = Field(
        None, description="YAML file of experiments started at start-up unless they already exist."
    )


class RetrainSettings(BaseSettings):
    """Retraining inside the serving process (or a separate `loopchat retrain --schedule` job)."""

    model_config = SettingsConfigDict(extra="forbid")

    schedule: bool = Field(False, description="Run scheduled retraining in this process.")
    config_file: Path | None = Field(
        None, description="Retraining config (YAML); default: built-in defaults."
    )
    check_interval_s: float = Field(600, gt=0, description="How often the schedule is checked.")


class AccessSettings(BaseSettings):
    """API keys on the /v1 routes (`loopchat keys create|list|revoke`)."""

    model_config = SettingsConfigDict(extra="forbid")

    require_keys: bool | None = Field(
        None,
        description="Refuse /v1 requests without a key. None: required outside development. "
        "Development mode binds a non-loopback host only with this set to true.",
    )
    key_requests_per_minute: int = Field(
        600, ge=1, description="A key's request rate unless it sets its own."
    )
    key_max_concurrent: int = Field(
        64, ge=1, description="A key's requests in flight unless it sets its own."
    )
    key_cache_s: float = Field(
        30.0, gt=0, description="How long a key lookup is cached: a revocation takes effect within it."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web origins allowed to call the API from a browser, besides those of public keys.",
    )


class LimitsSettings(BaseSettings):
    """Caps on what one request may ask for; refused with 400 (413 for the body) before the engine
    sees anything."""

    model_config = SettingsConfigDict(extra="forbid")

    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted.")
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request.")
    max_message_chars: int = Field(65_536, ge=1, description="Longest message (characters).")
    max_completion_tokens: int = Field(
        4096, ge=1, description="Most tokens one completion may ask for (max_tokens); also the default."
    )
    max_choices: int = Field(16, ge=1, description="Most choices (`n`) one chat request may ask for.")


class MonitoringSettings(BaseSettings):
    """Prometheus metrics."""

    model_config = SettingsConfigDict(extra="forbid")

    sample_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often engine and writer gauges are sampled between scrapes "
        "(what other workers report in multiprocess mode).",
    )
    database_refresh_s: float = Field(
        15.0,
        gt=0,
        description="How often retraining runs and A/B decisions are read from the database for /metrics.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LOOPCHAT_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Field(Path(".data"), description="Models, caches, database, adapters.")
    base_model: Path | None = Field(
        None,
        description="HF model folder to serve. Default: the embedded SmolLM2 under data_dir.",
    )
    served_model_name: str | None = Field(
        None, description="Name of the base model in the API; default: the folder's name."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /admin routes; admin routes are off without one."
    )
    active_model: str | None = Field(
        None,
        description=f"Model version the alias `{ALIAS_MODEL}` serves when the registry has no active "
        "version yet; default: the base.",
    )
    adapters: dict[str, Path] = Field(
        default_factory=dict,
        description="Adapters (name -> folder) registered at start-up unless the registry has them.",
    )
    engine: EngineSettings = Field(default_factory=EngineSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL (postgresql+psycopg://user@host/db); default: SQLite in data_dir.",
    )
    auto_migrate: bool = Field(True, description="Apply database migrations at start-up.")
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    ab: ABSettings = Field(default_factory=ABSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("LOOPCHAT_CONFIG_FILE")
        if config_file:
            if not Path(config_file).is_file():
                raise ValueError(f"LOOPCHAT_CONFIG_FILE={config_file} is not a file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _refuse_open_development_server(self) -> Settings:
        # Development mode needs no API key on /v1: on an address other machines reach, that
        # would hand the model (and everyone's logged conversations) to the network.
        if (
            self.environment == "development"
            and self.access.require_keys is not True
            and not is_loopback(self.host)
        ):
            raise ValueError(
                f"host {self.host!r} is not a loopback address, and development mode serves /v1 "
                "without API keys. Either require keys (access.require_keys: true, "
                "LOOPCHAT_ACCESS__REQUIRE_KEYS=true; create them with `loopchat keys create`), "
                "run in production (LOOPCHAT_ENVIRONMENT=production), or bind 127.0.0.1"
            )
        return self

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        exposed = self.environment != "development" or not is_loopback(self.host)
        if exposed and self.admin_token is not None:
            token = self.admin_token.get_secret_value()
            if token.lower() in _PLACEHOLDER_SECRETS or len(token) < 16:
                raise ValueError(
                    "admin_token is a placeholder or shorter than 16 characters; "
                    "set a real secret outside development or on a non-loopback host"
                )
        if self.environment != "development" and self.database_url:
            password = urlsplit(self.database_url).password
            if password is not None and password.lower() in _PLACEHOLDER_SECRETS:
                raise ValueError(
                    "database_url has a placeholder password; set the database's real one outside development"
                )
        return self

    @property
    def keys_required(self) -> bool:
        if self.access.require_keys is not None:
            return self.access.require_keys
        return self.environment != "development"

    @property
    def model_path(self) -> Path:
        if self.base_model is not None:
            return self.base_model.expanduser().resolve()
        return self.data_dir / "models" / EMBEDDED_MODEL_NAME

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path.name

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'loopchat.db'}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def vllm_cache_dir(self) -> Path:
        return self.data_dir / "cache" / "vllm"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
