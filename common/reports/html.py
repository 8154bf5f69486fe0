"""A tiny HTML builder for self-contained report pages.

No template engine, no external CSS/JS/fonts: everything (style, figures as
``data:`` URIs) is inside the one file, so a report can be opened offline at a
site or attached to an e-mail.  Every text value is escaped.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable

STYLE = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
     color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;border-bottom:2px solid #345;padding-bottom:4px}
h2{font-size:1.25em;margin-top:1.6em;color:#234;border-bottom:1px solid #ccd}
h3{font-size:1.05em;color:#345}
table{border-collapse:collapse;margin:8px 0 16px 0;font-size:0.92em}
th,td{border:1px solid #ccd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.nc{color:#a33;font-style:italic}
.note{color:#555;font-size:0.9em}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0;border:1px solid #dde;padding:6px;background:#fff}
figure img{display:block;max-width:100%;height:auto}
figcaption{font-size:0.85em;color:#555;margin-top:4px}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}.warn{color:#9a6700;font-weight:600}
"""


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt_num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def metric_cell(entry: Any, digits: int = 3) -> str:
    """HTML for a metric entry: ``{"value","lo","hi"}`` or ``{"not_computable": reason}``."""
    if isinstance(entry, dict):
        if entry.get("not_computable"):
            return f'<span class="nc">not computable: {esc(entry["not_computable"])}</span>'
        v = entry.get("value")
        if v is None:
            return '<span class="nc">not computable</span>'
        s = fmt_num(v, digits)
        if entry.get("lo") is not None and entry.get("hi") is not None:
            s += f" ({fmt_num(entry['lo'], digits)}&ndash;{fmt_num(entry['hi'], digits)})"
        return s
    return esc(fmt_num(entry, digits))


def table(headers: list[str], rows: Iterable[Iterable[Any]], raw: bool = False, cls: str = "") -> str:
    """``raw=True``: cells are already HTML (e.g. from :func:`metric_cell`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for c in r:
            txt = c if raw else esc(fmt_num(c))
            num = isinstance(c, (int, float)) and not isinstance(c, bool)
            cells.append(f'<td class="num">{txt}</td>' if num else f"<td>{txt}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    c = f' class="{esc(cls)}"' if cls else ""
    thead = f"<thead><tr>{head}</tr></thead>" if any(str(h) for h in headers) else ""
    return f"<table{c}>{thead}<tbody>{''.join(body)}</tbody></table>"


def figure(data_uri: str, caption: str, alt: str | None = None, fig_id: str | None = None) -> str:
    i = f' id="{esc(fig_id)}"' if fig_id else ""
    return (f'<figure{i}><img src="{data_uri}" alt="{esc(alt or caption)}" data-plot="{esc(fig_id or caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def not_computable(what: str, reason: str) -> str:
    return f'<p class="nc">{esc(what)}: not computable: {esc(reason)}</p>'


def page(title: str, body: Iterable[str], subtitle: str = "") -> str:
    sub = f'<p class="note">{esc(subtitle)}</p>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{sub}\n" + "\n".join(body) + "\n</body></html>\n")
