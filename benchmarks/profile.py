"""A text summary of a py-spy profile (collapsed stacks: ``frame;frame;... count`` per line):
where ``serve``'s samples are, by function (self and inclusive) and by package."""

from __future__ import annotations

import re
from collections import Counter

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
TOP = 30


def _function(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['function']} ({_short(match['file'])})"


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return path


def _package(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if match is None:
        return "other"
    parts = _short(match["file"]).split("/")
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def summarize(collapsed: str) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        self_time[_function(frames[-1])] += count
        packages[_package(frames[-1])] += count
        for name in {_function(f) for f in frames}:
            inclusive[name] += count
    if not total:
        return "no samples\n"

    def table(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"\n{title}"]
        rows += [f"  {100 * n / total:5.1f} %  {name}" for name, n in counter.most_common(TOP)]
        return rows

    lines = [f"{total} samples of ledger serve under load (py-spy at 200 Hz, all threads; idle samples left out)"]
    lines += table("self time by package (the leaf frame's file)", packages)
    lines += table("self time by function", self_time)
    lines += table("inclusive time by function", inclusive)
    return "\n".join(lines) + "\n"
