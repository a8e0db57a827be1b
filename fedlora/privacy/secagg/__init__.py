"""Secure aggregation (SecAgg / SecAgg+) and signed updates, independent of any transport.

The server learns only the weighted sum of the clients' vectors (Bonawitz et
al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning"), with sparse neighbour graphs (Bell et al. 2020, SecAgg+) so each
client masks with and shares secrets among ``k = O(log n)`` neighbours.

Pieces, bottom-up (all primitives come from ``cryptography``):

* :mod:`~fedlora.privacy.secagg.encoding` — fixed-point encoding in Z_{2^32}, with a
  client weight and a securely summed normaliser;
* :mod:`~fedlora.privacy.secagg.prg` — AES-256-CTR mask expansion, in place;
* :mod:`~fedlora.privacy.secagg.keys` — X25519 agreement + HKDF-SHA256;
* :mod:`~fedlora.privacy.secagg.shamir` — t-of-n sharing over GF(2^521 − 1);
* :mod:`~fedlora.privacy.secagg.channel` — AES-GCM for shares relayed by the server;
* :mod:`~fedlora.privacy.secagg.graph` — the seeded neighbour graph;
* :mod:`~fedlora.privacy.secagg.params` — ``k`` and ``t`` from collusion/dropout bounds (Bell et
al.);
* :class:`SecAggClient` / :class:`SecAggServer` — the four-stage protocol, with the server's
  reply checks in :mod:`~fedlora.privacy.secagg.replies`, its recovery arithmetic in
  :mod:`~fedlora.privacy.secagg.recovery` and the client's snapshot reader in
  :mod:`~fedlora.privacy.secagg.snapshot`;
* :mod:`~fedlora.privacy.secagg.signing` — Ed25519 signatures over updates.

>>> server = SecAggServer(SecAggConfig(), 1, ids, vector_size=d)    # doctest: +SKIP
>>> directory = server.collect_keys([c.advertise_keys() for c in clients])  # doctest: +SKIP

Which aggregation rules can run securely: :func:`secagg_compatible`.
"""

from fedlora.privacy.secagg.client import SecAggClient
from fedlora.privacy.secagg.config import (
    COMPATIBLE,
    INCOMPATIBLE,
    GroupParameters,
    SecAggConfig,
    secagg_compatible,
)
from fedlora.privacy.secagg.encoding import ArrayLayout, DecodedSum, FixedPointCodec, flatten_arrays
from fedlora.privacy.secagg.errors import (
    ProtocolError,
    SecAggAborted,
    SecAggError,
    ShamirError,
    ShareAuthenticationError,
)
from fedlora.privacy.secagg.keys import PublicKeys
from fedlora.privacy.secagg.messages import (
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RelayedShares,
    ShareBundle,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedlora.privacy.secagg.server import Rejection, SecAggServer, SecureSum
from fedlora.privacy.secagg.signing import (
    SignatureRejected,
    SignedUpdate,
    UpdateSigner,
    UpdateVerifier,
    hash_arrays,
)

__all__ = [
    "COMPATIBLE",
    "INCOMPATIBLE",
    "ArrayLayout",
    "DecodedSum",
    "FixedPointCodec",
    "GroupParameters",
    "KeyAdvertisement",
    "KeyDirectory",
    "MaskedInput",
    "ProtocolError",
    "PublicKeys",
    "Rejection",
    "RelayedShares",
    "SecAggAborted",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "SecureSum",
    "ShamirError",
    "ShareAuthenticationError",
    "ShareBundle",
    "SignatureRejected",
    "SignedUpdate",
    "Stage",
    "UnmaskRequest",
    "UnmaskResponse",
    "UpdateSigner",
    "UpdateVerifier",
    "flatten_arrays",
    "hash_arrays",
    "secagg_compatible",
]
