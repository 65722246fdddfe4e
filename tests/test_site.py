"""The built course site as a reader meets it: headless Chromium, no network.

Which sites are tested:

* by default the two sites ``make book-ci`` builds without executing the notebooks
  (``_build/ci-student``, ``_build/ci-instructor``; built here once when missing). Their lesson
  pages have no outputs, so they are checked for what exists without execution: every page loads
  without a console error or a request off this machine, every formula written in Markdown is
  typeset by the MathJax the site serves itself, Chinese search finds the right chapters, every
  local link and anchor resolves, every sidebar lists exactly the site's pages, and the student
  site has no solutions;
* ``COURSE_SITE=<html folder>`` tests a site that ``make book`` built with execution
  (``python tools/book.py --print-html`` prints its folder); there, in addition, each lesson must
  show its figures and tables (图N/表N with their captions, images that loaded).

The browser is Debian's ``chromium`` with ``chromium-driver`` through Selenium; without one the
browser tests are skipped with a message saying how to install it. The last tests break a copy of
a built site (MathJax removed, MathJax from a CDN, a broken link, a script error, a search index
without Chinese words, a stale sidebar, a lesson without outputs) and prove that each check fails
on it. One more test runs the README's student workflow: ``make lab`` serves lessons/ and labs/.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = (
    "no headless browser for the site test: install Chromium and its driver, e.g. "
    "`sudo apt-get install chromium chromium-driver` on Debian/Ubuntu (`make browser` does this "
    "as root), and selenium from requirements.txt"
)
SEARCHES = {  # a Chinese word → the lesson that must be among its results
    "量化": "lessons/02_quantization.html",
    "剪枝": "lessons/03_pruning.html",
    "蒸馏": "lessons/04_distillation.html",
}
PAGE_TIMEOUT_S = 30


def _load_book_helper():
    spec = importlib.util.spec_from_file_location("course_book", ROOT / "tools" / "book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- sites and pages


def pages_of(site: Path) -> list[str]:
    """Every content page of a built site (the documents of its search index), as paths."""
    index = site / "searchindex.js"
    data = json.loads(index.read_text(encoding="utf-8").removeprefix("Search.setIndex(")[:-1])
    return [f"{name}.html" for name in data["docnames"]]


def banner(site: Path) -> dict[str, str]:
    """The variant banner of a site (``tools/book.py``): site, profile, executed."""
    text = (site / "intro.html").read_text(encoding="utf-8")
    match = re.search(r'class="course-variant"([^>]*)>', text)
    assert match, f"{site}: the page does not say which site and profile built it"
    return dict(re.findall(r'data-(\w+)="([^"]*)"', match.group(1)))


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("id", "name"):
            if values.get(key):
                self.ids.add(values[key])
        for key in ("href", "src"):
            if tag in ("a", "img", "script", "link") and values.get(key):
                self.links.append(values[key])


@functools.cache
def _parse(path: Path) -> _Anchors:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def broken_links(site: Path, page: str) -> list[str]:
    """Local links, images, scripts and stylesheets of ``page`` whose file or anchor is missing."""
    problems = []
    source = site / page
    for link in _parse(source).links:
        parts = urllib.parse.urlsplit(link)
        if parts.scheme or link.startswith("//"):
            continue  # external (mailto:, https:) — checked by the no-network rule instead
        target = source if not parts.path else (source.parent / urllib.parse.unquote(parts.path))
        target = target.resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"{page}: link to missing file {link}")
            continue
        fragment = urllib.parse.unquote(parts.fragment)
        if fragment and target.suffix == ".html" and fragment not in _parse(target).ids:
            problems.append(f"{page}: link to missing anchor {link}")
    return problems


def navigation_problems(site: Path, page: str) -> list[str]:
    """Pages that the sidebar of ``page`` lists but the site lacks, or lacks but the site has
    (a stale sidebar, as an incremental build leaves after the table of contents changes)."""
    text = (site / page).read_text(encoding="utf-8")
    nav = re.search(r'<nav class="bd-links bd-docs-nav"[^>]*>(.*?)</nav>', text, re.S)
    if nav is None:
        return [f"{page}: no navigation sidebar"]
    listed = {page}  # the page itself is listed as "#"
    for href in re.findall(r'href="([^"#]+)', nav.group(1)):
        target = (site / page).parent / urllib.parse.unquote(href)
        listed.add(target.resolve().relative_to(site.resolve()).as_posix())
    expected = set(pages_of(site))
    return [
        f"{page}: sidebar lists {sorted(listed - expected)}, lacks {sorted(expected - listed)}"
    ] * (listed != expected)


@pytest.fixture(scope="session")
def ci_sites() -> dict[str, Path]:
    """The sites of ``make book-ci`` (built here, without execution, when missing)."""
    book = _load_book_helper()
    sites = {}
    for site in ("student", "instructor"):
        folder = book.html_dir(ROOT, site, "fast", execute=False)
        if not (folder / "searchindex.js").is_file():
            subprocess.run(
                [sys.executable, str(ROOT / "tools" / "book.py"), "--site", site, "--no-execute"],
                check=True,
                cwd=ROOT,
            )
        sites[site] = folder
    return sites


def test_pages_and_assets_have_no_broken_local_link(ci_sites):
    problems = [
        p for site in ci_sites.values() for page in pages_of(site) for p in broken_links(site, page)
    ]
    assert problems == []


def test_every_sidebar_lists_exactly_the_pages_of_its_site(ci_sites):
    problems = [
        p
        for site in ci_sites.values()
        for page in pages_of(site)
        for p in navigation_problems(site, page)
    ]
    assert problems == []


def test_student_site_has_no_solutions_and_instructor_site_has_them(ci_sites):
    student, instructor = ci_sites["student"], ci_sites["instructor"]
    assert banner(student)["site"] == "student" and banner(instructor)["site"] == "instructor"
    student_pages, instructor_pages = pages_of(student), pages_of(instructor)
    assert not [p for p in student_pages if p.startswith("solutions/")]
    assert not (student / "solutions").exists(), "solutions published on the student site"
    assert {p for p in instructor_pages if p.startswith("solutions/")} == {
        f"solutions/{p.name[:-6]}.html" for p in (ROOT / "solutions").glob("*.ipynb")
    }
    assert {p for p in student_pages if p.startswith("labs/")} == {
        f"labs/{p.name[:-6]}.html" for p in (ROOT / "labs").glob("*.ipynb")
    }
    for site, label in ((student, "学生版"), (instructor, "教师版")):
        title = re.search(r"<title>([^<]*)</title>", (site / "intro.html").read_text("utf-8"))
        assert label in title.group(1), f"{site}: title {title.group(1)!r} lacks {label}"


def citation_problems(site: Path) -> list[str]:
    """Citations as the reader sees them: every lesson's {footcite} keys rendered as footnotes with a
    reference list at the end, nothing left as raw role text, and the bibliography page (chapter 12)
    listing every entry of references.bib."""
    from utils.references import lesson_citations, load_bibliography

    problems = []
    cites = lesson_citations(ROOT)
    per_lesson: dict[str, set[str]] = {}
    for key, places in cites.items():
        for c in places:
            per_lesson.setdefault(c.notebook, set()).add(key)
    for page in pages_of(site):
        text = (site / page).read_text("utf-8")
        if "{footcite" in text or "{cite" in text:
            problems.append(f"{page}: a citation role was left unrendered")
    for stem, keys in sorted(per_lesson.items()):
        page = site / "lessons" / f"{stem}.html"
        text = page.read_text("utf-8")
        notes = re.findall(r'<aside class="footnote(?!-list)[^"]*"', text)
        if len(notes) != len(keys):
            problems.append(
                f"lessons/{stem}.html: {len(notes)} footnotes for {len(keys)} cited keys"
            )
    bib_pages = [p for p in pages_of(site) if p.startswith("lessons/12_")]
    if not bib_pages:
        problems.append("no bibliography page (lessons/12_*.html)")
    else:
        text = (site / bib_pages[0]).read_text("utf-8")
        listed = text.count('role="doc-biblioentry"')
        entries = len(load_bibliography(ROOT / "references.bib"))
        if listed < entries:
            problems.append(
                f"{bib_pages[0]}: lists {listed} of the {entries} entries of references.bib"
            )
    return problems


def test_citations_render_and_the_bibliography_lists_every_entry(ci_sites):
    assert citation_problems(ci_sites["student"]) == []


def test_citation_check_fails_on_an_unrendered_role(ci_sites, tmp_path):
    broken = tmp_path / "site"
    shutil.copytree(ci_sites["student"], broken)
    page = broken / "lessons" / "04_distillation.html"
    text = page.read_text("utf-8")
    first = text.index('<aside class="footnote')
    page.write_text(
        text[:first] + "{footcite:p}`x`" + text[text.index("</aside>", first) + 8 :], "utf-8"
    )
    problems = citation_problems(broken)
    assert any("unrendered" in p for p in problems) and any("footnotes for" in p for p in problems)


def test_each_profile_has_its_own_build_folder_and_cache(tmp_path):
    book = _load_book_helper()
    fast = book.derive_config(_config(), "student", "fast", True, tmp_path / "fast")
    full = book.derive_config(_config(), "student", "full", True, tmp_path / "full")
    assert fast["execute"]["cache"] != full["execute"]["cache"]
    assert book.html_dir(ROOT, "student", "fast", True) != book.html_dir(
        ROOT, "student", "full", True
    )
    assert 'data-profile="full"' in full["html"]["announcement"]
    assert "COURSE_PROFILE=full" in full["html"]["announcement"]


def _config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the browser


def _browser_paths() -> tuple[str, str] | None:
    binary = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium that cannot resolve any host name: a CDN request fails as offline."""
    paths = _browser_paths()
    if paths is None:
        pytest.skip(INSTALL_HINT)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(INSTALL_HINT)
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    driver.set_script_timeout(PAGE_TIMEOUT_S)
    yield driver
    driver.quit()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="session")
def serve() -> Iterator:
    """Serve a site folder on 127.0.0.1 (search needs HTTP to fetch page summaries)."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


READ_PAGE = """
const done = arguments[arguments.length - 1];
const typeset = (window.MathJax && MathJax.startup && MathJax.startup.promise)
    || Promise.resolve();
Promise.race([typeset, new Promise(r => setTimeout(r, 15000))]).then(() => {
  const math = Array.from(document.querySelectorAll('.math'));
  const local = u => u.startsWith(location.origin) || u.startsWith('data:');
  done({
    math: math.length,
    raw: math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 40)),
    typeset: document.querySelectorAll('mjx-container').length,
    offsite: performance.getEntriesByType('resource').map(e => e.name).filter(u => !local(u)),
    images: Array.from(document.querySelectorAll('img')).map(
        i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]),
    outputImages: document.querySelectorAll('.cell_output img').length,
    outputTables: document.querySelectorAll('.cell_output table').length,
    outputText: Array.from(document.querySelectorAll('.cell_output')).map(e => e.innerText).join(' '),
  });
});
"""


def read_page(driver, url: str) -> tuple[dict, list[str]]:
    """Load ``url``, wait for MathJax, and return what the page shows and its console errors."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    state = driver.execute_async_script(READ_PAGE)
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return state, errors


def page_problems(driver, base: str, page: str) -> list[str]:
    """What is wrong with one page in the browser: console errors, untypeset math, requests off
    this machine, images that did not load."""
    state, errors = read_page(driver, base + page)
    problems = [f"{page}: console error: {e}" for e in errors]
    problems += [f"{page}: math not typeset (raw TeX): {raw!r}" for raw in state["raw"]]
    problems += [f"{page}: request off this machine: {u}" for u in state["offsite"]]
    problems += [f"{page}: image did not load: {src}" for src, ok in state["images"] if not ok]
    return problems


def search_results(driver, base: str, word: str) -> list[str]:
    """The pages Sphinx's search page lists for ``word``."""
    driver.get(base + "search.html?q=" + urllib.parse.quote(word))
    driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        const summary = () => document.querySelector('#search-results .search-summary');
        // the summary is filled in once the last result is listed
        const poll = () => summary() && summary().innerText ? done() : setTimeout(poll, 100);
        poll();"""
    )
    links = driver.execute_script(
        "return Array.from(document.querySelectorAll('#search-results ul.search li a'))"
        ".map(a => a.getAttribute('href'))"
    )
    return sorted({urllib.parse.urlsplit(link).path for link in links})


def test_every_page_loads_offline_with_math_typeset(ci_sites, browser, serve):
    """Every page of the instructor site, whose sources include all of the student site's; of
    the student site, whose pages differ only in navigation, its home, a lesson and a lab."""
    student = ["intro.html", "lessons/02_quantization.html", "labs/02_quantization.html"]
    problems = []
    for site, pages in ((ci_sites["instructor"], None), (ci_sites["student"], student)):
        base = serve(site)
        for page in pages or pages_of(site):
            problems += page_problems(browser, base, page)
    assert problems == []
    state, _ = read_page(browser, serve(ci_sites["student"]) + "lessons/02_quantization.html")
    assert state["typeset"] >= 10, f"lesson 02 shows {state['typeset']} typeset formulas"


@pytest.mark.parametrize("which", ["student", "instructor"])
def test_chinese_search_finds_the_chapters(which, ci_sites, browser, serve):
    base = serve(ci_sites[which])
    for word, lesson in SEARCHES.items():
        found = search_results(browser, base, word)
        assert lesson in found, f"searching {word!r} found {found}"
        assert len(found) >= 3, f"searching {word!r} found only {found}"
    if which == "student":
        assert not [p for p in search_results(browser, base, "量化") if p.startswith("solutions/")]


def _lesson_captions(page: str) -> list[str]:
    """图N/表N of a lesson, from its number: chapter k draws 图2k-1, 表2k-1, 图2k and 表2k."""
    k = int(Path(page).name[:2])
    return [f"{kind}{n}" for n in (2 * k - 1, 2 * k) for kind in ("图", "表")]


def figure_problems(driver, base: str, page: str) -> list[str]:
    """What a lesson page of an executed site lacks: its 图N/表N captions, figures and tables,
    all looked for in the outputs of code cells (the captions also occur in the code)."""
    state, _ = read_page(driver, base + page)
    text = state["outputText"]
    missing = [c for c in _lesson_captions(page) if not re.search(c + "[:：]", text)]
    problems = [f"{page}: caption {c} missing" for c in missing]
    if state["outputImages"] < 2 or state["outputTables"] < 2:
        problems.append(
            f"{page}: {state['outputImages']} figures, {state['outputTables']} tables shown"
        )
    return problems


def test_executed_site_shows_every_figure_and_table(browser, serve):
    folder = os.environ.get("COURSE_SITE")
    if not folder:
        pytest.skip(
            "make book-ci builds without executing notebooks, so lesson pages have no figures; "
            "after `make book`, run COURSE_SITE=$(python tools/book.py --print-html) "
            "pytest tests/test_site.py"
        )
    site = Path(folder)
    assert banner(site)["executed"] == "true", f"{site} was built without execution"
    base = serve(site)
    problems = []
    for page in [p for p in pages_of(site) if p.startswith("lessons/")]:
        problems += page_problems(browser, base, page) + figure_problems(browser, base, page)
    assert problems == []


# --------------------------------------------------------------------------- make lab


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_make_lab_reaches_lessons_and_labs():
    """The README's student workflow: `make lab` serves the repository, so lessons/ and labs/."""
    import signal
    import time
    import urllib.request

    venv = Path(sys.prefix)
    if not (venv / ".installed").is_file() or shutil.which("make") is None:
        pytest.skip(f"{venv} was not made by `make venv`, or make is missing")
    port, token = _free_port(), "course-site-test"
    args = f"--no-browser --ip 127.0.0.1 --port {port} --IdentityProvider.token={token}"
    if os.geteuid() == 0:
        args += " --allow-root"
    server = subprocess.Popen(
        # -o: never reinstall the environment under test, even if requirements.txt is newer
        ["make", "-s", "-o", f"{venv}/.installed", f"VENV={venv}", "lab", f"LAB_ARGS={args}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, stopped as a whole below
    )
    try:
        listings, deadline = {}, time.monotonic() + 120
        while len(listings) < 2 and time.monotonic() < deadline and server.poll() is None:
            for folder in ("lessons", "labs"):
                url = f"http://127.0.0.1:{port}/api/contents/{folder}"
                request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
                try:
                    with urllib.request.urlopen(request, timeout=5) as reply:
                        listings[folder] = {c["name"] for c in json.load(reply)["content"]}
                except OSError:
                    time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    for folder in ("lessons", "labs"):
        expected = {p.name for p in (ROOT / folder).glob("*.ipynb")}
        assert expected and expected <= listings.get(folder, set()), f"{folder}/ not served"


# --------------------------------------------------------------------------- able to fail


@pytest.fixture
def broken_site(ci_sites, tmp_path) -> Path:
    """A copy of the student CI site, to be broken by each test."""
    return Path(shutil.copytree(ci_sites["student"], tmp_path / "html"))


def test_math_check_fails_without_mathjax(broken_site, browser, serve):
    shutil.rmtree(broken_site / "_static" / "mathjax")
    problems = page_problems(browser, serve(broken_site), "lessons/02_quantization.html")
    assert any("math not typeset" in p for p in problems), problems


def test_math_check_fails_with_mathjax_from_a_cdn(broken_site, browser, serve):
    page = broken_site / "lessons" / "02_quantization.html"
    text = page.read_text(encoding="utf-8")
    cdn = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"
    text, replaced = re.subn(r'src="[./]*_static/mathjax/tex-chtml\.js[^"]*"', f'src="{cdn}"', text)
    assert replaced == 1, "the page no longer loads the MathJax the site serves"
    page.write_text(text, encoding="utf-8")
    problems = page_problems(browser, serve(broken_site), "lessons/02_quantization.html")
    assert any("math not typeset" in p for p in problems), problems


def test_link_check_fails_on_a_broken_link(broken_site):
    page = broken_site / "intro.html"
    text = page.read_text(encoding="utf-8")
    broken = (
        '<a href="lessons/02_quantization.html#no-such-section">x</a><a href="labs/99.html">y</a>'
    )
    page.write_text(text.replace("</main>", broken + "</main>"), encoding="utf-8")
    _parse.cache_clear()
    problems = broken_links(broken_site, "intro.html")
    assert any("missing anchor" in p for p in problems), problems
    assert any("missing file labs/99.html" in p for p in problems), problems


def test_console_check_fails_on_a_script_error(broken_site, browser, serve):
    page = broken_site / "intro.html"
    text = page.read_text(encoding="utf-8")
    page.write_text(text.replace("</body>", "<script>undefinedFunction()</script></body>"), "utf-8")
    problems = page_problems(browser, serve(broken_site), "intro.html")
    assert any("console error" in p and "undefinedFunction" in p for p in problems), problems


def test_search_check_fails_without_chinese_words_in_the_index(broken_site, browser, serve):
    index = broken_site / "searchindex.js"
    data = json.loads(index.read_text(encoding="utf-8").removeprefix("Search.setIndex(")[:-1])
    for key in ("terms", "titleterms", "alltitles"):
        data[key] = {t: d for t, d in data[key].items() if not re.search(r"[\u4e00-\u9fff]", t)}
    index.write_text("Search.setIndex(" + json.dumps(data) + ")", encoding="utf-8")
    assert SEARCHES["量化"] not in search_results(browser, serve(broken_site), "量化")


def test_figure_check_fails_on_a_lesson_without_outputs(ci_sites, browser, serve):
    problems = figure_problems(browser, serve(ci_sites["student"]), "lessons/02_quantization.html")
    assert "lessons/02_quantization.html: caption 图3 missing" in problems, problems
    assert any("0 figures, 0 tables" in p for p in problems), problems


def test_navigation_check_fails_on_a_stale_sidebar(broken_site):
    page = broken_site / "lessons" / "02_quantization.html"
    text = page.read_text(encoding="utf-8")
    page.write_text(text.replace('href="../setup.html"', 'href="../solutions/gone.html"'), "utf-8")
    problems = navigation_problems(broken_site, "lessons/02_quantization.html")
    assert problems and "solutions/gone.html" in problems[0] and "setup.html" in problems[0]
