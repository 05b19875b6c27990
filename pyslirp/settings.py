"""Settings and record classes without ``dataclasses`` at start-up.

``@dataclass`` writes and compiles an ``__init__``, ``__repr__`` and
``__eq__`` for each class when the module loads: 0.4 to 1.9 ms a class,
and the import of dataclasses (with inspect) another 10 ms; the forwarder
loaded about 25 of them before it said ready. Here the same class-body
form costs a scan of the annotations:

    class WarningLimits(Settings):
        # Lines of one kind per interval ...
        burst: int = 5
        cidr: IPv4Network = factory(lambda: IPv4Network("10.0.2.0/24"))

A ``Settings`` subclass takes its fields as keywords (or in order), each
defaulting to its class-body value or to a fresh ``factory()`` value, and
rejects unknown names; ``__post_init__`` runs after them if the class has
one; ``==`` compares the fields, ``repr`` shows them. ``Record`` is the
base of small slotted classes that write their own ``__init__`` (events,
parsed headers): it gives ``==`` and ``repr`` from ``__slots__``.

``fields``, ``replace`` and ``is_dataclass`` work on both, and on real
dataclasses (used off the start path), as their ``dataclasses`` namesakes do.
This module imports nothing, so that the sans-IO stack may use it.
"""

from __future__ import annotations

MISSING = object()  # a field without a default: the caller must give it


class Field:
    """A field's name and its default (or ``default_factory``)."""

    __slots__ = ("name", "default", "default_factory")

    def __init__(self, name: str, default=MISSING, default_factory=None) -> None:
        self.name = name
        self.default = default
        self.default_factory = default_factory

    def __repr__(self) -> str:
        return f"Field({self.name!r})"


class factory:  # noqa: N801 (used like dataclasses.field)
    """A class-body default made fresh for each instance: ``factory(list)``."""

    __slots__ = ("make",)

    def __init__(self, make) -> None:
        self.make = make


class Settings:
    """A configuration object (see the module's docstring)."""

    _fields: tuple[Field, ...] = ()
    __hash__ = None  # mutable and compared by value, like a dataclass

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        found = {f.name: f for f in cls._fields}  # the base classes' fields first
        for name in cls.__dict__.get("__annotations__", {}):
            if name.startswith("_"):
                continue
            value = cls.__dict__.get(name, MISSING)
            if isinstance(value, factory):
                found[name] = Field(name, default_factory=value.make)
                delattr(cls, name)  # the instance always has its own
            else:
                found[name] = Field(name, value)
        cls._fields = tuple(found.values())

    def __init__(self, *args, **kw) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes {len(fields)} arguments")
        for f, value in zip(fields, args):
            if f.name in kw:
                raise TypeError(f"{type(self).__name__}() got two values for {f.name!r}")
            kw[f.name] = value
        for f in fields:
            if f.name in kw:
                value = kw.pop(f.name)
            elif f.default_factory is not None:
                value = f.default_factory()
            elif f.default is MISSING:
                raise TypeError(f"{type(self).__name__}() missing argument {f.name!r}")
            else:
                value = f.default
            setattr(self, f.name, value)
        if kw:
            unknown = next(iter(kw))
            raise TypeError(f"{type(self).__name__}() got an unexpected argument {unknown!r}")
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    def __eq__(self, other) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in self._fields)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self._fields)
        return f"{type(self).__name__}({shown})"


class Record:
    """A slotted class with its own ``__init__``: ``==`` and ``repr`` from
    its ``__slots__`` (all of them fields, in order)."""

    __slots__ = ()
    __hash__ = None

    def __eq__(self, other) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"


def fields(cls_or_obj) -> tuple:
    """The fields (objects with ``.name``) of a Settings or Record class or
    instance, or of a dataclass."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    if issubclass(cls, Settings):
        return cls._fields
    if issubclass(cls, Record):
        return tuple(Field(name) for name in cls.__slots__)
    import dataclasses

    return dataclasses.fields(cls_or_obj)


def is_dataclass(obj) -> bool:
    """True for a Settings or Record class or instance, or a dataclass."""
    cls = obj if isinstance(obj, type) else type(obj)
    return issubclass(cls, (Settings, Record)) or hasattr(cls, "__dataclass_fields__")


def replace(obj, **changes):
    """A copy of ``obj`` with ``changes`` (its ``__post_init__`` runs again)."""
    if isinstance(obj, Settings):
        values = {f.name: getattr(obj, f.name) for f in obj._fields}
        values.update(changes)
        return type(obj)(**values)
    if isinstance(obj, Record):
        values = {name: getattr(obj, name) for name in obj.__slots__}
        values.update(changes)
        return type(obj)(**values)
    import dataclasses

    return dataclasses.replace(obj, **changes)
