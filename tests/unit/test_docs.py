"""Documentation: a short README that starts with the two commands CI runs, and docs whose links all resolve."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 200


def ci_test_command() -> str:
    ci = (ROOT / ".ci" / "run").read_text()
    return re.search(r"^(python3 -m venv .*pytest.*)$", ci, re.M).group(1)


def main_job_command() -> str:
    """The main job: CI's setup without the test extra, then `skiplayer benchmark` instead of pytest."""
    setup, run_tests = ci_test_command().rsplit(" && ", 1)
    assert "pytest" in run_tests
    assert "'.[test]'" in setup
    return setup.replace("'.[test]'", ".") + " && skiplayer benchmark"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move details into docs/"


def test_readme_starts_with_the_two_commands():
    head = README.read_text().splitlines()[:12]
    commands = [line.strip() for line in head if line.startswith("    python3 -m venv")]
    assert commands == [main_job_command(), ci_test_command()]


def test_readme_has_the_results_markers():
    text = README.read_text()
    start, end = text.find("<!-- results:start -->"), text.find("<!-- results:end -->")
    assert 0 <= start < end


def _without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(path: Path) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _without_code(path.read_text()))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks too) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M)}


def broken_links(doc: Path) -> tuple[list[str], int]:
    """Relative links of `doc` whose file (or heading, for a #fragment into markdown) does not exist; and how many
    relative links there were."""
    broken, checked = [], 0
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        checked += 1
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists() or (fragment and dest.suffix == ".md" and fragment not in anchors(dest)):
            broken.append(target)
    return broken, checked


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(doc):
    broken, checked = broken_links(doc)
    assert broken == [], f"{doc.relative_to(ROOT)}: broken links {broken}"
    if doc == README:
        assert checked >= 5  # the README links to the docs pages


def test_slug_matches_github_anchors():
    assert slug("Generated table: verify_cost") == "generated-table-verify_cost"
    assert slug("Verification cost: v(n)") == "verification-cost-vn"
    assert slug("Calibrated drafts: `skiplayer calibrate`") == "calibrated-drafts-skiplayer-calibrate"


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# A `code` title\n\n```\n# not a heading\n```\n")
    doc = tmp_path / "a.md"
    doc.write_text("[ok](sub/b.md#a-code-title) [bad](missing.md) [no heading](sub/b.md#not-a-heading)\n"
                   "![img](sub) [web](https://example.org/x.md) `[code](x.md)` [self](#top)\n\n# Top\n")
    assert broken_links(doc) == (["missing.md", "sub/b.md#not-a-heading"], 5)


def test_verify_cost_writes_its_tables_between_the_markers(tmp_path):
    spec = importlib.util.spec_from_file_location("verify_cost", ROOT / "benchmarks" / "verify_cost.py")
    verify_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify_cost)
    performance = (ROOT / "docs" / "performance.md").read_text()
    assert verify_cost.DOC_START in performance and verify_cost.DOC_END in performance
    doc = tmp_path / "performance.md"
    doc.write_text(f"before\n{verify_cost.DOC_START}\nold table\n{verify_cost.DOC_END}\nafter\n")
    verify_cost.update_doc(str(doc), ["| config | tok/s |", "| float16 | 100.0 |"])
    text = doc.read_text()
    assert "old table" not in text and "| float16 | 100.0 |" in text
    assert text.startswith("before\n") and text.endswith(f"{verify_cost.DOC_END}\nafter\n")
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit):
        verify_cost.update_doc(str(doc), ["x"])
