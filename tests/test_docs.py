"""README.md and docs/*.md: every generated section matches the results file it is generated from (cog --check).

The sections between cog markers are written by docs/gen.py from committed results files (`make docs`); a
results file that changes without `make docs` leaves a stale section, which fails here.
"""
import json
import re
from pathlib import Path

import pytest

from conftest import run_gen

pytest.importorskip("cogapp", reason="cogapp is in the [dev] extra (make test installs it)")

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 120


def test_generated_sections_match_their_results_files():
    proc = run_gen(ROOT, "--check")
    assert proc.returncode == 0, ("a generated section of README.md or docs/*.md is stale: run `make docs` and "
                                  f"commit the result.\n{proc.stdout}\n{proc.stderr}")


def test_readme_is_one_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_readme_links_point_to_docs_pages():
    text = (ROOT / "README.md").read_text()
    links = set(re.findall(r"\]\((docs/[^)#]+\.md)", text))
    assert {"docs/install.md", "docs/training.md", "docs/benchmarks.md", "docs/demo.md"} <= links, links


def test_check_fails_when_a_results_file_changes(docs_copy):
    path = docs_copy / "benchmarks" / "results" / "train_step.csv"
    text = path.read_text()
    row = next(ln for ln in text.splitlines() if ",cat," in ln and ln.startswith("1024,"))
    fields = row.split(",")
    fields[5] = "1.5"  # step_x_sdpa of CAT at T=1024
    path.write_text(text.replace(row, ",".join(fields)))
    proc = run_gen(docs_copy, "--check")
    assert proc.returncode != 0, f"the check passed although train_step.csv changed:\n{proc.stdout}"
    assert run_gen(docs_copy).returncode == 0
    assert "1.50x / 1.04x" in (docs_copy / "README.md").read_text()  # the headline table follows the file
    assert run_gen(docs_copy, "--check").returncode == 0


def test_missing_results_file_says_not_measured(docs_copy):
    (docs_copy / "benchmarks" / "results" / "train_step.csv").unlink()
    assert run_gen(docs_copy).returncode == 0
    assert "Not measured yet: `benchmarks/results/train_step.csv`" in (docs_copy / "README.md").read_text()


def test_demo_per_seed_numbers_are_ranges_across_runs(docs_copy):
    """A second demo results file with other per-seed accuracies turns the per-seed cells into min-max ranges."""
    committed = sorted((docs_copy / "docs").glob("demo_results*.json"))
    per_seed = [json.loads(p.read_text())["capt"]["capt"]["commonsense"]["per_seed"] for p in committed]
    data = json.loads(committed[0].read_text())
    capt = data["capt"]["capt"]["commonsense"]
    capt["per_seed"] = [round(min(runs) - 0.05, 2) for runs in zip(*per_seed)]  # a new low on every seed
    per_seed.append(capt["per_seed"])
    expected = " / ".join(f"{100 * min(runs):.0f}–{100 * max(runs):.0f}" for runs in zip(*per_seed))
    data["machine"] = {"description": "a test machine", "date": "2000-01-01"}
    (docs_copy / "docs" / "demo_results_2000-01-01.json").write_text(json.dumps(data))
    assert run_gen(docs_copy).returncode == 0
    demo = (docs_copy / "docs" / "demo.md").read_text()
    assert expected in demo, f"{expected!r} not in the generated CAPT table"
    assert "a test machine" in demo


def test_readme_example_runs():
    """The README's example, as printed, on the bundled SmolLM2-135M: edges found, loss active, gradients."""
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md example", "exec"), scope)
    try:
        assert scope["sample"].edges and scope["sample"].missing == [], scope["sample"]
        assert float(scope["handle"].loss().detach()) > 0, "the Re-Attention hinge is inactive on the example"
        params = [p for p in scope["model"].parameters() if p.requires_grad]
        assert params and all(p.grad is not None for p in params)
    finally:
        scope["handle"].unpatch()
