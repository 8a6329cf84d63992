"""The feedback store: corrections people send to the service, append-only, in SQLite (WAL) or PostgreSQL.

Torch-free and Prefect-free: the service writes it, the collect stage and the review command read it.
Rows are never updated or deleted (triggers refuse it); a review is a new row, the latest one wins.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from pipeline.contract import GLYPH_SIDE
from pipeline.databases import with_pinned_driver

STORE_ENV = "KUZUSHIJI_FEEDBACK_STORE"  # a URL that wins over feedback.store (e.g. PostgreSQL in compose)
GLYPH_BYTES = GLYPH_SIDE * GLYPH_SIDE
ACCEPTED, REJECTED, NEW = "accepted", "rejected", "new"
DECISIONS = (ACCEPTED, REJECTED)
Accept = Literal["reviewed", "all"]
TEXT_MAX = 64  # model versions and reviewer names are short

metadata = sa.MetaData()
items = sa.Table(
    "feedback_items", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("digest", sa.String(64), nullable=False),  # sha256 of the uploaded bytes
    sa.Column("label", sa.Integer, nullable=False),  # index in the served model's class map
    sa.Column("label_char", sa.String(8), nullable=False),  # the class itself: survives a class-map reorder
    sa.Column("glyph", sa.LargeBinary, nullable=False),  # uint8 28x28, what the model reads
    sa.Column("predicted", sa.Integer),  # the served model's top-1 for this glyph when it arrived
    sa.Column("model_version", sa.String(TEXT_MAX)),  # the served model's version then
    sa.Column("client_predicted", sa.Integer),  # what the client said it was shown (untrusted)
    sa.Column("client_model_version", sa.String(TEXT_MAX)),
    sa.Column("received_at", sa.Float, nullable=False),  # Unix seconds, UTC
    sa.UniqueConstraint("digest", "label", name="feedback_once"),
)
reviews = sa.Table(
    "feedback_reviews", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item_id", sa.Integer, sa.ForeignKey("feedback_items.id"), nullable=False, index=True),
    sa.Column("decision", sa.String(8), nullable=False),
    sa.Column("reviewer", sa.String(TEXT_MAX)),
    sa.Column("reviewed_at", sa.Float, nullable=False),
)
# Append-only in the database itself, not only in this module (SQLite; PostgreSQL below).
_SQLITE_GUARDS = [
    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{verb} BEFORE {verb.upper()} ON {table} "
    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
    for table in ("feedback_items", "feedback_reviews") for verb in ("update", "delete")
]

_POSTGRES_GUARDS = [
    "CREATE OR REPLACE FUNCTION feedback_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'feedback rows are append-only'; END $$",
    *(f"CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
      "FOR EACH ROW EXECUTE FUNCTION feedback_append_only()" for table in ("feedback_items", "feedback_reviews")),
]
SCHEMA_LOCK = 2323  # PostgreSQL advisory lock: workers opening the store at once create the schema once
SCHEMA_ATTEMPTS = 3  # SQLite: a worker that lost the race to create a table finds it there next time


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or written (down, full, read-only); the message says which and where."""


@dataclass(frozen=True)
class Feedback:
    """One correction as received: the glyph, the upload's hash and the right class."""

    glyph: np.ndarray
    digest: str
    label: int
    label_char: str
    predicted: int | None = None
    model_version: str | None = None
    client_predicted: int | None = None
    client_model_version: str | None = None


@dataclass(frozen=True)
class StoredItem:
    id: int
    label: int
    label_char: str
    glyph: np.ndarray
    predicted: int | None
    model_version: str | None
    received_at: float
    state: str  # new | accepted | rejected (the latest review)


def upload_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_url(configured: str, root: Path) -> str:
    """``$KUZUSHIJI_FEEDBACK_STORE``, else ``feedback.store``: a database URL, or a SQLite file path
    (relative to the project root)."""
    value = os.environ.get(STORE_ENV, "").strip() or configured
    if "://" in value:
        return with_pinned_driver(value)
    path = Path(value) if Path(value).is_absolute() else root / value
    return f"sqlite:///{path}"


def open_configured(feedback: Any, root: Path, create: bool = True) -> FeedbackStore | None:
    """The store of a ``feedback`` settings section; None when it is a SQLite file that does not exist yet
    and ``create`` is off (readers need not make an empty store)."""
    url = store_url(feedback.store, root)
    if not create and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    return FeedbackStore(url, feedback.store_timeout_s)


def accepted_items(feedback: Any, root: Path) -> list[StoredItem]:
    """What ``feedback.accept`` counts now, read without creating a store (none yet: nothing)."""
    store = open_configured(feedback, root, create=False)
    if store is None:
        return []
    try:
        return store.accepted(feedback.accept)
    finally:
        store.close()


def redact(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def _on_sqlite_connect(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut, not only a kill
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class FeedbackStore:
    """The store at one URL; every failure of the database is a :class:`StoreUnavailable`."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self.where = redact(url)
        sqlite = url.startswith("sqlite")
        if sqlite:
            path = Path(url.removeprefix("sqlite:///"))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(f"feedback store {path}: cannot create its folder ({exc})") from None
        connect_args = {"timeout": timeout_s} if sqlite else {"connect_timeout": max(1, round(timeout_s))}
        # SQLite: a connection per use, so a file that was moved, restored or repaired is opened afresh.
        pool = {"poolclass": sa.pool.NullPool} if sqlite else {"pool_pre_ping": True}
        self.engine = sa.create_engine(url, connect_args=connect_args, **pool)
        if sqlite:
            sa.event.listen(self.engine, "connect", _on_sqlite_connect)
        with self._failures("open"):
            self._create_schema()

    def _create_schema(self) -> None:
        postgres = self.engine.dialect.name == "postgresql"
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                with self.engine.begin() as connection:
                    if postgres:
                        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK)))
                    metadata.create_all(connection)
                    for statement in _POSTGRES_GUARDS if postgres else _SQLITE_GUARDS:
                        connection.exec_driver_sql(statement)
                return
            except SQLAlchemyError:
                if attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(0.1 * (attempt + 1))

    @contextmanager
    def _failures(self, action: str) -> Iterator[None]:
        try:
            yield
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0][:300]
            raise StoreUnavailable(f"feedback store {self.where}: cannot {action} ({reason})") from None

    def add(self, feedback: Feedback, now: float | None = None) -> tuple[int, bool]:
        """Store one item; (its id, True) when new, (the stored id, False) for the same bytes and label."""
        glyph = np.ascontiguousarray(feedback.glyph, dtype=np.uint8)
        if glyph.shape != (GLYPH_SIDE, GLYPH_SIDE):
            raise ValueError(f"a glyph is {GLYPH_SIDE}x{GLYPH_SIDE}, got {glyph.shape}")
        row = {
            "digest": feedback.digest, "label": feedback.label, "label_char": feedback.label_char,
            "glyph": glyph.tobytes(), "predicted": feedback.predicted,
            "model_version": _short(feedback.model_version), "client_predicted": feedback.client_predicted,
            "client_model_version": _short(feedback.client_model_version),
            "received_at": time.time() if now is None else now,
        }
        with self._failures("store the feedback"):
            try:
                with self.engine.begin() as connection:
                    key = connection.execute(items.insert().values(**row)).inserted_primary_key
                    assert key is not None
                    return int(key[0]), True
            except IntegrityError:  # the same upload with the same label: stored once
                with self.engine.connect() as connection:
                    found = connection.execute(sa.select(items.c.id).where(
                        items.c.digest == feedback.digest, items.c.label == feedback.label)).scalar()
                if found is None:
                    raise
                return int(found), False

    def review(self, ids: Iterable[int], decision: str, reviewer: str | None = None) -> list[int]:
        """Append a decision for each existing id (one transaction); returns the ids reviewed."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        wanted = sorted(set(ids))
        with self._failures("record the review"), self.engine.begin() as connection:
            known = [int(i) for i in connection.execute(
                sa.select(items.c.id).where(items.c.id.in_(wanted)).order_by(items.c.id)).scalars()]
            if known:
                now = time.time()
                connection.execute(reviews.insert(), [
                    {"item_id": i, "decision": decision, "reviewer": _short(reviewer), "reviewed_at": now}
                    for i in known])
        return known

    def _states(self) -> sa.Subquery:
        latest = sa.select(reviews.c.item_id, sa.func.max(reviews.c.id).label("review_id")).group_by(
            reviews.c.item_id).subquery()
        return sa.select(latest.c.item_id, reviews.c.decision).join(
            reviews, reviews.c.id == latest.c.review_id).subquery()

    def list_items(self, states: Sequence[str] | None = None, ids: Iterable[int] | None = None) -> list[StoredItem]:
        """Items in id order, with their review state; ``states`` filters (new | accepted | rejected)."""
        state = self._states()
        state_col = sa.func.coalesce(state.c.decision, NEW).label("state")
        query = sa.select(items, state_col).outerjoin(state, state.c.item_id == items.c.id).order_by(items.c.id)
        if states is not None:
            query = query.where(state_col.in_(list(states)))
        if ids is not None:
            query = query.where(items.c.id.in_(sorted(set(ids))))
        with self._failures("read the feedback"), self.engine.connect() as connection:
            rows = connection.execute(query).mappings().all()
        return [StoredItem(
            id=row["id"], label=row["label"], label_char=row["label_char"],
            glyph=np.frombuffer(row["glyph"], dtype=np.uint8).reshape(GLYPH_SIDE, GLYPH_SIDE),
            predicted=row["predicted"], model_version=row["model_version"], received_at=row["received_at"],
            state=row["state"]) for row in rows]

    def accepted(self, accept: Accept) -> list[StoredItem]:
        """What counts as training data: reviewed-and-accepted items, or (``all``) every item not rejected."""
        return self.list_items((ACCEPTED,) if accept == "reviewed" else (ACCEPTED, NEW))

    def counts(self) -> dict[str, int]:
        found = {NEW: 0, ACCEPTED: 0, REJECTED: 0}
        for item in self.list_items():
            found[item.state] += 1
        return found

    def integrity(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` (``ok`` when sound); other databases answer ``ok`` if reachable."""
        with self._failures("check the store"), self.engine.connect() as connection:
            if self.engine.dialect.name == "sqlite":
                return str(connection.exec_driver_sql("PRAGMA integrity_check").scalar())
            connection.execute(sa.select(1))
            return "ok"

    def close(self) -> None:
        self.engine.dispose()


def _short(text: str | None) -> str | None:
    return None if text is None else str(text)[:TEXT_MAX]


def new_since(accepted: Sequence[StoredItem], used_items: int, used_max_id: int) -> int:
    """Accepted items not in a model's data, from what its run recorded (how many, the highest id): exact
    unless an item of that data was rejected afterwards (then a lower bound)."""
    later = sum(1 for item in accepted if item.id > used_max_id)
    earlier = len(accepted) - later
    return later + max(0, earlier - used_items)
