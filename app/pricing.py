"""Prices per model and tenants' daily budgets (the `[prices]` and `[budgets]` tables).

Pure: no database or app needed. A price is USD per million tokens, for input, output and
cached input, each with a batch price (a provider's batch API runs at half the price by
default). `[prices]` keys are model names or globs (`"openai/gpt-4o*"`); the most specific
match wins (an exact name, else the longest glob). The mock models have defaults.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PER_TOKENS = 1_000_000


class ConfigError(ValueError):
    """A bad [prices] or [budgets] setting (app.config turns it into its ConfigError)."""


BATCH_RATIO = 0.5  # the providers' batch APIs: 50 % of the interactive price
_PRICE_KEYS = (
    "input",
    "output",
    "cached_input",
    "batch_input",
    "batch_output",
    "batch_cached_input",
)
_BUDGET_KEYS = ("default", "tenants")


@dataclass(frozen=True)
class Price:
    """USD per million tokens; the batch prices default to BATCH_RATIO of the others."""

    input: float
    output: float
    cached_input: float | None = None
    batch_input: float | None = None
    batch_output: float | None = None
    batch_cached_input: float | None = None

    def rates(self, executor: str | None) -> tuple[float, float, float]:
        """(input, output, cached input) for a job run by this executor."""
        cached = self.input if self.cached_input is None else self.cached_input
        if executor != "provider":
            return self.input, self.output, cached
        return (
            self.input * BATCH_RATIO if self.batch_input is None else self.batch_input,
            self.output * BATCH_RATIO if self.batch_output is None else self.batch_output,
            cached * BATCH_RATIO if self.batch_cached_input is None else self.batch_cached_input,
        )

    def discount(self) -> float:
        """The batch price as a fraction of the interactive one (by input price)."""
        batch_input = self.rates("provider")[0]
        return batch_input / self.input if self.input else BATCH_RATIO

    def cost(self, usage: Mapping[str, Any] | None, executor: str | None) -> float:
        """What a job with this usage cost, in USD."""
        if not usage:
            return 0.0
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
        cached = min(cached, prompt)
        rate_in, rate_out, rate_cached = self.rates(executor)
        total = (prompt - cached) * rate_in + cached * rate_cached + completion * rate_out
        return round(total / PER_TOKENS, 10)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# what `mock/<anything>` costs unless [prices] says otherwise (so `make dev` shows cost)
DEFAULT_PRICES: dict[str, Price] = {"mock/*": Price(input=0.15, output=0.60, cached_input=0.075)}


def parse_prices(table: Any) -> dict[str, Price]:
    """The `[prices]` table, validated (ConfigError naming the model and field), plus defaults."""
    if not isinstance(table, Mapping):
        raise ConfigError("[prices] in sluice.toml must be a table of model = { input, output }")
    out = dict(DEFAULT_PRICES)
    for model, raw in table.items():
        where = f"prices.{model!r}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a table such as {{ input = 0.15, output = 0.6 }}")
        for key in raw:
            if key not in _PRICE_KEYS:
                raise ConfigError(f"{where}.{key} is not a price; known: {list(_PRICE_KEYS)}")
        for key in ("input", "output"):
            if key not in raw:
                raise ConfigError(f"{where}.{key} is required (USD per million tokens)")
        values = {key: _usd(f"{where}.{key}", raw[key]) for key in raw}
        out[str(model)] = Price(**values)
    return out


def _usd(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where} must be a non-negative number (USD), got {value!r}")
    return float(value)


def price_for(model: str, prices: Mapping[str, Price]) -> Price | None:
    """The model's price: its exact entry, else the longest glob that matches it."""
    if model in prices:
        return prices[model]
    globs = [g for g in prices if any(c in g for c in "*?[") and fnmatch.fnmatchcase(model, g)]
    return prices[max(globs, key=len)] if globs else None


def job_cost(
    model: str, usage: Mapping[str, Any] | None, executor: str | None, config: Mapping[str, Any]
) -> float:
    """What one job cost in USD (0 for a model without a price)."""
    price = price_for(model, prices_of(config))
    return price.cost(usage, executor) if price is not None else 0.0


def prices_of(config: Mapping[str, Any]) -> dict[str, Price]:
    """The app's parsed price table (parsed once per config mapping)."""
    cached = config.get("PRICE_TABLE")
    if isinstance(cached, dict):
        return cached
    return parse_prices(config.get("PRICES") or {})


def parse_budgets(table: Any) -> tuple[float | None, dict[str, float]]:
    """(default budget, per-tenant budgets) in USD per UTC day, from `[budgets]`."""
    if not isinstance(table, Mapping):
        raise ConfigError("[budgets] in sluice.toml must be a table")
    for key in table:
        if key not in _BUDGET_KEYS:
            raise ConfigError(f"budgets.{key} is not a budget field; known: {list(_BUDGET_KEYS)}")
    default = _usd("budgets.default", table["default"]) if "default" in table else None
    tenants = table.get("tenants", {})
    if not isinstance(tenants, Mapping):
        raise ConfigError("budgets.tenants must be a table of tenant name = USD per day")
    return default, {str(k): _usd(f"budgets.tenants.{k}", v) for k, v in tenants.items()}


def budget_for(tenant_name: str, tenant_id: str, config: Mapping[str, Any]) -> float | None:
    """The tenant's daily budget in USD (by name, then id, then the default), or None."""
    default, tenants = parse_budgets(config.get("BUDGETS") or {})
    for key in (tenant_name, tenant_id):
        if key in tenants:
            return tenants[key]
    return default


def check_config(config: dict[str, Any]) -> None:
    """Validate [prices] and [budgets] at start (ConfigError naming the field); keep the table."""
    config["PRICE_TABLE"] = parse_prices(config.get("PRICES") or {})
    parse_budgets(config.get("BUDGETS") or {})
