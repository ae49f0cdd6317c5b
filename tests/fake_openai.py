"""A local fake of the OpenAI ``/v1/chat/completions`` endpoint for tests.

``FakeOpenAI(answer)`` starts a threaded HTTP server on 127.0.0.1 (ephemeral port) in a daemon
thread; use it as a context manager. ``answer(body, n)`` gets the decoded request body and the
1-based request number and returns either a string (the assistant's content, sent as a normal
200 completion with usage) or a :class:`Reply` for anything else: an HTTP error status (429, 500),
a raw non-completion body, a delay before answering (for timeouts), or extra headers.

Every request is recorded in ``server.requests`` as ``{"body", "headers", "n"}``, so tests can count
requests per prompt and check what was (not) sent. ``server.base_url`` is ``http://127.0.0.1:PORT/v1``.

Run as a script (``python tests/fake_openai.py ANSWERS.json``) it serves answers from a JSON file
mapping a substring of the last user message to the answer, printing ``PORT <n>`` on stdout.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclasses.dataclass
class Reply:
    content: str | None = None   # assistant text for a 200 completion
    status: int = 200
    body: bytes | None = None    # raw body instead of a completion (malformed responses, error bodies)
    delay: float = 0.0           # seconds to wait before answering
    headers: dict = dataclasses.field(default_factory=dict)


def completion(content: str, model: str = "fake", prompt_tokens: int = 11, completion_tokens: int = 7) -> bytes:
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }).encode()


class FakeOpenAI:
    def __init__(self, answer: Callable[[dict, int], "str | Reply"]):
        self.answer = answer
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, b'{"error": "not found"}')
                try:
                    body = json.loads(raw)
                except ValueError:
                    return self._send(400, b'{"error": "bad json"}')
                with fake._lock:
                    n = len(fake.requests) + 1
                    fake.requests.append({"body": body, "headers": dict(self.headers), "n": n})
                reply = fake.answer(body, n)
                if isinstance(reply, str):
                    reply = Reply(content=reply)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.body is not None:
                    data = reply.body
                elif reply.status == 200:
                    data = completion(reply.content or "", model=body.get("model", "fake"))
                else:
                    data = json.dumps({"error": {"message": f"fake status {reply.status}"}}).encode()
                self._send(reply.status, data, reply.headers)

            def _send(self, status, data, headers=None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, str(v))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def prompts(self) -> list[str]:
        """The last user message of every request, in arrival order."""
        out = []
        for r in self.requests:
            users = [m["content"] for m in r["body"]["messages"] if m.get("role") == "user"]
            out.append(users[-1] if users else "")
        return out


def _serve_from_file(path: str) -> None:
    with open(path) as f:
        table = json.load(f)

    def answer(body, n):
        last = body["messages"][-1]["content"]
        for needle, reply in table.items():
            if needle in last:
                return reply
        return Reply(status=500)

    with FakeOpenAI(answer) as fake:
        print(f"PORT {fake.port}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _serve_from_file(sys.argv[1])
