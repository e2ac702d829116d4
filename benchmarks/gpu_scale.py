"""One batch of 100 edits at 8B scale on a GPU: RLSEdit, MEMIT and AlphaEdit, end to end, in one run.

A Llama-3-8B-shaped model (32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocabulary 128256) is
built from its config with random bf16 weights directly on the device (nothing is downloaded); a word-level
tokenizer is built from the CounterFact requests. Each layer's ``Sigma`` is the second moment of random
keys (the timing does not depend on its content). Then, for each method, one batch of ``--edits`` requests
is applied to edited layers 4-8 (the papers' Llama-3-8B layers) and timed by stage (targets, keys, update;
the first method's targets are shared with the others through a target cache, as on the same model state
they are the same), with the peak GPU memory of each; the weights are restored between methods. Last,
the update alone (:func:`rlsedit.linalg.rls_step`) at ``d_k = 14336`` with the RLSEdit state.

    python benchmarks/gpu_scale.py --out /tmp/GPU.md                 # on a GPU: under 8 minutes
    python benchmarks/gpu_scale.py --quick --device cpu --out /tmp/G.md   # a tiny model on the CPU (CI)

Writes the Markdown report and, beside it, the raw figures as JSON (same name, .json).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine_info, sync  # noqa: E402
from rlsedit.datasets import load_counterfact  # noqa: E402
from rlsedit.editors import make_editor  # noqa: E402
from rlsedit.linalg import rls_step  # noqa: E402
from rlsedit.locate.provider import TargetProvider  # noqa: E402
from rlsedit.models.arch import get_module, mlp_out_name, weight_kv  # noqa: E402

log = logging.getLogger("benchmarks.gpu_scale")

#: Llama-3-8B's shape; ``--quick`` shrinks it.
FULL = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
}
QUICK = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 0,  # the tokenizer's
    "max_position_embeddings": 512,
}
METHODS = ("rlsedit", "memit", "alphaedit")


def word_tokenizer(texts: list[str]) -> Any:
    """A word-level fast tokenizer over ``texts`` (plus an end-of-text and an unknown token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.replace(".", " . ").replace(",", " , ").split()})
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )


def build_model(shape: dict[str, int], vocab: int, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**shape, "vocab_size": shape["vocab_size"] or vocab})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def random_sigma(d_k: int, device: str, seed: int) -> torch.Tensor:
    """``X X^T / m`` for ``X = diag(sqrt(s)) Z`` (``Z (d_k, m)`` standard normal, ``m = 2 d_k``, ``s``
    log-spaced from 1 to 1e-4, as the keys' second moments of real models fall off): SPD, with about half
    of its eigenvalues below AlphaEdit's 2e-2; float64 on the CPU (where editors keep Sigma)."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.logspace(0, -4, d_k, device=device, dtype=torch.float32)
    X = torch.randn(d_k, 2 * d_k, generator=g, device=device, dtype=torch.float32) * s.sqrt()[:, None]
    return (X @ X.T / X.shape[1]).to(torch.float64).cpu()


def peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    dtype = getattr(torch, args.dtype)
    t_all = time.perf_counter()
    cases = load_counterfact(split="test", limit=args.edits)
    reqs = [c.request for c in cases]
    texts = [r.text + " " + r.target_new_text for r in reqs] + [r.text for r in reqs]
    tok = word_tokenizer(texts + ["The Therefore Because I You is a"])
    shape = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    model = build_model(shape, len(tok), device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    layers = [1, 2, 3] if args.quick else [4, 5, 6, 7, 8]
    d_k = model.config.intermediate_size
    t0 = time.perf_counter()
    sigmas = {layer: random_sigma(d_k, device, layer) for layer in layers}
    sigma_s = time.perf_counter() - t0
    names = [mlp_out_name(model, layer) for layer in layers]
    saved = {n: weight_kv(get_module(model, n)).detach().clone() for n in names}
    settings: dict[str, Any] = {"layers": layers, "lr": 0.1, "steps": args.steps}
    if args.quick:
        settings.update({"n_templates": 2, "template_length": 4})
    out: dict[str, Any] = {
        "device": device,
        "card": torch.cuda.get_device_name() if device.startswith("cuda") else machine_info(device)["CPU"],
        "dtype": args.dtype,
        "shape": {k: getattr(model.config, k) for k in FULL},
        "edits": len(reqs),
        "layers": layers,
        "target_steps": args.steps,
        "build_seconds": build_s,
        "sigma_seconds": sigma_s,
        "methods": {},
    }
    with tempfile.TemporaryDirectory() as cache:
        provider_dir = Path(cache)
        rls_state = None
        for method in METHODS:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            editor = make_editor(method, model, tok, sigmas=sigmas, **settings)
            sync(device)
            setup_s = time.perf_counter() - t0
            editor.use_targets(TargetProvider(cache_dir=provider_dir))
            rep = editor.edit(reqs).batches[0]
            sync(device)
            out["methods"][method] = {
                "setup_seconds": setup_s,
                "timings": dict(rep.timings),
                "targets_shared": rep.targets_cached,
                "peak_gpu_bytes": peak_bytes(device),
                "residual_before": rep.residual_before,
                "residual_after": rep.residual_after,
            }
            log.info("%s: %s", method, {k: round(v, 2) for k, v in rep.timings.items()})
            if method == "rlsedit":
                layer = layers[-1]
                st = editor.layer_state[layer]
                rls_state = (st["C"].clone(), weight_kv(get_module(model, names[-1])).detach().double())
            with torch.no_grad():
                for n, w in saved.items():
                    weight_kv(get_module(model, n)).copy_(w)
            del editor
        # the update alone at this d_k, on the RLSEdit state of the last layer
        assert rls_state is not None
        C, W = rls_state
        g = torch.Generator(device=C.device).manual_seed(0)
        K = torch.randn(d_k, len(reqs), generator=g, device=C.device, dtype=torch.float64)
        V = K.T @ W + 0.1 * torch.randn(
            len(reqs), W.shape[1], generator=g, device=C.device, dtype=torch.float64
        )
        times = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            rls_step(C, W, K, V)
            sync(device)
            times.append(time.perf_counter() - t0)
        out["update_alone"] = {"d_k": d_k, "u": len(reqs), "seconds": sorted(times)[len(times) // 2]}
    out["total_seconds"] = time.perf_counter() - t_all
    return out


def render(res: dict[str, Any], command: str) -> str:
    gib = 1024**3
    scale = "8B" if res["shape"]["hidden_size"] == 4096 else "tiny"
    lines = [
        f"# One batch of {res['edits']} edits at {scale} scale",
        "",
        f"Card: **{res['card']}** ({res['device']}, {res['dtype']}); model shape {res['shape']}; edited "
        f"layers {res['layers']}; {res['target_steps']} target steps. Built in {res['build_seconds']:.1f} s, "
        f"Sigma in {res['sigma_seconds']:.1f} s; the whole run {res['total_seconds']:.0f} s.",
        "",
        "| method | targets s | keys s | update s | total s | peak GPU memory |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in res["methods"].items():
        t = r["timings"]
        shared = " (shared)" if r["targets_shared"] else ""
        peak = "-" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / gib:.1f} GiB"
        cells = [f"{t.get(k, 0):.2f}" for k in ("targets", "keys", "update", "total")]
        cells[0] += shared
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {peak} |")
    u = res["update_alone"]
    lines += [
        "",
        f"The update alone (`rls_step`, d_k = {u['d_k']}, u = {u['u']}): {u['seconds']:.3f} s (median).",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Markdown report (raw figures: same name, .json)")
    p.add_argument("--quick", action="store_true", help="a tiny model (for the CPU and CI)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--steps", type=int, default=25, help="target optimisation steps")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the update alone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/gpu_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(render(res, command), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(render(res, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
