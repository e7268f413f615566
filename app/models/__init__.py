"""Typed SQLAlchemy models, one module per aggregate."""

from app.models.base import Base, epoch, new_id, utcnow
from app.models.batch import Batch
from app.models.file import File
from app.models.job import Job
from app.models.provider_batch import ProviderBatch
from app.models.tenant import ApiKey, Tenant

__all__ = [
    "ApiKey",
    "Base",
    "Batch",
    "File",
    "Job",
    "ProviderBatch",
    "Tenant",
    "epoch",
    "new_id",
    "utcnow",
]
