"""Build one variant of the course site: who it is for, which profile ran it, executed or not.

The site comes in two audiences, chosen by ``--site``:

* ``student`` — lessons and labs (the exercises), no reference solutions;
* ``instructor`` — lessons, labs and the reference solutions, titled as the instructors' site.

Every variant gets its own build folder ``_build/<site>-<profile>/`` (``_build/ci-<site>/`` when
the notebooks are not executed), and every profile its own execution cache
``_build/.jupyter_cache/<profile>/``: the cache of Jupyter Book keys on the code of a
notebook, not on ``COURSE_PROFILE``, so a shared cache would serve the fast profile's outputs to
a ``full`` build. Each page shows a banner saying which variant and profile produced it.

The helper writes a derived ``_config.yml`` and ``_toc.yml`` into the build folder and runs
``jupyter-book build`` with them (warnings are errors). Usage::

    python tools/book.py --site student                 # make book
    python tools/book.py --site instructor              # make book-instructor
    python tools/book.py --site instructor --no-execute # make book-ci (CI: nbval already ran)
    python tools/book.py --site student --print-html    # only print where the site would be
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.config import PROFILE_ENV, PROFILES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITES = {
    "student": ("学生版", "课程与实验练习，不含参考答案"),
    "instructor": ("教师版", "课程、实验练习与参考答案"),
}
SOLUTIONS_PREFIX = "solutions/"


def variant_name(site: str, profile: str, execute: bool) -> str:
    """Name of the build folder: ``<site>-<profile>`` executed, ``ci-<site>`` not executed."""
    return f"{site}-{profile}" if execute else f"ci-{site}"


def html_dir(root: Path, site: str, profile: str, execute: bool) -> Path:
    """Where ``jupyter-book`` writes the HTML of a variant."""
    return root / "_build" / variant_name(site, profile, execute) / "_build" / "html"


def derive_toc(toc: dict, site: str) -> dict:
    """The table of contents of ``site``: the student site drops every part made of solutions."""
    if site == "instructor":
        return toc
    parts = [
        part
        for part in toc["parts"]
        if not all(ch["file"].startswith(SOLUTIONS_PREFIX) for ch in part["chapters"])
    ]
    return {**toc, "parts": parts}


def derive_config(
    config: dict, site: str, profile: str, execute: bool, cache: Path, root: Path = ROOT
) -> dict:
    """The book configuration of one variant: title, banner, execution mode and cache folder.

    Paths of local Sphinx extensions become absolute: Jupyter Book resolves them against the
    folder of the configuration file, which for a variant is its build folder.
    """
    label, contents = SITES[site]
    ran = f"由 COURSE_PROFILE={profile} 执行生成" if execute else "未执行笔记本的 CI 构建（无输出）"
    derived = yaml.safe_load(yaml.safe_dump(config))  # deep copy
    derived["title"] = f"{config['title']}（{label}）"
    derived["execute"]["execute_notebooks"] = "cache" if execute else "off"
    derived["execute"]["cache"] = str(cache)
    local = derived.get("sphinx", {}).get("local_extensions", {})
    for name, path in local.items():
        local[name] = str((root / path).resolve())
    derived.setdefault("html", {})["announcement"] = (
        f'<span class="course-variant" data-site="{site}" data-profile="{profile}"'
        f' data-executed="{str(execute).lower()}">{label}：{contents} · {ran}</span>'
    )
    if site == "student":
        derived["exclude_patterns"] = [*config["exclude_patterns"], f"{SOLUTIONS_PREFIX}*"]
    return derived


def kernel_profile(folder: Path) -> Path:
    """An IPython directory whose kernels log errors only, for the notebooks the build executes.

    Each kernel otherwise logs "Kernel is running over TCP without encryption" (ipykernel 7; the
    kernel listens on this machine only), once per notebook in the build log. Warnings that
    notebook code raises are outputs of its cells and still show.
    """
    config = folder / "profile_default" / "ipython_kernel_config.py"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('c.IPKernelApp.log_level = "ERROR"\n', encoding="utf-8")
    return folder


def build(root: Path, site: str, profile: str, execute: bool) -> Path:
    """Write the derived configuration, run ``jupyter-book build`` and return the HTML folder."""
    out = root / "_build" / variant_name(site, profile, execute)
    out.mkdir(parents=True, exist_ok=True)
    cache = root / "_build" / ".jupyter_cache" / profile
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    config_path, toc_path = out / "_config.yml", out / "_toc.yml"
    derived = derive_config(config, site, profile, execute, cache, root)
    config_path.write_text(yaml.safe_dump(derived, allow_unicode=True), encoding="utf-8")
    toc_path.write_text(yaml.safe_dump(derive_toc(toc, site), allow_unicode=True), "utf-8")
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    # --all: Sphinx rebuilds only changed sources, leaving the navigation of the others stale when
    # the table of contents changes; executed outputs still come from the cache.
    command = [str(jupyter_book), "build", str(root), "--all", "-W", "--keep-going"]
    command += ["--config", str(config_path), "--toc", str(toc_path), "--path-output", str(out)]
    ipython = kernel_profile(root / "_build" / "ipython")
    env = {**os.environ, PROFILE_ENV: profile, "IPYTHONDIR": str(ipython)}
    subprocess.run(command, check=True, env=env, cwd=root)
    return html_dir(root, site, profile, execute)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", choices=sorted(SITES), default="student")
    parser.add_argument("--no-execute", dest="execute", action="store_false")
    parser.add_argument("--print-html", action="store_true", help="print the HTML folder only")
    args = parser.parse_args(argv)
    profile = os.environ.get(PROFILE_ENV, "fast")
    if profile not in PROFILES:
        parser.error(f"{PROFILE_ENV} must be one of {sorted(PROFILES)}, got {profile!r}")
    if args.print_html:
        print(html_dir(ROOT, args.site, profile, args.execute))
        return
    html = build(ROOT, args.site, profile, args.execute)
    print(f"site ({args.site}, COURSE_PROFILE={profile}): {html / 'index.html'}")


if __name__ == "__main__":
    main()
