"""Causal faithfulness: does the AR's reconstruction *do* what the original vector did?

A reconstruction can score a high FVE and still miss the few directions the model's later
blocks read. So we patch it back into the base model at layer K (the output of decoder block
K, ``hidden_states[K + 1]``, docs/design.md §2) at the sampled position, run the remaining
blocks, and compare the next-token distribution with the clean one:

* ``KL(clean ‖ patched)`` for the reconstruction, for the dataset mean μ (mean ablation: the
  floor, "the model saw an average state here"), for the true vector (the zero-effect
  baseline: patching a vector with itself must change nothing, which checks the whole
  re-tokenisation and patching path), and for another row's reconstruction (a shuffled
  control);
* ``fraction recovered = 1 − KL(recon) / KL(mean)``: 1 when the reconstruction restores the
  clean distribution, 0 when it does no better than μ, negative when worse;
* per claim: the KL change when one claim is dropped from the explanation before the AR
  reconstructs it (positive: the claim carried something the model uses).

Every patched vector is rescaled to the norm of the clean state it replaces. The AR is
trained on the direction only (``mse_nrm`` compares ``sqrt(d)``-normalised vectors,
docs/design.md §6) and μ is a mean of normalised vectors, so neither has a meaningful norm of
its own; residual-stream norms grow with depth and position and later blocks (layer norms,
attention sinks) react to the norm, so patching a raw AR output would measure the scale
mismatch instead of what the words say about the direction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from nla.errors import NLAError
from nla.eval import probes
from nla.models.layers import decoder_blocks

# A row whose re-tokenised context no longer reproduces the stored vector (decode/encode is
# not always an identity) is left out rather than scored against the wrong clean state.
MATCH_COSINE = 0.999
MAX_CLAIMS = 8
VARIANTS_PER_FORWARD = 16


@contextmanager
def base_lm(nla: Any) -> Iterator[Any]:
    """The base model *with* its LM head: the AV with its LoRA adapter disabled, or the base
    loaded once (a fully fine-tuned or merged AV is not the base model)."""
    if hasattr(nla.av_model, "disable_adapter"):
        with nla.av_model.disable_adapter():
            yield nla.av_model
        return
    if getattr(nla, "_base", None) is None:
        from nla.models.loading import load_model

        nla._base, _ = load_model(nla.meta.base_model, device=str(nla.device))
    yield nla._base


def _rescale(directions: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    d = directions.float()
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm


@torch.no_grad()
def prefix_cache(model: Any, ids: list[int]) -> Any:
    """The key/value cache of one forward over ``ids`` (None for no tokens)."""
    if not ids:
        return None
    dev = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=dev), use_cache=True, **_last_logits_only(model)).past_key_values


def croppable(cache: Any) -> bool:
    """Whether ``cache`` can be cut back to its first tokens and give what a forward over only
    those tokens gives. A sliding-window layer keeps only its last window of keys, so a cache
    with any (Gemma-2/3's hybrid caches) is not, nor a cache without ``crop`` (transformers'
    ``Cache.is_croppable`` where the installed version has it)."""
    if cache is None or not hasattr(cache, "crop") or not hasattr(cache, "get_seq_length"):
        return False
    if any(getattr(cache, "is_sliding", None) or []):
        return False
    return bool(getattr(cache, "is_croppable", True))


def _cropped_copy(cache: Any, length: int) -> Any:
    """A copy of ``cache`` holding its first ``length`` tokens; the shared cache is untouched."""
    import copy

    out = copy.deepcopy(cache)
    extra = out.get_seq_length() - length
    if extra > 0:
        # A negative argument removes that many tokens in every transformers version we
        # support; a positive one meant "keep this many" before 5.x and raises since.
        out.crop(-extra)
    if out.get_seq_length() != length:
        raise NLAError(f"causal: a cache cropped to {length} tokens holds {out.get_seq_length()}")
    return out


@torch.no_grad()
def patched_logprobs(model: Any, layer: int, ids: list[int], directions: torch.Tensor, *,
                     shared_cache: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities after ``ids``: row 0 clean, row ``1 + i`` with block
    ``layer``'s output at the last position replaced by ``directions[i]`` rescaled to the
    clean state's norm. Also returns the clean block-``layer`` state at the last position.

    The patch touches only the last position, and a causal model's earlier positions never
    see a later one: so the prefix runs once, its key/value cache is copied to every variant,
    and only the last token runs per variant (about ``1 + variants / length`` of the cost of
    running every variant's whole sequence, which is what this computes).

    ``shared_cache`` (see :func:`croppable`): the cache of a forward over a token sequence
    that starts with ``ids[:-1]``; it is copied and cut to ``len(ids) - 1`` tokens instead of
    running the prefix again (rows of one document share their prefix, :func:`causal_faithfulness`).
    """
    import copy

    block = decoder_blocks(model)[layer]
    dev = next(model.parameters()).device
    prefix: Any = None
    if len(ids) > 1:
        prefix = (_cropped_copy(shared_cache, len(ids) - 1) if shared_cache is not None
                  else prefix_cache(model, ids[:-1]))
    last = ids[-1:] if prefix is not None else ids
    clean_state: list[torch.Tensor] = []
    outs = []
    for start in range(0, max(1, len(directions)), VARIANTS_PER_FORWARD):
        chunk = directions[start : start + VARIANTS_PER_FORWARD]

        def hook(_m: torch.nn.Module, _inp: Any, output: Any, chunk: torch.Tensor = chunk) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            h0 = hidden[0, -1].float()
            if not clean_state:
                clean_state.append(h0.detach().cpu())
            if len(chunk):
                hidden = hidden.clone()
                hidden[1:, -1] = _rescale(chunk.to(hidden.device), h0.norm()).to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        batch = torch.tensor([last] * (1 + len(chunk)), device=dev)
        kwargs: dict[str, Any] = {"use_cache": prefix is not None}
        if prefix is not None:
            cache = copy.deepcopy(prefix)  # the forward appends to it; each chunk starts clean
            cache.batch_repeat_interleave(len(batch))
            kwargs["past_key_values"] = cache
        handle = block.register_forward_hook(hook)
        try:
            logits = model(input_ids=batch, **kwargs, **_last_logits_only(model)).logits[:, -1].float()
        finally:
            handle.remove()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        outs.append(logp if start == 0 else logp[1:])
    return torch.cat(outs), clean_state[0]


def prefix_groups(ids: list[list[int]]) -> list[list[int]]:
    """Row indices grouped so that within a group every row's ``ids[:-1]`` is a prefix of the
    group's last (longest) row's ``ids[:-1]``: one forward over that serves them all.

    Sorted lexicographically, a sequence lies between any prefix of it and the sequence
    itself, so a prefix chain is a run of neighbours; a row starts a new group where its
    predecessor's prefix is not a prefix of its own (another document, or a re-tokenised
    context whose last token merged differently). Rows without tokens are left out.
    """
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: ids[i][:-1])
    groups: list[list[int]] = []
    for i in order:
        head = ids[i][:-1]
        if groups:
            prev = ids[groups[-1][-1]][:-1]
            if head[: len(prev)] == prev:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def _last_logits_only(model: Any) -> dict[str, Any]:
    """``logits_to_keep=1`` where the model takes it: only the last position's next-token
    distribution is compared, and full logits (batch × length × vocabulary floats, half a GiB
    for 13 variants of a 200-token SmolLM2 context) would dominate time and memory."""
    import inspect

    # A PEFT wrapper takes **kwargs and hands them to the model it wraps: ask that one.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(inner, "forward", None)
    try:
        params = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        params = {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def kl_div(clean: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
    """``KL(clean ‖ patched)`` in nats, per row, from log-probabilities."""
    return (clean.exp() * (clean - patched)).sum(-1).clamp_min(0.0)


def fraction_recovered(kl_patch: float, kl_mean: float) -> float | None:
    """``1 − KL(patch)/KL(mean)``; None when μ itself changes nothing (nothing to recover)."""
    if kl_mean <= 1e-9:
        return None
    return 1.0 - kl_patch / kl_mean


@dataclass
class CausalRows:
    """Per-row results; rows left out (context mismatch) hold None."""

    kl_recon: list[float | None]
    kl_mean: list[float | None]
    kl_true: list[float | None]
    kl_shuffled: list[float | None]
    claim_delta_kl: list[list[float | None]]


def causal_faithfulness(
    nla: Any, contexts: list[str], vectors: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor,
    texts: list[str] | None = None, *, shuffled: torch.Tensor | None = None, claims: bool = True,
    batch_size: int = 32, progress: bool = False, share_prefix: bool = True,
) -> tuple[dict[str, Any], CausalRows]:
    """The causal block of ``nla eval``: one entry per row of ``contexts`` / ``vectors``.

    ``recon`` are the AR's reconstructions of ``texts`` (the AV's explanations); with
    ``claims`` each explanation of two or more claims is also reconstructed once per dropped
    claim. ``shuffled`` maps each row to another row whose reconstruction is patched as a
    control (default: none). ``share_prefix=False`` runs every row's prefix on its own (the
    reference the shared-prefix path is tested and benchmarked against).
    """
    from tqdm.auto import tqdm

    n = len(contexts)
    if not (len(vectors) == len(recon) == n):
        raise NLAError(f"causal: {n} contexts, {len(vectors)} vectors, {len(recon)} reconstructions")
    drops: dict[int, list[str]] = defaultdict(list)
    if claims and texts is not None:
        for i, t in enumerate(texts):
            c, _ = probes.split_claims(t)
            if len(c) > 1:
                for j in range(min(len(c), MAX_CLAIMS)):
                    dropped = probes.drop_claim(t, j)
                    drops[i].append(dropped if dropped is not None else t)
    flat = [(i, j) for i, ds in drops.items() for j in range(len(ds))]
    drop_pred = nla.reconstruct([drops[i][j] for i, j in flat], batch_size=batch_size).float() if flat else None
    drop_index = {key: k for k, key in enumerate(flat)}

    rows = CausalRows([None] * n, [None] * n, [None] * n, [None] * n, [[] for _ in range(n)])
    layer = nla.meta.layer_index
    all_ids = [nla.tokenizer.encode(c or "", add_special_tokens=True) for c in contexts]
    mismatched = sum(1 for ids in all_ids if not ids)
    with base_lm(nla) as model, tqdm(total=n, desc="causal", unit="row", disable=not progress) as bar:
        bar.update(mismatched)
        for group in prefix_groups(all_ids):
            # Rows of one document share their prefix: one forward over the longest serves
            # every row of the group, each cutting a copy of its cache to its own length
            # (the same logits as its own prefix forward, up to float rounding).
            longest = all_ids[group[-1]]
            shared = prefix_cache(model, longest[:-1]) if share_prefix and len(group) > 1 else None
            cut = croppable(shared)
            for i in group:
                bar.update(1)
                # A cache that cannot be cut back still serves the rows it was run for.
                use = shared if cut or len(all_ids[i]) == len(longest) else None
                mismatched += _score_row(i, all_ids[i], model, layer, vectors, recon, mean, shuffled, drops,
                                         drop_pred, drop_index, use, rows)
    return summarize(rows, n, mismatched), rows


def _score_row(i: int, ids: list[int], model: Any, layer: int, vectors: torch.Tensor, recon: torch.Tensor,
               mean: torch.Tensor, shuffled: torch.Tensor | None, drops: dict[int, list[str]],
               drop_pred: torch.Tensor | None, drop_index: dict[tuple[int, int], int], shared: Any,
               rows: CausalRows) -> int:
    """Patch row ``i``'s variants and fill its entries of ``rows``; 1 when the row is left out."""
    variants = [vectors[i], recon[i], mean]
    if shuffled is not None:
        variants.append(recon[int(shuffled[i])])
    n_drop = len(drops.get(i, []))
    if drop_pred is not None:
        variants += [drop_pred[drop_index[(i, j)]] for j in range(n_drop)]
    logp, clean = patched_logprobs(model, layer, ids, torch.stack([v.float() for v in variants]), shared_cache=shared)
    if float(torch.nn.functional.cosine_similarity(clean, vectors[i].float(), dim=0)) < MATCH_COSINE:
        return 1
    kls = kl_div(logp[:1], logp[1:]).tolist()
    rows.kl_true[i], rows.kl_recon[i], rows.kl_mean[i] = kls[0], kls[1], kls[2]
    k = 3
    if shuffled is not None:
        rows.kl_shuffled[i] = kls[3]
        k = 4
    rows.claim_delta_kl[i] = [kls[k + j] - kls[1] for j in range(n_drop)]
    return 0


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def summarize(rows: CausalRows, n: int, mismatched: int) -> dict[str, Any]:
    """Means of the per-row KLs and the fraction recovered (a ratio of means: per-row ratios
    blow up where μ happens to change the distribution little)."""
    kl = {name: _mean(getattr(rows, f"kl_{name}")) for name in ("recon", "mean", "true", "shuffled")}
    per_row = [fraction_recovered(r, m) for r, m in zip(rows.kl_recon, rows.kl_mean) if r is not None and m is not None]
    per_row_ok = sorted(v for v in per_row if v is not None)
    by_index: dict[int, list[float]] = defaultdict(list)
    for deltas in rows.claim_delta_kl:
        for j, d in enumerate(deltas):
            if d is not None:
                by_index[j].append(d)
    all_deltas = [d for v in by_index.values() for d in v]
    scored = sum(1 for v in rows.kl_recon if v is not None)

    def frac(value: float | None) -> float | None:
        return fraction_recovered(value, kl["mean"]) if value is not None and kl["mean"] is not None else None

    return {
        "enabled": True,
        "n": scored,
        "rows_left_out": mismatched,
        "note": (f"{mismatched} of {n} rows left out: their re-tokenised context does not reproduce the stored vector "
                 f"(cosine < {MATCH_COSINE})") if mismatched else None,
        "kl": {"reconstruction": kl["recon"], "mean_ablation": kl["mean"], "true_vector": kl["true"],
               "shuffled_reconstruction": kl["shuffled"]},
        "fraction_recovered": frac(kl["recon"]),
        "fraction_recovered_true_vector": frac(kl["true"]),
        "fraction_recovered_shuffled": frac(kl["shuffled"]),
        "fraction_recovered_median_row": per_row_ok[len(per_row_ok) // 2] if per_row_ok else None,
        "claim_ablation": {
            "rows_with_claims": sum(1 for d in rows.claim_delta_kl if d),
            "delta_kl": sum(all_deltas) / len(all_deltas) if all_deltas else None,
            "per_claim_index": [{"index": j, "n": len(v), "delta_kl": sum(v) / len(v)} for j, v in sorted(by_index.items())],
        },
    }


def causal_at_positions(nla: Any, ids: list[int], positions: list[int], recon: torch.Tensor,
                        mean: torch.Tensor) -> list[dict[str, float | None]]:
    """For each position ``p`` of ``ids``: the KL of patching ``recon[i]`` and μ at ``p`` (the
    next-token distribution after ``ids[:p + 1]``) and the fraction recovered (the explorer's
    per-token causal check; same patching as :func:`causal_faithfulness`)."""
    out: list[dict[str, float | None]] = []
    with base_lm(nla) as model:
        # Every position's prefix is a prefix of ids: one forward up to the last one serves all.
        shared = prefix_cache(model, ids[: max(positions)]) if len(positions) > 1 else None
        if shared is not None and not croppable(shared):
            shared = None
        for i, p in enumerate(positions):
            logp, _ = patched_logprobs(model, nla.meta.layer_index, ids[: p + 1],
                                       torch.stack([recon[i].float(), mean.float()]), shared_cache=shared)
            kl_recon, kl_mean = kl_div(logp[:1], logp[1:]).tolist()
            out.append({"kl_reconstruction": kl_recon, "kl_mean_ablation": kl_mean,
                        "fraction_recovered": fraction_recovered(kl_recon, kl_mean)})
    return out
