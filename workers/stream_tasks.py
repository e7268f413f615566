"""Thin tasks for the stream channel (queue `interactive`)."""

from __future__ import annotations
