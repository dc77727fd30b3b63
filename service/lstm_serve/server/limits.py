"""The answer-size limit of one call, shared by every protocol's translator.

An answer larger than the client can receive would be applied and then lost on the wire, so
each translator bounds the answer before anything is queued and refuses it with
INVALID_ARGUMENT instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from lstm_serve.core.errors import InvalidArgument

# Metadata a client sends to say the largest answer it accepts (its receive limit), in bytes.
MAX_RESPONSE_KEY = "lstm-serve-max-response-bytes"
# Below this even a one-step answer (ids, seqs, framing) may not fit: such a limit refuses
# every request, which is a client's mistake worth naming.
MIN_RESPONSE_BYTES = 512


def parse_limit(value: str) -> int:
    """A byte count from metadata: an integer, or a whole number in float notation ("1e6")."""
    text = value.strip()
    try:
        n = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            f = math.nan
        if not math.isfinite(f) or f != int(f):
            raise InvalidArgument(
                f"{MAX_RESPONSE_KEY} is {value!r}: it must be a whole number of bytes"
            ) from None
        n = int(f)
    if n < MIN_RESPONSE_BYTES:
        raise InvalidArgument(
            f"{MAX_RESPONSE_KEY} is {value!r}: a receive limit must be at least "
            f"{MIN_RESPONSE_BYTES} bytes"
        )
    return n


def answer_limit(metadata: Iterable[tuple[str, str | bytes]] | None, server_max: int) -> int:
    """The largest answer this call may get: the server's send limit or the client's own."""
    limit = server_max
    for key, value in metadata or ():
        if key == MAX_RESPONSE_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            limit = min(limit, parse_limit(text))
    return limit


def check_answer(size: int, limit: int, hint: str) -> None:
    """Refuse, before anything is applied, an answer of about `size` bytes over `limit`."""
    if size > limit:
        raise InvalidArgument(
            f"the answer would take about {size} bytes, more than the {limit} allowed "
            f"(the server's max_message_bytes or the client's {MAX_RESPONSE_KEY}); {hint}"
        )
