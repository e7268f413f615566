"""/v1/spend: what the calling tenant spent this UTC day, and its daily budget (#13)."""

from __future__ import annotations

from flask import Blueprint, current_app, g
from flask.typing import ResponseReturnValue

from app.pricing import budget_for
from app.services.costs import day_of, spent_today

bp = Blueprint("spend", __name__)


@bp.get("/spend")
def show_spend() -> ResponseReturnValue:
    spent = round(spent_today(g.tenant_id), 8)
    budget = budget_for(g.api_key.tenant.name, g.tenant_id, current_app.config)
    return {
        "object": "spend",
        "day": day_of(),
        "spent_usd": spent,
        "budget_usd": budget,
        "budget_left_usd": None if budget is None else round(budget - spent, 8),
    }
