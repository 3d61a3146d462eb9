"""Tables of the conversation log and the ratings (SQLModel), and their public shapes.

A completion row holds everything the loop later needs about one served answer: the prompt
messages, the answer, what served it, how it was sampled, how fast and how confident it was.
Ratings keep one current row per (completion, user) and an append-only history beside it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, ForeignKey, Index, String, UniqueConstraint, text
from sqlmodel import Field, SQLModel

# Ratings by clients without a user key share this key: one current rating per completion.
ANONYMOUS = ""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _timestamp(*, index: bool = False) -> Any:
    return Field(
        default_factory=utcnow,
        sa_type=DateTime(timezone=True),
        nullable=False,
        index=index,
    )


def _completion_fk(*, index: bool = True) -> Any:
    return Field(
        sa_column_args=[ForeignKey("completion.id", ondelete="CASCADE")],
        max_length=64,
        index=index,
    )


class Conversation(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=128)
    user_key: str = Field(default=ANONYMOUS, max_length=256, index=True)
    created_at: datetime = _timestamp()
    last_active_at: datetime = _timestamp(index=True)


class Completion(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    conversation_id: str = Field(
        sa_column_args=[ForeignKey("conversation.id", ondelete="CASCADE")], max_length=128, index=True
    )
    user_key: str = Field(default=ANONYMOUS, max_length=256, index=True)
    created_at: datetime = _timestamp(index=True)
    model_version: str = Field(max_length=128, index=True)
    # Filled by A/B routing; empty when no experiment served the request.
    experiment: str = Field(default="", max_length=128, index=True)
    variant: str = Field(default="", max_length=128)
    # Side-by-side answers to one prompt share a pair id.
    pair_id: str | None = Field(default=None, max_length=64, index=True)
    messages: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    prompt_hash: str = Field(max_length=64, index=True)
    response: str = ""
    # The tools the request offered (OpenAI function definitions) and the calls the answer made,
    # as the API returned them; None when the request had no tools / the answer made no call.
    tools: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    tool_calls: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    sampling: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float | None = None
    ttft_ms: float | None = None
    finish_reason: str | None = Field(default=None, max_length=32)
    logprob_mean: float | None = None
    logprob_min: float | None = None
    error: str | None = Field(default=None, sa_type=String(1024))
    redacted: bool = False
    # The API key's site that asked (None: no key, development mode); ratings stay within it.
    site: str | None = Field(default=None, max_length=64, index=True)
    # live: served here; import: an answer from an imported transcript (import_batch says which
    # file); paraphrase: an imported user turn reworded by the serving model, for training only
    # (origin_id: the completion it rewords; never held out for evaluation).
    source: str = Field(default="live", max_length=16, index=True)
    import_batch: str | None = Field(default=None, max_length=64, index=True)
    origin_id: str | None = Field(
        default=None,
        sa_column_args=[ForeignKey("completion.id", ondelete="CASCADE")],
        max_length=64,
        index=True,
    )


class Rating(SQLModel, table=True):
    """The current rating of one completion by one user."""

    __table_args__ = (UniqueConstraint("completion_id", "user_key", name="uq_rating_completion_user"),)

    id: int | None = Field(default=None, primary_key=True)
    completion_id: str = _completion_fk(index=False)
    user_key: str = Field(default=ANONYMOUS, max_length=256, index=True)
    thumb: str | None = Field(default=None, max_length=4)
    score: int | None = None
    comment: str | None = None
    correction: str | None = None
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp(index=True)


class RatingEvent(SQLModel, table=True):
    """Every rating ever posted, in order: the history behind `Rating`."""

    __tablename__ = "rating_event"
    __table_args__ = (Index("ix_rating_event_completion_user", "completion_id", "user_key"),)

    # Chosen by the writer, so a batch replayed from the spool twice adds no duplicate.
    id: str = Field(primary_key=True, max_length=32)
    completion_id: str = _completion_fk(index=False)
    user_key: str = Field(default=ANONYMOUS, max_length=256)
    thumb: str | None = Field(default=None, max_length=4)
    score: int | None = None
    comment: str | None = None
    correction: str | None = None
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _timestamp(index=True)


class Preference(SQLModel, table=True):
    """A side-by-side choice: one current choice per pair of completions and user."""

    __table_args__ = (UniqueConstraint("pair_key", "user_key", name="uq_preference_pair_user"),)

    id: int | None = Field(default=None, primary_key=True)
    # The two completion ids sorted and joined: the same pair whichever way it was chosen.
    pair_key: str = Field(max_length=160)
    chosen_completion_id: str = _completion_fk()
    rejected_completion_id: str = _completion_fk()
    user_key: str = Field(default=ANONYMOUS, max_length=256, index=True)
    comment: str | None = None
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp(index=True)


def pair_key(first: str, second: str) -> str:
    return "|".join(sorted((first, second)))


# -- model registry and experiments ------------------------------------------------------------


def _at_most_one(name: str, column: str, value: str) -> Index:
    """A partial unique index: at most one row with `column = value` (SQLite and PostgreSQL)."""
    where = text(f"{column} = '{value}'")
    return Index(name, column, unique=True, sqlite_where=where, postgresql_where=where)


VERSION_STATUSES = ("candidate", "canary", "active", "rejected", "retired")
# Versions every serving process keeps loaded.
SERVABLE_STATUSES = ("candidate", "canary", "active")


class ModelVersionRecord(SQLModel, table=True):
    """One model version: a LoRA adapter on the base model (the base itself has no row)."""

    __tablename__ = "model_version"
    # At most one active version: the alias serves it (or the base when there is none).
    __table_args__ = (_at_most_one("uq_model_version_one_active", "status", "active"),)

    name: str = Field(primary_key=True, max_length=128)
    base_model: str = Field(max_length=512)
    adapter_path: str = Field(max_length=1024)
    parent: str | None = Field(default=None, max_length=128)
    dataset_version: str | None = Field(default=None, max_length=128)
    training_run: str | None = Field(default=None, max_length=128)
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="candidate", max_length=16, index=True)
    status_reason: str | None = Field(default=None, max_length=1024)
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp()


class Experiment(SQLModel, table=True):
    """An A/B test or canary on the alias: variants are model versions with weights."""

    __table_args__ = (_at_most_one("uq_experiment_one_running", "status", "running"),)

    name: str = Field(primary_key=True, max_length=128)
    # running, promoted, rolled_back, stopped; at most one experiment runs at a time.
    status: str = Field(default="running", max_length=16, index=True)
    salt: str = Field(max_length=128)
    control: str = Field(max_length=128)
    # [{"name": variant, "version": model version, "weight": percent}], control included.
    variants: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    # Candidate percentages, one stage after another; [] for fixed weights.
    ramp: list[float] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    stage: int = 0
    stage_started_at: datetime = _timestamp()
    # The experiment's full spec (policy, minimum samples, guardrails) as given.
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Bumped on every change: decisions apply only to the state they were computed on.
    revision: int = 0
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp()
    ended_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class ABDecision(SQLModel, table=True):
    """Every decision about an experiment, automatic or by an operator, with its numbers."""

    __tablename__ = "ab_decision"

    id: int | None = Field(default=None, primary_key=True)
    experiment: str = Field(
        sa_column_args=[ForeignKey("experiment.name", ondelete="CASCADE")], max_length=128, index=True
    )
    # start, ramp, promote, rollback, weights, stop
    action: str = Field(max_length=16)
    variant: str | None = Field(default=None, max_length=128)
    reason: str = Field(default="", max_length=2048)
    actor: str = Field(default="auto", max_length=64)
    numbers: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    weights_before: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    weights_after: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _timestamp(index=True)


class RegistryState(SQLModel, table=True):
    """One row: a counter every registry or experiment change bumps, so replicas poll cheaply."""

    __tablename__ = "registry_state"

    id: int = Field(default=1, primary_key=True)
    revision: int = 0


class ServingReplica(SQLModel, table=True):
    """What one serving process serves, as it reports it (every change, and every 30 s): the
    version whose weights its engine holds and where they are read from, and its LoRA room."""

    __tablename__ = "serving_replica"

    # host:pid (the host is the pod's name on Kubernetes).
    replica: str = Field(primary_key=True, max_length=255)
    active_version: str = Field(max_length=128)
    # The version merged into the engine's weights (served without LoRA), and their folder.
    live_version: str = Field(max_length=128)
    weights_path: str = Field(max_length=1024)
    # The engine's LoRA room (0: none) and the versions it holds as adapters.
    lora_slots: int = 0
    lora_max_rank: int = 0
    lora_versions: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    registry_revision: int = 0
    started_at: datetime = _timestamp()
    updated_at: datetime = _timestamp(index=True)


# -- retraining --------------------------------------------------------------------------------


class TrainingRun(SQLModel, table=True):
    """One retraining run: what it selected and trained on, how it scored, what came of it."""

    __tablename__ = "training_run"

    id: str = Field(primary_key=True, max_length=64)
    # running, registered (passed the gate), rejected (failed it), skipped (not enough data), failed
    status: str = Field(default="running", max_length=16, index=True)
    trigger: str = Field(default="manual", max_length=32)
    method: str | None = Field(default=None, max_length=8)
    champion: str | None = Field(default=None, max_length=128)
    candidate: str | None = Field(default=None, max_length=128)
    dataset_version: str | None = Field(default=None, max_length=64)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Selection, dataset, training and evaluation figures; stage durations in seconds.
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    durations: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    reason: str | None = Field(default=None, sa_type=String(2048))
    started_at: datetime = _timestamp(index=True)
    finished_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class TrainingSample(SQLModel, table=True):
    """A logged completion a run selected, with why."""

    __tablename__ = "training_sample"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(
        sa_column_args=[ForeignKey("training_run.id", ondelete="CASCADE")], max_length=64, index=True
    )
    completion_id: str = _completion_fk()
    score: float = 0.0
    reasons: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Where the run used it: train, or held_out (its prompt judged the candidate: not spent).
    # None: recorded before splits were kept (spent).
    split: str | None = Field(default=None, max_length=16)


class RetrainLock(SQLModel, table=True):
    """A lease that keeps two retraining runs from overlapping across processes and machines."""

    __tablename__ = "retrain_lock"

    name: str = Field(primary_key=True, max_length=64)
    owner: str | None = Field(default=None, max_length=128)
    expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class ApiKey(SQLModel, table=True):
    """A client's key: stored as a SHA-256 hash, shown once at creation.

    Keys belong to a site; a site's conversations are rated only with its keys. A secret key
    calls every /v1 route from a server; a public key goes into a web page (the rating widget):
    it may only rate, only the site's completions, from the listed origins.
    """

    __tablename__ = "api_key"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=128)
    site: str = Field(max_length=64, index=True)
    kind: str = Field(default="secret", max_length=8)  # secret, public
    prefix: str = Field(max_length=16)
    hash: str = Field(max_length=64, unique=True)
    origins: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # None: the service's defaults (limits.key_requests_per_minute, limits.key_max_concurrent).
    requests_per_minute: int | None = None
    max_concurrent: int | None = None
    created_at: datetime = _timestamp()
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class ImportBatch(SQLModel, table=True):
    """One `loopchat import` of a transcript file: what it read, added, cleaned and refused."""

    __tablename__ = "import_batch"

    id: str = Field(primary_key=True, max_length=64)
    # The name imported conversations are marked with (default: the file name).
    source: str = Field(max_length=128, index=True)
    path: str = Field(max_length=1024)
    file_sha256: str = Field(max_length=64, index=True)
    format: str = Field(max_length=8)  # jsonl, csv
    # running, finished, failed (an exception), interrupted (stopped by the operator)
    status: str = Field(default="running", max_length=16)
    # records read, conversations and answers added, duplicates, ratings, malformed records ...
    counts: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # What each cleaning step changed or removed.
    cleaning: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # The first malformed records: {"line": n, "error": "..."}.
    errors: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    started_at: datetime = _timestamp(index=True)
    finished_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class Erasure(SQLModel, table=True):
    """A deletion that records still waiting in some replica's spool must not undo.

    `db delete-user` leaves one for the user (their key's SHA-256, not the key itself) and
    `db purge` one for its cut-off; the writer drops any record created before a matching
    erasure, so a replay after an outage never brings erased data back.
    """

    __tablename__ = "erasure"

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=16, index=True)  # user, older_than
    user_hash: str | None = Field(default=None, max_length=64, index=True)
    # Records created before this instant are erased.
    before: datetime = Field(sa_type=DateTime(timezone=True), nullable=False)
    created_at: datetime = _timestamp()
