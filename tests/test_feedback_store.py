"""The feedback store on a real SQLite file: WAL, stored once per image and label, append-only, reviews as
rows, nothing committed lost when its writer is killed mid-batch, a down or full store said plainly."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sqlalchemy as sa

from pipeline.feedback_store import (
    ACCEPTED,
    NEW,
    REJECTED,
    Feedback,
    FeedbackStore,
    StoreUnavailable,
    new_since,
    store_url,
    upload_digest,
)
from tests.support import PROJECT_ROOT


def _item(seed: int, label: int = 3) -> Feedback:
    glyph = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    return Feedback(glyph=glyph, digest=upload_digest(glyph.tobytes()), label=label, label_char="え",
                    predicted=1, model_version="7")


@pytest.fixture
def store(tmp_path):
    opened = FeedbackStore(store_url(str(tmp_path / "feedback.db"), tmp_path))
    yield opened
    opened.close()


def test_the_sqlite_store_is_in_wal_mode_and_keeps_the_glyph(store, tmp_path):
    item = _item(0)
    item_id, created = store.add(item)
    assert created and item_id == 1
    with sqlite3.connect(tmp_path / "feedback.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    (stored,) = store.list_items()
    assert np.array_equal(stored.glyph, item.glyph) and stored.label_char == "え" and stored.state == NEW
    assert (stored.predicted, stored.model_version) == (1, "7")


def test_the_same_image_and_label_is_stored_once(store):
    first = store.add(_item(0))
    assert store.add(_item(0)) == (first[0], False)
    other_label = store.add(_item(0, label=4))
    assert other_label[1] and other_label[0] != first[0]
    assert len(store.list_items()) == 2


def test_rows_are_append_only_and_reviews_are_rows(store, tmp_path):
    ids = [store.add(_item(seed))[0] for seed in range(4)]
    assert store.review(ids[:3], ACCEPTED, "me") == ids[:3]
    assert store.review([ids[1], 999], REJECTED) == [ids[1]]  # unknown ids are skipped, named by the result
    assert [item.state for item in store.list_items()] == [ACCEPTED, REJECTED, ACCEPTED, NEW]
    assert [item.id for item in store.accepted("reviewed")] == [ids[0], ids[2]]
    assert [item.id for item in store.accepted("all")] == [ids[0], ids[2], ids[3]]
    assert store.counts() == {NEW: 1, ACCEPTED: 2, REJECTED: 1}
    with sqlite3.connect(tmp_path / "feedback.db") as connection:
        for statement in ("UPDATE feedback_items SET label = 0", "DELETE FROM feedback_reviews"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                connection.execute(statement)
        assert connection.execute("SELECT count(*) FROM feedback_reviews").fetchone()[0] == 4


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pipeline.feedback_store import Feedback, FeedbackStore, upload_digest
    store = FeedbackStore(sys.argv[1])
    for seed in range(100_000):
        glyph = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
        item_id, _ = store.add(Feedback(glyph, upload_digest(glyph.tobytes()), seed % 10, "x"))
        print(item_id, flush=True)  # printed only once committed
""")


def test_a_writer_killed_mid_batch_loses_no_committed_row(tmp_path):
    url = store_url(str(tmp_path / "feedback.db"), tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert writer.stdout is not None
    committed = [int(writer.stdout.readline()) for _ in range(60)]
    os.kill(writer.pid, signal.SIGKILL)  # mid-write: it is inserting the next rows
    writer.wait()
    committed += [int(line) for line in writer.stdout.read().split()]
    reopened = FeedbackStore(url)
    assert reopened.integrity() == "ok"
    stored = {item.id for item in reopened.list_items()}
    assert set(committed) <= stored and len(stored) - len(committed) <= 1  # at most the one it had committed
    assert reopened.add(_item(10**6))[1]  # and it takes writes again
    reopened.close()


def test_a_store_that_cannot_open_says_where_and_why(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreUnavailable, match="feedback store"):
        FeedbackStore(store_url(str(blocker / "feedback.db"), tmp_path))


def test_a_full_store_is_unavailable_not_corrupted(store):
    store.add(_item(0))
    with store.engine.connect() as connection:
        pages = connection.exec_driver_sql("PRAGMA page_count").scalar()
    sa.event.listen(store.engine, "connect",
                    lambda connection, _: connection.execute(f"PRAGMA max_page_count={pages + 2}"))
    with pytest.raises(StoreUnavailable, match="full"):
        for seed in range(1, 200):
            store.add(_item(seed))
    assert store.integrity() == "ok" and store.list_items()[0].id == 1


def test_new_since_counts_items_a_model_did_not_see():
    class Item:
        def __init__(self, id):
            self.id = id

    accepted = [Item(i) for i in (1, 2, 3, 5, 8, 9)]
    assert new_since(accepted, used_items=0, used_max_id=0) == 6
    assert new_since(accepted, used_items=3, used_max_id=3) == 3  # 5, 8, 9
    assert new_since(accepted, used_items=2, used_max_id=5) == 4  # 8, 9 and two of 1..5 accepted later


@pytest.mark.slow
def test_the_postgresql_store_behaves_the_same_and_is_append_only_too():
    from tests.postgres import database_name, running_postgres

    with running_postgres() as server:
        name = server.create_database(database_name("feedback"))
        try:
            store = FeedbackStore(store_url(server.url(name), PROJECT_ROOT))
            again = FeedbackStore(store_url(server.url(name), PROJECT_ROOT))  # a second worker: schema once
            first = store.add(_item(0))
            assert again.add(_item(0)) == (first[0], False) and store.add(_item(1))[1]
            assert store.review([first[0]], ACCEPTED) == [first[0]]
            assert [item.id for item in again.accepted("reviewed")] == [first[0]]
            assert np.array_equal(again.list_items()[0].glyph, _item(0).glyph) and store.integrity() == "ok"
            with store.engine.begin() as connection, pytest.raises(sa.exc.DatabaseError, match="append-only"):
                connection.exec_driver_sql("DELETE FROM feedback_items")
            assert len(store.list_items()) == 2
            store.close()
            again.close()
        finally:
            server.drop_database(name)
    with pytest.raises(StoreUnavailable, match="cannot open"):  # the server is gone
        FeedbackStore(store_url(server.url(name), PROJECT_ROOT), timeout_s=2)
