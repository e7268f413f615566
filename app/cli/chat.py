"""`sluice chat`: stream an answer to the terminal."""

from __future__ import annotations
