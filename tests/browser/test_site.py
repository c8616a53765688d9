"""The rendered book as a reader meets it: every page in headless Chromium, offline.

Run after the book is built (``make browser`` does both).  For every HTML page of
``_build/html``: no failed request, no request leaving localhost, no console error, every
image loaded and carrying alt text, math typeset by the bundled MathJax (no raw ``$$``,
``\\(`` or ``\\[`` in the visible text), and every internal link resolving to an existing
page and anchor.  Screenshots go to ``test-artifacts/screenshots/``.

Chromium comes from the system (Debian's ``chromium``), driven by Playwright with
``executable_path``; nothing is downloaded.  Without a browser the tests skip with a
message, except on CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "_build" / "html"
SHOTS = ROOT / "test-artifacts" / "screenshots"
# full-page screenshots of these pages; every other page gets its first screen only
FULL_PAGE = {"chapters/index.html", "chapters/front/notation.html", "chapters/01_lookup.html",
             "chapters/03_sdpa.html", "chapters/08_masking.html"}
SKIP_PAGES = {"genindex.html", "search.html", "index.html"}  # generated or a redirect


def _pages() -> list[str]:
    if not SITE.is_dir():
        return []
    return sorted(str(p.relative_to(SITE)) for p in SITE.rglob("*.html")
                  if not str(p.relative_to(SITE)).startswith(("_static", "_sources", "_images"))
                  and str(p.relative_to(SITE)) not in SKIP_PAGES)


# Without a built book every test is skipped with this message, unless the task runner
# asks for the book (BOOK_BUILT=required, as `python tasks.py browser` does): then it fails.
NO_BOOK = f"no built book under {SITE}: run `python tasks.py browser` (or `make browser`)"
PAGES = _pages() or [NO_BOOK]


def _require_book(page_path: str) -> None:
    if page_path == NO_BOOK:
        if os.environ.get("BOOK_BUILT") == "required":
            pytest.fail(NO_BOOK)
        pytest.skip(NO_BOOK)


def _browser_path() -> str | None:
    candidates = [os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"),
                  shutil.which("chromium-browser"), shutil.which("google-chrome")]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def server():
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output readable
        pass


@pytest.fixture(scope="session")
def browser():
    path = _browser_path()
    if path is None:
        _unavailable("no Chromium found: install Debian's `chromium` package or set CHROMIUM_PATH")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed (pip install -r requirements.txt)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


_VISIBLE_TEXT_JS = """() => {
  const root = (document.querySelector('article') || document.body).cloneNode(true);
  root.querySelectorAll('pre, code, script, style, mjx-container, .MathJax')
      .forEach(e => e.remove());
  return root.innerText;
}"""

_IMAGES_JS = """async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return imgs.map(i => ({src: i.getAttribute('src'), alt: i.getAttribute('alt'),
                         ok: i.complete && i.naturalWidth > 0,
                         width: i.getBoundingClientRect().width}));
}"""

_MATH_JS = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  return {math: document.querySelectorAll('.math, div.math, span.math').length,
          typeset: document.querySelectorAll('mjx-container').length,
          mathjax: !!(window.MathJax && window.MathJax.version)};
}"""


# Widths checked: a laptop, and a phone (iPhone SE / mini, 375 CSS px).  At both, the page
# must not scroll sideways and no code block may need its own horizontal scroll bar.
WIDTHS = (1280, 375)
_OVERFLOW_JS = """() => {
  const page = document.scrollingElement || document.documentElement;
  const wide = [];
  if (page.scrollWidth > window.innerWidth + 1) {
    // name the elements that stick out past the right edge of the screen
    for (const e of document.querySelectorAll('article *, .bd-header *, .bd-footer *')) {
      const r = e.getBoundingClientRect();
      if (r.right > window.innerWidth + 1 && r.width > 0 && e.children.length === 0) {
        wide.push(`${e.tagName.toLowerCase()}.${e.className} (right edge ${Math.round(r.right)} px): `
                  + (e.textContent || '').trim().slice(0, 60));
        if (wide.length >= 3) break;
      }
    }
    wide.unshift(`page is ${page.scrollWidth} px wide`);
  }
  for (const pre of document.querySelectorAll('div.highlight pre')) {
    if (pre.scrollWidth > pre.clientWidth + 1) {
      wide.push(`code block scrolls sideways (${pre.scrollWidth} > ${pre.clientWidth} px): `
                + (pre.textContent || '').trim().slice(0, 60));
      break;
    }
  }
  return wide;
}"""


@pytest.mark.parametrize("page_path", PAGES)
def test_page_renders_offline(page_path, request):
    _require_book(page_path)
    browser, server = request.getfixturevalue("browser"), request.getfixturevalue("server")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}")
            if r.status >= 400 else None)

    def only_localhost(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost") \
                or route.request.url.startswith("data:"):
            route.continue_()
        else:
            problems.append(f"request leaves the machine: {route.request.url}")
            route.abort()

    page.route("**/*", only_localhost)
    page.goto(server + page_path, wait_until="load")
    math = page.evaluate(_MATH_JS)
    images = page.evaluate(_IMAGES_JS)
    text = page.evaluate(_VISIBLE_TEXT_JS)
    page.wait_for_timeout(100)
    shot = SHOTS / (page_path.replace("/", "__").removesuffix(".html") + ".png")
    page.screenshot(path=str(shot), full_page=page_path in FULL_PAGE)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900 if width > 500 else 740})
        page.wait_for_timeout(50)
        problems += [f"at {width} px: {w}" for w in page.evaluate(_OVERFLOW_JS)]
    if page_path in FULL_PAGE:
        page.screenshot(path=str(shot.with_name(shot.stem + "__phone.png")))
    page.close()

    for img in images:
        if not img["ok"]:
            problems.append(f"image did not load: {img['src']}")
        if not (img["alt"] or "").strip():
            problems.append(f"image without alt text: {img['src']}")
    for raw in ("$$", "\\(", "\\["):
        if raw in text:
            at = text.index(raw)
            problems.append(f"raw math {raw!r} left in the text: ...{text[max(0, at - 60):at + 60]!r}...")
    if math["math"]:
        if not math["mathjax"]:
            problems.append("page has math but MathJax did not load")
        elif math["typeset"] == 0:
            problems.append(f"{math['math']} math elements but nothing typeset")
    assert not problems, f"{page_path}:\n  " + "\n  ".join(problems)


def _link_targets(page_path: str):
    html = (SITE / page_path).read_text(encoding="utf-8")
    soup = BeautifulSoup(html, "html.parser")
    for a in soup.find_all("a", href=True):
        href = a["href"]
        if href.startswith(("http:", "https:", "mailto:", "javascript:", "data:")) or href == "#":
            continue
        yield href


@functools.lru_cache(maxsize=None)
def _ids(path: Path) -> frozenset[str]:
    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    return frozenset(e["id"] for e in soup.find_all(id=True))


@pytest.mark.parametrize("page_path", PAGES)
def test_internal_links_resolve(page_path):
    _require_book(page_path)
    broken = []
    base = "http://site/" + page_path
    for href in _link_targets(page_path):
        target, fragment = urldefrag(urljoin(base, href))
        rel = unquote(urlparse(target).path).lstrip("/")
        path = SITE / rel
        if path.is_dir():
            path = path / "index.html"
        if not path.exists():
            broken.append(f"{href} -> missing file {rel}")
        elif fragment and path.suffix == ".html" and unquote(fragment) not in _ids(path):
            broken.append(f"{href} -> no element with id {fragment!r} in {rel}")
    assert not broken, f"{page_path}: broken internal links:\n  " + "\n  ".join(broken)
