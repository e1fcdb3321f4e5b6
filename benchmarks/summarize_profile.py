"""Where a server process spent its busy time, from a py-spy ``record -f raw`` file (folded stacks).

run_all.sh records the model and gateway workers with py-spy during the concurrency sweep when PROFILE_SERVER=1
(py-spy on PATH, or PYSPY=path). This prints the busy samples per thread and the functions that hold the most of
them (inclusive: the function or anything it calls; self: the function itself), so a saturated process shows
whether its time goes to the forward pass, JPEG decoding, serialization, HTTP handling or the event loop.
The self time of ``Runner.run`` is the event loop itself; with uvloop that includes its wait for I/O, which py-spy
cannot tell from work.

    python benchmarks/summarize_profile.py /tmp/bench-out/profile-model.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterable

from common import print_table

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """'forward (torch/nn/modules/linear.py:125)' -> 'forward (linear.py)'; other text is kept as it is."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('func')} ({m.group('file').rsplit('/', 1)[-1]})"


def summarize(lines: Iterable[str]) -> dict[str, collections.Counter]:
    """Folded stacks ('frame;frame;... count') -> sample counts: total, per thread (first frame), inclusive and
    self per function. A function on a stack twice (recursion) counts once for that stack; functions on every
    stack of their thread are left out of ``inclusive``."""
    total = 0
    threads: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    self_: collections.Counter = collections.Counter()
    per_thread: collections.Counter = collections.Counter()  # (thread, function) -> samples
    for line in lines:
        line = line.rstrip()
        if not line or " " not in line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        threads[frames[0]] += n
        for name in set(frames):
            inclusive[name] += n
            per_thread[frames[0], name] += n
        self_[frames[-1]] += n
    # Frames on every stack of their thread (thread start-up, the event loop's run call) say nothing.
    plumbing = {name for (thread, name), n in per_thread.items() if n == threads[thread]}
    for name in plumbing:
        del inclusive[name]
    return {"total": collections.Counter({"samples": total}), "threads": threads, "inclusive": inclusive,
            "self": self_}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with open(args.path, errors="replace") as f:
        s = summarize(f)
    total = s["total"]["samples"]
    if not total:
        print(f"{args.path}: no samples")
        return 0

    def pct(n: int) -> str:
        return f"{100 * n / total:.1f}%"

    print(f"{args.path}: {total} busy samples")
    print_table("threads", ["share", "first frame"], [(pct(n), k) for k, n in s["threads"].most_common(6)])
    print_table("functions, inclusive", ["share", "function"],
                [(pct(n), k) for k, n in s["inclusive"].most_common(args.top)])
    print_table("functions, self", ["share", "function"], [(pct(n), k) for k, n in s["self"].most_common(args.top)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
