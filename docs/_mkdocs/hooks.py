"""MkDocs hooks: serve images that pages take from the repository, outside ``docs/``.

``docs/performance.md`` shows ``../benchmarks/results/dataplane.png``, the plot
the benchmark writes next to its table. That relative link works where the
Markdown is read in the repository, but the file is outside the docs
directory, so MkDocs would neither copy it nor accept the link. These hooks add
every such image (one inside the repository, outside ``docs/``) to the site under
``assets/repository/<its path in the repository>`` and point the page's link
there. The page and the image stay where they are; nothing is copied into
``docs/``. Links to files that do not exist are left alone for MkDocs to report.

Loaded by ``mkdocs.yml`` (``hooks:``).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

_IMAGE = re.compile(r"(?P<head>!\[[^\]]*\]\()(?P<target>[^)\s]+)(?P<tail>[^)]*\))")
_ASSETS = "assets/repository"


def _repository_images(page_path: Path, docs_dir: Path, markdown: str) -> Iterator[tuple[re.Match[str], str]]:
    """Image links of a page that point into the repository outside ``docs_dir``: (match, repository path)."""
    root = docs_dir.parent
    for match in _IMAGE.finditer(markdown):
        target = match["target"]
        if "://" in target or target.startswith(("/", "#", "data:")):
            continue
        resolved = (page_path.parent / target).resolve()
        if docs_dir in resolved.parents or root not in resolved.parents or not resolved.is_file():
            continue
        yield match, resolved.relative_to(root).as_posix()


def on_files(files: Files, config: Any) -> Files:
    """Add the repository images that pages show to the site's files."""
    docs_dir = Path(config["docs_dir"]).resolve()
    for page in list(files.documentation_pages()):
        if page.abs_src_path is None:
            continue
        path = Path(page.abs_src_path)
        for _, repository_path in _repository_images(path, docs_dir, path.read_text(encoding="utf-8")):
            uri = f"{_ASSETS}/{repository_path}"
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(docs_dir.parent / repository_path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point the page's repository images at their copies in the site."""
    if page.file.abs_src_path is None:
        return markdown
    docs_dir = Path(config["docs_dir"]).resolve()
    page_dir = posixpath.dirname(page.file.src_uri)
    replacements = {
        match.start(): (match, posixpath.relpath(f"{_ASSETS}/{repository_path}", page_dir or "."))
        for match, repository_path in _repository_images(Path(page.file.abs_src_path), docs_dir, markdown)
    }
    for start in sorted(replacements, reverse=True):
        match, link = replacements[start]
        markdown = f"{markdown[:start]}{match['head']}{link}{match['tail']}{markdown[match.end():]}"
    return markdown
