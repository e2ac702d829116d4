"""Editors: the protocol, the registry and the built-in methods."""

from rlsedit.editors.base import (
    BatchReport,
    EditError,
    Editor,
    EditorConfig,
    EditReport,
    LocateThenEditEditor,
    editor_class,
    list_editors,
    load_editor,
    make_editor,
    register_editor,
)
from rlsedit.editors.rlsedit import RLSEditConfig, RLSEditor

__all__ = [
    "BatchReport",
    "EditError",
    "EditReport",
    "Editor",
    "EditorConfig",
    "LocateThenEditEditor",
    "RLSEditConfig",
    "RLSEditor",
    "editor_class",
    "list_editors",
    "load_editor",
    "make_editor",
    "register_editor",
]
