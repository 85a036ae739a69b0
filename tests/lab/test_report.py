"""``normlab report``: table.md's Markdown as HTML, the page built from run folders (escaping, marks, error
entries, index, atomic write, errors), and the page of real --quick runs loaded in headless Chromium (every image
decodes, nothing is requested from outside the file, no sideways scrolling at phone width; screenshots kept)."""

from __future__ import annotations

import base64
import html.parser
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import run_quick

import normlab
from normlab.lab import cli, files
from normlab.lab import report as R
from normlab.lab.metrics import markdown_table
from normlab.lab.rundir import RunFolder

# ---------------------------------------------------------------------------------------------------------------
# Markdown (markdown-it-py): what the page needs of it


def test_markdown_table_aligns_escapes_and_wraps_in_a_scrolling_box():
    md = markdown_table(("arm", "test acc"), [("bn <b>", "0.9436"), ("a & b", "**0.5**")])
    out = R.markdown_html(md)
    assert out.startswith('<div class="scroll"><table>') and out.endswith("</table>\n</div>\n")
    assert '<th>arm</th>\n<th class="right">test acc</th>' in out
    assert '<td>bn &lt;b&gt;</td>\n<td class="right">0.9436</td>' in out
    assert '<td>a &amp; b</td>\n<td class="right"><strong>0.5</strong></td>' in out
    assert "<b>" not in out and "style=" not in out


def test_markdown_cell_with_a_pipe_is_one_cell():
    # test-stats' header has cells like "L1 |μ−μ_pop|/σ_pop": markdown_table writes its pipes \| (GitHub reads it so)
    md = markdown_table(("stat", "L1 |μ−μ_pop|/σ_pop", "x̂ skew"), [("ema", "0.076", "1.2"), ("a|b", "|", "`c|d`")])
    out = R.markdown_html(md)
    assert '<th>stat</th>\n<th class="right">L1 |μ−μ_pop|/σ_pop</th>\n<th class="right">x̂ skew</th>' in out
    assert '<td>ema</td>\n<td class="right">0.076</td>\n<td class="right">1.2</td>' in out
    assert '<td>a|b</td>\n<td class="right">|</td>\n<td class="right"><code>c|d</code></td>' in out
    assert out.count("</th>") == 3 and out.count("</td>") == 6 and "\\" not in out


def test_markdown_of_table_md_headings_nest_under_the_run():
    text = "\n".join([
        "## a title", "", "*Quick run (`--quick`): 100 steps.*", "",
        "Command: `normlab x --out 'a b'`",  # a table right after a paragraph line, as mnist's table.md has
        "| | b |", "|-|--:|", "| r | 1 |", "", "### sub", "", "- **MLP**: ours a > b", "###### deepest",
    ])
    out = R.markdown_html(text, heading_shift=1)
    assert out.startswith("<h3>a title</h3>\n<p><em>Quick run (<code>--quick</code>): 100 steps.</em></p>\n")
    assert "<p>Command: <code>normlab x --out 'a b'</code></p>\n<div class=\"scroll\"><table>" in out
    assert '<td>r</td>\n<td class="right">1</td>' in out
    assert "<h4>sub</h4>" in out and "<li><strong>MLP</strong>: ours a &gt; b</li>" in out
    assert "<h6>deepest</h6>" in out  # no <h7>
    assert R.markdown_html(text).startswith("<h2>a title</h2>")


def test_markdown_escapes_html_and_keeps_every_reference_inside_the_page():
    out = R.markdown_html('<script>alert("x")</script>\n\n`**x** <y>` and **z**\n\n<div onclick=f()>d</div>')
    assert "<script" not in out and "<div" not in out
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in out
    assert "<code>**x** &lt;y&gt;</code> and <strong>z</strong>" in out
    # images and links to anything but an anchor of the page stay text: nothing is loaded, nothing leaves
    out = R.markdown_html("![a](http://x/y.png) [l](javascript:alert(1)) <https://a.b> [r] [in](#index)\n\n"
                          "[r]: file:///etc/passwd")
    page = _Page(out)
    assert page.imgs == [] and page.refs == ["#index"], out
    assert "![a](http://x/y.png)" in out and "&lt;https://a.b&gt;" in out


# ---------------------------------------------------------------------------------------------------------------
# the page, from run folders written here


PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
                       "AAAABJRU5ErkJggg==")  # one pixel


def _fake_run(folder: Path, experiment: str = "mnist", quick: bool = False, source: str = "files",
              table: str | None = "## title\n\n| a | b |\n|---|--:|\n| x | 1 |\n", figure: bytes | None = PNG,
              command=("normlab", "mnist", "--steps", "5"), summary: bool = True) -> Path:
    """A run folder as the runner writes it (config.json, summary.json, table.md, the figure), without training."""
    from normlab.lab import registry

    folder.mkdir(parents=True)
    meta = {"experiment": experiment, "command": list(command) if command else None, "quick": quick,
            "config": {"steps": 5, "lr": 0.5, "data_dir": None, "seeds": 1}, "paper": "Ioffe & Szegedy 2015",
            "our_choices": ["lr"], "data": {"source": source, "location": "/d", "train": 60000, "test": 10000},
            "versions": {"normlab": "0.1.0", "python": "3.11.7", "numpy": "2.4.6", "torch": "2.13.0+cpu"},
            "host": {"platform": "Linux", "cpus": 2, "gpu": None}}
    (folder / "config.json").write_text(json.dumps(meta))
    if summary:
        (folder / "summary.json").write_text(json.dumps({"experiment": experiment, "wall_s_this_session": 1.5}))
    if table is not None:
        (folder / "table.md").write_text(table)
    if figure is not None:
        (folder / registry.get(experiment).figure_name).write_bytes(figure)
    return folder


class _Page(html.parser.HTMLParser):
    """What the tests look at in a page: ids, links, img sources, and every URL-valued attribute."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.links, self.imgs, self.refs = [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        self.refs += [v for k, v in attrs if k in ("src", "href", "action", "srcset", "poster", "data") and v]


def _build(root: Path, tmp_path: Path) -> tuple[str, _Page, list]:
    out = tmp_path / "page.html"
    path, entries = R.write_report(root, out, log=lambda m: None)
    assert path == out
    text = out.read_text(encoding="utf-8")
    return text, _Page(text), entries


def test_page_holds_every_run_escaped_marked_and_indexed(tmp_path):
    root = tmp_path / "results"
    _fake_run(root / "quick" / "mnist", quick=True)
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="2"><rect width="4" height="2"/></svg>'
    (root / "quick" / "mnist" / "a-redrawn.svg").write_text(svg)  # as `normlab plot RUN --out x.svg` leaves it
    _fake_run(root / "sample-run", source="sample",
              table="## t\n\n<script>alert(1)</script> & <img src=x onerror=alert(2)>\n",
              command=["normlab", "mnist", "--out", "<b>odd & 'quoted'</b>"])
    _fake_run(root / "nested" / "deeper" / "plain")
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("hello")
    _fake_run(root / ".hidden")  # hidden folders are skipped
    text, page, entries = _build(root, tmp_path)

    assert [e.rel for e in entries] == ["nested/deeper/plain", "quick/mnist", "sample-run"]
    assert all(e.error is None for e in entries)
    # the index links to every section, and every section exists
    anchors = [e.anchor for e in entries]
    assert [h for h in page.links if h.startswith("#run-")] == [f"#{a}" for a in anchors]
    assert set(anchors) <= set(page.ids) and "index" in page.ids
    assert len(set(anchors)) == len(anchors)
    # marks: quick only on the quick run, sample only on the sample run, in the index and the section
    by = {e.rel: e for e in entries}
    assert by["quick/mnist"].marks == ["quick"] and by["sample-run"].marks == ["sample"]
    assert by["nested/deeper/plain"].marks == []
    assert text.count('class="mark quick"') == 2 and text.count('class="mark sample"') == 2
    assert text.count('class="banner quick"') == 1 and text.count('class="banner sample"') == 1
    assert "Shipped sample, not MNIST" in text and "NOT the paper" in text
    # everything from the files is escaped: no markup of theirs reaches the page
    assert "<script" not in text and "<img src=x" not in text and "<b>odd" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(2)&gt;" in text
    assert "normlab mnist --out &#x27;&lt;b&gt;odd &amp; &#x27;&quot;&#x27;&quot;&#x27;quoted&#x27;&quot;" in text
    # figures embedded as data: URIs, the PNG's own bytes; nothing outside the page
    # the experiment's figure first, then the folder's other images
    assert len(page.imgs) == 4
    assert page.imgs[2] == "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
    pngs = page.imgs[:2] + page.imgs[3:]
    assert all(s.startswith("data:image/png;base64,") and base64.b64decode(s.split(",", 1)[1]) == PNG for s in pngs)
    assert text.index("<figcaption>figure1.png</figcaption>", text.index('id="run-2-quick-mnist"')) \
        < text.index("<figcaption>a-redrawn.svg</figcaption>")
    assert all(r.startswith(("#", "data:")) for r in page.refs)
    assert not re.search(r"(?i)\b(src|href)\s*=\s*[\"']?\s*(https?:|//|file:)", text)
    assert f'content="{R.CSP}"' in text.replace("&#x27;", "'")
    # command, configuration, versions, our choices, data
    assert "<pre class=cmd><code>normlab mnist --steps 5</code></pre>" in text
    assert "normlab 0.1.0, python 3.11.7, numpy 2.4.6, torch 2.13.0+cpu" in text
    assert '<tr><th>lr</th><td>0.5 <span class="ours">ours</span></td></tr>' in text
    assert "<tr><th>data_dir</th><td>null</td></tr>" in text
    assert "files at /d (60000 training / 10000 test images)" in text
    # the table rendered, responsive page
    assert "<h3>title</h3>" in text and '<td>x</td>\n<td class="right">1</td>' in text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert "img { max-width: 100%" in text and ".scroll { overflow-x: auto" in text


def test_unreadable_runs_are_error_entries_and_said_on_stderr(tmp_path, capsys):
    root = tmp_path / "r"
    _fake_run(root / "good")
    (root / "bad-json").mkdir(parents=True)
    (root / "bad-json" / "config.json").write_text('{"experiment": ')
    (root / "not-ours").mkdir()
    (root / "not-ours" / "config.json").write_text('{"name": "some other tool"}')
    _fake_run(root / "bad-table", table=None)
    (root / "bad-table" / "table.md").write_bytes(b"\xff\xfe not utf-8")
    out = tmp_path / "report.html"
    assert cli.main(["report", str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    text = out.read_text()
    assert f"cannot read the run in {root / 'bad-json'}: {root / 'bad-json' / 'config.json'} is not valid JSON" in err
    assert f"cannot read the run in {root / 'not-ours'}: {root / 'not-ours' / 'config.json'} has no 'config'" in err
    assert f"cannot read the run in {root / 'bad-table'}: UnicodeDecodeError" in err
    assert "4 run(s) (3 of them unreadable" in err
    assert text.count('<section class="error"') == 3
    # the good run is whole, first; the error entries follow, each with its message, linked from the index
    assert text.index("<h2>good</h2>") < text.index('<section class="error"')
    for name in ("bad-json", "not-ours", "bad-table"):
        assert re.search(rf'<li><a href="#run-\d-{name}">{name}</a>  <span class="mark error">', text)
    assert "is not valid JSON at line 1 column 16" in text


def test_missing_figure_table_or_summary_is_noted_not_fatal(tmp_path):
    root = tmp_path / "r"
    _fake_run(root / "a", table=None, figure=None, summary=False, command=None)
    _fake_run(root / "b", figure=b"not a png")
    text, page, entries = _build(root, tmp_path)
    a, b = entries
    assert a.error is None and a.marks == ["unfinished", "incomplete"]
    assert "summary.json is missing: the run has not finished" in text
    assert "the figure figure1.png is missing." in text and "table.md is missing." in text
    assert "Command: not recorded" in text
    assert b.marks == ["incomplete"] and "cannot embed figure1.png:" in text and "is not an image" in text
    assert page.imgs == []


def test_errors_are_one_line_and_the_write_is_atomic(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nope"
    assert cli.main(["report", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (f"normlab: error: results folder {missing} does not exist; give the "
                                               "folder that holds your run folders")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert cli.main(["report", str(empty)]) == 2
    assert "holds no runs (no config.json in it or below it)" in capsys.readouterr().err
    afile = tmp_path / "file"
    afile.write_text("x")
    assert cli.main(["report", str(afile)]) == 2
    assert "is not a folder" in capsys.readouterr().err

    root = tmp_path / "r"
    _fake_run(root / "run")
    out = root / "report.html"
    assert cli.main(["report", str(root)]) == 0  # default: RESULTS_DIR/report.html
    assert capsys.readouterr().out.strip() == str(out)
    before = out.read_bytes()
    assert before.startswith(b"<!DOCTYPE html>") and before.rstrip().endswith(b"</html>")
    # a failure while writing leaves the previous page and no temporary file
    real = files.atomic_write

    def failing(path, write, mode=0o644):
        def torn(f):
            write(f)
            raise KeyboardInterrupt  # interrupted once the page's bytes are in the temporary file

        return real(path, torn, mode)

    monkeypatch.setattr(files, "atomic_write", failing)
    with pytest.raises(KeyboardInterrupt):
        R.write_report(root, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in root.iterdir()) == ["report.html", "run"]
    # the report itself is not a run: building again gives the same runs
    monkeypatch.setattr(files, "atomic_write", real)
    assert [e.rel for e in R.write_report(root, out)[1]] == ["run"]


# ---------------------------------------------------------------------------------------------------------------
# the page of real --quick runs, in headless Chromium


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """``$NORMLAB_CHROMIUM``, else the first of :data:`BROWSERS` on PATH."""
    return os.environ.get("NORMLAB_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated
    JSON on file descriptors 3 and 4), with nothing but the standard library."""

    def __init__(self, exe: str, profile: Path):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()

        def fds():  # in the child: the pipe ends as fds 3 and 4 (dup first: dup2 onto itself keeps close-on-exec)
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                                      "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                                      "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self.w, self.r = os.fdopen(to_w, "wb"), from_r
        self.buf, self.next_id, self.events = b"", 0, []

    def _recv(self, timeout: float = 60) -> dict:
        while b"\0" not in self.buf:
            if not select.select([self.r], [], [], timeout)[0]:
                raise TimeoutError(f"chromium sent nothing for {timeout} s")
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit code {self.proc.poll()})")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        self.w.write(json.dumps(msg).encode() + b"\0")
        self.w.flush()
        while (m := self._recv()).get("id") != self.next_id:
            self.events.append(m)
        if "error" in m:
            raise RuntimeError(f"{method}: {m['error']}")
        return m["result"]

    def wait_for(self, method: str) -> dict:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._recv())
        return next(e for e in self.events if e.get("method") == method)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.w.close()
        os.close(self.r)


# Runs in the page after load: every image decoded (its decode() promise and its natural size), the page's width
# against the viewport's, the resources the page fetched.
CHECK = """(async () => {
  const imgs = [...document.images];
  const sizes = await Promise.all(imgs.map(i => i.decode().then(() => [i.naturalWidth, i.naturalHeight],
                                                               () => [0, 0])));
  return {sizes, inner: window.innerWidth, scroll: document.documentElement.scrollWidth,
          resources: performance.getEntriesByType('resource').map(e => e.name),
          sections: document.querySelectorAll('main section').length,
          tables: document.querySelectorAll('.md table').length};
})()"""


def load(browser: Chromium, url: str, width: int, height: int, mobile: bool, shot: Path) -> tuple[dict, list[str]]:
    """Open ``url`` in a new tab of ``width`` x ``height`` CSS pixels, run :data:`CHECK`, save a full-page
    screenshot to ``shot``; returns CHECK's result and every URL the tab requested."""
    target = browser.send("Target.createTarget", url="about:blank")["targetId"]
    s = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    browser.events.clear()
    browser.send("Network.enable", session=s)
    browser.send("Page.enable", session=s)
    browser.send("Emulation.setDeviceMetricsOverride", session=s, width=width, height=height,
                 deviceScaleFactor=1, mobile=mobile)
    browser.send("Page.navigate", session=s, url=url)
    browser.wait_for("Page.loadEventFired")
    result = browser.send("Runtime.evaluate", session=s, expression=CHECK, awaitPromise=True,
                          returnByValue=True)["result"]["value"]
    shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", session=s, format="png",
                                                   captureBeyondViewport=True)["data"]))
    requested = [e["params"]["request"]["url"] for e in browser.events
                 if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == s]
    browser.send("Target.closeTarget", targetId=target)
    return result, requested


@pytest.fixture(scope="module")
def quick_results(real_dir, tmp_path_factory) -> Path:
    """Two real --quick runs, shrunk (a few seconds of CPU each), and a copy of one marked as a sample run."""
    root = tmp_path_factory.mktemp("report") / "results"
    run_quick("mnist", real_dir, root / "mnist", "--steps", "100", "--eval-every", "50", "--workers", "1")
    run_quick("regularization", real_dir, root / "regularization", "--steps", "60", "--eval-every", "30",
              "--noise-draws", "8", "--noise-batch-sizes", "2", "16", "--workers", "1")
    sample = shutil.copytree(root / "mnist", root / "on-sample" / "mnist")
    meta = RunFolder(sample).meta()
    meta["data"]["source"] = "sample"
    (sample / "config.json").write_text(json.dumps(meta))
    return root


def test_report_of_quick_runs(quick_results, tmp_path):
    out = tmp_path / "report.html"
    path, entries = R.write_report(quick_results, out)
    assert [(e.experiment, e.rel, e.marks) for e in entries] == [
        ("mnist", "mnist", ["quick"]), ("mnist", "on-sample/mnist", ["sample", "quick"]),
        ("regularization", "regularization", ["quick"])]
    page = _Page(out.read_text())
    assert len(page.imgs) == 3 and all(base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
                                       for s in page.imgs)
    text = out.read_text()
    # each run's table.md, rendered: mnist's published column, regularization's two tables
    assert text.count("paper: without / with BN</th>") == 2 and "published top-1</th>" in text
    assert f"normlab {normlab.__version__}, python" in text  # the runner records normlab's version


def test_report_in_headless_chromium(tmp_path, request):
    exe = find_browser()
    if exe is None:
        pytest.skip("no headless Chromium: none of " + ", ".join(BROWSERS) + " is on PATH and $NORMLAB_CHROMIUM is "
                    "unset; install it (Debian: apt-get install chromium; .ci/run does) to test the page in a browser")
    quick_results = request.getfixturevalue("quick_results")  # after the check: no training for a skipped test
    out = tmp_path / "report.html"
    R.write_report(quick_results, out)
    text, url = out.read_text(), out.resolve().as_uri()
    browser = Chromium(exe, Path(tempfile.mkdtemp(dir=tmp_path, prefix="profile-")))
    try:
        seen = {name: load(browser, url, w, h, mobile, tmp_path / f"report-{name}.png")
                for name, (w, h, mobile) in {"laptop": (1366, 800, False), "phone": (390, 844, True)}.items()}
    finally:
        browser.close()
    print(f"\nscreenshots: {tmp_path / 'report-laptop.png'} {tmp_path / 'report-phone.png'}")
    for name, (result, requested) in seen.items():
        # the browser sees the page's sections and every table.md table (mnist's twice, regularization's two)
        assert result["sections"] == 3 and result["tables"] == text.count("<table>\n<thead>") >= 4, (name, result)
        # every image decodes to a real picture
        assert len(result["sizes"]) == 3 and all(w > 100 and h > 100 for w, h in result["sizes"]), (name, result)
        # nothing requested but the file itself and its data: URIs; no resource fetched
        assert all(u == url or u.startswith("data:") for u in requested) and url in requested, (name, requested)
        assert result["resources"] == [], (name, result)
        # the page fits its width (tables scroll in their own box), at the phone's 390 px too
        assert result["scroll"] <= result["inner"] == {"laptop": 1366, "phone": 390}[name], (name, result)
    for name in seen:
        shot = (tmp_path / f"report-{name}.png").read_bytes()
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        width = {"laptop": 1366, "phone": 390}[name]
        assert width - 20 <= int.from_bytes(shot[16:20], "big") <= width  # less a scroll bar, if one is drawn


def test_the_browser_check_sees_a_broken_image_an_outside_request_and_sideways_scrolling(tmp_path):
    """The checks above can fail: a page with an image that does not decode, one from outside the file, and a
    line wider than a phone."""
    exe = find_browser()
    if exe is None:
        pytest.skip("no headless Chromium (see test_report_in_headless_chromium)")
    good = base64.b64encode(PNG).decode()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta name="viewport" content="width=device-width"></head><body>'
                    f'<img src="data:image/png;base64,{good}"><img src="data:image/png;base64,AAAA">'
                    '<img src="http://127.0.0.1:9/outside.png"><pre>' + "x" * 200 + "</pre></body></html>")
    browser = Chromium(exe, Path(tempfile.mkdtemp(dir=tmp_path, prefix="profile-")))
    try:
        result, requested = load(browser, page.as_uri(), 390, 844, True, tmp_path / "bad.png")
    finally:
        browser.close()
    assert result["sizes"] == [[1, 1], [0, 0], [0, 0]]
    assert "http://127.0.0.1:9/outside.png" in requested
    # on a phone a page wider than the screen is zoomed out: the viewport grows to its width
    assert max(result["scroll"], result["inner"]) > 390, result
