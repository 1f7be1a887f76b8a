"""Component names: one spelling for every layer of the library.

A head is "L.H" (layer L, head H) and an MLP is "MLP L", as TransformerLens prints them. These are
the only functions that build or read such names; everything else goes through them.
"""

from __future__ import annotations


def head_name(layer: int, head: int) -> str:
    return f"{layer}.{head}"


def mlp_name(layer: int) -> str:
    return f"MLP {layer}"


def is_mlp(name: str) -> bool:
    return name.startswith("MLP ")


def parse_component(name: str) -> tuple[int, int | None]:
    """'L.H' -> (L, H); 'MLP L' -> (L, None). Anything else is a ValueError naming both spellings."""
    try:
        if is_mlp(name):
            return int(name[4:]), None
        layer, head = name.split(".")
        return int(layer), int(head)
    except (ValueError, AttributeError):
        raise ValueError(
            f"bad component name {name!r}: write a head as 'L.H' (e.g. '9.6') and an MLP as 'MLP L'"
        ) from None


def parse_head(name: str) -> tuple[int, int]:
    """'L.H' -> (L, H); an MLP or anything else is a ValueError."""
    layer, head = parse_component(name) if isinstance(name, str) else (None, None)
    if head is None:
        raise ValueError(f"head names look like 'L.H' (e.g. '9.6'), got {name!r}")
    return layer, head
