"""MkDocs hooks of the covidxr site (``mkdocs.yml``: ``hooks:``), run at every build, strict or not.

- ``modules.md`` is generated: one row per Python module of ``covidxr/``, ``app/`` and ``benchmarks/`` with the first
  paragraph of its docstring, so the module index cannot fall behind the code (nobody keeps it by hand).
- A link from a page to a repository file outside ``docs/`` (``../app/README.md``, ``../benchmarks/results/X.md``)
  works on GitHub as it is; for the site the hook copies the file in under ``repo/`` and points the link there. A link
  to a file that does not exist is left alone, so MkDocs reports it and ``mkdocs build --strict`` fails.
- ``<!-- app-imports -->`` in a page becomes the list of ``covidxr`` modules that ``app/`` imports, read from its import
  statements.
"""

from __future__ import annotations

import ast
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

REPO = Path(__file__).resolve().parents[2]
MIRROR = "repo"  # site folder of the repository files the pages link to
INDEXED = ("covidxr", "app", "benchmarks")
LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")  # [text](target#anchor): inline links only


def first_paragraph(path: Path) -> str:
    """The first paragraph of a module's docstring on one line ("(no docstring)" when there is none)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "(no docstring)"
    text = " ".join(doc.split("\n\n")[0].split())
    return text.replace("|", "\\|")


def module_index() -> str:
    """The generated page: every module under ``INDEXED`` with its docstring's first paragraph."""
    lines = ["# Module index", "",
             "Generated at build time from each module's docstring (`docs/hooks/site_hooks.py`); to change a line, "
             "change the docstring. The layering rules and where to start are in [Architecture](architecture.md).", ""]
    for folder in INDEXED:
        lines += [f"## `{folder}/`", "", "| module | what it is |", "|---|---|"]
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            lines.append(f"| `{rel}` | {first_paragraph(path)} |")
        lines.append("")
    return "\n".join(lines)


def app_imports() -> str:
    """The ``covidxr`` modules ``app/`` imports (at module level or inside functions), as a Markdown list."""
    used: dict[str, set[str]] = {}
    for path in sorted((REPO / "app").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "covidxr":
                    used.setdefault(name, set()).add(f"`app/{path.name}`")
    return "\n".join(f"- `{name}`: {', '.join(sorted(users))}" for name, users in sorted(used.items()))


def outside_target(page_src: str, target: str, docs_dir: Path) -> Path | None:
    """The repository file a page's relative link points to when it lies outside ``docs/`` (else None)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
        return None  # an address or an absolute path: not a repository file
    source = (REPO / page_src[len(MIRROR) + 1:]) if page_src.startswith(MIRROR + "/") else docs_dir / page_src
    path = (source.parent / target).resolve()
    if path.is_relative_to(docs_dir) and not page_src.startswith(MIRROR + "/"):
        return None
    return path if path.is_relative_to(REPO) else None


def linked_files(text: str, page_src: str, docs_dir: Path) -> list[Path]:
    """The existing repository files outside ``docs/`` that ``text`` links to."""
    found = []
    for match in LINK.finditer(text):
        path = outside_target(page_src, match.group(2), docs_dir)
        if path is not None and path.is_file() and not path.is_relative_to(docs_dir):
            found.append(path)
    return found


def on_files(files: Files, config) -> Files:
    docs_dir = Path(config["docs_dir"]).resolve()
    files.append(File.generated(config, "modules.md", content=module_index()))
    todo = [(f.src_uri, Path(f.abs_src_path).read_text(encoding="utf-8")) for f in files.documentation_pages()
            if f.abs_src_path]
    mirrored: set[Path] = set()
    while todo:  # mirrored pages may link further out (app/README.md -> data/README.md)
        src, text = todo.pop()
        for path in linked_files(text, src, docs_dir):
            if path in mirrored:
                continue
            mirrored.add(path)
            uri = f"{MIRROR}/{path.relative_to(REPO).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV))
            if path.suffix == ".md":
                todo.append((uri, path.read_text(encoding="utf-8")))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    src = page.file.src_uri

    def relink(match: re.Match) -> str:
        path = outside_target(src, match.group(2), docs_dir)
        if path is None or not path.exists():
            return match.group(0)  # MkDocs checks it (strict: a missing target fails the build)
        site_uri = (path.relative_to(docs_dir).as_posix() if path.is_relative_to(docs_dir)
                    else f"{MIRROR}/{path.relative_to(REPO).as_posix()}")
        if path.is_dir() or files.get_file_from_path(site_uri) is None:
            return match.group(0)
        new = posixpath.relpath(site_uri, posixpath.dirname(src) or ".")
        return f"{match.group(1)}{new}{match.group(3) or ''}{match.group(4)}"

    markdown = markdown.replace("<!-- app-imports -->", app_imports())
    return LINK.sub(relink, markdown)
