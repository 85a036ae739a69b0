"""``normlab report RESULTS_DIR``: one self-contained HTML page of every run folder under a results directory.

The page holds, for each run (every folder under RESULTS_DIR, at any depth, that holds a ``config.json``, read with
:class:`~normlab.lab.rundir.RunFolder`): its figures embedded as ``data:`` URIs, its ``table.md`` (ours beside the
published numbers) rendered to HTML, the exact command, the configuration, the data source and the package
versions; runs on the shipped sample and ``--quick`` runs are marked as such; a short index links to each run. It
loads nothing from outside the file: no scripts, fonts, styles or images, and a Content-Security-Policy says so to
the browser. A run that cannot be read becomes an error entry on the page (and a line on stderr), never a missing
page. The page is written atomically (:func:`normlab.lab.files.write_text`).

:func:`markdown_html` renders ``table.md`` with markdown-it-py (CommonMark and pipe tables, raw HTML escaped).
"""

from __future__ import annotations

import base64
import datetime
import functools
import html
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt

import normlab
from normlab.lab import files
from normlab.lab.rundir import RunError, RunFolder

# Nothing from outside the page: images only as data: URIs, styles only inline, no script at all.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif", ".webp")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"))


def esc(value) -> str:
    """``value`` as text, HTML-escaped (quotes too: safe in attributes)."""
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------------------------------------------
# Markdown: table.md, by markdown-it-py


@functools.cache
def _markdown() -> MarkdownIt:
    """CommonMark plus pipe tables; raw HTML is text (escaped), and links or images may point only inside the page
    (``#...``): any other stays literal text, so table.md can neither inject markup nor make the page load anything."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.validateLink = lambda url: url.startswith("#")

    def table_open(renderer, tokens, idx, options, env):  # wide tables scroll in their own box, not the page
        return '<div class="scroll">' + renderer.renderToken(tokens, idx, options, env)

    def table_close(renderer, tokens, idx, options, env):
        return renderer.renderToken(tokens, idx, options, env) + "</div>\n"

    md.add_render_rule("table_open", table_open)
    md.add_render_rule("table_close", table_close)
    return md


def markdown_html(text: str, heading_shift: int = 0) -> str:
    """The HTML of the Markdown ``text`` (CommonMark and pipe tables, as :func:`_markdown` reads it): headings one
    level deeper per ``heading_shift`` (at most ``<h6>``), a column's alignment (``--:``, ``:-:``) as the cell's
    class ``right``/``center`` (the page's style sets it), everything taken from ``text`` escaped."""
    md = _markdown()
    tokens = md.parse(text)
    for t in tokens:
        if t.type in ("heading_open", "heading_close"):
            t.tag = f"h{min(int(t.tag[1:]) + heading_shift, 6)}"
        elif t.type in ("th_open", "td_open") and "style" in t.attrs:  # markdown-it gives "text-align:right"
            t.attrs = {"class": str(t.attrs["style"]).removeprefix("text-align:")}
    return md.renderer.render(tokens, md.options, {})


# ---------------------------------------------------------------------------------------------------------------
# the runs


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every folder under ``root`` (``root`` included, at any depth, hidden folders skipped) that holds a run's
    ``config.json``, sorted by path."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "config.json" in names:
            found.append(Path(folder))
    return sorted(found)


def image_uri(path: Path) -> str:
    """``path``'s bytes as a ``data:`` URI; ValueError when they are not a PNG, JPEG, GIF, WebP or SVG image."""
    data = path.read_bytes()
    mime = next((m for magic, m in _MAGIC if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None and path.suffix.lower() == ".svg" and b"<svg" in data[:4096]:
        mime = "image/svg+xml"
    if mime is None:
        raise ValueError(f"{path} is not an image (empty or an unknown format)" if data else f"{path} is empty")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass
class Entry:
    """One run on the page: its folder, its section's anchor, and what the index shows."""

    path: Path
    rel: str
    anchor: str
    experiment: str = "?"
    marks: list[str] = field(default_factory=list)
    error: str | None = None
    body: str = ""
    sort_key: tuple = ()


def _mark(kind: str, text: str) -> str:
    return f'<span class="mark {kind}">{esc(text)}</span>'


def _kv_table(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    """A two-column table of already-escaped (key, value) HTML."""
    body = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<div class="scroll"><table class="{cls}">\n{body}\n</table></div>'


def _json_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return esc(", ".join(str(x) for x in v))
    return esc("null" if v is None else v)


def _run_body(run: RunFolder, entry: Entry, experiments: dict) -> None:
    """Fill ``entry`` from ``run``; raises on what makes the run unreadable (its config.json)."""
    meta = run.meta()
    cfg = run.config()
    entry.experiment = run.experiment()
    exp = experiments.get(entry.experiment)
    entry.sort_key = (exp.order if exp is not None else 1000, entry.experiment, entry.rel)
    parts: list[str] = []
    notes: list[str] = []

    if run.is_sample():
        entry.marks.append("sample")
        parts.append('<p class="banner sample"><strong>Shipped sample, not MNIST:</strong> this run trained on the '
                     "small sample shipped with normlab, so its numbers are NOT the paper's experiment.</p>")
    if run.is_quick():
        entry.marks.append("quick")
        parts.append(f'<p class="banner quick"><strong>Quick run</strong> (<code>--quick</code>, '
                     f"{esc(format(cfg.get('steps', 0), ','))} steps): a demo of the protocol, not its "
                     "numbers.</p>")
    if not run.summary_path.is_file():
        entry.marks.append("unfinished")
        notes.append(f"{run.summary_path.name} is missing: the run has not finished (or was interrupted); "
                     "its table and figure may be absent or stale.")

    # figures: the experiment's own first, then any other image in the folder
    images = sorted(p for p in run.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not p.name.startswith("."))
    if exp is not None:
        own = run.path / exp.figure_name
        if own.is_file():
            images = [own, *(p for p in images if p != own)]
        else:
            notes.append(f"the figure {exp.figure_name} is missing.")
    for p in images:
        try:
            uri = image_uri(p)
        except (OSError, ValueError) as e:
            notes.append(f"cannot embed {p.name}: {e}")
            continue
        parts.append(f'<figure><img src="{uri}" alt="{esc(p.name)} of {esc(entry.rel)}">'
                     f"<figcaption>{esc(p.name)}</figcaption></figure>")

    if run.table_path.is_file():
        parts.append(f'<div class="md">\n{markdown_html(run.table_path.read_text(encoding="utf-8"), 1)}\n</div>')
    else:
        notes.append(f"{run.table_path.name} is missing.")

    # how it was run
    command = meta.get("command")
    shown = shlex.join(str(c) for c in command) if isinstance(command, list) else None
    parts.append("<h3>How it was run</h3>")
    parts.append(f"<pre class=cmd><code>{esc(shown)}</code></pre>" if shown else
                 "<p>Command: not recorded (the run was started from Python, not the command line).</p>")
    versions = meta.get("versions") or {}
    host = meta.get("host") or {}
    data = meta.get("data") or {}
    rows = [("experiment", esc(entry.experiment)), ("paper", esc(meta.get("paper") or "—"))]
    if data:
        rows.append(("data", esc(f"{data.get('source')} at {data.get('location')} "
                                 f"({data.get('train')} training / {data.get('test')} test images)")))
    rows.append(("versions", esc(", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded")
                 + ("" if "normlab" in versions else esc(" (normlab's not recorded)"))))
    if host:
        gpu = host.get("gpu")
        rows.append(("host", esc(f"{host.get('platform')}, {host.get('cpus')} CPUs" + (f", {gpu}" if gpu else ""))))
    if run.summary_path.is_file():
        summary = run.summary()
        if "wall_s_this_session" in summary:
            rows.append(("wall time", esc(f"{summary['wall_s_this_session']} s (its last session)")))
    parts.append(_kv_table(rows))
    ours = set(meta.get("our_choices") or ())
    cfg_rows = [(esc(k), _json_value(v) + (' <span class="ours">ours</span>' if k in ours else ""))
                for k, v in cfg.items()]
    parts.append(f"<details><summary>Configuration ({len(cfg_rows)} fields; <span class=\"ours\">ours</span>: "
                 "a choice the paper does not give)</summary>\n" + _kv_table(cfg_rows, "kv config") + "</details>")

    if notes:
        entry.marks.append("incomplete")
        parts.insert(0, '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    entry.body = "\n".join(parts)


def collect(root: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[Entry]:
    """One :class:`Entry` per run folder under ``root``, in report order (the experiments' ``normlab --help``
    order, then path; unreadable runs last). A run that cannot be read is an entry with ``error`` set, and ``log``
    (default: stderr) gets one line about it."""
    from normlab.lab import registry

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    root = Path(root)
    if not root.exists():
        raise ValueError(f"results folder {root} does not exist; give the folder that holds your run folders")
    if not root.is_dir():
        raise ValueError(f"results folder {root} is not a folder; give the folder that holds your run folders")
    folders = find_runs(root)
    if not folders:
        raise ValueError(f"{root} holds no runs (no config.json in it or below it); write one with "
                         f"`normlab EXPERIMENT --out {root}/NAME` first")
    experiments = registry.experiments()
    entries = []
    for i, folder in enumerate(folders, 1):
        rel = folder.relative_to(root).as_posix() if folder != root else "."
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", rel).strip("-") or "root"
        entry = Entry(folder, rel, f"run-{i}-{slug}")
        try:
            _run_body(RunFolder(folder), entry, experiments)
        except Exception as e:  # whatever is wrong with one run's files must not cost the page of the others
            entry.error = str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
            entry.sort_key = (10_000, "", rel)
            entry.marks = ["error"]
            log(f"normlab report: cannot read the run in {folder}: {entry.error}")
        entries.append(entry)
    return sorted(entries, key=lambda e: e.sort_key)


_LABELS = {"quick": "quick run", "sample": "shipped sample, not MNIST", "unfinished": "unfinished",
           "incomplete": "files missing", "error": "unreadable"}

STYLE = """
:root { --fg: #1d1f21; --muted: #5f6368; --line: #d9dce0; --bg: #fff; --soft: #f4f5f7; --link: #0b57d0; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0 auto; padding: 0 1rem 3rem; max-width: 72rem; color: var(--fg); background: var(--bg);
       font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
a { color: var(--link); }
h1 { font-size: 1.6rem; margin: 1.2rem 0 .4rem; }
h2 { font-size: 1.35rem; margin: 2.5rem 0 .4rem; padding-top: .8rem; border-top: 2px solid var(--line); }
h3 { font-size: 1.1rem; margin: 1.4rem 0 .4rem; }
h4 { font-size: 1rem; margin: 1.2rem 0 .3rem; }
p, li { overflow-wrap: break-word; }
.sub { color: var(--muted); margin-top: 0; overflow-wrap: anywhere; }
code { font: .9em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--soft);
       padding: 0 .2em; border-radius: 3px; overflow-wrap: anywhere; }
pre { background: var(--soft); padding: .6rem .8rem; border-radius: 4px; white-space: pre-wrap;
      overflow-wrap: anywhere; }
pre code { background: none; padding: 0; }
img { max-width: 100%; height: auto; display: block; }
figure { margin: 1rem 0; }
figcaption { color: var(--muted); font-size: .85rem; }
.scroll { overflow-x: auto; max-width: 100%; margin: .8rem 0; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top;
         white-space: nowrap; }
thead th { border-bottom: 2px solid var(--fg); }
td.right, th.right { text-align: right; font-variant-numeric: tabular-nums; }
td.center, th.center { text-align: center; }
table.kv th { color: var(--muted); font-weight: normal; }
table.kv td { white-space: normal; overflow-wrap: anywhere; min-width: 12rem; }
.mark { display: inline-block; font-size: .78rem; padding: 0 .45em; border-radius: 3px; margin: 0 .2em .2em 0;
        border: 1px solid; white-space: nowrap; }
.mark.quick { background: #fff4cc; border-color: #b08800; color: #5c4700; }
.mark.sample, .mark.error { background: #b3261e; border-color: #b3261e; color: #fff; }
.mark.unfinished, .mark.incomplete { background: #eef0f3; border-color: #80868b; color: #3c4043; }
.banner { padding: .5rem .8rem; border-radius: 4px; border-left: 5px solid; }
.banner.quick { background: #fff8db; border-color: #b08800; }
.banner.sample { background: #fde7e6; border-color: #b3261e; }
section.error { border: 2px solid #b3261e; border-radius: 4px; padding: 0 1rem; margin-top: 2rem; }
section.error h2 { border-top: none; margin-top: .6rem; }
ul.notes { background: #fef7e0; padding: .5rem 1rem .5rem 2rem; border-radius: 4px; }
.ours { font-size: .75rem; color: #5c4700; background: #fff4cc; padding: 0 .3em; border-radius: 3px; }
details { margin: .6rem 0; }
summary { cursor: pointer; color: var(--link); }
ol.index { padding-left: 1.6rem; }
ol.index li { margin: .25rem 0; overflow-wrap: anywhere; }
.exp { color: var(--muted); font-size: .9rem; margin-right: .3em; }
@media (max-width: 40rem) {
  body { padding: 0 .6rem 2rem; font-size: 15px; }
  h1 { font-size: 1.35rem; } h2 { font-size: 1.15rem; }
  th, td { padding: .25rem .4rem; }
}
"""


def render(entries: list[Entry], root: str | os.PathLike, command: str | None = None) -> str:
    """The page: header, index, then one section per entry."""
    runs, bad = [e for e in entries if e.error is None], [e for e in entries if e.error is not None]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts = f"{len(runs)} run(s)" + (f", {len(bad)} unreadable" if bad else "")
    index_rows = []
    for e in entries:
        marks = " ".join(_mark(m, _LABELS[m]) for m in e.marks)
        what = f'<span class="exp">{esc(e.experiment)}</span>' if e.error is None else ""
        index_rows.append(f'<li><a href="#{esc(e.anchor)}">{esc(e.rel)}</a> {what} {marks}</li>')
    sections = []
    for e in entries:
        marks = " ".join(_mark(m, _LABELS[m]) for m in e.marks)
        if e.error is not None:
            sections.append(f'<section class="error" id="{esc(e.anchor)}">\n<h2>{esc(e.rel)} {marks}</h2>\n'
                            f"<p>This run could not be read, so it is left out of the report:</p>\n"
                            f"<pre>{esc(e.error)}</pre>\n</section>")
        else:
            sections.append(f'<section id="{esc(e.anchor)}">\n<h2>{esc(e.rel)}</h2>\n'
                            f'<p class="sub"><span class="exp">normlab {esc(e.experiment)}</span> {marks} '
                            f'<a href="#index">back to the index</a></p>\n{e.body}\n</section>')
    made = f"made by <code>{esc(command)}</code> " if command else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">
<meta name="referrer" content="no-referrer">
<title>normlab report: {esc(root)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>normlab report</h1>
<p class="sub">{counts} under <code>{esc(root)}</code>; {made}on {esc(now)} with normlab {esc(normlab.__version__)}.
Each run shows its figure, its table (ours beside the published numbers) and how it was run.</p>
</header>
<nav id="index">
<h2>Index</h2>
<ol class="index">
{chr(10).join(index_rows)}
</ol>
</nav>
<main>
{chr(10).join(sections)}
</main>
</body>
</html>
"""


def write_report(root: str | os.PathLike, out: str | os.PathLike | None = None, command: str | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[Path, list[Entry]]:
    """Build the page of every run under ``root`` and write it to ``out`` (default ``root/report.html``)
    atomically; returns its path and the entries (those with ``error`` set could not be read)."""
    entries = collect(root, log)
    out = Path(out) if out is not None else Path(root) / "report.html"
    files.writable_dir(out.parent, "the report's folder")
    files.write_text(out, render(entries, root, command))
    return out, entries
