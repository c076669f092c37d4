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
