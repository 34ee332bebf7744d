"""Shared by the benchmark scripts: print a Markdown report and save it."""
from pathlib import Path


def write_report(markdown: str, out: str | Path) -> None:
    print()
    print(markdown)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    print(f"wrote {out}")
