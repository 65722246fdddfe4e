"""Static checks of the course against its syllabus, for the chapters that exist.

The same rules as the course's design card: each lesson names its chapter in a
``# `` title, carries the captions of its syllabus figures (图N) and tables (表N),
is committed without outputs, and is listed in ``_toc.yml``; every lab has its
solution. (Executing the lessons is nbval's job.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SYLLABUS: dict[int, tuple[str, dict[str, str]]] = {
    1: (
        "推理加速的基本概念",
        {
            "图1": "推理加速的基本原理示意图",
            "表1": "推理加速前后的性能对比",
            "图2": "推理加速在实际应用中的重要性示意图",
            "表2": "推理加速技术在不同应用中的效果对比",
        },
    ),
    2: (
        "模型量化",
        {
            "图3": "模型量化的基本原理示意图",
            "表3": "模型量化前后的性能对比",
            "图4": "各种模型量化方法的实现示意图",
            "表4": "不同量化方法的效果对比",
        },
    ),
    3: (
        "模型剪枝",
        {
            "图5": "模型剪枝的基本原理示意图",
            "表5": "模型剪枝前后的性能对比",
            "图6": "各种模型剪枝方法的实现示意图",
            "表6": "不同剪枝方法的效果对比",
        },
    ),
    4: (
        "知识蒸馏",
        {
            "图7": "知识蒸馏的基本原理示意图",
            "表7": "知识蒸馏前后的模型性能对比",
            "图8": "各种知识蒸馏方法的实现示意图",
            "表8": "不同蒸馏方法的效果对比",
        },
    ),
    5: (
        "结合",
        {
            "图9": "量化、剪枝与知识蒸馏结合的原理示意图",
            "表9": "量化、剪枝与知识蒸馏结合前后的模型性能对比",
            "图10": "量化、剪枝与知识蒸馏结合的实现流程图",
            "表10": "结合方法在不同任务中的效果对比",
        },
    ),
    6: (
        "工具",
        {
            "图11": "推理加速实现的基本流程图",
            "表11": "不同推理加速方法的对比",
            "图12": "推理加速工具的应用示意图",
            "表12": "不同推理加速工具的性能对比",
        },
    ),
    7: (
        "自然语言处理",
        {
            "图13": "自然语言处理中的推理加速应用示意图",
            "表13": "推理加速在不同自然语言处理任务中的效果对比",
            "图14": "自然语言处理推理加速案例分析示意图",
            "表14": "推理加速在具体案例中的效果对比",
        },
    ),
    8: (
        "计算机视觉",
        {
            "图15": "计算机视觉中的推理加速应用示意图",
            "表15": "推理加速在不同计算机视觉任务中的效果对比",
            "图16": "计算机视觉推理加速案例分析示意图",
            "表16": "推理加速在具体案例中的效果对比",
        },
    ),
    9: (
        "挑战",
        {
            "图17": "推理加速面临的主要挑战示意图",
            "表17": "推理加速技术在不同应用中的挑战",
            "图18": "推理加速技术的解决方案示意图",
            "表18": "解决方案在不同任务中的效果对比",
        },
    ),
    10: (
        "前沿",
        {
            "图19": "低比特量化的基本原理示意图",
            "表19": "低比特量化在不同任务中的效果对比",
            "图20": "硬件加速技术的基本原理示意图",
            "表20": "不同硬件加速技术的性能对比",
            "图21": "动态推理技术的基本原理示意图",
            "表21": "动态推理在不同任务中的效果对比",
        },
    ),
    11: ("总结", {}),
    12: ("参考文献", {}),
}

LESSONS: dict[int, list[Path]] = {}  # a chapter may be split: 10_a_….ipynb, 10_b_….ipynb
for _p in sorted((ROOT / "lessons").glob("[0-9][0-9]_*.ipynb")):
    LESSONS.setdefault(int(_p.name[:2]), []).append(_p)
NOTEBOOKS = sorted(p for d in ("lessons", "labs", "solutions") for p in (ROOT / d).glob("*.ipynb"))


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text).replace("：", ":")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_chapter_one_exists():
    assert 1 in LESSONS


@pytest.mark.parametrize("number", sorted(LESSONS), ids=[f"{n:02d}" for n in sorted(LESSONS)])
def test_lesson_title_and_captions(number: int):
    chapter, captions = SYLLABUS[number]
    text = ""
    for path in LESSONS[number]:
        nb = load(path)
        first = nb["cells"][0]
        title = "".join(first["source"])
        assert first["cell_type"] == "markdown" and title.startswith("# "), (
            f"{path.name}: first cell must be a '# ' title"
        )
        assert chapter in title, f"{path.name}: the title must name the chapter ({chapter})"
        text += squash("\n".join("".join(c["source"]) for c in nb["cells"]))
    missing = [k for k, t in captions.items() if f"{k}:{squash(t)}" not in text]
    assert missing == [], f"captions missing: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[f"{p.parent.name}/{p.stem}" for p in NOTEBOOKS])
def test_notebooks_are_committed_without_outputs(path: Path):
    for i, cell in enumerate(load(path)["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, (
                f"cell {i} has outputs"
            )


def test_every_lab_has_a_solution():
    labs = {p.name for p in (ROOT / "labs").glob("*.ipynb")}
    sols = {p.name for p in (ROOT / "solutions").glob("*.ipynb")}
    assert labs == sols


def test_toc_lists_every_notebook():
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    missing = [
        f"{p.parent.name}/{p.stem}" for p in NOTEBOOKS if f"{p.parent.name}/{p.stem}" not in toc
    ]
    assert missing == [], f"_toc.yml does not list {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[f"{p.parent.name}/{p.stem}" for p in NOTEBOOKS])
def test_notebooks_declare_the_python3_kernel(path: Path):
    """JupyterLab, nbval and the book (its code highlighting) all read this metadata."""
    meta = load(path)["metadata"]
    assert meta.get("kernelspec", {}).get("name") == "python3"
    assert meta.get("language_info", {}).get("name") == "python"


#: One Chinese term per concept, as d2l keeps a glossary: variant → the course's term.
TERMS = {
    "哈夫曼": "霍夫曼",
    "时延": "延迟",
    "推断": "推理",
    "精馏": "蒸馏",
    "权值": "权重",
    "标定": "校准",
}


def test_one_term_per_concept():
    found = []
    for path in sorted([*ROOT.glob("lessons/*.ipynb"), *ROOT.glob("solutions/*.ipynb")]):
        text = "".join(
            "".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
        )
        found += [f"{path.name}: {v} → {t}" for v, t in TERMS.items() if v in text]
    assert found == [], "use the course's term: " + "; ".join(found)
