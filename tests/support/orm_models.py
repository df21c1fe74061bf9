"""A realistic ORM model for the SQLAlchemy integration tests (importable by subprocesses).

The classes are mapped the way applications map them, so the tests meet
what the ORM really does in a flush:

* :class:`Author` and :class:`Book` -- parent and children with
  ``cascade="all, delete-orphan"``; ``Author.books`` is eager (``selectin``),
  ``Book.author`` is eager (``joined``), so a naive cache would pickle the
  relationships into the entries;
* :class:`Tag` -- a many-to-many association with :class:`Author`;
* ``Author.bio`` -- a deferred column;
* ``Book.price`` ``Numeric(10, 2)``, ``Book.code`` ``CHAR(5)``,
  ``Book.published`` ``Date``, :class:`Event` with a naive and a
  timezone-aware timestamp -- columns whose stored value differs from what a
  program may assign;
* :class:`Account` -- no version (the lost-update case), :class:`Wallet` --
  an integer ``version_id_col``, :class:`Document` -- a UUID version
  generator (versions that do not order);
* :class:`Missing` -- a mapped class whose table is never created.

None of these classes declares ``__stockpyle_keys__``: they are keyed by
their primary key and NOT NULL unique columns.  This module must not import
``stockpyle.stores.sqlalchemy`` (a subprocess test relies on it).  Table names
come from :func:`support.databases.table_name`, so parallel runs never collide.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .databases import MYSQL_TABLE_ARGS, table_name

__all__ = [
    "Account",
    "Author",
    "Book",
    "Document",
    "Event",
    "Missing",
    "OrmBase",
    "Tag",
    "Wallet",
    "author_tag",
    "column_values",
    "orm_metadata",
]


class OrmBase(DeclarativeBase):
    """Declarative base of the realistic model (:data:`orm_metadata`)."""


orm_metadata = OrmBase.metadata

author_tag = sa.Table(
    table_name("orm_author_tag"),
    orm_metadata,
    sa.Column("author_id", sa.ForeignKey(f"{table_name('orm_author')}.id"), primary_key=True),
    sa.Column("tag_id", sa.ForeignKey(f"{table_name('orm_tag')}.id"), primary_key=True),
    **MYSQL_TABLE_ARGS,
)


class Author(OrmBase):
    """The parent: keyed by ``id`` and the unique ``email``; ``bio`` is deferred."""

    __tablename__ = table_name("orm_author")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(sa.String(80), unique=True)
    name: Mapped[str] = mapped_column(sa.String(80), default="")
    bio: Mapped[str | None] = mapped_column(sa.Text, deferred=True)
    books: Mapped[list[Book]] = relationship(
        cascade="all, delete-orphan", back_populates="author", lazy="selectin", order_by="Book.id"
    )
    tags: Mapped[list[Tag]] = relationship(secondary=author_tag, back_populates="authors", order_by="Tag.id")


class Book(OrmBase):
    """A child of :class:`Author`, with columns whose stored values differ from assigned ones."""

    __tablename__ = table_name("orm_book")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey(Author.id))
    title: Mapped[str] = mapped_column(sa.String(200), default="")
    price: Mapped[Decimal | None] = mapped_column(sa.Numeric(10, 2))
    code: Mapped[str | None] = mapped_column(sa.CHAR(5))
    published: Mapped[dt.date | None] = mapped_column(sa.Date)
    author: Mapped[Author] = relationship(back_populates="books", lazy="joined")


class Tag(OrmBase):
    """The other side of a many-to-many association with :class:`Author`."""

    __tablename__ = table_name("orm_tag")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(sa.String(40), unique=True)
    authors: Mapped[list[Author]] = relationship(secondary=author_tag, back_populates="tags")


class Event(OrmBase):
    """A naive and a timezone-aware timestamp."""

    __tablename__ = table_name("orm_event")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    starts_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime())
    ends_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))


class Account(OrmBase):
    """No version: concurrent writers are told apart only by what they changed."""

    __tablename__ = table_name("orm_account")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(80))
    balance: Mapped[int] = mapped_column(default=0)


class Wallet(OrmBase):
    """An integer ``version_id_col``: versions order the writes."""

    __tablename__ = table_name("orm_wallet")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(sa.String(80))
    balance: Mapped[int] = mapped_column(default=0)
    version: Mapped[int] = mapped_column(nullable=False)

    __mapper_args__: ClassVar[dict[str, Any]] = {"version_id_col": version}


def _new_revision(_current: Any) -> uuid.UUID:
    return uuid.uuid4()


class Document(OrmBase):
    """A UUID version generator: versions are equality tokens, they do not order."""

    __tablename__ = table_name("orm_document")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(sa.String(200), default="")
    revision: Mapped[uuid.UUID] = mapped_column(sa.Uuid, nullable=False)

    __mapper_args__: ClassVar[dict[str, Any]] = {"version_id_col": revision, "version_id_generator": _new_revision}


class _MissingBase(DeclarativeBase):
    """Metadata that is never created: the table of :class:`Missing` does not exist."""


class Missing(_MissingBase):
    """Mapped, but its table is never created."""

    __tablename__ = table_name("orm_missing")

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(sa.String(20), default="")


def column_values(obj: Any) -> dict[str, str]:
    """``{column attribute: repr(value)}`` of a mapped instance (reprs show types, padding, time zones)."""
    mapper = sa.inspect(type(obj))
    return {prop.key: repr(getattr(obj, prop.key)) for prop in mapper.column_attrs}
