"""CAPT: symbol assignment, round trips, annotation re-location, estimation against the fake server,
replication, loaders, the answer parser and per-variant accuracy."""
from __future__ import annotations

import collections
import json
import os
import random
import re
import string

import pytest
import torch
from hypothesis import given, settings, strategies as st

from causal_attn.data import capt
from causal_attn.data.jsonl import read_jsonl
from fake_openai import FakeOpenAI, Reply

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "capt")


def fixture(name):
    return os.path.join(FIXTURES, name)


def template_of(n_symbols, uses, rng):
    """A template using each of ``n_symbols`` placeholders ``uses`` times in random order."""
    slots = [i for i in range(1, n_symbols + 1) for _ in range(uses)]
    rng.shuffle(slots)
    return " and ".join("{symbol_%d}" % i for i in slots) + " {not_a_symbol}."


# ------------------------------------------------------------------------------ symbol assignment

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), uses=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_random_assignment_distinct_consistent_deterministic(n, uses, seed):
    template = template_of(n, uses, random.Random(seed))
    text, assignment = capt.symbolize(template, "random", seed)
    assert sorted(assignment, key=lambda k: int(k[7:])) == [f"symbol_{i}" for i in range(1, n + 1)]
    letters = list(assignment.values())
    assert len(set(letters)) == n                                   # distinct
    assert all(re.fullmatch("[A-Z]+", x) for x in letters)
    if n <= 26:
        assert all(len(x) == 1 for x in letters)
    else:  # the documented extension: every single letter, then two-letter names
        assert sum(len(x) == 1 for x in letters) == 26 and all(len(x) <= 2 for x in letters)
    # consistent: every occurrence of a placeholder got the same letter (text rebuilt independently)
    expected = re.sub(r"\{(symbol_\d+)\}", lambda m: assignment[m.group(1)], template)
    assert text == expected and text.endswith("{not_a_symbol}.")
    assert capt.symbolize(template, "random", seed) == (text, assignment)  # deterministic for a seed


def chi2_sf(stat, df):
    """Chi-square survival function (regularised upper incomplete gamma), fp64."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def letter_distribution(draws=10_000, n=3):
    counts = [collections.Counter() for _ in range(n)]
    template = " ".join("{symbol_%d}" % (i + 1) for i in range(n))
    for seed in range(draws):
        _, a = capt.symbolize(template, "random", seed)
        for i in range(n):
            counts[i][a[f"symbol_{i + 1}"]] += 1
    return counts


def test_letters_uniform_over_seeds():
    draws = 10_000
    counts = letter_distribution(draws)
    expected = draws / 26
    for c in counts:
        assert set(c) == set(string.ascii_uppercase)
        stat = sum((c[x] - expected) ** 2 / expected for x in string.ascii_uppercase)
        p = chi2_sf(stat, 25)
        max_dev = max(abs(c[x] / draws - 1 / 26) for x in string.ascii_uppercase)
        print(f"CAPT letters over {draws} draws: chi2={stat:.1f} (df 25) p={p:.3f} max|f-1/26|={max_dev:.4f}")
        assert p > 1e-4 and max_dev < 0.01


def test_order_symbol_original_modes():
    template = "{symbol_2} causes {symbol_1}; {symbol_3} and {symbol_2}."
    assert capt.symbolize(template, "order")[0] == "B causes A; C and B."
    assert capt.symbolize(template, "symbol") == (template, {f"symbol_{i}": "{symbol_%d}" % i for i in (1, 2, 3)})
    mapping = {"symbol_1": "rain", "symbol_2": {"phrase": "clouds", "set": "it is cloudy", "unset": "clear sky"},
               "symbol_3": "wind"}
    assert capt.symbolize(template, "original", mapping=mapping)[0] == "clouds causes rain; wind and clouds."
    with pytest.raises(ValueError, match="needs the mapping"):
        capt.symbolize(template, "original")
    with pytest.raises(ValueError, match="no phrase for symbol_3"):
        capt.symbolize(template, "original", mapping={"symbol_1": "a", "symbol_2": "b"})
    with pytest.raises(ValueError, match="unknown mode"):
        capt.symbolize(template, "letters")
    assert [capt.ordered_symbol(i) for i in (0, 25, 26, 27, 701, 702)] == ["A", "Z", "AA", "AB", "ZZ", "AAA"]


# ------------------------------------------------------------------------------ round trip and re-location

words = st.text(alphabet=string.ascii_letters + " ,.:", min_size=1, max_size=8)
phrases = st.lists(st.text(alphabet=string.ascii_lowercase + " ", min_size=1, max_size=10), min_size=1, max_size=5)


@st.composite
def abstracted_samples(draw):
    """(original text, template, mapping, pieces) built together: the truth estimation should find."""
    phrase_list = draw(phrases)
    pieces = draw(st.lists(st.one_of(words, st.integers(0, len(phrase_list) - 1)), min_size=1, max_size=12))
    original, template = "", ""
    for k, piece in enumerate(pieces):
        if isinstance(piece, str):
            original += piece
            template += piece
        else:
            original += phrase_list[piece]
            template += "{symbol_%d}" % (piece + 1)
    mapping = {f"symbol_{i + 1}": p for i, p in enumerate(phrase_list)}
    return original, template, mapping, pieces


def char_sources(pieces, value_of):
    """For an independent check: the template piece each output character comes from."""
    out = []
    for k, piece in enumerate(pieces):
        out += [("lit", k, j) for j in range(len(piece))] if isinstance(piece, str) else [("sym", k)] * len(value_of(piece))
    return out


@settings(max_examples=80, deadline=None)
@given(sample=abstracted_samples(), seed=st.integers(0, 10**6), data=st.data())
def test_round_trip_and_relocation(sample, seed, data):
    original, template, mapping, pieces = sample
    # original -> template (estimation) -> original
    assert capt.symbolize(template, "original", mapping=mapping)[0] == original
    sym, assignment = capt.symbolize(template, "random", seed)
    rendered = capt.render(template, assignment)
    # symbols -> original through the recorded spans
    back = rendered.text
    for name, s, e in reversed(rendered.spans):
        back = back[:s] + mapping[name] + back[e:]
    assert back == original
    # re-location of a span of the original text, checked against a brute-force character map
    s = data.draw(st.integers(0, len(original) - 1))
    e = data.draw(st.integers(s + 1, len(original)))
    orig_src = char_sources(pieces, lambda i: mapping[f"symbol_{i + 1}"])
    new_src = char_sources(pieces, lambda i: assignment[f"symbol_{i + 1}"])
    covered = set(orig_src[s:e])
    hit = [j for j, src in enumerate(new_src) if src in covered]
    want_span = sym[hit[0]:hit[-1] + 1]
    orig_r = capt.render(template, capt.make_assignment(list(mapping), "original", mapping=mapping))
    omap = capt._OffsetMap(orig_r, rendered)
    assert sym[omap.start(s):omap.end(e)] == want_span


def test_symbolize_sample_moves_cat_annotation():
    sample = {"id": 7, "input": "Smoking: 5, Weight: 3, Room size: 2. Answer: ", "target": "High Risk",
              "important": [{"High Risk": ["Smoking: 5", "Weight: 3"]}, {"Risk": ["oking"]}],
              "capt": {"templates": {"input": "{symbol_1}: 5, {symbol_2}: 3, {symbol_3}: 2. Answer: ",
                                     "target": "High Risk"},
                       "symbols": {"symbol_1": "Smoking", "symbol_2": "Weight", "symbol_3": "Room size"}}}
    for seed in range(20):
        rec = capt.symbolize_sample(sample, "random", seed)
        a = rec["capt_assignment"]
        assert rec["input"] == f"{a['symbol_1']}: 5, {a['symbol_2']}: 3, {a['symbol_3']}: 2. Answer: "
        # a value inside a replaced phrase ("oking") grows to the whole symbol
        assert rec["important"] == [{"High Risk": [f"{a['symbol_1']}: 5", f"{a['symbol_2']}: 3"]},
                                    {"Risk": [a["symbol_1"]]}]
        assert rec["capt_span_stats"]["missing"] == 0
        assert "capt" not in rec and rec["id"] == 7


def word_tokenizer(texts):
    """A tiny fast word-level tokenizer trained on ``texts`` (offsets work as with real ones)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_capt_composes_with_cat_graph():
    sample = {"input": "Smoking: 5, Weight: 3. Answer: ", "target": "High",
              "important": [{"High": ["Smoking: 5"]}],
              "capt": {"templates": {"input": "{symbol_1}: 5, {symbol_2}: 3. Answer: ", "target": "High"},
                       "symbols": {"symbol_1": "Smoking", "symbol_2": "Weight"}}}
    tok = word_tokenizer(list(string.ascii_uppercase) + ["5 3 : , . Answer High"])
    rec = capt.symbolize_sample(sample, "random", 11)
    res = capt.capt_graph(rec, tok)
    assert res.missing == []
    pieces = tok.convert_ids_to_tokens(res.input_ids)
    letter = rec["capt_assignment"]["symbol_1"]
    # key "High" is the last token: row = its position - 1; values = the tokens "<letter>", ":", "5"
    assert pieces[-1] == "High" and pieces[:3] == [letter, ":", "5"]
    assert res.edges == [(len(pieces) - 2, 0), (len(pieces) - 2, 1), (len(pieces) - 2, 2)]


# ------------------------------------------------------------------------------ estimation validation

def job(binary=False, **fields):
    return {"id": 0, "fields": fields or {"input": "Rain makes wet grass. Does rain cause wet grass?"}, "binary": binary}


GOOD = {"input": "{symbol_1} makes {symbol_2}. Does {symbol_1} cause {symbol_2}?",
        "symbols": {"symbol_1": "Rain", "symbol_2": "wet grass"}}


@pytest.mark.parametrize("answer, reason", [
    ("Sure! Here it is.", "JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"symbols": GOOD["symbols"]}), "field 'input' missing"),
    (json.dumps({**GOOD, "symbols": {}}), "'symbols' missing or empty"),
    (json.dumps({**GOOD, "input": "{symbol_1} makes wet grass. Does {symbol_1} cause {symbol_2}?"}), "still occurs"),
    (json.dumps({**GOOD, "input": GOOD["input"] + " {symbol_3}"}), "do not match"),
    (json.dumps({**GOOD, "symbols": {**GOOD["symbols"], "symbol_3": "makes"}}), "do not match"),
    (json.dumps({**GOOD, "input": GOOD["input"] + " {symbol_x}"}), "malformed placeholder"),
    (json.dumps({**GOOD, "symbols": {"symbol_1": "Rain", "symbol_2": "rain"}}), "mapped twice"),
    (json.dumps({**GOOD, "symbols": {"symbol_1": "Rain", "symbol_2": "snow"}}), "does not occur"),
    (json.dumps({**GOOD, "symbols": {"symbol_1": "Rain", "sym_2": "wet grass"}}), "symbol names"),
])
def test_validate_rejects(answer, reason):
    with pytest.raises(ValueError, match=reason):
        capt.validate_estimation(answer, job())


def test_validate_accepts_and_checks_binary():
    out = capt.validate_estimation("```json\n" + json.dumps(GOOD) + "\n```", job())
    assert out["templates"]["input"] == GOOD["input"] and out["roundtrip"] is False  # "Rain" restores "rain"
    with pytest.raises(ValueError, match="binary events need"):
        capt.validate_estimation(json.dumps(GOOD), job(binary=True))
    binary = {**GOOD, "symbols": {"symbol_1": {"phrase": "Rain", "set": "it rains", "unset": "no rain"},
                                  "symbol_2": {"phrase": "wet grass", "set": "wet grass", "unset": "dry grass"}}}
    assert capt.validate_estimation(json.dumps(binary), job(binary=True))["symbols"]["symbol_1"]["set"] == "it rains"
    leaky = {**binary, "input": binary["input"] + " Otherwise dry grass."}
    with pytest.raises(ValueError, match="'dry grass' still occurs"):
        capt.validate_estimation(json.dumps(leaky), job(binary=True, input=job()["fields"]["input"] + " Otherwise dry grass."))


def test_prompt_demonstrations_pass_validation():
    for fields, binary, answer in capt._DEMOS:
        out = capt.validate_estimation(json.dumps(answer), {"fields": fields, "binary": binary})
        assert out["symbols"] == answer["symbols"]
        msgs = capt.estimation_messages(fields, binary)
        assert msgs[0]["role"] == "system" and json.loads(msgs[-1]["content"].split("\n", 1)[1]) == fields


# ------------------------------------------------------------------------------ estimation against the fake server

# surface forms the scripted assistant replaces: (form, symbol number[, words kept before it])
FORMS = {
    101: [("smoking", 1), ("smoke", 1), ("lung cancer", 2)],
    102: [("rain", 1), ("wet streets", 2), ("dry streets", 2, "not ")],
    103: [("exercise", 1), ("heart disease", 2)],
    201: [("smoking", 1), ("smoke", 1), ("lung cancer", 2)],
    202: [("exercise", 1), ("heart disease", 2)],
    "301": [("yupt", 1), ("zupj", 2)],
    "302": [("kwox", 1), ("swoy", 2)],
    "prontoqa_fictional_ontology:example1": [("zumpus", 1), ("bitter", 2), ("Dumpuses", 3), ("dumpus", 3), ("Max", 4)],
    "prontoqa_fictional_ontology:example2": [("tumpus", 1), ("small", 2), ("Impuses", 3), ("impus", 3), ("Polly", 4)],
    "prontoqa_true_ontology:example1": [("cat", 1), ("Felines", 2), ("feline", 2), ("mammals", 3), ("mammal", 3),
                                          ("Tom", 4)],
    "prontoqa_true_ontology:example2": [("sparrow", 1), ("Birds", 2), ("bird", 2), ("cold-blooded", 3), ("Kiki", 4)],
}
# set / unset wording of binary (CLadder) events; default: the phrase / "not " + phrase
SET_UNSET = {"smoking": ("smoke", "do not smoke"), "rain": ("it rains", "without rain"),
             "wet streets": ("wet streets", "dry streets"), "exercise": ("exercise", "do not exercise")}
# scripted misbehaviour per sample: answers before the good one
SCRIPT = {102: ["leak"], 103: ["malformed"], 201: ["unmapped"], 202: ["leak", "leak", "leak"],
          "302": ["http500"], "prontoqa_fictional_ontology:example2": ["invented"]}


def load_fixture_samples():
    samples = []
    for name in ("cladder-v1-q-commonsense.json", "cladder-v1-q-anticommonsense.json", "test-noncommonsense-v1.5.csv"):
        samples += capt.load_cladder(fixture(name)).records
    for name in ("prontoqa_fictional_ontology.json", "prontoqa_true_ontology.json"):
        samples += capt.load_prontoqa(fixture(name)).records
    return samples


def good_answer(fields, forms, binary):
    """The correct abstraction of ``fields``: every surface form replaced, phrase = its first form."""
    out, symbols = {}, {}
    for form, num, *before in forms:
        phrase = symbols.setdefault(f"symbol_{num}", form)
        for f in fields:
            text = out.get(f, fields[f])
            out[f] = re.sub(r"(?<!\w)" + re.escape(form) + r"(?!\w)", "".join(before) + "{symbol_%d}" % num, text)
    if binary:
        symbols = {k: dict(zip(("phrase", "set", "unset"), (p, *SET_UNSET.get(p, (p, "not " + p)))))
                   for k, p in symbols.items()}
    return {**out, "symbols": symbols}


def scripted_llm(samples):
    by_input = {s["input"]: s for s in samples}

    def answer(body, n):
        msgs = body["messages"]
        ask = max(i for i, m in enumerate(msgs) if m["role"] == "user" and m["content"].startswith("Abstract this"))
        fields = json.loads(msgs[ask]["content"].split("\n", 1)[1])
        attempt = (len(msgs) - ask - 1) // 2          # earlier answers in this conversation
        sample = by_input[fields["input"]]
        binary = "binary" in msgs[0]["content"]
        good = good_answer(fields, FORMS[sample["id"]], binary)
        script = SCRIPT.get(sample["id"], [])
        http_failures = sum(1 for r in fake.requests if r["body"]["messages"] == msgs) - 1  # same request before
        step = script[attempt] if attempt < len(script) else "good"
        if step == "http500" and http_failures < 1:
            return Reply(status=500)
        if step == "leak":  # one occurrence of the first event left in place
            text, phrase = good["input"], capt.phrase_of(good["symbols"]["symbol_1"])
            cut = text.rfind("{symbol_1}")
            return json.dumps({**good, "input": text[:cut] + phrase + text[cut + len("{symbol_1}"):]})
        if step == "malformed":
            return "I think the events are rain and streets."
        if step == "unmapped":
            return json.dumps({**good, "target": good["target"] + " {symbol_9}"})
        if step == "invented":
            return json.dumps({**good, "symbols": {**good["symbols"], "symbol_1": "unicorn"}})
        return "Here you go:\n" + json.dumps(good)

    fake = FakeOpenAI(answer)
    return fake


def run_estimation(tmp_path, samples):
    from causal_attn.data.llm import ChatClient, JsonlCache

    with scripted_llm(samples) as fake:
        client = ChatClient(fake.base_url, "fake-mini", max_concurrency=3, backoff=0.01, max_retries=2)
        cache = JsonlCache(tmp_path / "cache.jsonl")
        estimated, report = capt.estimate_events(samples, client, cache, max_attempts=3)
        n_requests = len(fake.requests)
    return estimated, report, n_requests


def test_estimation_against_fake_server(tmp_path):
    samples = load_fixture_samples()
    assert len(samples) == 11
    estimated, report, n_requests = run_estimation(tmp_path, samples)
    print("CAPT estimation on fixtures + fake server:", report.summary(), report.reasons)
    assert (report.samples, report.accepted, report.rejected, report.errors) == (11, 10, 1, 0)
    assert report.retried == 5 and report.accepted_after_retry == 4     # 102, 103, 201, invented; 202 rejected
    assert report.re_asks == 4 + 2 and report.reasons == {"still occurs": 1}
    assert n_requests == 11 + 6 + 1                                         # + one HTTP 500 retried by the client
    assert {s["id"] for s in estimated} == {s["id"] for s in samples} - {202}
    for s in estimated:
        est = s["capt"]
        restored = capt.symbolize_sample(s, "original")
        assert capt.parse_answer(restored["target"]) == s["answer"]     # the answer survives abstraction
        assert not restored["input"].count("{symbol_")
        assert (s["source"] == "cladder") == isinstance(est["symbols"]["symbol_1"], dict)
    # resumable: a second run is served entirely from the cache, rejected sample included
    again, report2, n2 = run_estimation(tmp_path, samples)
    assert n2 == 0 and report2.cached == 11 and report2.accepted == 10 and report2.rejected == 1
    assert [s["capt"] for s in again] == [s["capt"] for s in estimated]


# ------------------------------------------------------------------------------ replication

def estimated_sample(i, n_symbols=3):
    template = " then ".join("{symbol_%d}" % (k + 1) for k in range(n_symbols))
    return {"id": i, "input": template.replace("{", "").replace("}", "") + "?", "target": " yes",
            "capt": {"templates": {"input": template + "?", "target": " {symbol_1} yes"},
                     "symbols": {f"symbol_{k + 1}": f"symbol_{k + 1}" for k in range(n_symbols)}}}


def test_replicate_count_variety_determinism():
    samples = [estimated_sample(i) for i in range(5)]
    k = 20
    out = capt.replicate(samples, k, seed=123)
    assert len(out) == k * len(samples)
    assert [r["capt_copy"] for r in out] == [c for c in range(k) for _ in samples]
    for i in range(len(samples)):
        copies = [r for r in out if r["id"] == i]
        assignments = {tuple(r["capt_assignment"].values()) for r in copies}
        assert len(assignments) >= k - 2                                    # new letters per copy
        for r in copies:                                                    # prompt and target share them
            assert r["target"] == f" {r['capt_assignment']['symbol_1']} yes"
    assert capt.replicate(samples, k, seed=123) == out
    assert capt.replicate(samples, k, seed=124) != out
    import datasets
    ds = capt.replicate(datasets.Dataset.from_list(samples), 2, seed=1)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 10
    with pytest.raises(ValueError, match="no event estimation"):
        capt.replicate([{"input": "x", "target": "y"}], 1)


def test_fresh_symbols_each_read():
    import datasets
    rows = [{**s, "capt": json.dumps(s["capt"])} for s in (estimated_sample(i) for i in range(3))]
    ds = datasets.Dataset.from_list(rows)
    ds.set_transform(capt.fresh_symbols_transform(seed=3))
    reads = [ds[0] for _ in range(6)]
    assert len({tuple(r["capt_assignment"].values()) for r in reads}) >= 5
    for r in reads:
        a = r["capt_assignment"]
        assert r["input"] == f"{a['symbol_1']} then {a['symbol_2']} then {a['symbol_3']}?"
    assert len(ds[0:3]["input"]) == 3


# ------------------------------------------------------------------------------ loaders, parser, accuracy

def test_loaders_and_variants():
    com = capt.load_cladder(fixture("cladder-v1-q-commonsense.json"))
    assert len(com) == 3 and com.skipped == ["104: answer 'maybe' is not yes/no"]
    assert {r["variant"] for r in com.records} == {"commonsense"}
    assert com.records[0]["target"] == " <answer>Yes</answer>" and com.records[1]["answer"] == "no"
    anti = capt.load_cladder(fixture("cladder-v1-q-anticommonsense.json"))
    assert {r["variant"] for r in anti.records} == {"anticommonsense"}
    non = capt.load_records(fixture("test-noncommonsense-v1.5.csv"))
    assert [r["variant"] for r in non.records] == ["nonsense"] * 2 and non.records[0]["input"].startswith("For those")
    fic = capt.load_prontoqa(fixture("prontoqa_fictional_ontology.json"))
    assert len(fic) == 2 and len(fic.skipped) == 1 and fic.records[0]["answer"] == "false"
    assert fic.records[0]["id"] == "prontoqa_fictional_ontology:example1"
    assert fic.records[0]["target"].endswith("Max is bitter. <answer>False</answer>")
    assert len(capt.load_prontoqa(fixture("prontoqa_fictional_ontology.json"), include_in_context=True)) == 3
    true = capt.load_records(fixture("prontoqa_true_ontology.json"))
    assert {r["variant"] for r in true.records} == {"commonsense"}
    assert capt.load_prontoqa(fixture("prontoqa_true_ontology.json"), "non-sense").records[0]["variant"] == "nonsense"
    with pytest.raises(ValueError, match="unknown test variant"):
        capt.normalize_variant("silly")


def test_unknown_record_format(tmp_path):
    (tmp_path / "odd.json").write_text('[{"foo": 1}]')
    with pytest.raises(ValueError, match="cannot tell the record format"):
        capt.load_records(str(tmp_path / "odd.json"))
    (tmp_path / "prepared.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": 3, "target": "b"}\n')
    loaded = capt.load_records(str(tmp_path / "prepared.jsonl"))
    assert len(loaded) == 1 and len(loaded.skipped) == 1


@pytest.mark.parametrize("text, choices, want", [
    ("<answer>Yes</answer>", ("yes", "no"), "yes"),
    ("Reasoning... <answer> no. </answer> yes", ("yes", "no"), "no"),
    ("<ANSWER>True</ANSWER>", ("true", "false"), "true"),
    ("<answer>maybe</answer> so the answer is no", ("yes", "no"), "no"),
    ("<answer>Yes", ("yes", "no"), "yes"),                 # unclosed tag: first word fallback
    ("False, because Max is bitter. True.", ("true", "false"), "false"),
    ("yesterday nothing happened", ("yes", "no"), None),   # whole words only
    ("", ("yes", "no"), None),
    (None, ("yes", "no"), None),
    ("<answer></answer>", ("yes", "no"), None),
    ("</answer>No<answer>", ("yes", "no"), "no"),
])
def test_parse_answer(text, choices, want):
    assert capt.parse_answer(text, choices) == want


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/answerYESnotruefalsNO .x\n")), max_size=60))
def test_parse_answer_never_crashes(text):
    out = capt.parse_answer(text)
    assert out in (None, "yes", "no", "true", "false")
    if out is not None and "<answer>" not in text.lower():
        assert re.search(r"\b" + out + r"\b", text, re.IGNORECASE)


def test_accuracy_by_variant():
    recs = (capt.load_cladder(fixture("cladder-v1-q-commonsense.json")).records
            + capt.load_cladder(fixture("cladder-v1-q-anticommonsense.json")).records
            + capt.load_prontoqa(fixture("prontoqa_fictional_ontology.json")).records)
    gens = ["<answer>Yes</answer>", "No.", "garbled", "<answer>Yes</answer>", "yes", "<answer>False</answer>", "no idea"]
    table = capt.accuracy_by_variant(recs, gens)
    assert table["commonsense"] == {"n": 3, "correct": 2, "unparsed": 1, "accuracy": 2 / 3}
    assert table["anticommonsense"] == {"n": 2, "correct": 1, "unparsed": 0, "accuracy": 0.5}
    assert table["nonsense"] == {"n": 2, "correct": 1, "unparsed": 1, "accuracy": 0.5}
    assert table["all"]["n"] == 7 and table["all"]["correct"] == 4
    with pytest.raises(ValueError, match="generations"):
        capt.accuracy_by_variant(recs, gens[:2])


# ------------------------------------------------------------------------------ command line

def test_cli_estimate_symbolize_score(tmp_path, capsys):
    from causal_attn.cli import main

    samples = load_fixture_samples()[:3]
    with scripted_llm(samples) as fake:
        rc = main(["capt", "estimate", "--data", fixture("cladder-v1-q-commonsense.json"), "--out",
                   str(tmp_path / "est.jsonl"), "--base-url", fake.base_url, "--model", "fake-mini"])
    assert rc == 0
    assert "3 samples: 3 accepted (2 after a retry)" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "est.cache.jsonl")
    rc = main(["capt", "symbolize", "--data", str(tmp_path / "est.jsonl"), "--out", str(tmp_path / "train.jsonl"),
               "--copies", "4", "--seed", "5"])
    assert rc == 0
    rows = read_jsonl(tmp_path / "train.jsonl")
    assert len(rows) == 12 and all("{symbol_" not in r["input"] for r in rows)
    assert "smok" not in " ".join(r["input"] for r in rows).lower()
    scored = [{**r, "generation": r["target"]} for r in rows]
    with open(tmp_path / "gen.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in scored))
    assert main(["capt", "score", "--data", str(tmp_path / "gen.jsonl")]) == 0
    assert "commonsense      n=   12 accuracy=1.0000" in capsys.readouterr().out
    assert main(["capt", "symbolize", "--data", str(tmp_path / "missing.jsonl"), "--out", "x"]) == 2
    assert main(["capt", "symbolize", "--data", fixture("cladder-v1-q-commonsense.json"), "--out",
                 str(tmp_path / "y.jsonl")]) == 2                           # not estimated yet: one-line error


def test_deduction_without_chain_of_thought_keeps_the_records_and_drops_the_reasoning():
    """``cot=False``: the same draws (inputs, answers, variants), the target is the tagged answer alone, and the
    CAT annotation (the answer depends on the fact and the relevant rule) still relocates under CAPT's letters."""
    from causal_attn.data.capt import parse_answer
    from causal_attn.data.capt.deduction import generate

    seed = random.randrange(10**6)
    with_cot, without = generate(seed, n_train=50, n_test=20), generate(seed, n_train=50, n_test=20, cot=False)
    for split in with_cot:
        for a, b in zip(with_cot[split], without[split], strict=True):
            assert (a["input"], a["answer"], a["world_agrees"]) == (b["input"], b["answer"], b["world_agrees"])
            assert b["target"] == " " + a["target"].rsplit(" ", 1)[1] and b["target"].startswith(" <answer>")
            assert parse_answer(b["target"]) == parse_answer(a["target"]) == b["answer"]
            (key, values), = b["important"][0].items()
            assert key == b["target"].strip() and all(v in b["input"] for v in values), f"seed {seed}"
    replicas = capt.replicate(without["train"], 2, seed=seed, mode="random")
    assert all(r["capt_span_stats"] == {"missing": 0, "ambiguous": 0} for r in replicas), f"seed {seed}"
