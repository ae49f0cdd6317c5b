"""Generic OpenAI-compatible chat client, resumable JSONL cache and a validated job runner.

Used by the CAT annotation pipeline (``causal_attn.data.annotate``) and CAPT event estimation
(``causal_attn.data.capt``). Standard library HTTP only (``urllib``), so it runs anywhere.

API
---
``ChatClient(base_url, model, *, api_key_env="OPENAI_API_KEY", max_concurrency=4, max_retries=5,
timeout=60.0, backoff=1.0, max_backoff=30.0, temperature=0.0, max_tokens=None,
price_prompt=0.0, price_completion=0.0)``
    ``client.chat(messages) -> ChatReply(text, prompt_tokens, completion_tokens, requests)``.
    POSTs ``{base_url}/chat/completions`` (``base_url`` like ``https://api.openai.com/v1``).
    Retries 429 / 5xx / timeouts / connection errors up to ``max_retries`` times with exponential
    back-off and jitter (``Retry-After`` honoured); other HTTP errors raise :class:`ChatError` at once.
    ``max_concurrency`` bounds simultaneous requests across threads. The API key is read from the
    environment variable ``api_key_env`` at each request (none set -> no ``Authorization`` header,
    fine for local servers); it is never logged, stored on the object, or written to disk.
    ``price_*`` are in currency units per million tokens, for the cost in the report.

``JsonlCache(path)``
    Append-only JSONL file of finished records, each ``{"key", "status", ...}``; ``status`` is
    ``"ok"`` or ``"failed"``. Every record is flushed and fsynced as it is written, so a crash or
    SIGKILL loses at most the record being written; a torn last line is ignored on load (counted
    in ``cache.corrupt_lines``) and later records start on a fresh line. ``cache.get(key)``,
    ``cache.put(record)``, ``key in cache``, ``len(cache)``.
    ``cache_key(model, messages)`` is the SHA-256 of the canonical JSON of both.

``run_jobs(client, cache, jobs, build_messages, validate, *, max_attempts=3, desc="llm",
progress=True, retry_failed=False) -> RunReport``
    For every job: ``messages = build_messages(job)``; if the cache holds the key (``ok``, or
    ``failed`` unless ``retry_failed``) no request is made. Otherwise the answer is sent to
    ``validate(text, job)``, which returns the parsed object or raises ``ValueError(reason)``; an
    invalid answer is re-asked (the conversation gains the bad answer and the reason) up to
    ``max_attempts`` answers in total, then recorded as ``failed`` with the reason. Transport
    failures after the client's own retries are counted as ``errors`` and *not* cached (the next
    run tries again). Jobs run on ``client.max_concurrency`` threads; results are written as they
    arrive. ``report.records`` holds one record per job, in job order (``None`` for errors).
    Record fields: ``key, status, job_id, result, raw, reason, attempts, prompt_tokens,
    completion_tokens``. ``job_id`` is ``job["id"]`` when the job is a dict holding one.

``extract_json(text)``
    The first JSON object or array in an answer (code fences and prose around it allowed);
    raises ``ValueError`` when there is none.

Example::

    client = ChatClient("https://api.openai.com/v1", "gpt-4o-mini", api_key_env="OPENAI_API_KEY")
    cache = JsonlCache("out/cache.jsonl")
    def build(job): return [{"role": "user", "content": job["prompt"]}]
    def check(text, job):
        obj = extract_json(text)
        if not isinstance(obj, dict): raise ValueError("not a JSON object")
        return obj
    report = run_jobs(client, cache, jobs, build, check, max_attempts=3, desc="annotate")
    print(report.summary())
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Iterable

from .jsonl import numbered_jsonl

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ChatError(RuntimeError):
    """A request that failed for good (non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, *, status: int | None = None, requests: int = 0):
        super().__init__(message)
        self.status = status
        self.requests = requests


@dataclasses.dataclass
class ChatReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 1  # HTTP requests spent, including transport retries


class ChatClient:
    """Minimal OpenAI-compatible ``/chat/completions`` client with bounded concurrency and retries."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 4, max_retries: int = 5, timeout: float = 60.0,
                 backoff: float = 1.0, max_backoff: float = 30.0, temperature: float | None = 0.0,
                 max_tokens: int | None = None, price_prompt: float = 0.0, price_completion: float = 0.0,
                 extra_body: dict | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError("max_concurrency must be >= 1 and max_retries >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.price_prompt = float(price_prompt)
        self.price_completion = float(price_completion)
        self.extra_body = dict(extra_body or {})
        self._slots = threading.BoundedSemaphore(self.max_concurrency)

    def __repr__(self) -> str:  # deliberately without any key material
        return f"ChatClient(url={self.url!r}, model={self.model!r}, key from ${self.api_key_env})"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_prompt + completion_tokens * self.price_completion) / 1e6

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = "Bearer " + key
        return headers

    def _sleep_before_retry(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2 ** attempt) * (0.5 + random.random())
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, self.max_backoff))

    def chat(self, messages: list[dict]) -> ChatReply:
        """One completion for ``messages``; transport retries are inside."""
        body = {"model": self.model, "messages": messages, **self.extra_body}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        data = json.dumps(body).encode("utf-8")
        last = "no attempt"
        status = None
        for attempt in range(self.max_retries + 1):
            retry_after = None
            with self._slots:
                req = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
                try:
                    with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                        payload = resp.read()
                    return _parse_completion(payload, attempt + 1)
                except urllib.error.HTTPError as e:
                    status = e.code
                    retry_after = e.headers.get("Retry-After") if e.headers else None
                    detail = e.read()[:200].decode("utf-8", "replace")
                    last = f"HTTP {e.code}: {detail}"
                    if e.code not in RETRYABLE_STATUS:
                        raise ChatError(f"{self.url}: {last}", status=e.code, requests=attempt + 1) from None
                except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError,
                        ConnectionError) as e:
                    status = None
                    last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                except _BadPayload as e:  # a 200 that is not a completion: retry like a 5xx
                    status = 200
                    last = str(e)
            if attempt < self.max_retries:
                self._sleep_before_retry(attempt, retry_after)
        raise ChatError(f"{self.url}: gave up after {self.max_retries + 1} requests; last: {last}",
                        status=status, requests=self.max_retries + 1)


class _BadPayload(Exception):
    pass


def _parse_completion(payload: bytes, requests: int) -> ChatReply:
    try:
        obj = json.loads(payload)
        text = obj["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise _BadPayload(f"malformed completion response ({type(e).__name__}): {payload[:120]!r}") from None
    usage = obj.get("usage") or {}
    return ChatReply(text=text if isinstance(text, str) else "", requests=requests,
                     prompt_tokens=int(usage.get("prompt_tokens") or 0),
                     completion_tokens=int(usage.get("completion_tokens") or 0))


# ---------------------------------------------------------------------------------------- cache

def cache_key(model: str, messages: list[dict]) -> str:
    """SHA-256 of the canonical JSON of the model name and the messages."""
    blob = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JsonlCache:
    """Append-only, fsynced-per-record JSONL store of finished requests, keyed by ``record["key"]``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.corrupt_lines = 0
        self._needs_newline = False
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        if os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        read = numbered_jsonl(self.path, skip_bad=True)  # a torn write from a killed process is skipped
        self._needs_newline = not read.ends_with_newline
        self.corrupt_lines = read.skipped
        for _, rec in read.records:
            if "key" not in rec or isinstance(rec["key"], (list, dict)):  # a JSON key must be hashable
                self.corrupt_lines += 1
                continue
            self._records[rec["key"]] = rec  # later records win (e.g. a retried failure that now succeeded)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def records(self) -> list[dict]:
        return list(self._records.values())

    def put(self, record: dict) -> None:
        if "key" not in record:
            raise ValueError("cache record needs a 'key'")
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as f:
                if self._needs_newline:
                    f.write("\n")
                    self._needs_newline = False
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._records[record["key"]] = record


# ---------------------------------------------------------------------------------------- runner

@dataclasses.dataclass
class RunReport:
    jobs: int = 0
    requests: int = 0          # HTTP requests sent (including transport retries)
    retries: int = 0           # transport retries + re-asks after invalid answers
    transport_retries: int = 0
    invalid_retries: int = 0
    ok: int = 0
    failed: int = 0            # invalid after max_attempts, recorded in the cache with the reason
    errors: int = 0            # transport failures after retries, not cached
    cached: int = 0            # answered from the cache, no request
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    records: list = dataclasses.field(default_factory=list, repr=False)
    error_messages: list = dataclasses.field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("records")
        d["error_messages"] = self.error_messages[:5]
        return d

    def summary(self) -> str:
        return (f"{self.jobs} jobs: {self.ok} ok, {self.failed} failed, {self.errors} errors, "
                f"{self.cached} from cache; {self.requests} requests, {self.retries} retries; "
                f"tokens {self.prompt_tokens} prompt + {self.completion_tokens} completion; "
                f"cost {self.cost:.4f}")


def _job_id(job: Any):
    return job.get("id") if isinstance(job, dict) else None


def run_jobs(client: ChatClient, cache: JsonlCache, jobs: Iterable[Any],
             build_messages: Callable[[Any], list], validate: Callable[[str, Any], Any], *,
             max_attempts: int = 3, desc: str = "llm", progress: bool = True,
             retry_failed: bool = False) -> RunReport:
    """Run every job through the model with validation, caching and accounting (see module doc)."""
    from tqdm.auto import tqdm

    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    jobs = list(jobs)
    report = RunReport(jobs=len(jobs), records=[None] * len(jobs))
    lock = threading.Lock()
    todo = []
    for idx, job in enumerate(jobs):
        messages = build_messages(job)
        key = cache_key(client.model, messages)
        hit = cache.get(key)
        if hit is not None and (hit.get("status") == "ok" or (hit.get("status") == "failed" and not retry_failed)):
            report.cached += 1
            report.records[idx] = hit
            if hit["status"] == "ok":
                report.ok += 1
            else:
                report.failed += 1
        else:
            todo.append((idx, job, key, messages))

    def one(idx, job, key, messages):
        convo = list(messages)
        reason, text = "", ""
        ptok = ctok = 0
        for attempt in range(1, max_attempts + 1):
            try:
                reply = client.chat(convo)
            except ChatError as e:
                with lock:
                    report.requests += e.requests
                    report.transport_retries += max(e.requests - 1, 0)
                    report.prompt_tokens += ptok
                    report.completion_tokens += ctok
                raise
            ptok += reply.prompt_tokens
            ctok += reply.completion_tokens
            with lock:
                report.requests += reply.requests
                report.transport_retries += reply.requests - 1
            text = reply.text
            try:
                result = validate(text, job)
            except ValueError as e:
                reason = str(e) or type(e).__name__
                if attempt < max_attempts:
                    with lock:
                        report.invalid_retries += 1
                    convo = list(messages) + [
                        {"role": "assistant", "content": text},
                        {"role": "user", "content": f"That answer was invalid: {reason}. "
                                                    "Answer again with only the corrected JSON."}]
                continue
            rec = dict(key=key, status="ok", job_id=_job_id(job), result=result, raw=text, reason=None,
                       attempts=attempt, prompt_tokens=ptok, completion_tokens=ctok)
            break
        else:
            rec = dict(key=key, status="failed", job_id=_job_id(job), result=None, raw=text, reason=reason,
                       attempts=max_attempts, prompt_tokens=ptok, completion_tokens=ctok)
        # written by the worker the moment it arrives: even on Ctrl-C in-flight answers are kept
        cache.put(rec)
        return rec

    bar = tqdm(total=len(jobs), initial=report.cached, desc=desc, disable=not progress, unit="job")
    pool = ThreadPoolExecutor(max_workers=client.max_concurrency)
    try:
        futures = {pool.submit(one, *t): t[0] for t in todo}
        for fut in as_completed(futures):
            idx = futures[fut]
            try:
                rec = fut.result()
            except ChatError as e:
                report.errors += 1
                report.error_messages.append(str(e))
            else:
                report.records[idx] = rec
                report.prompt_tokens += rec["prompt_tokens"]
                report.completion_tokens += rec["completion_tokens"]
                if rec["status"] == "ok":
                    report.ok += 1
                else:
                    report.failed += 1
            bar.update(1)
            bar.set_postfix(ok=report.ok, failed=report.failed, errors=report.errors)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    report.retries = report.transport_retries + report.invalid_retries
    report.cost = client.cost(report.prompt_tokens, report.completion_tokens)
    return report


def extract_json(text: str) -> Any:
    """The first JSON object or array in ``text`` (fences, prose before/after tolerated).

    Tries the whole stripped text first, then every ``{`` / ``[`` position with a raw decode, so
    ``Here it is: {...} Hope this helps`` works. Raises ``ValueError`` when nothing parses.
    """
    if not isinstance(text, str):
        raise ValueError("answer is not text")
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                obj, _ = decoder.raw_decode(text, i)
            except ValueError:
                continue
            if isinstance(obj, (dict, list)):
                return obj
    raise ValueError("no JSON object found in the answer")
