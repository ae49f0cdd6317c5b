"""CAT causal annotation by an assistant LLM (SPEC §7): prompt templates, validation, pipeline.

Per task (``stg``, ``svamp``, ``arc_e``, ``gsm8k``, ``mawps``) the prompt is the project's own task
description + one or two hand-written demonstrations + the sample (question and answer) + a strict
JSON instruction. The model answers a JSON list of one-entry objects ``{key_span: [value_span, ...]}``
("the generation of key is influenced by the values"), the format of SPEC §4.

:func:`validate_annotation` accepts an answer only if it parses (fences / prose tolerated), has the
list-of-objects shape (a single object is split into one-entry objects), and every span occurs in
the sample's text (exactly or case-insensitively: what ``annotations_to_graph`` can locate without
fuzzy matching). Otherwise it raises ``ValueError`` with the reason, and :func:`annotate_records`
(through :func:`causal_attn.data.llm.run_jobs`) re-asks, then records the failure.

:func:`annotate_records` returns the records with ``important`` filled (records whose annotation
failed keep no ``important`` and get ``annotation_error``) and the run report; every answer is in
the resumable cache the moment it arrives, so a rerun after a crash requests only unfinished samples.
"""
from __future__ import annotations

import json
from typing import Any

from .adjacency import NormalizedText, iter_annotation_pairs, locate
from .llm import ChatClient, JsonlCache, RunReport, extract_json, run_jobs

SYSTEM = ("You annotate causal dependencies between spans of text for training language models. "
          "You answer with JSON only.")

INSTRUCTION = (
    "Return ONLY a JSON list of objects, each with exactly one key: {\"<key span>\": [\"<value span>\", ...]}. "
    "The key span is a piece of the text whose generation is influenced by the value spans. Copy every span "
    "verbatim from the text (same spelling, case and spacing); each value span must appear before its key span. "
    "Use short spans (a number with its unit, a name, a short phrase). No explanations, no markdown.")

TASKS: dict[str, dict[str, Any]] = {
    "stg": {
        "description": ("The text lists variables of a person or a city followed by a predicted outcome. Only some "
                        "variables cause the outcome; others are merely correlated with it or irrelevant. Mark the "
                        "outcome as the key and the causal variables (name and value) as its values."),
        "demos": [(
            "Here is the statistical data for a person. Please predict the probability of cancer. Hormones: 2, "
            "Smoking: 4, Room size: 7, Exercise: 5, Weight: 4, Yellow fingers: 6, Certain gene: 1, "
            "Clothing size: 4 Answer: ", "Low Risk",
            [{"Low Risk": ["Smoking: 4", "Exercise: 5", "Weight: 4"]}])],
    },
    "svamp": {
        "description": ("The text is a short math word problem followed by its numeric answer. Link each quantity to the "
                        "entity or action it belongs to, the question to the quantities it needs, and the answer to "
                        "the quantities and operation words that determine it."),
        "demos": [(
            "Jack had 12 marbles. He gave 5 marbles to Ann.. How many marbles does Jack have now?. Answer: ", "7.0",
            [{"12 marbles": ["Jack"]}, {"gave 5 marbles": ["He"]}, {"How many marbles": ["Jack", "gave"]},
             {"7.0": ["12 marbles", "gave 5 marbles", "How many marbles"]}])],
    },
    "mawps": {
        "description": ("The text is an arithmetic word problem and its answer. Link quantities to their owners and "
                        "actions, the question to what it asks about, and the answer to the quantities used."),
        "demos": [(
            "Lisa has 9 pens. She buys 4 more pens. How many pens does Lisa have?", "Answer: 13.0",
            [{"9 pens": ["Lisa has"]}, {"4 more pens": ["She buys"]}, {"How many pens": ["Lisa have"]},
             {"13.0": ["9 pens", "4 more pens", "How many pens"]}])],
    },
    "gsm8k": {
        "description": ("The text is a grade-school math problem followed by a worked solution that ends with "
                        "'#### <answer>'. Link each intermediate result in the solution to the quantities of the "
                        "problem or earlier results it is computed from, and the final answer to the last results."),
        "demos": [(
            "A box holds 6 eggs. Tom buys 3 boxes and breaks 2 eggs. How many eggs are left? Answer: ",
            "3 boxes hold 3*6=<<3*6=18>>18 eggs.\nAfter breaking 2 he has 18-2=<<18-2=16>>16 eggs.\n#### 16",
            [{"3*6=<<3*6=18>>18 eggs": ["6 eggs", "3 boxes"]}, {"18-2=<<18-2=16>>16 eggs": ["breaks 2 eggs", "18 eggs"]},
             {"#### 16": ["16 eggs", "How many eggs are left"]}])],
    },
    "arc_e": {
        "description": ("The text is a multiple-choice science question with lettered options and the letter of the "
                        "correct option. Link the answer to the words of the question and of the chosen option that "
                        "justify it."),
        "demos": [(
            "Which of these is needed for a plant to make food? (A) sunlight (B) sand (C) noise (D) plastic Answer: ",
            "A",
            [{"A": ["make food", "(A) sunlight"]}, {"(A) sunlight": ["needed for a plant"]}])],
    },
}


def _sample_block(question: str, answer: str) -> str:
    return f"Text:\n<<<\n{question}{answer}\n>>>"


def build_messages(task: str, question: str, answer: str) -> list[dict]:
    """Chat messages for one sample: system, then the task description, demonstrations and sample."""
    if task not in TASKS:
        raise ValueError(f"unknown annotation task {task!r}; known: {sorted(TASKS)}")
    spec = TASKS[task]
    parts = [spec["description"], INSTRUCTION]
    for i, (q, a, ann) in enumerate(spec["demos"], 1):
        parts.append(f"Example {i}.\n{_sample_block(q, a)}\nAnnotation:\n{json.dumps(ann, ensure_ascii=False)}")
    parts.append(f"Now annotate this sample.\n{_sample_block(question, answer)}\nAnnotation:")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def validate_annotation(answer: str, text: str) -> list[dict]:
    """Parsed ``[{key: [values]}]`` if every span occurs in ``text``; else ``ValueError(reason)``."""
    obj = extract_json(answer)
    if isinstance(obj, dict):
        obj = [{k: v} for k, v in obj.items()]
    if not isinstance(obj, list) or not obj:
        raise ValueError("expected a non-empty JSON list of {key: [values]} objects")
    out, bad = [], []
    norm = NormalizedText(text)
    for item in obj:
        if not isinstance(item, dict) or not item:
            raise ValueError(f"list entries must be objects, got {json.dumps(item)[:60]}")
        for key, values in item.items():
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"values of {key!r} must be a list of strings")
            for span in [key, *values]:
                if locate(norm, span, fuzzy=False)[0] is None:
                    bad.append(span)
            out.append({key: values})
    if bad:
        shown = ", ".join(json.dumps(s, ensure_ascii=False) for s in bad[:3])
        raise ValueError(f"{len(bad)} span(s) not found verbatim in the text: {shown}")
    return out


def annotate_records(records: list[dict], task: str, client: ChatClient, cache: JsonlCache, *,
                     input_field: str = "input", target_field: str = "target", max_attempts: int = 3,
                     progress: bool = True) -> tuple[list[dict], RunReport]:
    """Annotate ``records`` (dicts holding the question and answer fields); see module doc."""
    jobs = []
    for i, rec in enumerate(records):
        if input_field not in rec or target_field not in rec:
            raise ValueError(f"record {i} lacks {input_field!r} or {target_field!r}")
        q, a = str(rec[input_field]), str(rec[target_field])
        jobs.append({"id": i, "question": q, "answer": a, "text": q + a})
    report = run_jobs(client, cache, jobs, lambda j: build_messages(task, j["question"], j["answer"]),
                      lambda text, j: validate_annotation(text, j["text"]), max_attempts=max_attempts,
                      desc=f"annotate {task}", progress=progress)
    out = []
    for rec, cached in zip(records, report.records):
        new = {k: v for k, v in rec.items() if k not in ("important", "annotation_error")}
        if cached is not None and cached["status"] == "ok":
            new["important"] = cached["result"]
        else:
            new["annotation_error"] = cached["reason"] if cached else "request failed (see report)"
        out.append(new)
    return out, report


def annotation_spans(important: Any) -> int:
    """Number of span mentions in an annotation (for reporting)."""
    return sum(1 + len(v) for _, v in iter_annotation_pairs(important))
