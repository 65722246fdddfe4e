"""Write data/translation/{train,valid,test}.tsv: spelled-out English dates → ISO 8601.

A small, synthetic but real translation-style task (text normalisation, as a
text-to-speech front end or an information-extraction pipeline does it): the
source is a date written in words, in one of several common English phrasings,
the target its ISO 8601 form::

    the twenty-first of march, two thousand and five  →  2005-03-21
    nineteen ninety-nine june third                     →  1999-06-03

Every pair is correct by construction (the target is formatted from the same
``datetime.date`` the words are generated from). Splits are disjoint by date, so
the test split measures generalisation to dates never seen in training.
Deterministic: the same seed writes byte-identical files.

Usage::

    python tools/make_translation_data.py            # writes data/translation/*.tsv
    python tools/make_translation_data.py --check    # exits 1 if the files differ from a fresh run
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "translation"
SEED = 2023
SIZES = {"train": 4000, "valid": 500, "test": 500}
FIRST_YEAR, LAST_YEAR = 1900, 2099

ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINAL_ONES = "_ first second third fourth fifth sixth seventh eighth ninth".split()
ORDINAL_TEENS = (
    "tenth eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth "
    "eighteenth nineteenth"
).split()
ORDINAL_TENS = {20: "twentieth", 30: "thirtieth"}
MONTHS = (
    "january february march april may june july august september october november december"
).split()


def cardinal(n: int) -> str:
    """0..99 in words: ``45`` → ``"forty-five"``."""
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


def ordinal(n: int) -> str:
    """1..31 as an ordinal in words: ``21`` → ``"twenty-first"``."""
    if n < 10:
        return ORDINAL_ONES[n]
    if n < 20:
        return ORDINAL_TEENS[n - 10]
    tens, ones = divmod(n, 10)
    if ones == 0:
        return ORDINAL_TENS[n]
    return TENS[tens] + "-" + ORDINAL_ONES[ones]


def year_words(year: int, rng: random.Random) -> str:
    """A year as people say it: 1999 → "nineteen ninety-nine", 2005 → "two thousand (and) five"."""
    hi, lo = divmod(year, 100)
    if year >= 2000 and (lo < 10 or rng.random() < 0.5):
        if lo == 0:
            return "two thousand"
        return "two thousand " + ("and " if rng.random() < 0.5 else "") + cardinal(lo)
    head = cardinal(hi)
    if lo == 0:
        return head + " hundred"
    if lo < 10:
        return head + " oh " + ONES[lo]
    return head + " " + cardinal(lo)


def date_words(date: dt.date, rng: random.Random) -> str:
    """One of five English phrasings of ``date``."""
    day, month, year = ordinal(date.day), MONTHS[date.month - 1], year_words(date.year, rng)
    style = rng.randrange(5)
    if style == 0:
        return f"the {day} of {month} {year}"
    if style == 1:
        return f"the {day} of {month}, {year}"
    if style == 2:
        return f"{month} {day}, {year}"
    if style == 3:
        return f"{month} the {day} {year}"
    return f"{year} {month} {day}"


def make_pairs(seed: int = SEED) -> dict[str, list[tuple[str, str]]]:
    """The three splits, disjoint by date, each a list of ``(words, iso_date)``."""
    rng = random.Random(seed)
    first = dt.date(FIRST_YEAR, 1, 1).toordinal()
    last = dt.date(LAST_YEAR, 12, 31).toordinal()
    total = sum(SIZES.values())
    ordinals = rng.sample(range(first, last + 1), total)
    splits: dict[str, list[tuple[str, str]]] = {}
    start = 0
    for name, size in SIZES.items():
        dates = [dt.date.fromordinal(o) for o in ordinals[start : start + size]]
        splits[name] = [(date_words(d, rng), d.isoformat()) for d in dates]
        start += size
    return splits


def render(pairs: list[tuple[str, str]]) -> str:
    """Tab-separated ``source<TAB>target`` lines with a header."""
    return "source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, pairs in make_pairs().items():
        path = OUT / f"{name}.tsv"
        text = render(pairs)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {len(pairs)} pairs to {path}")
    if stale:
        print("out of date (run tools/make_translation_data.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
