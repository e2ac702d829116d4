"""Editors: the protocol, the registry and the built-in methods."""

from rlsedit.editors.alphaedit import AlphaEditConfig, AlphaEditEditor
from rlsedit.editors.base import (
    BatchReport,
    EditError,
    Editor,
    EditorConfig,
    EditReport,
    editor_class,
    list_editors,
    load_editor,
    make_editor,
    register_editor,
)
from rlsedit.editors.evoedit import EvoEditConfig, EvoEditEditor
from rlsedit.editors.ft import FTConfig, FTEditor
from rlsedit.editors.loop import LocateThenEditEditor
from rlsedit.editors.memit import MEMITConfig, MEMITEditor
from rlsedit.editors.rlsedit import RLSEditConfig, RLSEditor
from rlsedit.editors.rome import ROMEConfig, ROMEEditor
from rlsedit.editors.ultraedit import UltraEditConfig, UltraEditEditor

__all__ = [
    "AlphaEditConfig",
    "AlphaEditEditor",
    "BatchReport",
    "EditError",
    "EditReport",
    "Editor",
    "EditorConfig",
    "EvoEditConfig",
    "EvoEditEditor",
    "FTConfig",
    "FTEditor",
    "LocateThenEditEditor",
    "MEMITConfig",
    "MEMITEditor",
    "RLSEditConfig",
    "RLSEditor",
    "ROMEConfig",
    "ROMEEditor",
    "UltraEditConfig",
    "UltraEditEditor",
    "editor_class",
    "list_editors",
    "load_editor",
    "make_editor",
    "register_editor",
]
