"""A griffe extension: ckptio's reStructuredText docstring markup, rendered as Markdown.

ckptio's docstrings are Google style with Sphinx roles (``:class:`StateComponent```,
``:func:`~ckptio.storage.open_storage```), ``::`` literal blocks, and
Args entries that describe several parameters at once (``a, b: as for f``).
mkdocstrings renders docstrings as Markdown, where a role would print as
``:class:`` followed by code. Before the docstrings are parsed, this extension:

* turns every role into a cross-reference to the object it names, resolved the
  way Python would from the docstring's scope (then through imports to the
  object's canonical path). The reference is *optional*: it becomes a link when
  the object is rendered somewhere in the site and plain code otherwise
  (private modules, torch), so ``mkdocs build --strict`` never fails on it;
* ends a paragraph introducing a literal block with ``:`` instead of ``::``;
* splits an Args or Attributes entry naming several parameters
  (``pattern, key, world: as for ...``) into one entry per name, which griffe
  would otherwise report as an unknown parameter;
* lets a docstring open with a section (``Args:`` on its first line), which
  the Google parser reads as plain text unless a summary line comes first;
* takes a Sphinx ``#:`` comment above an attribute (``#: Newest manifest
  format...``) as that attribute's docstring, which griffe does not.

It changes only what mkdocstrings renders; the source files are not touched.
Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const):`(?P<text>[^`]+)`")
_TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")
_LITERAL_INTRO = re.compile(r"(?m)(?<=\S)::$")
_LITERAL_ALONE = re.compile(r"(?m)^(\s*)::$")
_OPENING_SECTION = re.compile(r"^(?:Args|Arguments|Parameters|Attributes|Returns|Raises|Yields):\s*\n")
_SECTION = re.compile(r"^(?P<indent>\s*)(?:Args|Arguments|Parameters|Attributes):\s*$")
_GROUPED_ENTRY = re.compile(r"^(?P<indent>\s+)(?P<names>[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)\s*:(?P<rest>.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_entries(text: str) -> str:
    """One Args/Attributes entry per name: ``a, b: text`` becomes ``a: text`` and ``b: text``."""
    lines = text.splitlines()
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and section_indent is not None and _indent(line) <= section_indent:
            section_indent = None
        header = _SECTION.match(line)
        if header:
            section_indent = len(header["indent"])
            out.append(line)
            i += 1
            continue
        entry = _GROUPED_ENTRY.match(line) if section_indent is not None else None
        if entry is None:
            out.append(line)
            i += 1
            continue
        # The entry's continuation lines are indented deeper than the entry itself.
        body = [entry["rest"]]
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(entry["indent"])):
            body.append("\n" + lines[i])
            i += 1
        for name in (n.strip() for n in entry["names"].split(",")):
            out.append(f"{entry['indent']}{name}:{''.join(body)}".rstrip())
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def open_with_summary(text: str) -> str:
    """A docstring that opens with a section header, as the Google parser reads it.

    ``inspect.cleandoc`` strips the indentation of the lines after the first
    one, so the entries of a section header on the first line lose theirs
    (``Args:\nconfig: ...``): indent them back under their header, and put an
    empty summary line first.
    """
    lines = text.splitlines()
    if len(lines) > 1 and lines[1][:1].isspace():
        return "\n" + text  # still indented: only the summary line is missing
    out = [""]
    for line in lines:
        header = _OPENING_SECTION.match(line + "\n")
        out.append(line if header or not line.strip() else f"    {line}")
    return "\n".join(out)


def _comment_above(obj: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above ``obj``'s first line, joined (None without one)."""
    if obj.lineno is None:
        return None
    try:
        lines = obj.module.lines
    except (AttributeError, OSError, ValueError):
        return None
    comment: list[str] = []
    index = obj.lineno - 2
    while 0 <= index < len(lines) and lines[index].strip().startswith("#:"):
        comment.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(comment) or None


class RstMarkup(griffe.Extension):
    """Rewrite the reStructuredText markup of every docstring of a package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite every docstring of ``pkg`` once the whole package is loaded (names resolve then)."""
        self._collection = loader.modules_collection
        self._rewrite(pkg, seen=set())

    def on_package_loaded(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """The name griffe 1.x gives :meth:`on_package` (rewriting twice changes nothing)."""
        self.on_package(pkg=pkg, loader=loader, **kwargs)

    def _rewrite(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is None and obj.is_attribute:
            comment = _comment_above(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            text = _LITERAL_ALONE.sub(r"\1", _LITERAL_INTRO.sub(":", obj.docstring.value))
            text = split_grouped_entries(text)
            if _OPENING_SECTION.match(text):
                text = open_with_summary(text)
            obj.docstring.value = _ROLE.sub(lambda m: self._reference(obj, m["text"]), text)
        for member in obj.members.values():
            if not member.is_alias:  # aliases are documented where they are defined
                self._rewrite(member, seen)

    def _reference(self, scope: griffe.Object, text: str) -> str:
        """An optional autorefs cross-reference for a role's text (``~a.b.C``, ``Title <a.b.C>``, ``C.meth``)."""
        titled = _TITLED.match(text)
        if titled:
            title, target = titled["title"], titled["target"]
        else:
            target = text.lstrip("~")
            title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
        target = target.rstrip("()")
        path = self._canonical(scope, target)
        code = f"<code>{html.escape(title)}</code>"
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    def _canonical(self, scope: griffe.Object, name: str) -> str | None:
        """The canonical path of ``name`` as seen from ``scope``, or None when it is not a ckptio object."""
        head, _, tail = name.partition(".")
        candidates = [name]
        try:
            resolved = scope.resolve(head)
        except (griffe.NameResolutionError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            resolved = None
        if resolved is not None:
            candidates.insert(0, f"{resolved}.{tail}" if tail else resolved)
        for path in candidates:
            try:
                found = self._collection[path]
            except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            try:
                return str(found.final_target.path if found.is_alias else found.path)
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
        return None
