"""The report's HTML: one self-contained page (inline CSS, images as ``data:`` URIs, no script, no network).

Every helper escapes plain strings; only :class:`Html` values (built by these helpers) pass through unchanged, so a
class name or path can never become markup.

Example::

    body = table(["class", "F1"], [["<cat>", "0.91"]])
    page("run", [section("per-class", "Per-class metrics", body)])
"""
from __future__ import annotations

import base64
import html as _html
from collections.abc import Iterable, Sequence

SECTIONS = {  # id -> title, in page order
    "summary": "Run summary",
    "curves": "Learning curves",
    "confusion": "Confusion matrix",
    "per-class": "Per-class metrics",
    "confused-pairs": "Most-confused pairs",
    "top-losses": "Top losses",
    "calibration": "Calibration",
    "gradcam": "Grad-CAM",
    "data": "Data",
}

CSS = """
:root { color-scheme: light; --fg: #1d1d1f; --muted: #5f6368; --line: #dadce0; --bg2: #f6f8fa; --bad: #fde8e8;
        --warn: #fff4d6; --good: #2ca02c; --red: #d62728; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); background: #fff; }
header, main, footer { max-width: 1120px; margin: 0 auto; padding: 0 16px; }
header { padding-top: 18px; }
h1 { font-size: 1.5rem; margin: 0 0 4px; word-break: break-word; }
h2 { font-size: 1.2rem; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1rem; margin: 16px 0 6px; }
.sub { color: var(--muted); margin: 0 0 10px; font-size: .9rem; word-break: break-word; }
nav { display: flex; flex-wrap: wrap; gap: 6px; margin: 10px 0 4px; }
nav a { font-size: .85rem; padding: 3px 9px; border: 1px solid var(--line); border-radius: 14px; color: inherit;
        text-decoration: none; background: var(--bg2); }
section { margin: 26px 0; scroll-margin-top: 8px; }
.table-wrap { overflow-x: auto; -webkit-overflow-scrolling: touch; max-width: 100%; margin: 6px 0 10px; }
table { border-collapse: collapse; font-size: .88rem; min-width: 50%; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--bg2); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { text-align: left; width: 1%; }
td.wrap { word-break: break-all; min-width: 12em; }
tr.worst td { background: var(--bad); }
.note { background: var(--warn); border-left: 4px solid #f0a500; padding: 8px 12px; margin: 8px 0; border-radius: 3px; }
.muted { color: var(--muted); font-size: .9rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; margin: 8px 0 14px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; background: var(--bg2); }
.card .v { font-size: 1.25rem; font-weight: 600; word-break: break-word; }
.card .k { color: var(--muted); font-size: .8rem; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 330px), 1fr)); gap: 12px; }
.plots.wide { grid-template-columns: repeat(auto-fit, minmax(min(100%, 480px), 1fr)); }
.plots.single { grid-template-columns: minmax(0, 620px); }
figure { margin: 0; }
figure.plot img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(132px, 1fr)); gap: 10px; }
.gallery.pairs { grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 6px; background: #fff; }
.tile .imgs { display: flex; gap: 4px; }
.tile .imgs img { flex: 1 1 0; min-width: 0; width: 100%; height: auto; image-rendering: pixelated;
                  border-radius: 3px; }
.tile figcaption { font-size: .78rem; line-height: 1.35; margin-top: 4px; word-break: break-word; }
.tile .muted { font-size: inherit; }
.bad { color: var(--red); font-weight: 600; }
.good { color: var(--good); font-weight: 600; }
footer { color: var(--muted); font-size: .8rem; padding-bottom: 30px; }
code { font-size: .85em; background: var(--bg2); padding: 0 3px; border-radius: 3px; word-break: break-all; }
"""


class Html(str):
    """A string that is already markup: helpers insert it as is."""


def esc(x: object) -> Html:
    """``x`` as safe markup: Html passes through, anything else is ``str()``-ed and escaped.

    Example::

        esc("<script>")  # '&lt;script&gt;'
    """
    return x if isinstance(x, Html) else Html(_html.escape(str(x), quote=True))


def join(parts: Iterable[object], sep: str = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


def tag(name: str, body: object = "", cls: str | None = None, **attrs: object) -> Html:
    """``<name class=... attr=...>body</name>`` with every attribute value and a plain-string body escaped.

    Example::

        tag("a", "<top>", href="#summary")  # '<a href="#summary">&lt;top&gt;</a>'
    """
    a = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    c = f' class="{esc(cls)}"' if cls else ""
    return Html(f"<{name}{c}{a}>{esc(body)}</{name}>")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str) -> Html:
    return Html(f'<img src="{data_uri(png)}" alt="{esc(alt)}" loading="eager">')


def plot(png: bytes, alt: str, caption: object = None) -> Html:
    cap = tag("figcaption", caption, "muted") if caption else ""
    return Html(f'<figure class="plot">{img(png, alt)}{cap}</figure>')


def plots(figures: Sequence[Html], wide: bool = False) -> Html:
    """Plots side by side, wrapping to one a row on a narrow screen; a lone plot is not stretched past 620 px."""
    return tag("div", join(figures), "plots wide" if wide else "plots single" if len(figures) == 1 else "plots")


def note(text: object) -> Html:
    return tag("p", text, "note")


def para(text: object, cls: str | None = None) -> Html:
    return tag("p", text, cls)


class Num:
    """A right-aligned (numeric) table cell."""

    def __init__(self, value: object) -> None:
        self.value = value


def num(value: object) -> Num:
    return Num(value)


def table(headers: Sequence[object], rows: Iterable[Sequence[object]], row_classes: Sequence[str | None] = (),
          cls: str | None = None) -> Html:
    """A horizontally scrollable table; cells made with :func:`num` are right-aligned.

    Example::

        table(["class", "n"], [["cat", num(3)]], row_classes=["worst"])
    """
    def cell(t: str, v: object) -> str:
        if isinstance(v, Num):
            return f'<{t} class="num">{esc(v.value)}</{t}>'
        return f"<{t}>{esc(v)}</{t}>"
    head = "".join(cell("th", h) for h in headers)
    body = []
    for i, r in enumerate(rows):
        rc = row_classes[i] if i < len(row_classes) else None
        attr = f' class="{esc(rc)}"' if rc else ""
        body.append(f"<tr{attr}>{''.join(cell('td', v) for v in r)}</tr>")
    c = f' class="{esc(cls)}"' if cls else ""
    return Html(f'<div class="table-wrap"><table{c}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
                f"</table></div>")


def kv_table(pairs: Iterable[tuple[str, object]]) -> Html:
    """A two-column key/value table; pairs whose value is None or "" are left out.

    Example::

        kv_table([("model", "resnet18"), ("weights", None)])
    """
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs if v is not None and v != "")
    return Html(f'<div class="table-wrap"><table class="kv"><tbody>{rows}</tbody></table></div>')


def cards(pairs: Iterable[tuple[str, object]]) -> Html:
    """Headline numbers: a wrapping row of small cards.

    Example::

        cards([("best val_acc1", "93.2%"), ("epochs", 10)])
    """
    items = "".join(f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>'
                    for k, v in pairs if v is not None and v != "")
    return Html(f'<div class="cards">{items}</div>')


def tile(images: Sequence[tuple[bytes, str]], caption: object) -> Html:
    """One gallery tile: one or more images side by side, and a caption.

    Example::

        tile([(png, "input"), (cam_png, "Grad-CAM")], join(["pred ", tag("b", "cat")]))
    """
    imgs = "".join(img(png, alt) for png, alt in images)
    return Html(f'<figure class="tile"><div class="imgs">{imgs}</div>{tag("figcaption", caption)}</figure>')


def gallery(tiles: Sequence[Html], pairs: bool = False) -> Html:
    return tag("div", join(tiles), "gallery pairs" if pairs else "gallery")


def section(sid: str, body: object, title: str | None = None) -> Html:
    """``<section id=sid>`` with its title (from SECTIONS unless given) and body."""
    return Html(f'<section id="{esc(sid)}">{tag("h2", title or SECTIONS.get(sid, sid))}{esc(body)}</section>')


def page(title: str, subtitle: object, sections: Sequence[Html], footer: object = "",
         nav_sections: dict[str, str] | None = None) -> str:
    """The whole document. The Content-Security-Policy forbids every network fetch and every script: the page
    works offline, and nothing in it can run.

    Example::

        page("Run report: r1", "lenet on digits", [section("summary", para("hello"))])

    ``nav_sections``: the section ids and titles the page links to (default: the classification report's).
    """
    nav = "".join(f'<a href="#{esc(k)}">{esc(v)}</a>' for k, v in (nav_sections or SECTIONS).items())
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return ("<!doctype html>\n"
            '<html lang="en"><head><meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
            f"<header>{tag('h1', title)}{tag('p', subtitle, 'sub')}<nav>{nav}</nav></header>\n"
            f"<main>\n{chr(10).join(sections)}\n</main>\n<footer>{esc(footer)}</footer>\n</body></html>\n")
