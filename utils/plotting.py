"""One plotting style and the helpers that show a figure or a table with its caption.

Every figure and table of the course is shown through :func:`show_figure` or
:func:`show_table`, which display the caption (``图N: …`` / ``表N: …``) as
Markdown text output in the same cell as the image or the HTML table, so the
executed notebook, the book and the syllabus line up. Plot text is English (the
default fonts have no CJK glyphs; captions carry the Chinese).
"""

from __future__ import annotations

import re
from typing import Any

import matplotlib
import matplotlib.figure
import matplotlib.pyplot as plt
import pandas as pd

from utils.validation import check_type

CAPTION_RE = re.compile(r"^(图|表)\d+\s*[:：]\s*\S")
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def set_style() -> None:
    """Apply the course's matplotlib style (idempotent)."""
    plt.rcParams.update(
        {
            "figure.figsize": (7.0, 4.0),
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
            "font.size": 10,
            "legend.frameon": False,
        }
    )


def _check_caption(caption: str) -> None:
    check_type("caption", caption, str)
    if not CAPTION_RE.match(caption):
        raise ValueError(f"caption must look like '图N: title' or '表N: title', got {caption!r}")


def _display(obj: Any) -> None:
    """``IPython.display.display`` inside a notebook; plain text on a terminal."""
    from IPython import get_ipython
    from IPython.display import display

    if get_ipython() is not None:
        display(obj)
    elif isinstance(obj, matplotlib.figure.Figure):
        print(f"<figure with {len(obj.axes)} axes>")
    else:
        print(getattr(obj, "data", obj))


def show_figure(fig: matplotlib.figure.Figure, caption: str, note: str | None = None) -> None:
    """Display ``caption`` (bold Markdown), the figure, and an optional note; then close it."""
    from IPython.display import Markdown

    check_type("fig", fig, matplotlib.figure.Figure)
    _check_caption(caption)
    _display(Markdown(f"**{caption}**"))
    _display(fig)
    if note:
        _display(Markdown(note))
    plt.close(fig)


def show_table(df: pd.DataFrame, caption: str, *, digits: int = 2, note: str | None = None) -> None:
    """Display ``caption`` and ``df`` as an HTML table (floats rounded to ``digits``)."""
    from IPython.display import HTML, Markdown

    check_type("df", df, pd.DataFrame)
    _check_caption(caption)
    _display(Markdown(f"**{caption}**"))
    styled = df.style.format(precision=digits, thousands=",", na_rep="—")
    _display(HTML(styled.to_html()))
    if note:
        _display(Markdown(note))


def show_source(obj: Any, *, max_lines: int = 40) -> None:
    """Show the source of a ``utils`` function or class as a highlighted code block.

    Lessons call it right before they first use a core function, so the reader sees
    the lines the numbers come from while the code still exists once (in ``utils``).
    The docstring is kept (it states the formula and cites the paper); a source longer
    than ``max_lines`` is cut with a pointer to the file.
    """
    import inspect

    from IPython.display import Markdown

    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)):
        raise TypeError(f"obj must be a function, method or class, got {type(obj).__name__}")
    if isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 1:
        raise ValueError(f"max_lines must be a positive int, got {max_lines!r}")
    lines = inspect.getsource(obj).rstrip().splitlines()
    module = inspect.getmodule(obj)
    where = f"{module.__name__}.{obj.__qualname__}" if module else obj.__qualname__
    if len(lines) > max_lines:
        cut = len(lines) - max_lines
        lines = [*lines[:max_lines], f"    # … {cut} more lines: see {where}"]
    body = "\n".join(lines)
    _display(Markdown(f"`{where}`:\n\n```python\n{body}\n```"))
