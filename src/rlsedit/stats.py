"""Second moment ``E[k k^T]`` of a layer's keys over a text corpus.

Keys are the inputs of the edited projection (``d_k``) at every non-padding token. The sums are streamed
in float64 (on each module's own device) with a progress bar, written to a cache keyed by the model's
fingerprint, the module, the corpus and the sample count, and resumed from the last checkpoint if a run
was interrupted.

Layout of a statistics folder (``rlsedit stats --out DIR``, or the user cache)::

    DIR/<model fingerprint>/v1-<corpus id>-n<samples>-len<max_len>/<module name>.safetensors

each file holding ``sum`` (``(d_k, d_k)`` float64, the sum of ``k k^T`` over tokens) and ``count`` (the
number of tokens). Editors given ``stats_dir=DIR`` (``--stats DIR``) read the set that matches their
``stats_samples`` / ``stats_max_len`` / ``stats_corpus`` and compute nothing.

Under ``torch.distributed`` (e.g. ``torchrun --nproc_per_node K -m rlsedit stats ...``, see
:func:`init_distributed_from_env`) each rank streams its own shard (texts ``rank::world_size``), the sums and
the token count are all-reduced and rank 0 writes the files, so the result equals the single-process one
up to float64 summation order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rlsedit.hooks import trace
from rlsedit.models.arch import get_module, input_device, kv_dims, weight_kv
from rlsedit.models.load import model_fingerprint
from rlsedit.store import CorruptStateError, load_tensors, save_tensors

__all__ = [
    "second_moments",
    "stats_cache_dir",
    "corpus_texts",
    "stats_key",
    "available_stats",
    "layer_sigmas",
    "init_distributed_from_env",
]

log = logging.getLogger(__name__)

#: Format version of cached statistics; bump when the computation changes.
STATS_VERSION = 1


def stats_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where statistics are cached: ``cache_dir``, else ``$RLSEDIT_CACHE/stats``, else
    ``~/.cache/rlsedit/stats`` (``$XDG_CACHE_HOME`` respected)."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("RLSEDIT_CACHE")
    if root:
        return Path(root) / "stats"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "rlsedit" / "stats"


def corpus_texts(corpus: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """Texts of a corpus and an identifier for cache keys.

    ``None`` or ``"wikipedia-leads"`` is the bundled Wikipedia corpus; otherwise a path to a JSONL file
    with a ``text`` field per line or to a plain text file (one passage per non-blank line).
    """
    if corpus is None or str(corpus) == "wikipedia-leads":
        from rlsedit.datasets import load_wikipedia_leads

        return load_wikipedia_leads(), "wikipedia-leads"
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    import json

    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:16]
    texts: list[str] = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path} line {n}: expected an object with a string field 'text'")
            texts.append(obj["text"])
        else:
            texts.append(line)
    return texts, f"{path.stem}-{digest}"


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _reduce_device() -> torch.device:
    """Where collective buffers live: this rank's current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_ranks_agree(flag: bool) -> bool:
    """``flag`` and-ed over every rank (the flag itself when not distributed)."""
    rank, world = _dist()
    if world == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_reduce_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def init_distributed_from_env(device: str | torch.device | None = None) -> torch.device | None:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` set); a no-op otherwise.

    The backend is NCCL when this rank computes on a GPU, else gloo. Each rank uses GPU ``LOCAL_RANK``
    unless ``device`` names another one explicitly (``"cuda:3"``); ``device=None`` or ``"cuda"`` means
    ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Returns:
        the device this rank should put the model on, or None when not launched by torchrun (or when the
        process group is already initialised: then the caller's placement is kept).
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 1:
        return None
    if torch.distributed.is_initialized():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else None
    if dev is None or (dev.type == "cuda" and dev.index is None):
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    log.info(
        "rank %d of %d (%s, local rank %d) on %s",
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        backend,
        local,
        dev,
    )
    return dev


def stats_key(corpus_id: str, samples: int, max_len: int) -> str:
    """The folder name of one statistics set (under the model's fingerprint)."""
    return f"v{STATS_VERSION}-{corpus_id}-n{samples}-len{max_len}"


_KEY_RE = re.compile(r"^v(?P<version>\d+)-(?P<corpus>.+)-n(?P<samples>\d+)-len(?P<max_len>\d+)$")


def available_stats(
    cache_dir: str | os.PathLike | None, model: nn.Module, module_names: Sequence[str]
) -> list[dict[str, str | int]]:
    """The statistics sets of ``model`` in ``cache_dir`` that hold every one of ``module_names``.

    Returns:
        ``[{"key", "corpus", "samples", "max_len", "path"}]`` (current format version only), sorted by key.
    """
    root = stats_cache_dir(cache_dir) / model_fingerprint(model)
    if not root.is_dir():
        return []
    out: list[dict[str, str | int]] = []
    for folder in sorted(root.iterdir()):
        m = _KEY_RE.match(folder.name)
        if not m or int(m["version"]) != STATS_VERSION or not folder.is_dir():
            continue
        if all((folder / f"{n}.safetensors").is_file() for n in module_names):
            out.append(
                {
                    "key": folder.name,
                    "corpus": m["corpus"],
                    "samples": int(m["samples"]),
                    "max_len": int(m["max_len"]),
                    "path": str(folder),
                }
            )
    return out


@torch.no_grad()
def _accumulate(
    model: nn.Module,
    tokenizer,
    module_names: Sequence[str],
    texts: Sequence[str],
    max_len: int,
    batch_size: int,
    sums: dict[str, torch.Tensor],
    count: int,
    done: int,
    checkpoint,
    progress: bool,
) -> int:
    device = input_device(model)
    bar = tqdm(total=len(texts), initial=done, desc="second moment", unit="text", disable=not progress)
    for start in range(done, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        mask = enc["attention_mask"].bool()
        with trace(model, module_names, capture_input=True, capture_output=False, stop=True) as tr:
            model(
                input_ids=enc["input_ids"].to(device), attention_mask=mask.long().to(device), use_cache=False
            )
        for name in module_names:
            keys = tr[name].input  # (batch, seq, d_k), on the module's device
            x = keys[mask.to(keys.device)].to(torch.float64)  # (tokens, d_k)
            sums[name] += (x.T @ x).to(sums[name].device)
        count += int(mask.sum())
        done = start + len(chunk)
        bar.update(len(chunk))
        checkpoint(done, count)
    bar.close()
    return count


def _cached(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The second moments of ``names`` cached in ``folder`` (a corrupt file is skipped with a warning)."""
    result: dict[str, torch.Tensor] = {}
    for name in names:
        path = folder / f"{name}.safetensors"
        if path.is_file():
            try:
                t = load_tensors(path)
                result[name] = t["sum"] / float(t["count"].item())
            except CorruptStateError as exc:
                log.warning("ignoring a corrupt statistics file: %s", exc)
    return result


def _resumed(
    partial: Path,
    todo: list[str],
    where: dict[str, torch.device],
    sums: dict[str, torch.Tensor],
    n_texts: int,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """``(sums, token count, texts done)`` of this rank's checkpoint ``partial`` when it holds the sums of
    exactly ``todo``; else the fresh ``sums`` and zeros."""
    try:
        t = load_tensors(partial)
        if set(k for k in t if k.startswith("sum:")) == {f"sum:{n}" for n in todo}:
            done = int(t["done"].item())
            log.info("resuming statistics at text %d of %d", done, n_texts)
            return {n: t[f"sum:{n}"].to(where[n]) for n in todo}, int(t["count"].item()), done
    except CorruptStateError as exc:
        log.warning("ignoring a corrupt partial statistics file: %s", exc)
    return sums, 0, 0


def _all_reduce(sums: dict[str, torch.Tensor], count: int) -> int:
    """Sum every rank's ``sums`` (in place, on the reduction device) and token counts; returns the total."""
    dev = _reduce_device()
    for n in list(sums):
        buf = sums[n].to(dev)
        torch.distributed.all_reduce(buf)
        sums[n] = buf
    c = torch.tensor([count], dtype=torch.int64, device=dev)
    torch.distributed.all_reduce(c)
    return int(c.item())


def _save(folder: Path, sums: dict[str, torch.Tensor], count: int, meta: dict[str, str]) -> None:
    """One file per module in ``folder``: its ``sum`` (``(d_k, d_k)`` float64) and the token ``count``."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, total in sums.items():
        save_tensors(
            folder / f"{n}.safetensors",
            {"sum": total, "count": torch.tensor(count, dtype=torch.int64)},
            {"module": n, **meta},
        )


def second_moments(
    model: nn.Module,
    tokenizer,
    module_names: Sequence[str],
    samples: int = 1000,
    corpus: str | os.PathLike | None = None,
    max_len: int = 128,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    checkpoint_every: int = 50,
    checkpoint_seconds: float = 120.0,
) -> dict[str, torch.Tensor]:
    """Uncentred second moment ``Sigma = E[k k^T]`` (float64, ``(d_k, d_k)``) per module in ``module_names``.

    Args:
        module_names: edited projections (their inputs are the keys).
        samples: number of corpus texts (the first ``samples``), each truncated to ``max_len`` tokens.
        corpus: see :func:`corpus_texts`.
        cache_dir: see :func:`stats_cache_dir`; ``use_cache=False`` neither reads nor writes it.
        checkpoint_every / checkpoint_seconds: write this rank's partial sums (to resume an interrupted
            run) once at least this many texts and this many seconds have passed since the last checkpoint
            (a checkpoint writes ``d_k^2 x 8`` bytes per module: 1.6 GB per layer for Llama-3-8B).
    Returns:
        ``{module_name: Sigma}`` on CPU.
    """
    if samples < 1 or max_len < 2 or batch_size < 1:
        raise ValueError("samples >= 1, max_len >= 2 and batch_size >= 1 are required")
    texts, corpus_id = corpus_texts(corpus)
    if samples > len(texts):
        raise ValueError(f"the corpus {corpus_id!r} has only {len(texts)} texts; asked for {samples}")
    texts = texts[:samples]
    rank, world = _dist()
    shard = texts[rank::world]
    key = stats_key(corpus_id, samples, max_len)
    folder = stats_cache_dir(cache_dir) / model_fingerprint(model) / key
    names = list(module_names)
    result = _cached(folder, names) if use_cache else {}
    if use_cache:
        # every rank must take the same branch (a rank that skips the computation would leave the others
        # waiting in the all-reduce), e.g. when only rank 0 sees the cache folder
        if _all_ranks_agree(len(result) == len(names)):
            log.info("second moments loaded from %s", folder)
            return result
        if world > 1:
            result = {}
    todo = [n for n in names if n not in result]
    # the sums live on each module's device (a d_k x d_k float64 copy to the host per batch would dominate
    # the time on a GPU); they come back to the CPU at the end
    where = {n: weight_kv(get_module(model, n)).device for n in todo}
    d = {n: kv_dims(get_module(model, n))[0] for n in todo}
    sums = {n: torch.zeros(d[n], d[n], dtype=torch.float64, device=where[n]) for n in todo}
    count, done = 0, 0
    partial = folder / f"partial-rank{rank}of{world}.safetensors"
    if use_cache and partial.is_file():
        sums, count, done = _resumed(partial, todo, where, sums, len(shard))

    state = {"last": done, "time": time.monotonic()}

    def checkpoint(done_now: int, count_now: int) -> None:
        if not use_cache or done_now - state["last"] < checkpoint_every or done_now >= len(shard):
            return
        if time.monotonic() - state["time"] < checkpoint_seconds:
            return
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"sum:{n}": sums[n] for n in todo}
        tensors["count"] = torch.tensor(count_now, dtype=torch.int64)
        tensors["done"] = torch.tensor(done_now, dtype=torch.int64)
        save_tensors(partial, tensors)
        state["last"] = done_now
        state["time"] = time.monotonic()

    count = _accumulate(
        model,
        tokenizer,
        todo,
        shard,
        max_len,
        batch_size,
        sums,
        count,
        done,
        checkpoint,
        progress and rank == 0,
    )
    if world > 1:
        count = _all_reduce(sums, count)
    sums = {n: t.cpu() for n, t in sums.items()}
    if count == 0:
        raise ValueError("the corpus produced no tokens")
    result.update({n: sums[n] / count for n in todo})
    if use_cache and rank == 0:
        _save(folder, sums, count, {"corpus": corpus_id, "samples": str(samples), "max_len": str(max_len)})
    if use_cache and partial.is_file():
        partial.unlink()
    if world > 1:  # the files exist once any rank returns
        torch.distributed.barrier()
    log.info("second moments of %d modules over %d tokens (%d rank(s))", len(todo), count, world)
    return result


def layer_sigmas(
    model: nn.Module,
    tokenizer,
    module_names: Sequence[str],
    *,
    samples: int,
    corpus: str | os.PathLike | None,
    max_len: int,
    stats_dir: str | os.PathLike | None,
) -> dict[str, torch.Tensor]:
    """:func:`second_moments` for an editor: with ``stats_dir`` given, first say whether it holds the
    statistics asked for, and warn, before they are computed anew, when it holds other statistics of this
    model or statistics of other models only."""
    if stats_dir is not None:
        _check_stats_dir(stats_dir, model, module_names, samples, corpus, max_len)
    return second_moments(
        model, tokenizer, module_names, samples=samples, corpus=corpus, max_len=max_len, cache_dir=stats_dir
    )


def _check_stats_dir(
    stats_dir: str | os.PathLike,
    model: nn.Module,
    names: Sequence[str],
    samples: int,
    corpus: str | os.PathLike | None,
    max_len: int,
) -> None:
    sets = available_stats(stats_dir, model, names)
    want = stats_key(corpus_texts(corpus)[1], samples, max_len)
    if any(x["key"] == want for x in sets):
        log.info("using the precomputed statistics in %s", stats_cache_dir(stats_dir))
        return
    if sets:
        found = "; ".join(
            f"stats_samples={x['samples']}, stats_max_len={x['max_len']}, corpus {x['corpus']}" for x in sets
        )
        log.warning(
            "%s holds statistics of this model with other settings (%s) than the editor's "
            "(stats_samples=%d, stats_max_len=%d, stats_corpus=%s): computing new ones. Set the "
            "editor's stats_* options (--set stats_samples=...) to use the precomputed ones.",
            stats_dir,
            found,
            samples,
            max_len,
            corpus,
        )
        return
    root = stats_cache_dir(stats_dir)
    mine = model_fingerprint(model)
    others = [d.name for d in root.iterdir() if d.is_dir() and d.name != mine] if root.is_dir() else []
    if others:
        log.warning(
            "%s holds no statistics of this model (fingerprint %s) for %s, only of %d other model "
            "fingerprint(s): the fingerprint depends on the weights and their dtype, so load the model "
            "with the same --dtype as `rlsedit stats` did. Computing them now.",
            stats_dir,
            mine,
            ", ".join(names),
            len(others),
        )
