"""Annotation pipeline against a local fake OpenAI server: faults, retries, cache, SIGKILL + restart."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from causal_attn.data.annotate import TASKS, annotate_records, build_messages, validate_annotation
from causal_attn.data.jsonl import read_jsonl
from causal_attn.data.llm import ChatClient, ChatError, JsonlCache, cache_key, extract_json, run_jobs
from fake_openai import FakeOpenAI, Reply

SECRET = "sk-test-DO-NOT-LEAK-7f3a9c"
SAMPLE = re.compile(r"Text:\n<<<\n(.*?)\n>>>", re.S)


def _records(n):
    return [{"input": f"Sample {i}: Alice has {i + 3} apples and Bob has 2. How many in total? Answer: ",
             "target": str(i + 5), "idx": i} for i in range(n)]


def _sample_text(body):
    """The sample of a request (the last Text block of the first user message) and its index."""
    text = SAMPLE.findall(body["messages"][1]["content"])[-1]
    return text, int(re.match(r"Sample (\d+):", text).group(1))


def _good(text):
    return json.dumps([{text.rsplit(" ", 1)[1]: ["Alice has", "Bob has 2"]}, {"How many": ["apples"]}])


def test_extract_json_and_validation():
    assert extract_json('Sure!\n```json\n[{"a": ["b"]}]\n```\nDone') == [{"a": ["b"]}]
    assert extract_json('{"x": 1} trailing {"y": 2}') == {"x": 1}
    with pytest.raises(ValueError):
        extract_json("no json at all {broken")
    text = "Tom has 3 cats. Answer: 3"
    assert validate_annotation('{"3": ["Tom has", "3 cats"]}', text) == [{"3": ["Tom has", "3 cats"]}]
    assert validate_annotation('[{"answer": "tom HAS"}]', text) == [{"answer": ["tom HAS"]}]
    for bad, why in [('[{"3": ["Tom had"]}]', "not found"), ("[]", "non-empty"), ('["3"]', "objects"),
                     ('[{"3": [1]}]', "strings"), ("Tom has", "no JSON")]:
        with pytest.raises(ValueError, match=why):
            validate_annotation(bad, text)


def test_every_template_has_demos_that_validate():
    for task, spec in TASKS.items():
        for q, a, ann in spec["demos"]:
            assert validate_annotation(json.dumps(ann), q + a) == ann
        msgs = build_messages(task, "Q? Answer: ", "A")
        assert msgs[0]["role"] == "system" and "JSON" in msgs[1]["content"] and msgs[1]["content"].endswith("Annotation:")


def test_faults_retries_and_accounting(tmp_path, monkeypatch):
    """Scripted faults per sample (by its n-th request): 429, 500, malformed JSON, a span not in the
    text, a slow answer beyond the timeout, a non-completion body, and a sample that never validates."""
    monkeypatch.setenv("FAKE_KEY", SECRET)
    calls, lock = Counter(), threading.Lock()

    def answer(body, n):
        text, i = _sample_text(body)
        with lock:
            calls[i] += 1
            k = calls[i]
        script = {
            (0, 1): Reply(status=429, headers={"Retry-After": "0"}),
            (1, 1): Reply(status=500),
            (2, 1): "I think it is {not json",
            (3, 1): json.dumps([{"Answer": ["Carol has"]}]),
            (4, 1): Reply(content=_good(text), delay=1.5),
            (6, 1): Reply(body=b"<html>gateway</html>"),
        }
        if i == 5:
            return json.dumps([{"Answer": ["a span that is not there"]}])
        return script.get((i, k), _good(text))

    records = _records(10)
    with FakeOpenAI(answer) as fake:
        client = ChatClient(fake.base_url, "fake-model", api_key_env="FAKE_KEY", max_concurrency=3,
                            max_retries=3, timeout=0.5, backoff=0.01, price_prompt=1.0, price_completion=2.0)
        cache = JsonlCache(tmp_path / "cache.jsonl")
        out, rep = annotate_records(records, "svamp", client, cache, max_attempts=3, progress=False)
        served = len(fake.requests)
        assert all(r["headers"].get("Authorization") == f"Bearer {SECRET}" for r in fake.requests)
        # rerun: everything comes from the cache, nothing is requested
        out2, rep2 = annotate_records(records, "svamp", client, JsonlCache(tmp_path / "cache.jsonl"), progress=False)
        assert len(fake.requests) == served
    print(f"\nfault run: {rep.as_dict()}\nrerun: requests={rep2.requests} cached={rep2.cached}")
    assert (rep.ok, rep.failed, rep.errors) == (9, 1, 0)
    # 10 first requests + 429 + 500 + timeout + bad body (transport) + malformed + bad span + 2 more for sample 5
    assert rep.transport_retries == 4 and rep.invalid_retries == 4 and rep.retries == 8
    assert rep.requests == 18 and served == 18
    # billed: the 14 completions that arrived (not 429 / 500 / the timed-out one / the bad body)
    assert rep.prompt_tokens == 11 * 14 and rep.completion_tokens == 7 * 14
    assert rep.cost == pytest.approx((11 * 14 * 1.0 + 7 * 14 * 2.0) / 1e6)
    assert (rep2.requests, rep2.cached, rep2.ok, rep2.failed) == (0, 10, 9, 1)
    assert "not found verbatim" in out[5]["annotation_error"] and "important" not in out[5]
    for rec in out[:5] + out[6:]:
        assert rec["important"][0] == {rec["target"]: ["Alice has", "Bob has 2"]}
    assert out2 == out
    assert SECRET not in (tmp_path / "cache.jsonl").read_text()


def test_non_retryable_status_and_exhausted_retries_are_errors_not_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with FakeOpenAI(lambda body, n: Reply(status=401 if "Sample 0" in body["messages"][-1]["content"] else 503)) as fake:
        client = ChatClient(fake.base_url, "m", api_key_env="NO_SUCH_KEY", max_retries=2, backoff=0.001)
        with pytest.raises(ChatError) as e:
            client.chat([{"role": "user", "content": "Sample 0"}])
        assert e.value.status == 401 and e.value.requests == 1
        cache = JsonlCache(tmp_path / "c.jsonl")
        rep = run_jobs(client, cache, [{"id": 1}], lambda j: [{"role": "user", "content": "x"}, {"role": "user", "content": "Sample 1"}],
                       lambda t, j: t, progress=False)
        assert (rep.errors, rep.requests, rep.transport_retries, len(cache)) == (1, 3, 2, 0)
        assert "Authorization" not in fake.requests[0]["headers"]  # no key set: none sent


def test_cache_survives_a_torn_last_line_and_later_records_win(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = JsonlCache(path)
    cache.put({"key": "a", "status": "failed", "reason": "x"})
    cache.put({"key": "b", "status": "ok", "result": [1]})
    with open(path, "a") as f:
        f.write('{"key": "c", "status": "o')  # a write cut by SIGKILL
    again = JsonlCache(path)
    assert again.corrupt_lines == 1 and len(again) == 2
    again.put({"key": "a", "status": "ok", "result": [2]})
    third = JsonlCache(path)
    assert third.get("a")["result"] == [2] and third.corrupt_lines == 1 and len(third) == 2
    assert cache_key("m", [{"role": "user", "content": "é"}]) != cache_key("m2", [{"role": "user", "content": "é"}])


def test_sigkill_mid_run_then_restart_loses_nothing_and_repeats_no_finished_sample(tmp_path):
    n = 16
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(n)))
    out, cache_path = tmp_path / "out.jsonl", tmp_path / "out.jsonl.cache.jsonl"
    per_sample, lock = Counter(), threading.Lock()

    def answer(body, k):
        text, i = _sample_text(body)
        with lock:
            per_sample[i] += 1
        if k % 5 == 0:
            return Reply(status=429, headers={"Retry-After": "0"})
        return Reply(content=_good(text), delay=0.25)

    env = {**os.environ, "ANNOTATE_KEY": SECRET, "PYTHONUNBUFFERED": "1"}
    with FakeOpenAI(answer) as fake:
        cmd = [sys.executable, "-m", "causal_attn", "annotate", str(src), "--task", "svamp", "--out", str(out),
               "--base-url", fake.base_url, "--model", "fake", "--api-key-env", "ANNOTATE_KEY",
               "--concurrency", "2", "--backoff", "0.01", "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if cache_path.exists() and cache_path.read_text().count("\n") >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "annotator finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        out1, err1 = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        first_requests = len(fake.requests)
        finished = JsonlCache(cache_path)
        done_keys = {r["key"] for r in finished.records()}
        done_ids = {r["job_id"] for r in finished.records()}
        before = Counter(per_sample)

        run2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run2.returncode == 0, run2.stderr
        second = [_sample_text(r["body"])[1] for r in fake.requests[first_requests:]]

    report = json.loads(run2.stderr.strip().splitlines()[-1])
    print(f"\nSIGKILL after {first_requests} requests with {len(done_ids)} records on disk "
          f"({finished.corrupt_lines} torn lines); restart: {report['requests']} requests, "
          f"{report['retries']} retries, {report['cached']} cached, {report['ok']} ok; "
          f"records after restart: {len(out.read_text().splitlines())}")
    assert not (set(second) & done_ids), "a finished sample was requested again"
    assert report["cached"] == len(done_ids) and report["ok"] == n and report["errors"] == 0
    assert set(second) == set(range(n)) - done_ids
    records = read_jsonl(out)
    assert [r["idx"] for r in records] == list(range(n))
    assert all(r["important"][0] == {r["target"]: ["Alice has", "Bob has 2"]} for r in records)
    final = JsonlCache(cache_path)
    assert len(final) == n and done_keys <= {r["key"] for r in final.records()}
    assert all(before[i] >= 1 for i in done_ids)
    for blob in [out1, err1, run2.stdout, run2.stderr] + [p.read_text() for p in tmp_path.iterdir() if p.is_file()]:
        assert SECRET not in blob


def test_cli_errors_and_coverage_table(tmp_path, capsys):
    from causal_attn.cli import main

    assert main(["annotate", str(tmp_path / "missing.jsonl"), "--task", "svamp", "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"input": "Tom has 3 cats. Answer: ", "target": "3", "important": [{"3": ["3 cats", "Tom had", "zebra"]}]}]))
    assert main(["annotate", str(src)]) == 2
    assert "--task and --out are required" in capsys.readouterr().err
    try:
        from causal_attn.data.tokenizers import llama3_tokenizer
        llama3_tokenizer()
    except ImportError as e:
        pytest.skip(str(e))
    assert main(["annotate", "--coverage", str(src), "--tokenizer", "llama3"]) == 0
    assert "| a.jsonl | llama3 | 4 | 2 | 0 | 1 | 1 | 75.00% |" in capsys.readouterr().out
