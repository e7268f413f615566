"""The fake upstream of `bench quota`, noting when each tagged stream arrived and first spoke.

`python -m bench.quota_upstream` takes `tests.fake_upstream`'s arguments. A streaming
request whose last user message starts with `quota-` is noted under that text: when the
server read it (`received`) and when it wrote the first token (`first`), both Unix seconds.
`GET /_bench/notes` answers every note so far as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from tests import fake_upstream as fake

TAG = "quota-"
NOTES: dict[str, dict[str, float]] = {}
LOCK = threading.Lock()
WALL = time.time() - time.monotonic()  # monotonic -> Unix seconds

_serve = fake._Handler._serve
_wait_until = fake._Handler._wait_until
_do_get = fake._Handler.do_GET


def _tag(body: dict[str, Any]) -> str | None:
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    text = users[-1].get("content") if users else None
    return text if body.get("stream") and isinstance(text, str) and text.startswith(TAG) else None


def serve(self: Any, kind: str, body: dict[str, Any], received: float) -> None:
    self.bench_tag = tag = _tag(body)
    if tag is not None:
        with LOCK:
            NOTES[tag] = {"received": WALL + received}
    _serve(self, kind, body, received)


def wait_until(self: Any, deadline: float) -> None:
    _wait_until(self, deadline)
    tag = getattr(self, "bench_tag", None)
    if tag is not None:  # the first delta goes out now
        self.bench_tag = None
        with LOCK:
            NOTES[tag]["first"] = time.time()


def do_get(self: Any) -> None:
    if self.path == "/_bench/notes":
        with LOCK:
            data = json.dumps(NOTES).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return
    _do_get(self)


fake._Handler._serve = serve  # type: ignore[method-assign]
fake._Handler._wait_until = wait_until  # type: ignore[method-assign]
fake._Handler.do_GET = do_get  # type: ignore[method-assign]

if __name__ == "__main__":
    fake.main(sys.argv[1:])
