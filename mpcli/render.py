"""Formatting helpers for human output: sizes, ids, times, tables."""

from __future__ import annotations

import json
import sys
import time

import click


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def short(sid: bytes | None) -> str:
    return sid.hex()[:12] if sid else "-"


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def emit_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


class ProgressBar:
    """A tqdm bar on stderr, or nothing (under --json, or when stderr is not a terminal)."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "B"):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, **scaled)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
