"""rlsedit: lifelong knowledge editing of language models.

The public API::

    import rlsedit
    model, tok = rlsedit.load_model("smollm2-135m")
    editor = rlsedit.make_editor("rlsedit", model, tok)
    report = editor.edit([rlsedit.EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")])
    editor.save("runs/demo"); editor = rlsedit.load_editor("runs/demo", model, tok)
"""

from rlsedit.editors import EditReport, list_editors, load_editor, make_editor, register_editor
from rlsedit.models.load import load_model
from rlsedit.requests import EditRequest, RequestError, read_requests_jsonl


def load_cases(path: str) -> list:
    """The edit cases of a file of KnowEdit-style (EasyEdit) records, validated (what ``rlsedit run
    --dataset FILE`` streams): a list of :class:`rlsedit.tasks.knowedit.KnowEditCase`, each with its
    ``request`` and the prompts that evaluate it. Raises :class:`RequestError` naming the record and field."""
    from rlsedit.tasks.knowedit import read_cases

    return read_cases(path)


__version__ = "0.1.0"

__all__ = [
    "EditReport",
    "EditRequest",
    "RequestError",
    "list_editors",
    "load_cases",
    "load_editor",
    "load_model",
    "make_editor",
    "read_requests_jsonl",
    "register_editor",
    "__version__",
]
