"""Reading a folder of documents into sections of clean paragraphs, skipping bad files with a reason.

A `Section` is a heading path (e.g. ["Pump manual", "Maintenance", "Seals"]) and its paragraphs.
Markup never reaches a paragraph: reStructuredText is rendered by docutils (`embedpipe.documents.rst`),
Markdown by markdown-it-py, HTML by BeautifulSoup. Code blocks are kept, because they matter for
retrieval, but fenced so later steps can tell code from prose: a code paragraph is
"```\n<code lines>\n```", and no line inside it starts with ``` (see `fence_code`).
Every file found is either read or listed in the skipped report: nothing is dropped silently.
"""

from __future__ import annotations

import html
import os
import posixpath
import re
import textwrap
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES

CODE_FENCE = "```"
"""The line before and after every code block inside passage text."""
CODE_BLOCK = re.compile(r"^```\n.*?\n```$", re.MULTILINE | re.DOTALL)
"""Finds the fenced code blocks in a passage (e.g. to keep them out of pseudo-queries)."""


def fence_code(code: str) -> str:
    """A code block as passage text: fence line, the code verbatim (tabs expanded, common indent and
    trailing spaces removed), fence line. A code line starting with ``` gets a leading space, so a
    line equal to the fence is always a fence. Empty code gives ""."""
    lines = [line.rstrip() for line in textwrap.dedent(code.expandtabs(4)).splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        return ""
    body = "\n".join(" " + line if line.startswith(CODE_FENCE) else line for line in lines)
    return f"{CODE_FENCE}\n{body}\n{CODE_FENCE}"


def is_code_block(paragraph: str) -> bool:
    """True for a paragraph made by `fence_code`."""
    return paragraph.startswith(CODE_FENCE + "\n") and paragraph.endswith("\n" + CODE_FENCE)


class DocumentsError(ValueError):
    """The documents folder as a whole is unusable (missing, empty, nothing readable)."""


@dataclass
class Link:
    """An internal cross-reference inside paragraph `paragraph` of its section: the visible `text` and the raw
    `href` ("page.md#id", "#id", "../x.html"; reStructuredText roles as "ref:label", "doc:path", "obj:name")."""

    text: str
    href: str
    paragraph: int


@dataclass
class Section:
    headings: list[str]
    paragraphs: list[str] = field(default_factory=list)
    # Structure kept for the LLM-free heading and anchor pairs (`embedpipe.sdg.structure`):
    anchors: dict[str, int] = field(default_factory=dict)  # id / label / heading slug -> paragraph index it names
    links: list[Link] = field(default_factory=list)
    named: bool = True  # False only for a first section named after the file (the document has no title heading)


@dataclass
class Document:
    path: str  # relative to the documents folder, with forward slashes
    sections: list[Section]


@dataclass
class Skipped:
    path: str
    reason: str


def discover(docs_dir: str | Path) -> tuple[list[Path], list[Skipped]]:
    """All files under docs_dir (recursively, symlinks followed once), plus those refused on sight."""
    root = Path(docs_dir)
    if not root.exists():
        raise DocumentsError(f"documents folder not found: {root}")
    if not root.is_dir():
        raise DocumentsError(f"not a folder: {root}")
    files: list[Path] = []
    skipped: list[Skipped] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            skipped.append(Skipped(_rel(Path(dirpath), root) + "/", "symlink loop (folder already read)"))
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() and not path.exists():
                skipped.append(Skipped(_rel(path, root), "broken or looping symlink"))
            elif not path.is_file():
                skipped.append(Skipped(_rel(path, root), "not a regular file"))
            elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
                skipped.append(Skipped(_rel(path, root), f"unsupported file type '{path.suffix or '(none)'}'"))
            else:
                files.append(path)
    return files, skipped


def read_document(path: Path, root: Path, max_bytes: int) -> Document | Skipped:
    """Parse one file into sections, or say why it was skipped."""
    rel = _rel(path, root)
    try:
        size = path.stat().st_size
        if size == 0:
            return Skipped(rel, "empty file")
        if size > max_bytes:
            return Skipped(rel, f"larger than the size limit ({size:,} > {max_bytes:,} bytes)")
        raw = path.read_bytes()
    except OSError as e:
        return Skipped(rel, f"unreadable: {e.strerror or e}")
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        sections = _parse_pdf(path)
    else:
        if b"\x00" in raw:
            return Skipped(rel, "binary file (contains NUL bytes)")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return Skipped(rel, f"not valid UTF-8 (byte {e.start})")
        title = path.stem.replace("_", " ").replace("-", " ")
        if suffix in HTML_SUFFIXES:
            sections = _parse_html(text, title)
        elif suffix == ".rst":
            sections = _parse_rst(text, title)
        elif suffix in {".md", ".markdown"}:
            sections = _parse_markdown(text, title)
        else:
            sections = _parse_plain(text, title)
    if isinstance(sections, str):
        return Skipped(rel, sections)
    sections = _drop_empty(sections)
    if not sections:
        return Skipped(rel, "no text content")
    return Document(rel, sections)


def _drop_empty(sections: list[Section]) -> list[Section]:
    """Sections with text; an empty one's anchors (a heading directly above a sub-heading) move to the next."""
    out: list[Section] = []
    carried: dict[str, int] = {}
    for section in sections:
        if not section.paragraphs:
            carried.update({a: 0 for a in section.anchors})
            continue
        if carried:
            section.anchors = {**carried, **section.anchors}
            carried = {}
        out.append(section)
    return out


_SLUG_DROP = re.compile(r"[^\w\- ]")


def heading_slug(text: str) -> str:
    """The id a Markdown renderer gives a heading (GitHub style): lower case, punctuation dropped, spaces -> '-'."""
    return _SLUG_DROP.sub("", text.strip().lower()).replace(" ", "-")


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _clean(text: str) -> str:
    """One line of prose: every run of whitespace (newlines included) becomes one space."""
    return " ".join(text.split())


def _split_paragraphs(text: str) -> list[str]:
    return [_clean(" ".join(block.splitlines())) for block in re.split(r"\n\s*\n", text) if block.strip()]


class _SectionBuilder:
    """Collects paragraphs and code blocks under the current heading path.

    `label` is a prefix waiting for the next paragraph ("- " for a list item, "Note: " for an
    admonition, "term: " for a definition), so a label and its text stay one paragraph.
    """

    def __init__(self, title: str):
        self.title = title
        self.titled = False  # set once the document's own first heading has named it
        self.stack: list[tuple[int, str]] = []
        self.sections: list[Section] = [Section([title], named=False)]
        self.label = ""
        self.pending_anchors: list[str] = []  # ids waiting for the next heading, paragraph or code block
        self.pending_links: list[tuple[str, str]] = []  # (text, href) of the paragraph being built

    def anchor(self, name: str) -> None:
        """An id (`<a id>`, an HTML id, a reStructuredText label) naming whatever comes next."""
        name = name.strip()
        if name:
            self.pending_anchors.append(name)

    def link(self, text: str, href: str) -> None:
        """An internal link inside the paragraph being built (attached when it is written)."""
        text, href = _clean(text), href.strip()
        if text and href:
            self.pending_links.append((text, href))

    def _attach(self, section: Section, paragraph: int) -> None:
        for name in self.pending_anchors:
            section.anchors.setdefault(name, paragraph)
        self.pending_anchors = []

    def heading(self, level: int, text: str) -> None:
        self.flush_label()
        text = _clean(text)
        self.pending_links = []  # a link inside a heading is not a cross-reference pair
        if not text:
            return
        if level == 1 and not self.titled and len(self.sections) == 1 and not self.sections[0].paragraphs:
            self.title = text  # the document's own first H1 names it
            self.titled = True
            self.sections[-1].headings = [text]
            self.sections[-1].named = True
        else:
            self.stack = [(lvl, h) for lvl, h in self.stack if lvl < level] + [(level, text)]
            self.sections.append(Section([self.title] + [h for _, h in self.stack]))
        self._attach(self.sections[-1], 0)
        self.sections[-1].anchors.setdefault(heading_slug(text), 0)

    def paragraph(self, text: str) -> None:
        text = _clean(text)
        if text.startswith(CODE_FENCE):  # prose never starts a line with a fence (see `fence_code`)
            text = text.lstrip("`").lstrip()
        if text:
            section = self.sections[-1]
            self._attach(section, len(section.paragraphs))
            section.links.extend(Link(t, h, len(section.paragraphs)) for t, h in self.pending_links)
            section.paragraphs.append(_clean(self.label + text))
            self.label = ""
        self.pending_links = []

    def code(self, text: str) -> None:
        """A code block, kept verbatim between fence lines (see `fence_code`)."""
        block = fence_code(text)
        self.pending_links = []
        if block:
            self.flush_label()
            self._attach(self.sections[-1], len(self.sections[-1].paragraphs))
            self.sections[-1].paragraphs.append(block)

    def flush_label(self) -> None:
        """A label with no paragraph to join (a list item opening with code) becomes its own line."""
        label = self.label.strip()
        self.label = ""
        if label and label != "-":
            self.sections[-1].paragraphs.append(label if label.endswith(":") else label + ":")


_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)


def _parse_markdown(text: str, title: str) -> list[Section]:
    """Markdown (CommonMark + tables) through markdown-it-py's token stream: headings open sections,
    list items become "- " paragraphs, table rows "a | b", fenced and indented code become code."""
    from markdown_it import MarkdownIt

    front = _FRONT_MATTER.match(text)
    if front:  # YAML front matter is metadata, not text (and would parse as a rule and a heading)
        text = text[front.end() :]
        named = re.search(r"^title:\s*['\"]?(.+?)['\"]?\s*$", front.group(1), re.MULTILINE)
        title = named.group(1) if named else title
    builder = _SectionBuilder(title)
    builder.sections[0].named = bool(front and named)
    tokens = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).parse(text)
    heading_level = 0
    row: list[str] | None = None
    for token in tokens:
        kind = token.type
        if kind == "heading_open":
            heading_level = int(token.tag[1])
        elif kind == "heading_close":
            heading_level = 0
        elif kind == "list_item_open":
            builder.flush_label()
            builder.label = "- "
        elif kind == "tr_open":
            row = []
        elif kind == "tr_close":
            builder.paragraph(" | ".join(cell for cell in row or [] if cell))
            row = None
        elif kind in ("fence", "code_block"):
            builder.code(token.content)
        elif kind == "html_block":
            _html_fragment(token.content, builder)
        elif kind == "inline":
            inline = _markdown_inline(token.children or [], builder)
            if heading_level:
                builder.heading(heading_level, inline)
            elif row is not None:
                row.append(_clean(inline))
            else:
                builder.paragraph(inline)
    return builder.sections


_HTML_ID = re.compile(r"<a\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def _markdown_inline(children: list, builder: _SectionBuilder | None = None) -> str:
    """Visible text of an inline run: text, code spans and image alt text; markup and raw HTML dropped.

    With a builder, `<a id="...">` anchors and internal links (`[text](page.md#id)`) are handed to it."""
    parts = []
    link_start: int | None = None
    href = ""
    for child in children:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.type == "image":
            parts.append(_markdown_inline(child.children or []))
        elif builder is not None and child.type == "html_inline":
            for name in _HTML_ID.findall(child.content):
                builder.anchor(html.unescape(name))
        elif builder is not None and child.type == "link_open":
            link_start, href = len(parts), str(child.attrs.get("href") or "")
        elif builder is not None and child.type == "link_close" and link_start is not None:
            if is_internal_href(href):
                builder.link("".join(parts[link_start:]), href)
            link_start = None
    return "".join(parts)


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def link_target(href: str, doc_path: str) -> str | None:
    """A link's target in a form independent of where the link sits: "path#id" or "path" (path relative to
    the documents folder, "#id" resolved against `doc_path`), or the reStructuredText forms "ref:label",
    "doc:path" (made relative to the folder) and "obj:name". None for an external or empty link."""
    if href.startswith(("ref:", "obj:")):
        return href
    if href.startswith("doc:"):
        path = href[4:]
        base = "" if path.startswith("/") else posixpath.dirname(doc_path)
        return "doc:" + posixpath.normpath(posixpath.join(base, path.lstrip("/")))
    if not is_internal_href(href):
        return None
    path, _, fragment = href.partition("#")
    path = urllib.parse.unquote(path.split("?")[0])
    fragment = urllib.parse.unquote(fragment)
    path = posixpath.normpath(posixpath.join(posixpath.dirname(doc_path), path)) if path else doc_path
    if path.startswith("../") or path == "..":
        return None  # outside the documents folder
    return f"{path}#{fragment}" if fragment else path


def is_internal_href(href: str) -> bool:
    """A link to another place in the same documentation: no scheme (http:, mailto:), not protocol-relative."""
    return bool(href) and not _SCHEME.match(href) and not href.startswith("//")


def _html_fragment(html: str, builder: _SectionBuilder) -> None:
    """Raw HTML inside Markdown: its text (and its <pre> blocks as code), never its tags."""
    from bs4 import BeautifulSoup, NavigableString

    for name in _HTML_ID.findall(html):
        builder.anchor(name)
    soup = BeautifulSoup(html, "lxml")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    texts: list[str] = []
    for node in soup.descendants:
        if getattr(node, "name", None) == "pre":
            builder.paragraph(" ".join(texts))
            texts.clear()
            builder.code(node.get_text())
        elif type(node) is NavigableString and node.find_parent("pre") is None:
            texts.append(node)
    builder.paragraph(" ".join(texts))


def _parse_rst(text: str, title: str) -> list[Section]:
    """reStructuredText (Sphinx flavour) rendered by docutils: see `embedpipe.documents.rst`."""
    from embedpipe.documents.rst import render_rst

    builder = _SectionBuilder(title)
    render_rst(text, builder)
    return builder.sections


_UNDERLINE = re.compile(r"^\s*([=\-~^*#])\1{2,}\s*$")


def _parse_plain(text: str, title: str) -> list[Section]:
    """Plain text: paragraphs by blank lines; an underlined line or a short ALL-CAPS line is a heading."""
    builder = _SectionBuilder(title)
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        if len(lines) >= 2 and _UNDERLINE.match(lines[1]):
            builder.heading(1 if lines[1].strip()[0] == "=" else 2, lines[0])
            lines = lines[2:]
        elif len(lines[0]) <= 80 and lines[0].strip().isupper() and len(lines[0].split()) <= 10:
            builder.heading(2 if builder.titled or builder.sections[0].paragraphs else 1, lines[0].strip().title())
            lines = lines[1:]
        if lines:
            builder.paragraph(" ".join(ln.strip() for ln in lines))
    return builder.sections


def _parse_html(text: str, title: str) -> list[Section]:
    from bs4 import BeautifulSoup, NavigableString

    soup = BeautifulSoup(text, "lxml")
    for tag in soup(["script", "style", "nav", "footer", "header", "noscript", "template", "aside"]):
        tag.decompose()
    page_title = soup.title.get_text(" ", strip=True) if soup.title else ""
    builder = _SectionBuilder(page_title or title)
    builder.sections[0].named = bool(page_title)
    body = soup.body or soup
    for element in body.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "tr", "dt", "dd", "blockquote"]):
        if element.find_parent(["li", "p", "pre", "tr", "dt", "dd", "blockquote"]) is not None:
            continue  # its text is part of the enclosing block
        _html_structure(element, builder)
        if element.name.startswith("h"):
            builder.heading(int(element.name[1]), element.get_text(" ", strip=True))
        elif element.name == "pre":
            builder.code(element.get_text())
        elif element.name == "tr":
            cells = [c.get_text(" ", strip=True) for c in element.find_all(["th", "td"])]
            builder.paragraph(" | ".join(c for c in cells if c))
        else:  # a text block: its prose, then the code blocks inside it (code never joins prose)
            prefix = "- " if element.name == "li" else ""
            prose = (t for t in element.find_all(string=True) if type(t) is NavigableString and not t.find_parent("pre"))
            builder.paragraph(prefix + " ".join(t.strip() for t in prose))
            for pre in element.find_all("pre"):
                builder.code(pre.get_text())
    return builder.sections


def _html_ids(element) -> list[str]:
    """The ids naming a block: its own, those of anchors inside it, and for a heading the id of the
    <section>/<div> it opens (Sphinx writes `<section id="x"><h2>`)."""
    ids = [element.get("id")] + [a.get("id") or a.get("name") for a in element.find_all(["a", "span"])]
    if element.name[0] == "h" and element.parent is not None and element.parent.name in ("section", "div"):
        first = element.parent.find(["h1", "h2", "h3", "h4", "h5", "h6"])
        if first is element:
            ids.insert(0, element.parent.get("id"))
    return [i for i in ids if isinstance(i, str) and i]


def _html_structure(element, builder: _SectionBuilder) -> None:
    """Hand a block's ids and internal links (`<a href>`) to the builder before its text is written."""
    for name in _html_ids(element):
        builder.anchor(name)
    if element.name[0] == "h" or element.name == "pre":
        return
    for a in element.find_all("a", href=True):
        if is_internal_href(a["href"]):
            builder.link(a.get_text(" ", strip=True), a["href"])


def _parse_pdf(path: Path) -> list[Section] | str:
    try:
        from pypdf import PdfReader

        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types on damaged files
        return f"unreadable PDF ({type(e).__name__}: {e})"
    builder = _SectionBuilder(path.stem.replace("_", " "))
    for para in _split_paragraphs("\n\n".join(pages)):
        builder.paragraph(para)
    return builder.sections
