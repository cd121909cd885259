"""Entry point shared by the peer scripts: a failure ends with one line the harness records.

The harness keeps only the tail of a peer's stderr, and a peer's own logging can push the
exception far up; ``run`` prints the traceback, then ``peer-error: <type>: <message>`` last
(the message cut to 300 characters).
"""
from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

ERROR_PREFIX = "peer-error: "


def run(main: Callable[[], None]) -> None:
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - any failure of the peer is a result to record
        traceback.print_exc()
        message = " ".join(str(exc).split())
        if len(message) > 300:  # some messages list every layer; the harness keeps a short tail
            message = message[:300] + " ..."
        print(f"{ERROR_PREFIX}{type(exc).__name__}: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
