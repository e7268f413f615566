"""Thin tasks for the batch channel (queue `batch`)."""

from __future__ import annotations
