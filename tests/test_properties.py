"""Property-based tests (hypothesis) of the pure modules: whatever the input or the
engine answer, they return a value or raise the one documented error, in bounded work.

Each ``@settings`` keeps this file fast (a few seconds in all); a finding of these
tests is kept as a fixed case next to the property that found it.
"""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from regioncap.boxes import BoxFormatError
from regioncap.data import DataError
from regioncap.images import ImageLoadError

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- errors cross processes


@pytest.mark.parametrize("error", [
    ImageLoadError("corrupt_image", "a.png: image data is truncated or corrupt (broken data stream)"),
    BoxFormatError("bbox is not a list"),
    DataError("rows.jsonl line 3: bad row"),
], ids=lambda e: type(e).__name__)
def test_row_errors_survive_pickling(error):
    """A worker process sends its error back pickled: a failed unpickle looks like a dead worker."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    if isinstance(error, ImageLoadError):
        assert (back.kind, back.message) == (error.kind, error.message)
