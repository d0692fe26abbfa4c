"""`python -m async_rlhf.cluster.gcs_probe ADDRESS`: ask a Ray cluster's GCS whether it answers this process, and
print one JSON line: {"gcs": "HOST:PORT", "answer": ...}.

Answers: "open" (it answered), "auth" (it refused: it asks for a token this process did not send, or not that
one), "no-token" (this process is in token mode and has no token), "not-found" (no cluster for ADDRESS, e.g.
`auto` with none on this node), "unreachable" (nothing answers at its port). Ray reads RAY_AUTH_MODE once per
process, so each mode is asked in a process of its own (existing_ray.py runs this); Ray's own warnings go to
this process's stderr, which the caller keeps off the terminal.
"""
from __future__ import annotations

import json
import socket
import sys

from ray._private.services import canonicalize_bootstrap_address_or_die  # Ray's own reading of `auto`
from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, GcsClient, get_authentication_mode  # type: ignore[attr-defined]
from ray.exceptions import AuthenticationError

CONNECT_S = 5.0  # a GCS port that takes no TCP connection in this long is taken for down


def probe(address: str) -> dict[str, str]:
    try:
        gcs = canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as exc:
        return {"answer": "not-found", "detail": first_sentence(exc)}
    host, _, port = gcs.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_S).close()
    except OSError as exc:
        return {"gcs": gcs, "answer": "unreachable", "detail": exc.strerror or type(exc).__name__}
    token_mode = get_authentication_mode() == AuthenticationMode.TOKEN
    if token_mode and not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return {"gcs": gcs, "answer": "no-token"}
    return {"gcs": gcs, **_ask(gcs)}


def _ask(gcs: str) -> dict[str, str]:
    """The GCS's answer to a client of this process's authentication mode."""
    try:
        GcsClient(address=gcs)
    except AuthenticationError:
        return {"answer": "auth"}
    except Exception as exc:  # a port that answers TCP but not as a GCS, or a GCS gone meanwhile
        return {"answer": "unreachable", "detail": first_sentence(exc)}
    return {"answer": "open"}


def first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(". ")[0].rstrip(".")


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1])), flush=True)
