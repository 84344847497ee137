"""Typed configs whose fields are also command-line flags: defaults live in one place.

A defense or callback declares its settings once, as a dataclass deriving from :class:`FlagConfig`::

    @dataclass
    class CleanClipConfig(FlagConfig):
        prefix: ClassVar[str] = "cleanclip"
        group: ClassVar[str] = "CleanCLIP (--defense cleanclip)"
        ss_weight: float = option(1.0, "Weight of the unimodal loss.", metavar="λ2")

That gives ``--cleanclip-ss-weight`` (``add_arguments``), ``CleanClipConfig.from_args(namespace)`` and
``CleanClipConfig(ss_weight=0)`` from Python without argparse; ``validate`` runs in both cases and
raises :class:`~safe_train.errors.ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar, TypeVar

from safe_train.errors import ConfigError

C = TypeVar("C", bound="FlagConfig")


def option(default: Any, help: str, *, flag: str | None = None, type: Any = None, **argparse_kwargs: Any) -> Any:
    """A config field that is also a flag. ``flag`` overrides ``--<prefix>-<field-name>``; ``type`` is
    needed only when the default is None (argparse otherwise converts with ``type(default)``)."""
    metadata = {"help": help, "flag": flag, "type": type, "argparse": argparse_kwargs}
    return dataclasses.field(default=default, metadata=metadata)


class FlagConfig:
    """Base of every typed config (a dataclass); see the module docstring."""

    prefix: ClassVar[str] = ""
    group: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a value or combination that cannot work."""

    @property
    def enabled(self) -> bool:
        """Whether a callback with this config is switched on (callbacks override this)."""
        return True

    @classmethod
    def flag_name(cls, field: dataclasses.Field) -> str:
        flag = field.metadata.get("flag")
        if flag:
            return flag
        name = field.name.replace("_", "-")
        return f"--{cls.prefix}-{name}" if cls.prefix else f"--{name}"

    @classmethod
    def dest(cls, field: dataclasses.Field) -> str:
        return cls.flag_name(field).lstrip("-").replace("-", "_")

    @classmethod
    def flag_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "help" in f.metadata]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field to ``parser`` (in a group named ``cls.group``)."""
        group = parser.add_argument_group(cls.group or cls.__name__)
        for field in cls.flag_fields():
            default = field.default
            kwargs = dict(field.metadata["argparse"])
            help_text = field.metadata["help"]
            if default is False and field.metadata["type"] is None:
                group.add_argument(cls.flag_name(field), action="store_true", default=False, help=help_text,
                                   dest=cls.dest(field), **kwargs)
                continue
            if default is not None and "default" not in help_text:
                help_text = f"{help_text} (default: {default})"
            value_type = field.metadata["type"] or (type(default) if default is not None else str)
            group.add_argument(cls.flag_name(field), type=value_type, default=default, help=help_text,
                               dest=cls.dest(field), **kwargs)

    @classmethod
    def from_args(cls: type[C], args: argparse.Namespace | None = None, **overrides: Any) -> C:
        """The config from parsed flags; a flag missing from ``args`` keeps its default."""
        values: dict[str, Any] = {}
        for field in cls.flag_fields():
            dest = cls.dest(field)
            if args is not None and hasattr(args, dest):
                values[field.name] = getattr(args, dest)
        values.update(overrides)
        return cls(**values)

    def non_default(self) -> list[str]:
        """Flags set to something other than their default."""
        changed = []
        for field in self.flag_fields():
            if getattr(self, field.name) != field.default:
                changed.append(self.flag_name(field))
        return changed


def check(condition: bool, message: str) -> None:
    """``validate`` helper: a :class:`ConfigError` with ``message`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)
