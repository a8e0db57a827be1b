"""Under secure aggregation the codec clips each uploaded coordinate to ±secagg-clip-range:
each client counts what it clips (metric ``secagg-clipped``), the server sums and logs it."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.privacy.secure_wire import SECAGG
from tests.test_secure_rounds import flat_config, run


def _stage0_counts(replies) -> list[int]:
    return [int(r.content["metrics"]["secagg-clipped"]) for r in replies
            if not r.has_error() and SECAGG in r.content and "metrics" in r.content]


@pytest.mark.parametrize("clip_range", [0.02, 8.0])
def test_clipped_uploads_are_counted_by_the_clients_and_logged_by_the_server(clip_range):
    replies = []
    records, _, _, error = run(flat_config(True, secagg_clip_range=clip_range),
                               on_reply=replies.append)

    assert error is None
    counts = _stage0_counts(replies)
    assert len(counts) == 3  # one stage-0 reply per node, each with its count
    round_1 = records[1]
    if clip_range == 8.0:  # the adapter's values are far inside the default range
        assert counts == [0, 0, 0] and "secagg_clipped" not in round_1
    else:
        assert min(counts) > 0 and round_1["secagg_clipped"] == int(np.sum(counts))
