"""annotations_to_graph: properties against a brute-force oracle, tricky offsets, training records."""
from __future__ import annotations

import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from causal_attn import CausalGraph
from causal_attn.data.adjacency import (annotations_to_graph, encode_batch, encode_example, fuzzy_find,
                                        iter_annotation_pairs)
from causal_attn.data.collate import CATCollator
from causal_attn.data.tokenizers import TokenizerUnavailable, llama3_tokenizer, qwen2_tokenizer


def _local_tokenizer():
    """A tiny byte-level BPE trained here: multi-byte characters become several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "Smoking: 5, Weight: 3 Answer: High Risk", "héllo wörld café"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _real(name):
    try:
        return qwen2_tokenizer() if name == "qwen2" else llama3_tokenizer()
    except TokenizerUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def local_tok():
    return _local_tokenizer()


@pytest.fixture(scope="module", params=["local", "qwen2", "llama3"])
def any_tok(request, local_tok):
    return local_tok if request.param == "local" else _real(request.param)


# ----------------------------------------------------------------------------- oracle

def _oracle_occurrences(text, span):
    span = span.strip()
    if not span:
        return []
    hits = [(i, i + len(span)) for i in range(len(text) - len(span) + 1) if text[i:i + len(span)] == span]

    def wordish(c):
        return c.isalnum() or c == "_"

    bounded = [(s, e) for s, e in hits
               if (s == 0 or not (wordish(text[s - 1]) and wordish(text[s])))
               and (e == len(text) or not (wordish(text[e - 1]) and wordish(text[e])))]
    return bounded or hits


def _oracle_dense(text, annotations, offsets):
    """Brute force from the SPEC: character overlap -> token sets -> shifted rows x value columns."""
    T = len(offsets)
    dense = torch.zeros(T, T, dtype=torch.bool)

    def tokens(s, e):
        return [t for t, (a, b) in enumerate(offsets) if a < b and max(a, s) < min(b, e)]

    for item in annotations:
        for key, values in item.items():
            for ks_c, ke_c in _oracle_occurrences(text, key):
                kt = tokens(ks_c, ke_c)
                for value in values:
                    for vs_c, ve_c in _oracle_occurrences(text, value):
                        vt = tokens(vs_c, ve_c)
                        if ve_c > ks_c or not kt or not vt:
                            continue
                        for row in range(min(kt) - 1, max(kt)):
                            for col in range(min(vt), max(vt) + 1):
                                if 0 <= row and col <= row:
                                    dense[row, col] = True
    return dense


def _dense(res):
    T = len(res.input_ids)
    d = torch.zeros(T, T, dtype=torch.bool)
    for r, c in res.edges:
        d[r, c] = True
    return d


WORDS = ["cat", "the", "mat", "Smoking", "5", "10", "café", "héllo", "猫", "a", "Answer", ":", ",", "🙂"]
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=14).map(" ".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, data=st.data())
def test_exact_matches_equal_bruteforce_and_edges_are_causal(local_tok, text, data):
    spans = st.one_of(
        st.tuples(st.integers(0, len(text)), st.integers(1, 12)).map(lambda t: text[t[0]:t[0] + t[1]]),
        st.sampled_from(WORDS), st.text(max_size=6))
    ann = data.draw(st.lists(st.dictionaries(spans, st.lists(spans, max_size=3), min_size=1, max_size=2), max_size=4))
    res = annotations_to_graph(text, ann, local_tok, case_insensitive=False, fuzzy=False)
    T = len(res.input_ids)
    assert all(0 <= c <= r < T for r, c in res.edges)
    assert torch.equal(_dense(res), _oracle_dense(text, ann, res.offsets))
    # every span the oracle cannot find is reported missing, and only those
    mentioned = [s for item in ann for k, vs in item.items() for s in [k, *vs]]
    assert sorted(res.missing) == sorted(s for s in mentioned if s.strip() and not _oracle_occurrences(text, s))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60), ann=st.recursive(
    st.one_of(st.none(), st.text(max_size=8), st.integers()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=10))
def test_random_texts_and_garbage_annotations_never_crash(local_tok, text, ann):
    res = annotations_to_graph(text, ann, local_tok)
    assert all(0 <= c <= r < len(res.input_ids) for r, c in res.edges)


# ----------------------------------------------------------------------------- tricky offsets

def _toks(tok, res, rng):
    return [tok.decode([res.input_ids[t]]) for t in rng]


def test_leading_space_token_is_covered_and_neighbour_is_not(any_tok):
    text = "I like cats a lot. Answer: cats"
    res = annotations_to_graph(text, [{"Answer": ["like cats"]}], any_tok)
    cols = sorted({c for _, c in res.edges})
    covered = "".join(any_tok.decode([res.input_ids[c]]) for c in cols)
    assert covered.strip() == "like cats"
    rows = sorted({r for r, _ in res.edges})
    # rows ks-1 .. ke-2 predict exactly the key's tokens
    assert rows == list(range(rows[0], rows[-1] + 1))
    assert any_tok.decode(res.input_ids[rows[0] + 1: rows[-1] + 2]).strip() == "Answer"


def test_character_split_over_byte_tokens(any_tok):
    text = "The 猫🙂 sat. Then 猫🙂 purred"
    enc = any_tok(text, return_offsets_mapping=True)
    span_s = text.index("猫🙂")
    res = annotations_to_graph(text, [{"purred": ["猫🙂"]}], any_tok, encoding=enc)
    cols = sorted({c for _, c in res.edges})
    expect = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < b and a < span_s + 2 and b > span_s]
    expect2_s = text.index("猫🙂", span_s + 1)
    expect += [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < b and a < expect2_s + 2 and b > expect2_s]
    assert cols == sorted(set(expect))
    assert any_tok.decode([res.input_ids[c] for c in cols[: len(cols) // 2]]).strip() == "猫🙂"


def test_nfc_normalised_accents(any_tok):
    decomposed = unicodedata.normalize("NFD", "Le café est ouvert. Réponse: oui")
    assert decomposed != unicodedata.normalize("NFC", decomposed)
    res = annotations_to_graph(decomposed, [{"oui": ["café"]}, {"Réponse": ["ouvert"]}], any_tok)
    assert res.missing == [] and res.counts["exact"] == 4
    cols = {c for _, c in res.edges}
    s = decomposed.index("caf")
    assert any(a < s + 5 and b > s for a, b in (res.offsets[c] for c in cols))


def test_bos_at_offset_zero_and_span_at_the_very_start_and_end():
    tok = _real("llama3")
    text = "Rain makes the grass wet"
    res = annotations_to_graph(text, [{"wet": ["Rain"]}, {"Rain": ["grass"]}], tok)
    assert res.input_ids[0] == 128000 and res.offsets[0] == (0, 0)
    T = len(res.input_ids)
    # "wet" is the last token: its predicting row is T-2; "Rain" is token 1 (after BOS), never token 0
    assert res.edges == [(T - 2, 1)]
    # a key at the very start can be predicted by the BOS row, but its value comes later: no edge
    res2 = annotations_to_graph(text, [{"Rain": ["Rain"]}], tok)
    assert res2.edges == []


def test_key_at_token_zero_without_bos_has_no_row():
    tok = _real("qwen2")
    res = annotations_to_graph("Rain then Rain", [{"Rain": ["then"]}], tok)
    # first "Rain" is token 0: its row would be -1 and is dropped; the second gets row before it
    ids = res.input_ids
    assert res.offsets[0] == (0, 4) and res.edges == [(len(ids) - 2, 1)]


def test_repeated_spans_use_every_occurrence_and_only_earlier_values(local_tok):
    text = "x cat y cat z mat cat"
    res = annotations_to_graph(text, [{"mat": ["cat"]}], local_tok, case_insensitive=False, fuzzy=False)
    enc = local_tok(text, return_offsets_mapping=True)
    off = enc["offset_mapping"]
    cat_toks = {t for t, (a, b) in enumerate(off) if a < b and text[a:b].strip() == "cat"}
    mat_tok = [t for t, (a, b) in enumerate(off) if text[a:b].strip() == "mat"][0]
    assert {c for _, c in res.edges} == {t for t in cat_toks if t < mat_tok}
    assert {r for r, _ in res.edges} == {mat_tok - 1}


def test_word_boundary_preferred_over_substring(local_tok):
    text = "58 blocks and 5 more"
    res = annotations_to_graph(text, [{"more": ["5"]}], local_tok)
    cols = {c for _, c in res.edges}
    assert all(res.offsets[c][0] >= text.index(" 5 ") for c in cols)


def test_case_and_fuzzy_fallbacks_are_counted(local_tok):
    text = "Mom has 5 apples. She paid $ 6 each. Answer: 11"
    ann = [{"11": ["mom has", "Mom have", "$6 each", "5 apple", "banana"]}]
    res = annotations_to_graph(text, ann, local_tok)
    # "5 apple" is found inside "5 apples" (no word-boundary occurrence exists): still exact
    assert res.counts["exact"] == 2 and res.counts["case"] == 1 and res.counts["fuzzy"] == 2
    assert res.missing == ["banana"]
    assert ("Mom have", "Mom has") in res.fuzzy_matches
    off = annotations_to_graph(text, ann, local_tok, fuzzy=False)
    assert off.counts["fuzzy"] == 0 and len(off.missing) == 3


@pytest.mark.parametrize("span,text,found", [
    ("Mom have", "Mom has two", True), ("plant trees", "they planted trees", True),
    ("$1,000 prize", "a 1000 prize", True), ("5 hours", "five hours", False), ("2 hours", "3 hours", False),
    ("he", "she", False), ("apple", "apples", False), ("Tony can lift", "he can lift", False)])
def test_fuzzy_is_conservative(span, text, found):
    assert bool(fuzzy_find(text, span)) is found


def test_malformed_annotation_shapes_are_normalised_and_counted():
    import collections

    counts = collections.Counter()
    pairs = list(iter_annotation_pairs([{"k": "v"}, {"a": {"b": ["c"]}}, "junk", {"x": ["y", 3]}], counts))
    assert pairs == [("k", ["v"]), ("b", ["c"]), ("x", ["y"])]
    assert counts["malformed"] == 3
    assert list(iter_annotation_pairs('[{"k": ["v"]}]')) == [("k", ["v"])]


# ----------------------------------------------------------------------------- training records

def test_encode_example_labels_mask_prompt_and_edges_match_graph(any_tok):
    prompt, target = "Smoking: 5, Weight: 3 Answer: ", "High Risk"
    rec = encode_example(prompt, target, [{"High Risk": ["Smoking: 5"]}], any_tok)
    ids, labels = rec["input_ids"], rec["labels"]
    assert len(ids) == len(labels) == len(rec["attention_mask"])
    kept = [i for i, l in zip(ids, labels) if l != -100]
    text = any_tok.decode(kept, skip_special_tokens=True)
    assert text.strip() == target
    assert rec["edges"] and all(c <= r for r, c in rec["edges"])
    first_target = labels.index(next(l for l in labels if l != -100))
    n_key = sum(i != any_tok.eos_token_id for i in kept)  # the target is the key; EOS (if any) is not
    assert {r for r, _ in rec["edges"]} == set(range(first_target - 1, first_target - 1 + n_key))


def test_encode_batch_with_datasets_map_and_collate(local_tok):
    import datasets

    ds = datasets.Dataset.from_list([
        {"input": "the cat sat Answer: ", "target": "mat", "important": '[{"mat": ["cat"]}]'},
        {"input": "on the mat Answer: ", "target": "cat sat on the mat", "important": '[{"cat": ["mat"]}]'},
        {"input": "no notes here", "target": "x", "important": None}])
    enc = ds.map(encode_batch, batched=True, batch_size=2, fn_kwargs={"tokenizer": local_tok, "append_eos": False},
                 remove_columns=ds.column_names)
    batch = CATCollator(0, pad_to_multiple_of=8)(list(enc))
    B, T = batch["input_ids"].shape
    assert B == 3 and T % 8 == 0
    assert isinstance(batch["adjacency"], CausalGraph) and batch["adjacency"].seq_len == T
    dense = batch["adjacency"].to_dense()
    for b, rec in enumerate(enc):
        n = len(rec["input_ids"])
        assert batch["attention_mask"][b].sum() == n and (batch["labels"][b, n:] == -100).all()
        assert {(int(r), int(c)) for r, c in dense[b].nonzero()} == {tuple(e) for e in rec["edges"]}
    assert enc[2]["edges"] == []


def test_chat_template_wrapped_text_and_truncation():
    tok = _real("qwen2")
    text = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 cats. How many?"},
                                    {"role": "assistant", "content": "3"}], tokenize=False)
    res = annotations_to_graph(text, [{"3": ["3 cats"]}, {"How many": ["Tom"]}], tok)
    assert res.missing == [] and res.input_ids[0] == 151_644  # <|im_start|> is one special token
    threes = [t for t, (a, b) in enumerate(res.offsets) if text[a:b] == "3"]  # in "3 cats", then the answer
    assert len(threes) == 2 and (threes[1] - 1, threes[0]) in res.edges
    rec = encode_example("Tom has 3 cats. How many? Answer: ", "3", [{"3": ["3 cats"]}], tok, max_length=6)
    assert len(rec["input_ids"]) == 6 and all(c <= r < 6 for r, c in rec["edges"])
