"""MkDocs hooks for the gradflow site (registered in `mkdocs.yml` under `hooks:`).

1. **Tutorial scripts.** Every tutorial page `docs/tutorials/NAME.md` is also published
   as a runnable script `tutorials/NAME.py`: its executed Python blocks (the ones
   markdown-exec runs during the build, fenced with ```` ```python exec="on" ````), in
   order, with the page-only lines (marked `# markdown-exec: hide`) removed, except that
   `_show(fig)` becomes `fig.savefig("NAME-K.png")`. The script is compiled here, so a
   syntax error fails the build even before markdown-exec runs the page.
2. **API coverage.** Every public name of `gradflow/__init__.py` (the explicit
   `from .x import Y as Y` re-exports), and every public name or submodule of a
   re-exported package, must be rendered by a `::: identifier` directive on some page
   under `docs/api/` (or, for a function that shares its name with its module, such as
   `gradflow.flow`, carry an autorefs anchor `[](){#gradflow.flow}` above the directive
   that renders it); a missing one is a warning, which `mkdocs build --strict` turns
   into a failed build.
3. **MathJax, served with the site.** MathJax 3's browser bundle `tex-mml-chtml.js` and
   the files it loads on demand (its CHTML fonts, the TeX extensions it autoloads, the
   accessibility components of its menu) are copied from the installed
   `django-static-mathjax` package (a dependency of the `docs` extra; it ships MathJax's
   `es5/` directory) to `javascripts/mathjax/` in the site, which `mkdocs.yml`'s
   `extra_javascript` loads: the pages load no script from a CDN, and the math renders
   offline. Without the package the build fails with a warning that says what to install.
"""

import ast
import importlib.metadata
import logging
import re
import time
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.plugins.gradflow")

_FENCE = re.compile(r"^```python[^\n]*\bexec=\"on\"[^\n]*\n(.*?)^```", re.M | re.S)
_SHOW = re.compile(r"^(\s*)_show\((\w+)\)\s*#\s*markdown-exec: hide\s*$")
_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)", re.M)
_ANCHOR = re.compile(r"\[\]\(\)\{#([\w.]+)\}")  # an autorefs Markdown anchor [](){#gradflow.X}

_documented: set[str] = set()


def tutorial_script(markdown: str, stem: str) -> str:
    """The runnable script of a tutorial page (see the module docstring)."""
    blocks, figure = [], 0
    for match in _FENCE.finditer(markdown):
        lines = []
        for line in match.group(1).splitlines():
            show = _SHOW.match(line)
            if show:
                figure += 1
                indent, name = show.groups()
                lines.append(f'{indent}{name}.savefig("{stem}-{figure}.png", dpi=150)')
            elif "markdown-exec: hide" not in line:
                lines.append(line)
        code = "\n".join(lines).strip()
        if code:
            blocks.append(code)
    title = next((line[2:] for line in markdown.splitlines() if line.startswith("# ")), stem)
    header = (
        f'"""{title}\n\nThe executed code of the gradflow tutorial page tutorials/{stem}.md, '
        f"as one script.\nRun it with `python {stem}.py`; figures are saved as PNG files.\n"
        '"""'
    )
    return header + "\n\n" + "\n\n".join(blocks) + "\n"


MATHJAX_DIST = "django-static-mathjax"  # the PyPI distribution that ships MathJax 3's es5/
MATHJAX_DEST = "javascripts/mathjax"  # where it is served in the site (see mkdocs.yml)
# What of es5/ the page needs: the combined bundle, and what it loads from next to itself.
_MATHJAX_FILES = ("tex-mml-chtml.js", "LICENSE")
_MATHJAX_DIRS = ("output/chtml", "input/tex/extensions", "ui", "a11y", "sre")


def mathjax_es5() -> Path | None:
    """The `es5/` directory of the installed MathJax 3 package, or None if it is absent."""
    try:
        dist = importlib.metadata.distribution(MATHJAX_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    es5 = Path(dist.locate_file("mathjax/static/mathjax/es5"))
    return es5 if (es5 / "tex-mml-chtml.js").is_file() else None


def _mathjax_files(config):
    es5 = mathjax_es5()
    if es5 is None:
        log.warning(
            f"MathJax: the `{MATHJAX_DIST}` package is not installed, so the site would have "
            f"no math rendering: `pip install -e '.[docs]'` (or `pip install {MATHJAX_DIST}`)."
        )
        return []
    sources = [es5 / name for name in _MATHJAX_FILES if (es5 / name).is_file()]
    if not (es5 / "LICENSE").is_file() and (es5.parent / "LICENSE").is_file():
        sources.append(es5.parent / "LICENSE")  # MathJax's Apache-2.0 licence, served with it
    for folder in _MATHJAX_DIRS:
        sources.extend(sorted(p for p in (es5 / folder).rglob("*") if p.is_file()))
    out = []
    for src in sources:
        rel = src.relative_to(es5) if src.is_relative_to(es5) else Path(src.name)
        uri = f"{MATHJAX_DEST}/{rel.as_posix()}"
        out.append(File.generated(config, uri, abs_src_path=str(src)))
    return out


def on_files(files, config):
    for file in _mathjax_files(config):
        files.append(file)
    docs = Path(config["docs_dir"])
    for page in sorted((docs / "tutorials").glob("*.md")):
        if page.stem == "index":
            continue
        script = tutorial_script(page.read_text(encoding="utf-8"), page.stem)
        try:
            compile(script, f"tutorials/{page.stem}.py", "exec")
        except SyntaxError as error:
            log.warning(f"tutorials/{page.stem}.md: its script does not compile: {error}")
        files.append(File.generated(config, f"tutorials/{page.stem}.py", content=script))
    return files


_started: dict[str, float] = {}


def on_page_markdown(markdown, page, config, files):
    _started[page.file.src_uri] = time.perf_counter()
    if page.file.src_uri.startswith("api/"):
        _documented.update(_DIRECTIVE.findall(markdown))
        _documented.update(_ANCHOR.findall(markdown))
    return markdown


def on_page_content(html, page, config, files):
    # markdown-exec runs a page's code while it is converted: report the slow pages.
    seconds = time.perf_counter() - _started.pop(page.file.src_uri, time.perf_counter())
    if seconds >= 1.0:
        log.info(f"{page.file.src_uri}: rendered in {seconds:.1f}s (code executed)")
    return html


def _public(package_dir: Path, prefix: str) -> list[str]:
    """Identifiers that must be documented for the package at `package_dir`."""
    tree = ast.parse((package_dir / "__init__.py").read_text(encoding="utf-8"))
    names = []
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom):
            continue
        for alias in node.names:
            if alias.asname != alias.name or alias.name.startswith("_"):
                continue  # only explicit `import Y as Y` re-exports are public
            ident = f"{prefix}.{alias.name}"
            sub = package_dir / alias.name
            if node.module is None and (sub / "__init__.py").exists():
                names.append(ident)  # a subpackage: its own page, or each of its names
                names.extend(_public(sub, ident))
            else:
                names.append(ident)
    return names


def on_env(env, config, files):
    root = Path(__file__).resolve().parent.parent  # the repository (docs/hooks.py)
    required = _public(root / "gradflow", "gradflow")
    missing = []
    for ident in required:
        # A package counts as documented when all its own public names are.
        children = [r for r in required if r.startswith(ident + ".")]
        if ident in _documented or (children and all(c in _documented for c in children)):
            continue
        if not any(ident.startswith(d + ".") for d in _documented):
            missing.append(ident)
    for ident in missing:
        log.warning(
            f"API reference: public name `{ident}` is not rendered on any docs/api/ page "
            f"(add a `::: {ident}` directive)."
        )
    return env
