"""`sluice submit` and `sluice results`: the batch channel from the terminal."""

from __future__ import annotations
