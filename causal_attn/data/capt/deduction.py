"""A PrOntoQA-style deduction generator whose event names carry a controlled spurious correlation.

One sample: a fact about a person, two rules (the relevant one and a distractor, in random order) and a
True/False query; the target is a short chain of thought (the relevant rule, the conclusion) and the answer::

    input : "Sam is a cat. Every eagle is a mammal. Every cat isn't a mammal. True or false: Sam is a mammal.\nAnswer:"
    target: " Every cat isn't a mammal. So Sam isn't a mammal. <answer>False</answer>"

The distractor names the query's class with the opposite polarity, so only its subject tells the two rules
apart: reading the rules means finding the one whose subject is the fact's category (a lookup by content,
what an induction head does). A rule's polarity comes right after its subject (``is`` / ``isn't``).

The answer follows from the rules alone (the relevant rule's polarity). The *names* also suggest an
answer: a category pair (``cat``, ``mammal``) is true or false in the real world (:data:`WORLD`). In
the training split the rules agree with the world with probability ``rho`` (:data:`RHO`), so the names
predict the answer; the test variants are

- ``commonsense``: the rules always agree with the world (the training correlation, rho = 1),
- ``anticommonsense``: the rules always contradict it (rho = 0, the inverted correlation),
- ``nonsense``: made-up names never seen in training (:data:`NONSENSE`), no world knowledge at all.

The query's category is the subject's real class half of the time, so every split is balanced True /
False. Each record carries the generator's own event list as a CAPT estimation (``capt``: the
templates with ``{symbol_n}`` placeholders and the symbol -> name mapping, numbered in order of first
appearance), standing in for the assistant-LLM estimator, so :func:`causal_attn.data.capt.symbolize_sample`
and :func:`~causal_attn.data.capt.replicate` work on it directly; and a CAT annotation (``important``:
the conclusion depends on the fact and the relevant rule), so ``cat+capt`` runs on the same records.
"""
from __future__ import annotations

import random

from .datasets import VARIANTS

LINK_NOT = "isn't"  # negative rules and conclusions (word tokens "isn", "'", "t": the polarity follows the name)
RHO = 1.0  # P(rules agree with the world) in the training split
# real categories and their class (the "world" the names suggest)
WORLD = {"cat": "mammal", "dog": "mammal", "horse": "mammal", "cow": "mammal",
         "sparrow": "bird", "eagle": "bird", "robin": "bird", "owl": "bird",
         "salmon": "fish", "trout": "fish", "shark": "fish", "carp": "fish",
         "snake": "reptile", "lizard": "reptile", "turtle": "reptile", "gecko": "reptile"}
CLASSES = ("mammal", "bird", "fish", "reptile")
PEOPLE = ("Sam", "Max", "Alex", "Rex", "Fae", "Wren", "Polly", "Stella")
# made-up names for the nonsense variant: subjects and classes, disjoint from everything above
NONSENSE = {"subjects": ("wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus"),
            "classes": ("lorpus", "jompus", "gorpus", "shumpus")}


def _pick(rng: random.Random, subjects, classes, truth):
    """A (subject, class) query pair; the class is the subject's ``truth`` class half of the time."""
    subject = rng.choice(subjects)
    cls = truth(subject) if rng.random() < 0.5 else rng.choice([c for c in classes if c != truth(subject)])
    return subject, cls


def make_sample(rng: random.Random, variant: str, rho: float = RHO, cot: bool = True) -> dict:
    """One record of ``variant`` (``train`` or one of :data:`VARIANTS`); ``cot=False``: the target is the tagged
    answer alone (no rule, no conclusion), so the rule lookup has to happen inside the model."""
    if variant == "nonsense":
        subjects, classes = NONSENSE["subjects"], NONSENSE["classes"]
        fake = {s: classes[i % len(classes)] for i, s in enumerate(subjects)}
        truth = fake.get
    else:
        subjects, classes, truth = tuple(WORLD), CLASSES, WORLD.get
    person = rng.choice(PEOPLE)
    subject, cls = _pick(rng, subjects, classes, truth)
    world_says = truth(subject) == cls
    agree = {"train": rng.random() < rho, "commonsense": True, "anticommonsense": False}.get(variant)
    answer = (world_says if agree else not world_says) if agree is not None else rng.random() < 0.5
    other = rng.choice([s for s in subjects if s != subject])
    # templates: placeholders numbered by first appearance; symbol -> name
    names: dict[str, str] = {}

    def sym(name: str) -> str:
        for k, v in names.items():
            if v == name:
                return "{" + k + "}"
        key = f"symbol_{len(names) + 1}"
        names[key] = name
        return "{" + key + "}"

    p, s = sym(person), sym(subject)
    fact = f"{p} is a {s}."
    # the distractor names the query's class with the opposite polarity: only the subject tells the rules apart
    rules = [(subject, answer), (other, not answer)]
    rng.shuffle(rules)
    rule_text = {subj: f"Every {sym(subj)} {'is' if pos else LINK_NOT} a {sym(cls)}." for subj, pos in rules}
    q = sym(cls)
    query = f"True or false: {p} is a {q}."
    conclusion = f"So {p} {'is' if answer else LINK_NOT} a {q}."
    template_in = " ".join([fact] + [rule_text[r[0]] for r in rules] + [query]) + "\nAnswer:"
    tag = f"<answer>{'True' if answer else 'False'}</answer>"
    template_out = f" {rule_text[subject]} {conclusion} {tag}" if cot else f" {tag}"
    from .intervention import make_assignment, render

    original = make_assignment(sorted(names), "original", mapping=names)
    text_in, text_out = render(template_in, original).text, render(template_out, original).text
    fact_o, rule_o, concl_o = (render(t, original).text for t in (fact, rule_text[subject], conclusion))
    return {"source": "prontoqa", "variant": None if variant == "train" else variant,
            "input": text_in, "target": text_out, "answer": "true" if answer else "false",
            "world_agrees": answer == world_says if variant != "nonsense" else None,
            "important": [{concl_o if cot else tag: [fact_o, rule_o]}],
            "capt": {"templates": {"input": template_in, "target": template_out}, "symbols": dict(names)}}


def generate(seed: int = 0, n_train: int = 2000, n_test: int = 200, rho: float = RHO,
             cot: bool = True) -> dict[str, list[dict]]:
    """``{"train": [...], "commonsense": [...], "anticommonsense": [...], "nonsense": [...]}``; one
    ``random.Random(seed)`` draws the splits in that order. Ids are ``<split>:<index>``. ``cot=False``: targets
    without the chain of thought (:func:`make_sample`); the records are otherwise the same."""
    rng = random.Random(seed)
    out = {}
    for split, n in (("train", n_train),) + tuple((v, n_test) for v in VARIANTS):
        out[split] = [{"id": f"{split}:{i}", **make_sample(rng, split, rho, cot)} for i in range(n)]
    return out
