"""`fleetwatch replay SERIES.csv --out SCORES.csv`: CSV in, scores out, rows in input order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.config import ConfigError
from pipeline.detect.series import score_series


def _timestamps(col: pl.Series, where: Path) -> np.ndarray:
    """Seconds as float: numbers are taken as epoch seconds, text as ISO 8601 times."""
    if col.dtype.is_numeric():
        return col.cast(pl.Float64).to_numpy()
    if col.dtype == pl.String:
        try:
            col = col.str.to_datetime(time_zone="UTC")
        except pl.exceptions.PolarsError:
            try:
                as_numbers = col.cast(pl.Float64)
            except pl.exceptions.PolarsError:
                raise ConfigError(f"{where}: column 'timestamp' holds values that are neither numbers nor "
                                  f"ISO 8601 times (first: {col[0]!r})") from None
            return as_numbers.to_numpy()
    if col.dtype.is_temporal():
        return col.dt.epoch("us").cast(pl.Float64).to_numpy() / 1e6
    raise ConfigError(f"{where}: column 'timestamp' has type {col.dtype}; use numbers or ISO 8601 times")


@dataclass
class NotNumbers:
    """Values of the series that are not numbers: they score 0 and leave the state alone."""
    empty: int = 0
    text: int = 0          # e.g. 'n/a'
    non_finite: int = 0    # NaN, inf
    example: str = ""      # the first text value

    @property
    def total(self) -> int:
        return self.empty + self.text + self.non_finite

    def __bool__(self) -> bool:
        return self.total > 0

    def __str__(self) -> str:
        return ", ".join(part for n, part in ((self.empty, f"{self.empty} empty"),
                                              (self.text, f"{self.text} text such as {self.example!r}"),
                                              (self.non_finite, f"{self.non_finite} NaN or infinite")) if n)


def _not_numbers(raw: pl.Series, values: np.ndarray) -> NotNumbers:
    empty = raw.is_null()
    if raw.dtype == pl.String:
        empty = empty | (raw.str.strip_chars() == "")
    empty = empty.to_numpy()
    text = ~empty & raw.cast(pl.Float64, strict=False).is_null().to_numpy()  # e.g. 'n/a'
    non_finite = ~empty & ~text & ~np.isfinite(values)
    example = str(raw.filter(pl.Series(text))[0]) if text.any() else ""
    return NotNumbers(int(empty.sum()), int(text.sum()), int(non_finite.sum()), example)


def replay_csv(src: Path, dst: Path) -> tuple[int, NotNumbers]:
    """Rows scored, and the values that were not numbers."""
    if not src.exists():
        raise ConfigError(f"{src}: no such file")
    try:
        df = pl.read_csv(src, infer_schema_length=10000)
    except pl.exceptions.PolarsError as e:
        raise ConfigError(f"{src}: not a readable CSV ({e})") from None
    missing = [c for c in ("timestamp", "value") if c not in df.columns]
    if missing:
        raise ConfigError(f"{src}: missing column(s) {missing}; expected a header 'timestamp,value', "
                          f"found {df.columns}")
    ts = _timestamps(df["timestamp"], src)
    values = df["value"].cast(pl.Float64, strict=False).to_numpy()
    scores = score_series(ts, values)
    pl.DataFrame({"timestamp": df["timestamp"], "value": df["value"], "anomaly_score": scores}).write_csv(dst)
    return df.height, _not_numbers(df["value"], values)
