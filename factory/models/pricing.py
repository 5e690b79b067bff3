"""What a hosted model's tokens cost: the recipe's prices, else a small built-in table of list prices.

The openai backend (`factory/models/openai_backend.py`) puts the cost of each request on its rows.
"""

from __future__ import annotations

import re

from factory.config.models import ModelSpec

PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    # USD per million (input, output) tokens: OpenAI list prices (2025). Dated snapshots such as
    # `gpt-4o-2024-08-06` use their family's price. Set `price_in_per_mtok`/`price_out_per_mtok` to override.
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
_SNAPSHOT = re.compile(r"^(?P<family>.+)-\d{4}-\d{2}-\d{2}$")


def model_prices(spec: ModelSpec) -> tuple[float, float] | None:
    """(input, output) USD per million tokens: the recipe's prices, else the built-in table, else None."""
    listed = PRICES_PER_MTOK.get(spec.model)
    if listed is None and (m := _SNAPSHOT.match(spec.model)):
        listed = PRICES_PER_MTOK.get(m.group("family"))
    price_in = spec.price_in_per_mtok if spec.price_in_per_mtok is not None else listed and listed[0]
    price_out = spec.price_out_per_mtok if spec.price_out_per_mtok is not None else listed and listed[1]
    if price_in is None or price_out is None:
        return None
    return float(price_in), float(price_out)


def token_cost(prices: tuple[float, float] | None, tokens_in: float, tokens_out: float) -> float | None:
    """USD for these tokens at (input, output) USD per million tokens; None when the prices are unknown."""
    if prices is None:
        return None
    return (tokens_in * prices[0] + tokens_out * prices[1]) / 1e6
