"""reStructuredText (plain docutils or Sphinx sources) rendered to clean text with docutils.

Why docutils and not regexes: roles (``:meth:`writerow` ``), directives, literal blocks (``::``),
tables and nesting only come out right from the real parser. Sphinx is not needed: its roles and
directives are taught to docutils here as text-only stand-ins.

- Sections become headings (the chunker's title path); paragraphs, list items ("- "), definition
  and field lists ("term: text"), table rows ("a | b") become paragraphs.
- Every role, known or not, renders as its visible text; for ``text <target>`` the text.
- Code (``::`` blocks, code-block, sourcecode, code, doctest, console, …) becomes a fenced code
  block (see `embedpipe.documents.reading.fence_code`); object signatures (``.. method:: save(force=False)``)
  too. ``literalinclude`` is dropped: reading files named by a document is not allowed.
- versionadded / versionchanged / deprecated / seealso and the admonitions (note, warning, …)
  are prose with their label ("New in version 3.1: …", "Note: …").
- toctree, index, include, raw and other invisible or file-reading directives are dropped;
  only/ifconfig keep their body; any other unknown directive keeps its argument and body text.
- Broken markup never shows docutils' messages: a stray ``*`` or backquote is dropped, the words of
  a malformed table are kept.
- docutils is silenced (no report, never halts) and may not read files or URLs (`include`, `raw`,
  ``:file:``/``:url:`` options); a document it still cannot parse falls back to plain paragraphs.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from typing import Any, Protocol

from docutils import nodes
from docutils.core import publish_doctree
from docutils.parsers.rst import Directive, Parser, directives, roles
from docutils.parsers.rst.languages import en
from docutils.parsers.rst.states import Inliner
from docutils.utils import unescape

SETTINGS: dict[str, Any] = {
    "report_level": 5,  # no system message is ever written
    "halt_level": 5,  # and none stops the parse
    "exit_status_level": 5,
    "warning_stream": io.StringIO(),
    "file_insertion_enabled": False,  # no include, no :file:/:url: options
    "raw_enabled": False,
    "doctitle_xform": False,  # keep the top section a section: it names the document
    "sectsubtitle_xform": False,
    "syntax_highlight": "none",
    "smart_quotes": False,
    "pep_references": False,
    "rfc_references": False,
    "_disable_config": True,  # no docutils.conf from the machine
    "traceback": True,  # raise, do not sys.exit, on an internal error
}

# Directives whose output is invisible in Sphinx, or which would read a file: nothing is emitted.
DROPPED = {
    "toctree", "index", "highlight", "currentmodule", "module", "program", "tabularcolumns",
    "include", "raw", "literalinclude", "sectionauthor", "moduleauthor", "codeauthor", "testsetup",
    "testcleanup", "default-domain", "setting", "templatetag", "templatefilter", "fieldlookup",
    "autosummary", "meta", "contents", "rst-class", "cssclass", "highlightlang"
}
# Directives whose argument is a condition, not text: only their body is kept.
BODY_ONLY = {"only", "ifconfig"}
# Directives whose body is code.
CODE = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "console",
    "productionlist", "prompt", "ipython", "jupyter-execute", "graphviz", "digraph", "graph", "mermaid", "plantuml",
}
# Directives that describe an API object: the signature is code, the body prose.
SIGNATURES = {
    "class", "method", "function", "attribute", "data", "exception", "decorator", "decoratormethod",
    "classmethod", "staticmethod", "property", "member", "macro", "type", "var", "enum", "enumerator",
    "struct", "union", "option", "cmdoption", "envvar", "describe", "object", "django-admin",
    "django-admin-option", "autoclass", "autofunction", "automethod", "automodule", "autodata", "autoattribute",
    "autoexception",
}
SIGNATURE_PREFIXES = {
    "class": "class ", "exception": "exception ", "classmethod": "classmethod ", "staticmethod": "staticmethod ",
    "decorator": "@", "decoratormethod": "@", "django-admin": "django-admin ",
}
LABELS = {
    "versionadded": "New in version {}",
    "versionchanged": "Changed in version {}",
    "deprecated": "Deprecated since version {}",
    "versionremoved": "Removed in version {}",
    "deprecated-removed": "Deprecated since version {}, will be removed in version {}",
    "seealso": "See also",
}
_ROLE = re.compile(r"(?<![\w`]):((?:(?!_)\w)+(?:[-.+:](?:(?!_)\w)+)*):`")
_DIRECTIVE = re.compile(r"^\s*\.\.\s+((?:(?!_)\w)+(?:[-.+:](?:(?!_)\w)+)*)::", re.MULTILINE)
_TABLE_RULES = re.compile(r"[-=+]{3,}|[|+]")
_TITLED = re.compile(r"^(.*?)\s*<([^<>]*)>$", re.DOTALL)


class Builder(Protocol):
    """What the renderer writes into (`embedpipe.documents.reading._SectionBuilder`)."""

    label: str

    def heading(self, level: int, text: str) -> None: ...
    def paragraph(self, text: str) -> None: ...
    def code(self, text: str) -> None: ...
    def flush_label(self) -> None: ...
    def anchor(self, name: str) -> None: ...
    def link(self, text: str, href: str) -> None: ...


def render_rst(text: str, builder: Builder) -> None:
    """Parse `text` and write its sections, paragraphs and code blocks into `builder`."""
    _register(text)
    try:
        document = publish_doctree(text, parser=Parser(inliner=_inliner()), settings_overrides=SETTINGS)
    except Exception:  # docutils still raises on some pathological inputs: keep the text, lose the markup
        for block in re.split(r"\n\s*\n", text):
            builder.paragraph(" ".join(block.split()))
        return
    _blocks(document, builder, 1)


def visible_text(role_text: str, role_name: str = "") -> str:
    """What Sphinx shows for a role's text: "text" of "text <target>", "c" of "~a.b.c", "x" of "!x"."""
    text = unescape(role_text)
    match = _TITLED.match(text)
    if match and match.group(1):
        return match.group(1)
    if match:  # `<target>` alone
        text = match.group(2)
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    if role_name.rsplit(":", 1)[-1] in ("ref", "doc") and not match:  # a label or a path, not prose
        parts = [p for p in text.split("/") if p and p != "index"] or [text]
        text = parts[-1].replace("-", " ").replace("_", " ")
    return text


XREF_ROLES = {"ref": "ref", "doc": "doc"}
"""Sphinx roles that are cross-references to a label or a document (`embedpipe.sdg.structure` resolves them)."""
OBJECT_ROLES = {"func", "meth", "class", "attr", "exc", "data", "obj", "mod", "const", "setting", "option", "envvar"}
"""Roles naming an API object documented by a signature directive (`.. function:: name`)."""


def xref_target(role_name: str, role_text: str) -> str | None:
    """The link target of a cross-reference role: "ref:label", "doc:path" or "obj:dotted.name" (None if not one)."""
    kind = role_name.lower().rsplit(":", 1)[-1]
    text = unescape(role_text)
    match = _TITLED.match(text)
    target = (match.group(2) if match else text).strip().lstrip("!~")
    if not target:
        return None
    if kind in XREF_ROLES:
        return f"{XREF_ROLES[kind]}:{target.lower() if kind == 'ref' else target}"
    if kind in OBJECT_ROLES:
        return "obj:" + target.removesuffix("()")
    return None


def _text_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """Any role: its visible text as a plain text node (code-ness of inline roles is not kept); a
    cross-reference role's text is wrapped in an inline node carrying its target (`xref_target`)."""
    visible = visible_text(text, name)
    target = xref_target(name, text)
    if target:
        return [nodes.inline(rawtext, visible, classes=["embedpipe-xref"], target=target)], []
    return [nodes.Text(visible)], []


def _inliner() -> Inliner:
    """docutils' inline parser, with every role it does not know rendered by `_text_role`.

    (Bound on the instance: `Inliner.init_customizations` reads the class's own attributes, so a
    subclass would break it.)
    """
    inliner = Inliner()

    def interpreted(rawsource: str, text: str, role: str, lineno: int):
        role_fn, _messages = roles.role(role, inliner.language, lineno, inliner.reporter)
        if role_fn is not None:
            result, messages = role_fn(role, rawsource, text, lineno, inliner)
            if not any(isinstance(node, nodes.problematic) for node in result):
                return result, messages
        return _text_role(role, rawsource, text, lineno, inliner)  # unknown, or docutils refused its text

    inliner.interpreted = interpreted
    return inliner


class _AnyOptions(defaultdict):
    """An option spec accepting every option, so unknown directives never fail on their options."""

    def __init__(self) -> None:
        super().__init__(lambda: directives.unchanged, {"class": directives.unchanged})


class _Directive(Directive):
    optional_arguments = 1
    final_argument_whitespace = True
    has_content = True
    option_spec = _AnyOptions()

    def body(self) -> list[nodes.Node]:
        node = nodes.container()
        if self.content:
            self.state.nested_parse(self.content, self.content_offset, node)
        return node.children


class _Dropped(_Directive):
    def run(self) -> list[nodes.Node]:
        return []


class _Code(_Directive):
    def run(self) -> list[nodes.Node]:
        code = "\n".join(self.content)
        return [nodes.literal_block(code, code)] if code.strip() else []


class _Signature(_Directive):
    def run(self) -> list[nodes.Node]:
        signature = self.arguments[0] if self.arguments else ""
        kind = self.name.lower().rsplit(":", 1)[-1]
        if signature.strip() and kind in SIGNATURE_PREFIXES:  # what Sphinx prints before the name
            signature = "\n".join(SIGNATURE_PREFIXES[kind] + line.strip() for line in signature.splitlines())
        out: list[nodes.Node] = [nodes.literal_block(signature, signature)] if signature.strip() else []
        name = re.match(r"\s*(?:[\w.]+\s+)*?([A-Za-z_][\w.]*)\s*(?:\(|$|\s|=|:)", self.arguments[0] if self.arguments else "")
        if out and name:  # the object a :func:/:class:/... role can point at
            out[0]["embedpipe_objects"] = [name.group(1)]
        return out + self.body()


class _Labelled(_Directive):
    """versionadded & co.: "New in version 3.1: <the text after the version and the body>"."""

    def run(self) -> list[nodes.Node]:
        name = self.name.lower().rsplit(":", 1)[-1]
        argument = self.arguments[0] if self.arguments else ""
        slots = LABELS[name].count("{}")  # the leading words that are versions
        words = argument.split(None, slots)
        versions, rest = (words[:slots], words[slots] if len(words) > slots else "")
        label = LABELS[name].format(*(versions + [""] * slots)[:slots])
        node = nodes.container(classes=["embedpipe-label"], label=label)
        if rest.strip():
            inline, messages = self.state.inline_text(" ".join(rest.split()), self.lineno)
            node += nodes.paragraph("", "", *inline)
        node += self.body()
        return [node]


class _BodyOnly(_Directive):
    def run(self) -> list[nodes.Node]:
        return self.body()


class _Unknown(_Directive):
    """A directive nobody taught us: its argument as a paragraph, its body parsed as rst."""

    def run(self) -> list[nodes.Node]:
        argument = " ".join(" ".join(self.arguments).split())
        out: list[nodes.Node] = [nodes.paragraph(argument, argument)] if argument else []
        return out + self.body()


_KINDS = ((DROPPED, _Dropped), (BODY_ONLY, _BodyOnly), (CODE, _Code), (SIGNATURES, _Signature), (LABELS, _Labelled))


def _register(text: str) -> None:
    """Teach docutils the Sphinx directives, and every unknown directive `text` uses, as stand-ins.

    Registration is process-wide in docutils; the stand-ins only ever produce plain nodes.
    """
    if "toctree" not in directives._directives:
        for names, cls in _KINDS:
            for name in names:
                directives.register_directive(name, cls)
    for name in set(_DIRECTIVE.findall(text)):
        key = name.lower()
        short = key.rsplit(":", 1)[-1]  # py:method, c:function, rst:directive
        if key in directives._directives or key in en.directives or key in directives._directive_registry:
            continue
        for names, cls in _KINDS:
            if short in names:
                directives.register_directive(key, cls)
                break
        else:
            directives.register_directive(key, _Unknown)


def _inline(node: nodes.Node) -> str:
    """Visible text of a node: inline children concatenated, block children separated by spaces."""
    if isinstance(node, nodes.Text):
        return node.astext()  # resolves escapes: ``QuerySet``\s is "QuerySets"
    if isinstance(node, _INVISIBLE):
        return ""
    if isinstance(node, nodes.problematic):  # broken markup: its words without the stray markup characters
        return node.astext().strip("*`|_")
    sep = "" if isinstance(node, nodes.TextElement) else " "
    return sep.join(_inline(child) for child in node.children)


_INVISIBLE = (
    nodes.Invisible, nodes.system_message, nodes.raw, nodes.image, nodes.footnote_reference,
    nodes.citation_reference, nodes.label, nodes.docinfo, nodes.meta,
)
_ADMONITION_LABELS = {
    "attention": "Attention", "caution": "Caution", "danger": "Danger", "error": "Error", "hint": "Hint",
    "important": "Important", "note": "Note", "tip": "Tip", "warning": "Warning",
}


def _blocks(node: nodes.Element, builder: Builder, depth: int) -> None:
    """Walk block-level children in reading order, writing them into the builder."""
    for child in node.children:
        _block(child, builder, depth)


def _block(node: nodes.Node, builder: Builder, depth: int) -> None:
    if isinstance(node, nodes.system_message) and node.get("level", 0) >= 3:
        source = node.next_node(nodes.literal_block)
        if source is not None and source.astext().lstrip()[:1] in ("+", "="):  # a malformed table: keep its words
            builder.paragraph(_TABLE_RULES.sub(" ", source.astext()))
        return
    if isinstance(node, _INVISIBLE) or isinstance(node, (nodes.transition, nodes.Text)):
        if isinstance(node, nodes.Text) and node.strip():
            builder.paragraph(node.astext())
        return
    _structure(node, builder)
    if isinstance(node, nodes.section):
        title = node[0] if node.children and isinstance(node[0], nodes.title) else None
        builder.heading(depth, _inline(title) if title is not None else "")
        for child in node.children:
            if not isinstance(child, nodes.title):
                _block(child, builder, depth + 1)
    elif isinstance(node, (nodes.literal_block, nodes.doctest_block, nodes.math_block)):
        builder.code(node.astext())
    elif isinstance(node, nodes.list_item):
        builder.flush_label()
        builder.label = "- "
        _blocks(node, builder, depth)
    elif isinstance(node, nodes.definition_list_item):
        term = " ".join(_inline(c) for c in node.children if isinstance(c, (nodes.term, nodes.classifier)))
        _set_label(builder, term)
        for child in node.children:
            if isinstance(child, nodes.definition):
                _blocks(child, builder, depth)
    elif isinstance(node, nodes.field):
        if _inline(node[1]).strip():  # `:orphan:` and the like say nothing
            _set_label(builder, _inline(node[0]))
            _blocks(node[1], builder, depth)
    elif isinstance(node, nodes.option_list_item):
        _set_label(builder, _inline(node[0]))
        _blocks(node[1], builder, depth)
    elif isinstance(node, nodes.row):
        cells = [_squash(_inline(entry)) for entry in node.children]
        builder.paragraph(" | ".join(c for c in cells if c))
    elif isinstance(node, nodes.line_block):
        builder.paragraph(_inline(node))
    elif isinstance(node, nodes.topic) and "contents" in node["classes"]:
        return
    elif isinstance(node, nodes.Admonition) or isinstance(node, (nodes.topic, nodes.sidebar)):
        title = node[0] if node.children and isinstance(node[0], nodes.title) else None
        label = _inline(title) if title is not None else _ADMONITION_LABELS.get(node.tagname, node.tagname.title())
        _labelled(node, label, builder, depth)
    elif isinstance(node, nodes.container) and "embedpipe-label" in node["classes"]:
        if node.children:
            _labelled(node, node["label"], builder, depth)
        else:
            builder.paragraph(node["label"] + ".")
    elif isinstance(node, nodes.attribution):
        builder.paragraph("— " + _inline(node))
    elif isinstance(node, nodes.TextElement):  # paragraph, rubric, caption, title of a table, …
        builder.paragraph(_inline(node))
    elif isinstance(node, nodes.Element):  # lists, tables, block quotes, figures, containers, …
        _blocks(node, builder, depth)


def _structure(node: nodes.Node, builder: Builder) -> None:
    """Hand a block's labels (`.. _label:` before it, the section's own name) and, for a text block, its
    cross-references (Sphinx roles, relative `text <page.html#id>`_ links) to the builder before its text."""
    if not isinstance(node, nodes.Element):
        return
    for name in [*node.get("names", []), *node.get("ids", [])]:
        builder.anchor(name)
    for name in node.get("embedpipe_objects", []):
        builder.anchor("obj:" + name)
    if isinstance(node, (nodes.TextElement, nodes.row, nodes.line_block)) and not isinstance(node, nodes.FixedTextElement):
        for ref in node.findall(nodes.inline):
            if "embedpipe-xref" in ref["classes"]:
                builder.link(_inline(ref), ref["target"])
        for ref in node.findall(nodes.reference):
            uri = ref.get("refuri") or ""
            if uri and not re.match(r"^[a-zA-Z][\w+.-]*:|^//", uri):
                builder.link(_inline(ref), uri)


def _set_label(builder: Builder, text: str) -> str:
    """Make "text: " the prefix of the next paragraph; inside a list item it follows the "- "."""
    label = _squash(text).rstrip(":") + ": "
    if builder.label == "- ":
        label = "- " + label
    else:
        builder.flush_label()
    builder.label = label
    return label


def _labelled(node: nodes.Element, text: str, builder: Builder, depth: int) -> None:
    label = _set_label(builder, text)
    for child in node.children:
        if not isinstance(child, nodes.title):
            _block(child, builder, depth)
    if builder.label == label:  # nothing took it: say the label alone
        builder.label = ""
        builder.paragraph(label.rstrip(": ") + ".")


def _squash(text: str) -> str:
    return " ".join(text.split())
