"""The page's correction in a real browser against the session's real server: after a reading, "wrong" opens
the grid of the model's classes, a pick is stored (POST /feedback) with the very image that was read."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.feedback_store import FeedbackStore, store_url
from pipeline.imaging import load_glyph
from tests.test_page import KO, LIMITS, _draw, _pad_png, _settled, browser, page, server  # noqa: F401

pytestmark = pytest.mark.slow


def test_a_wrong_reading_is_corrected_from_the_grid_of_classes(page, server):
    _draw(page, KO)
    _settled(page)
    page.wait_for_selector("#feedback:not([hidden])")
    sent = _pad_png(page)
    page.click("#fb-wrong")
    page.wait_for_selector("#fb-choices:not([hidden])")
    choices = page.locator("#fb-choices .choice")
    assert [choices.nth(i).locator(".char").inner_text() for i in range(choices.count())] == server["chars"]
    choices.filter(has_text="お").first.click()
    page.wait_for_function("document.getElementById('fb-status').textContent.startsWith('Saved as #')")
    saved = int(re.search(r"#(\d+)", page.locator("#fb-status").inner_text()).group(1))
    assert page.locator("#fb-choices").is_hidden()
    folder = Path(server["work"]) / "stores" / "feedback"
    store = FeedbackStore(store_url(str(folder / "feedback.db"), folder))
    (item,) = store.list_items(ids=[saved])
    store.close()
    assert item.label_char == "お" and item.model_version == "7"
    np.testing.assert_array_equal(item.glyph, load_glyph(sent, LIMITS))
