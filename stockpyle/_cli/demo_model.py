"""The demo's data model: users known by an id and by an email address.

A module of its own, imported only when the demo runs (it needs SQLAlchemy),
and importable by name so that memcached entries of :class:`DemoUser` unpickle.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["TABLE", "DemoBase", "DemoUser"]

TABLE = "stockpyle_demo_users"


class DemoBase(DeclarativeBase):
    """Declarative base holding only the demo's table."""


class DemoUser(DemoBase):
    """A user: the primary key ``id`` and the unique ``email`` are alternate keys."""

    __tablename__ = TABLE
    __stockpyle_keys__: ClassVar[list[Any]] = ["id", "email"]

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(120), unique=True)
    name: Mapped[str] = mapped_column(String(80))
    visits: Mapped[int] = mapped_column(default=0)

    def __repr__(self) -> str:
        return f"DemoUser(id={self.id!r}, email={self.email!r})"
