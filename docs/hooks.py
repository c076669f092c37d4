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
"""

import ast
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


def on_files(files, config):
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
