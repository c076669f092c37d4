"""The project's documentation stands alone.

Users read the theory in `docs/` (the theory pages, concepts and tutorials); nothing in
the package, the docs, the benchmarks, the tests or the README may send them to a
specification that is not shipped with the repository. And the site must render its
math offline: `mkdocs.yml` loads no script from the network (MathJax is copied into the
site by `docs/hooks.py`). Fast: reads text files, imports nothing of gradflow or JAX.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED_DIRS = ("gradflow", "docs", "benchmarks", "tests")
SCANNED_FILES = ("README.md",)
# THEORY.md, "THEORY §x", "THEORY sums" (the specification by name, in capitals),
# DESIGN.md, and the folder it lives in.
FORBIDDEN = re.compile(r"\bTHEORY\b|\bDESIGN\.md\b|\.\./shared")
THIS_FILE = Path(__file__).resolve()


def _candidate_files() -> list[Path]:
    """Tracked files (and new files git does not ignore) under the scanned paths."""
    paths = list(SCANNED_DIRS) + list(SCANNED_FILES)
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *paths],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout.decode("utf-8", "surrogateescape")
        files = [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.SubprocessError):  # not a git checkout: every file there
        files = [p for d in SCANNED_DIRS for p in (ROOT / d).rglob("*")]
        files += [ROOT / name for name in SCANNED_FILES]
    return sorted({p for p in files if p.is_file() and p.resolve() != THIS_FILE})


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None  # binary (images, compiled files)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_reference_to_the_unshipped_specification():
    offenders = []
    files = _candidate_files()
    assert any(p.name == "README.md" for p in files) and len(files) > 20, "no files scanned"
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for found in FORBIDDEN.finditer(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {found.group()!r}: "
                                 f"{line.strip()[:120]}")
    assert not offenders, (
        "these lines point to a document users do not have (THEORY.md / DESIGN.md); "
        "link the docs page that states it instead (docs/theory/*.md, docs/concepts/*.md), "
        "or write the content out:\n" + "\n".join(offenders)
    )


def _extra_javascript(config: str) -> list[str]:
    """The entries of mkdocs.yml's top-level `extra_javascript:` list (plain or `path:`)."""
    match = re.search(r"^extra_javascript:[^\n]*\n((?:[ \t]+[^\n]*\n|[ \t]*\n)*)", config, re.M)
    assert match, "mkdocs.yml has no extra_javascript list"
    entries = []
    for line in match.group(1).splitlines():
        item = re.match(r"\s*-\s*(?:path:\s*)?(\S+)", line) or re.match(r"\s+path:\s*(\S+)", line)
        if item:
            entries.append(item.group(1).strip("'\""))
    return entries


def test_mkdocs_loads_no_remote_javascript():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    scripts = _extra_javascript(config)
    assert scripts, "mkdocs.yml's extra_javascript is empty: where does MathJax come from?"
    remote = [s for s in scripts if re.match(r"(?i)(https?:)?//", s)]
    assert not remote, (
        f"mkdocs.yml loads javascript from the network: {remote}; serve it with the site "
        "(docs/hooks.py copies MathJax into it) so the docs render offline"
    )
    assert "javascripts/mathjax/tex-mml-chtml.js" in scripts, (
        f"MathJax is not loaded from the site's own copy: extra_javascript = {scripts}"
    )


# "§N.M" (and "§N.M–N.K", "§N") always means a section of the project's theory pages:
# a paper's own sections are written "Sec. N". A cited section must exist there.
SECTION = re.compile(r"§(\d+)(?:\.(\d+))?(?:\s*[–-]\s*§?(?:(\d+)\.)?(\d+))?")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
THEORY = ROOT / "docs" / "theory"
# "the paper's §5.2", "ICML 2021, §4", "Boyd et al. 2011, §3": a paper's section
PAPER_SECTION = re.compile(r"(paper'?s?|et al\.?|ICML|NeurIPS|ICLR|COLT|\b(?:19|20)\d\d\)?),?\s*§")


def _sections(text: str) -> set[str]:
    """Every section a text names: "§2.3–2.4" is 2.3 and 2.4, "§1–§2" is 1 and 2."""
    found = set()
    for match in SECTION.finditer(text):
        chapter, first, end_chapter, last = match.groups()
        if first is None:  # a chapter, or a range of chapters
            found.add(chapter)
            if last is not None and end_chapter is None:
                found.update(str(c) for c in range(int(chapter) + 1, int(last) + 1))
            continue
        stop = int(last) if last is not None and end_chapter in (None, chapter) else int(first)
        found.update(f"{chapter}.{m}" for m in range(int(first), stop + 1))
        if end_chapter not in (None, chapter):  # §4.5–5.1: both ends
            found.add(f"{end_chapter}.{last}")
    return found


def _defined_sections() -> set[str]:
    """The sections the theory pages define: those in a heading (outside code blocks),
    and the chapters the index names ("§1 deep matrix factorization, ...")."""
    defined = set()
    for page in sorted(THEORY.glob("*.md")):
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for heading in re.findall(r"^#{1,6}\s+(.*)$", text, re.M):
            defined |= _sections(heading)
    index = (THEORY / "index.md").read_text(encoding="utf-8")
    defined |= set(re.findall(r"§(\d+) [a-zA-Z]", index))
    return defined


def test_section_reference_parsing():
    assert _sections("(§2.3–2.4) §1–§2, §5 and §3.7-3.9; §4.1, §4.7.") == {
        "2.3", "2.4", "1", "2", "5", "3.7", "3.8", "3.9", "4.1", "4.7"}
    for cited in ("the paper's §5.2", "ICML 2021, §4", "(Boyd et al. 2011, §3.4.1)",
                  "Razin & Cohen (NeurIPS 2020) §2"):
        assert PAPER_SECTION.search(cited), cited
    assert not PAPER_SECTION.search("Theorem 2 (§3.7), the docs' §5.2 and ICML 2021, Sec. 4")


def test_every_cited_section_exists_in_the_theory_pages():
    defined = _defined_sections()
    assert {"1.2", "3.7", "3.8", "3.9", "5", "1", "4"} <= defined, sorted(defined)
    missing = []
    for path in _candidate_files():
        relative = path.relative_to(ROOT)
        if relative.parts[0] not in ("gradflow", "docs") and relative.name != "README.md":
            continue
        text = _text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for section in sorted(_sections(line) - defined):
                missing.append(f"{relative}:{lineno}: §{section}: {line.strip()[:100]}")
            if PAPER_SECTION.search(line):
                missing.append(f"{relative}:{lineno}: a paper's section written with §: "
                               f"{line.strip()[:100]}")
    assert not missing, (
        "these lines cite a section that no heading of docs/theory/*.md defines; add the "
        "statement (with its assumptions and source paper) under a heading '§N.M ...' of "
        "the right theory page, or cite the section that has it (a paper's own section "
        "is written 'Sec. N'):\n" + "\n".join(missing)
    )
