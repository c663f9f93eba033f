"""Rendering the report's sections to markdown and to a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import logging

from harness.report.figures import CAPTIONS
from harness.report.tables import html_table, md_table

log = logging.getLogger(__name__)

def render_markdown(sections: list[tuple], figs: dict[str, bytes]) -> str:
    out = []
    for sec in sections:
        kind = sec[0]
        if kind == "h1":
            out.append(f"# {sec[1]}\n")
        elif kind == "h2":
            out.append(f"## {sec[1]}\n")
        elif kind in ("p", "raw-md"):
            out.append(sec[1] + "\n")
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in sec[1]) + "\n")
        elif kind == "table":
            out.append(md_table(sec[1], sec[2]) + "\n")
        elif kind == "fig" and sec[1] in figs:
            out.append(f"![{CAPTIONS[sec[1]]}]({sec[1]})\n\n*{CAPTIONS[sec[1]]}*\n")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}figcaption{font-size:13px;color:#555}")


def _inline_md(text: str) -> str:
    """**bold** and the escaped rest, enough for the report's own prose."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _md_block_to_html(text: str) -> str:
    """The calibration block: '- ' lines become a list, '|' lines a table."""
    out, items, table = [], [], []

    def flush():
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline_md(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if table:
            head = [c.strip() for c in table[0].strip("|").split("|")]
            rows = [[c.strip() for c in r.strip("|").split("|")] for r in table[2:]]
            out.append(html_table(head, rows))
            table.clear()

    for line in text.splitlines():
        if line.startswith("- "):
            if table:
                flush()
            items.append(line[2:])
        elif line.startswith("|"):
            if items:
                flush()
            table.append(line)
        else:
            flush()
            if line.strip():
                out.append(f"<p>{_inline_md(line)}</p>")
    flush()
    return "\n".join(out)


def render_html(sections: list[tuple], figs: dict[str, bytes], title: str) -> str:
    body = []
    for sec in sections:
        kind = sec[0]
        if kind == "h1":
            body.append(f"<h1>{html.escape(sec[1])}</h1>")
        elif kind == "h2":
            body.append(f"<h2>{html.escape(sec[1])}</h2>")
        elif kind == "p":
            body.append(f"<p>{_inline_md(sec[1])}</p>")
        elif kind == "raw-md":
            body.append(_md_block_to_html(sec[1]))
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_md(x)}</li>" for x in sec[1]) + "</ul>")
        elif kind == "table":
            body.append(html_table(sec[1], sec[2]))
        elif kind == "fig" and sec[1] in figs:
            b64 = base64.b64encode(figs[sec[1]]).decode()
            cap = html.escape(CAPTIONS[sec[1]])
            body.append(f'<figure><img alt="{cap}" src="data:image/png;base64,{b64}">'
                        f"<figcaption>{cap}</figcaption></figure>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
