"""py-spy summaries for the benchmarks: where the Python CPU of a process goes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

AREAS = [
    ("services/", "phiserve code"),
    ("redis/", "redis client"),
    ("fastapi/", "fastapi"),
    ("starlette/", "starlette"),
    ("pydantic", "pydantic"),
    ("uvicorn/", "uvicorn"),
    ("anyio/", "anyio threadpool"),
    ("ray/serve/", "ray serve"),
    ("ray/", "ray core"),
    ("logging/", "logging"),
    ("asyncio/", "asyncio"),
    ("json/", "json"),
]
SAMPLE_MS = 5.0  # py-spy records at 200 Hz


def summarise(path: Path, top: int, requests: int) -> None:
    """Print a `py-spy record -f raw` file: GIL time per request, by area and by function."""
    own: Counter[str] = Counter()
    area: Counter[str] = Counter()
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if count.isdigit() and frames:
            own[frames[-1]] += int(count)
            area[next((name for f in reversed(frames) for key, name in AREAS if key in f), "other")] += int(
                count
            )
    total = sum(own.values())
    if not total:
        print("  (no samples)")
        return
    print(
        f"  {total} samples = {SAMPLE_MS * total / requests:.2f} ms holding the GIL per request; by area of"
        " the innermost recognised frame: "
        + ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in area.most_common())
    )
    print(f"  top {top} functions by own samples:")
    for f, n in own.most_common(top):
        print(f"    {100 * n / total:5.1f}%  {f[:140]}")
