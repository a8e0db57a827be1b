"""Ed25519-signed updates: acceptance and each rejection reason."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlora.privacy.secagg import SignatureRejected, UpdateSigner, UpdateVerifier, hash_arrays
from fedlora.privacy.secagg.signing import (
    REASONS,
    generate_signing_key,
    public_key_bytes,
    update_digest,
)

RUN = "run-42"
NODE = 7


Payload = dict[str, np.ndarray]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture
def payload() -> Payload:
    rng = np.random.default_rng(0)
    return {
        "m.lora_A": rng.normal(size=(4, 16)).astype(np.float32),
        "m.lora_B": rng.normal(size=(16, 4)).astype(np.float32),
    }


@pytest.fixture
def signer(key: Ed25519PrivateKey) -> UpdateSigner:
    return UpdateSigner(key, RUN, NODE)


@pytest.fixture
def verifier(key: Ed25519PrivateKey) -> UpdateVerifier:
    return UpdateVerifier(RUN, {NODE: public_key_bytes(key)})


def test_good_signature_is_accepted(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    update = signer.sign(3, hash_arrays(payload))
    assert verifier.check(update, hash_arrays(payload), 3) is None


def test_tampered_payload_is_rejected(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    update = signer.sign(3, hash_arrays(payload))
    tampered = {**payload, "m.lora_B": payload["m.lora_B"] + 1e-3}
    assert verifier.check(update, hash_arrays(tampered), 3) == "TAMPERED"


def test_altered_envelope_breaks_the_signature(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    # An attacker who swaps the payload must also swap the signed hash
    tampered = {**payload, "m.lora_B": payload["m.lora_B"] * 0}
    update = dataclasses.replace(
        signer.sign(3, hash_arrays(payload)), payload_hash=hash_arrays(tampered)
    )
    assert verifier.check(update, hash_arrays(tampered), 3) == "BAD_SIGNATURE"


def test_wrong_round_is_rejected(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    update = signer.sign(2, hash_arrays(payload))
    assert verifier.check(update, hash_arrays(payload), 3) == "WRONG_ROUND"


def test_relabelled_round_breaks_the_signature(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    update = dataclasses.replace(signer.sign(2, hash_arrays(payload)), server_round=3)
    assert verifier.check(update, hash_arrays(payload), 3) == "BAD_SIGNATURE"


def test_replayed_nonce_is_rejected(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    update = signer.sign(3, hash_arrays(payload))
    assert verifier.check(update, hash_arrays(payload), 3) is None
    assert verifier.check(update, hash_arrays(payload), 3) == "REPLAYED"


def test_second_fresh_update_in_a_round_is_a_duplicate(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    assert verifier.check(signer.sign(3, hash_arrays(payload)), hash_arrays(payload), 3) is None
    again = signer.sign(3, hash_arrays(payload))
    assert verifier.check(again, hash_arrays(payload), 3) == "DUPLICATE"
    assert verifier.check(signer.sign(4, hash_arrays(payload)), hash_arrays(payload), 4) is None


def test_wrong_key_is_rejected(verifier: UpdateVerifier, payload: Payload) -> None:
    impostor = UpdateSigner(generate_signing_key(), RUN, NODE)
    update = impostor.sign(3, hash_arrays(payload))
    assert verifier.check(update, hash_arrays(payload), 3) == "BAD_SIGNATURE"


def test_unknown_node_and_wrong_run(
    key: Ed25519PrivateKey, signer: UpdateSigner, payload: Payload
) -> None:
    other_run = UpdateVerifier("run-43", {NODE: public_key_bytes(key)})
    update = signer.sign(3, hash_arrays(payload))
    assert other_run.check(update, hash_arrays(payload), 3) == "WRONG_RUN"
    nobody = UpdateVerifier(RUN, {NODE + 1: public_key_bytes(key)})
    assert nobody.check(update, hash_arrays(payload), 3) == "UNKNOWN_NODE"


def test_an_update_relayed_by_another_node_is_rejected(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    update = signer.sign(3, hash_arrays(payload))
    assert verifier.check(update, hash_arrays(payload), 3, sender=NODE + 1) == "WRONG_NODE"
    assert verifier.check(update, hash_arrays(payload), 3, sender=NODE) is None


@pytest.mark.parametrize(
    "change",
    [
        {"nonce": b"short"},
        {"signature": b""},
        {"node_id": -1},
        {"run_id": 5},
        {"server_round": "3"},
    ],
)
def test_malformed_envelope(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload, change: dict
) -> None:
    update = dataclasses.replace(signer.sign(3, hash_arrays(payload)), **change)
    assert verifier.check(update, hash_arrays(payload), 3) == "MALFORMED"


def test_rejections_do_not_poison_the_verifier(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    update = signer.sign(3, hash_arrays(payload))
    assert verifier.check(update, bytes(32), 3) == "TAMPERED"
    assert verifier.check(update, hash_arrays(payload), 3) is None


def test_verify_raises_with_the_reason(
    signer: UpdateSigner, verifier: UpdateVerifier, payload: Payload
) -> None:
    update = signer.sign(3, hash_arrays(payload))
    verifier.verify(update, hash_arrays(payload), 3)
    with pytest.raises(SignatureRejected, match=r"\[REPLAYED\].*same nonce") as caught:
        verifier.verify(update, hash_arrays(payload), 3)
    assert caught.value.reason == "REPLAYED" and caught.value.reason in REASONS


def test_signer_refuses_a_wrong_hash_size(signer: UpdateSigner) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        signer.sign(1, b"abc")


def test_digest_binds_every_field() -> None:
    base = ("run", 1, 2, bytes(16), bytes(32))
    digest = update_digest(*base)
    variants = [
        ("run2", 1, 2, bytes(16), bytes(32)),
        ("run", 2, 2, bytes(16), bytes(32)),
        ("run", 1, 3, bytes(16), bytes(32)),
        ("run", 1, 2, b"\x01" * 16, bytes(32)),
        ("run", 1, 2, bytes(16), b"\x01" * 32),
    ]
    assert all(update_digest(*v) != digest for v in variants)


def test_hash_arrays_is_canonical(payload: Payload) -> None:
    reference = hash_arrays(payload)
    reordered = dict(reversed(list(payload.items())))
    big_endian = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in payload.items()}
    fortran = {k: np.asfortranarray(v) for k, v in payload.items()}
    assert hash_arrays(reordered) == hash_arrays(big_endian) == hash_arrays(fortran) == reference


def test_hash_arrays_detects_every_change(payload: Payload) -> None:
    reference = hash_arrays(payload)
    a, b = payload["m.lora_A"], payload["m.lora_B"]
    variants = [
        {"m.lora_A": a, "m.lora_C": b},  # renamed
        {"m.lora_A": a.astype(np.float64), "m.lora_B": b},  # dtype
        {"m.lora_A": a.reshape(16, 4), "m.lora_B": b},  # shape
        {"m.lora_A": a, "m.lora_B": b.copy() + np.float32(1e-7)},  # values
        {"m.lora_A": a},  # missing array
        {"m.lora_": a, "Am.lora_B": b},  # name boundary shifted
    ]
    assert all(hash_arrays(v) != reference for v in variants)


def test_hash_arrays_refuses_object_arrays() -> None:
    with pytest.raises(ValueError, match="object"):
        hash_arrays({"x": np.array([1, "a"], dtype=object)})
