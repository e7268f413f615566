"""`sluice policy check|explain`."""

from __future__ import annotations
