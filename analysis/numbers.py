"""Numbers as text, one way for every page that prints them: fixed decimals, intervals and p-values.

Missing or non-finite values print as `missing` ("n/a" by default), never as "nan".
"""
from __future__ import annotations

import math
from typing import Any, Optional


def finite(x: Any) -> Optional[float]:
    """`x` as a float when it is a finite real number (bools excluded), else None."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def is_finite(*values: Any) -> bool:
    return all(finite(v) is not None for v in values)


def or_nan(x: Any) -> float:
    v = finite(x)
    return math.nan if v is None else v


def num(x: Any, digits: int = 2, signed: bool = False, missing: str = "n/a") -> str:
    v = finite(x)
    if v is None:
        return missing
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def interval(pair: Any, digits: int = 2, signed: bool = False, missing: str = "[n/a]") -> str:
    """`[lo, hi]` from a two-element list or tuple; `missing` unless both ends are finite."""
    if isinstance(pair, (list, tuple)) and len(pair) == 2 and is_finite(*pair):
        return f"[{num(pair[0], digits, signed)}, {num(pair[1], digits, signed)}]"
    return missing


def p_value(p: Any, prefix: bool = True) -> str:
    """'p = 0.0312' / 'p < 0.001' (without `prefix`: '0.0312' / '< 0.001'); 'n/a' when missing."""
    v = finite(p)
    text = "n/a" if v is None else "< 0.001" if v < 0.001 else f"{v:.3g}"
    if not prefix:
        return text
    return f"p {text}" if text.startswith("<") else f"p = {text}"
