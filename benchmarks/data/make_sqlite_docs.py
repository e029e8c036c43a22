"""Rebuild sqlite-docs.{eval,calib}.txt from the SQLite documentation (public domain).

    apt-get download sqlite3-doc && dpkg-deb -x sqlite3-doc_*.deb /tmp/sqlitedoc
    python benchmarks/data/make_sqlite_docs.py /tmp/sqlitedoc/usr/share/doc/sqlite3

Each page keeps its visible prose, headings, lists, tables and code examples; the site header
(logo, menus, search form), scripts, styles and the per-page table of contents are dropped. The
evaluation and calibration pages are disjoint.
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

EVAL_PAGES = [
    "atomiccommit", "lockingv3", "wal", "howtocorrupt", "queryplanner", "datatype3", "quirks", "isolation",
    "whentouse", "faq",
]
CALIB_PAGES = ["tempfiles", "threadsafe", "lang_transaction", "sharedcache", "limits", "foreignkeys"]
SKIP_TAGS = {"script", "style", "svg", "head"}
SKIP_CLASSES = {"nosearch", "fancy_toc"}
BLOCK_TAGS = {"p", "div", "h1", "h2", "h3", "h4", "li", "pre", "tr", "br", "blockquote", "dt", "dd", "table"}


class _Text(HTMLParser):
    """Visible text of one page; block elements end a line."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        # the element being dropped and how many of its tag are open inside it (pages leave <li>,
        # <p> and <tr> unclosed, so only the dropped element's own tag is counted)
        self.skip_tag: str | None = None
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            self.depth += tag == self.skip_tag
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag in SKIP_TAGS or classes & SKIP_CLASSES:
            self.skip_tag, self.depth = tag, 1
            return
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            self.depth -= tag == self.skip_tag
            if self.depth == 0:
                self.skip_tag = None
            return
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is None:
            self.parts.append(data)


def page_text(path: Path) -> str:
    """Visible text of one HTML page with runs of blank lines collapsed."""
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    text = "".join(parser.parts)
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def main(doc_dir: str) -> None:
    here = Path(__file__).resolve().parent
    for name, pages in (("eval", EVAL_PAGES), ("calib", CALIB_PAGES)):
        text = "\n\n".join(page_text(Path(doc_dir) / f"{p}.html") for p in pages)
        (here / f"sqlite-docs.{name}.txt").write_text(text, encoding="utf-8")
        print(f"sqlite-docs.{name}.txt: {len(pages)} pages, {len(text.encode())} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
