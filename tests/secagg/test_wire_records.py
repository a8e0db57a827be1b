"""Secure-aggregation replies as Flower records: every record can be sized by Flower's own
``count_bytes`` (its message-size mods and our byte accounting call it), also when a reply's
lists are empty — the usual case: no unreadable shares, no dropped peers."""

from __future__ import annotations

import numpy as np

from fedlora.privacy.secagg.messages import MaskedInput, UnmaskResponse
from fedlora.privacy.secure_wire import masked_content, read_masked, read_unmask, unmask_record


def test_a_masked_input_with_empty_lists_can_be_counted_and_read_back():
    masked = MaskedInput(server_round=3, sender=7, masked=np.arange(5, dtype=np.uint32),
                         no_shares_of=frozenset(), pair_seeds={})
    content = masked_content(masked)

    assert sum(r.count_bytes() for r in content.values()) > 20  # Flower fails on an empty list
    back = read_masked(content, sender=7, vector_size=4)
    assert back.no_shares_of == frozenset() and back.pair_seeds == {}
    assert np.array_equal(back.masked, masked.masked)


def test_an_unmask_response_with_nobody_dropped_can_be_counted_and_read_back():
    response = UnmaskResponse(server_round=2, sender=1, self_mask_shares={4: b"s4", 5: b"s5"},
                              mask_key_shares={}, pair_seeds={})
    record = unmask_record(response)

    assert record.count_bytes() > 0
    from flwr.app import RecordDict

    from fedlora.privacy.secure_wire import SECAGG
    back = read_unmask(RecordDict({SECAGG: record}), sender=1)
    assert back.self_mask_shares == {4: b"s4", 5: b"s5"} and back.mask_key_shares == {}
