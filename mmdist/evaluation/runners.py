"""Running a model over held-out shards: batches, the per-stage runners, gathering across ranks, one entry point.

What ``mmdist eval``, the trainer's ``train.eval_metrics`` and the demo call;
the metric math is mmdist/evaluation/metrics.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as tdist

from mmdist import distributed as dist
from mmdist import generate
from mmdist.data.collate import to_device
from mmdist.data.settings import SourceConfig
from mmdist.evaluation.metrics import IGNORE_INDEX, RECALL_AT, normalise_answer, retrieval_metrics, score_answer
from mmdist.stages import Measure, Stage

if TYPE_CHECKING:
    from mmdist.config.run import RunConfig

# ---------------------------------------------------------------------------
# gathering across ranks


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` [n_r, ...] concatenated along dim 0 in rank order (row counts may differ: sizes go first)."""
    world = dist.world_size()
    if world == 1:
        return x
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    tdist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)], 0)


def gather_list(items: list) -> list:
    """Every rank's list concatenated in rank order (picklable items)."""
    return [item for part in dist.all_gather_object(list(items)) for item in part]


def _first_of_each_key(keys: Sequence[str], max_samples: Optional[int]) -> list[int]:
    """Indices of the first occurrence of every key, sorted by key, cut to ``max_samples``."""
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    chosen = [first[k] for k in sorted(first)]
    return chosen[:max_samples] if max_samples else chosen


# ---------------------------------------------------------------------------
# batches


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def batches_with_keys(loader: Iterable, max_batches: Optional[int] = None) -> Iterator[tuple[dict, list[str]]]:
    """(batch, sample keys) from a loader; the keys come from ``loader.last_keys`` (StreamingLoader), else are made up.

    A loader without keys (tests' plain lists) gets ``b{batch:06d}_{row:04d}``,
    which is unique within one rank only: use it single-process.
    """
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        keys = list(getattr(loader, "last_keys", None) or [])
        rows = _rows_of(batch)
        if len(keys) != rows:
            keys = [f"b{index:06d}_{row:04d}" for row in range(rows)]
        yield batch, keys


def _rows_of(batch: dict) -> int:
    for name in ("input_ids", "text_input_ids"):
        if name in batch:
            return int(batch[name].shape[0])
    raise ValueError(f"batch has neither input_ids nor text_input_ids (keys: {sorted(batch)})")


def max_batches_for(max_samples: Optional[int], batch_size: int, world_size: int) -> Optional[int]:
    """Batches per rank that cover ``max_samples`` across ranks (None: all)."""
    if not max_samples:
        return None
    return max(1, math.ceil(max_samples / (world_size * batch_size)))


# ---------------------------------------------------------------------------
# stage 1


@torch.no_grad()
def align_embeddings(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings [B, D] or [B, Q, D], caption embeddings [B, D]) of an AlignModel on one batch, fp32."""
    features = model.image_features(batch)
    stage1 = model.stage1
    if model.settings.connector.type == "qformer":
        pooled = model.text(batch["text_input_ids"], batch["text_attention_mask"])[1]
        image = stage1.vision_proj(stage1.image_tokens_of(features))
        text = stage1.text_proj(pooled.to(image.dtype))
    else:
        image = stage1.image_embedding(features)
        text = stage1.text_embedding(model.text_features(batch))
    return image.float(), text.float()


@torch.no_grad()
def evaluate_retrieval(model: Any, loader: Iterable, *, max_samples: Optional[int] = None,
                       prepare: Optional[Callable[[dict], dict]] = None, ks: Sequence[int] = RECALL_AT) -> dict:
    """Stage-1 retrieval R@k over every rank's share of ``loader`` (a collective when distributed).

    ``prepare`` moves a batch to the model (default: tensors to the model's device).
    Returns the metrics of :func:`retrieval_metrics` plus ``samples`` and ``captions``.
    """
    world = dist.world_size()
    device = _model_device(model)
    prepare = prepare or (lambda b: to_device(b, device))
    tok = model.processors.text_tokenizer
    keys: list[str] = []
    captions: list[str] = []
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    batch_size = getattr(getattr(loader, "dataset", None), "batch_size", 1)
    for batch, batch_keys in batches_with_keys(loader, max_batches_for(max_samples, batch_size, world)):
        image, text = align_embeddings(model, prepare(batch))
        images.append(image)
        texts.append(text)
        keys += batch_keys
        for ids, mask in zip(batch["text_input_ids"], batch["text_attention_mask"]):
            captions.append(tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).strip())
    if not images:
        raise ValueError(
            "the evaluation data gave no batches on this rank (check data.eval shards and their sizes.json)"
        )
    image_all = gather_rows(torch.cat(images))
    text_all = gather_rows(torch.cat(texts))
    keys, captions = gather_list(keys), gather_list(captions)
    chosen = _first_of_each_key(keys, max_samples)
    gallery: dict[str, int] = {}
    caption_index, text_rows = [], []
    for i in chosen:
        if captions[i] not in gallery:
            gallery[captions[i]] = len(gallery)
            text_rows.append(i)
        caption_index.append(gallery[captions[i]])
    index = torch.tensor(chosen, device=image_all.device)
    metrics = retrieval_metrics(image_all[index], text_all[torch.tensor(text_rows, device=text_all.device)],
                                torch.tensor(caption_index, device=image_all.device), ks)
    metrics.update(samples=len(chosen), captions=len(gallery))
    return metrics


# ---------------------------------------------------------------------------
# stage 2


def split_last_turn(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                    ) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids) of one rendered sample: the last run of supervised labels is the reference."""
    n = int(attention_mask.sum()) if attention_mask is not None else len(input_ids)
    ids, lab = input_ids[:n].tolist(), labels[:n].tolist()
    supervised = [t != IGNORE_INDEX for t in lab]
    if not any(supervised):
        return ids, []
    end = max(i for i, s in enumerate(supervised) if s) + 1
    start = end - 1
    while start > 0 and supervised[start - 1]:
        start -= 1
    return ids[:start], [t for t in lab[start:end] if t != IGNORE_INDEX]


def _prompt_images(batch: dict, prompts: list[list[int]], image_token_id: int, tokens_per_image: int) -> dict:
    """The images the prompts keep (an image inside a dropped reference turn is dropped too), in batch order."""
    kept: list[int] = []
    image = 0
    for row, prompt in zip(batch["input_ids"], prompts):
        in_row = int((row == image_token_id).sum()) // tokens_per_image
        in_prompt = sum(1 for t in prompt if t == image_token_id) // tokens_per_image
        kept += list(range(image, image + in_prompt))
        image += in_row
    out = {}
    for name in ("pixel_values", "image_features"):
        value = batch.get(name)
        if value is not None:
            out[name] = (
                value
                if len(kept) == value.shape[0]
                else value[torch.tensor(kept, dtype=torch.long, device=value.device)]
            )
    return out


@torch.no_grad()
def evaluate_answers(
    model: Any,
    loader: Iterable,
    *,
    max_samples: Optional[int] = None,
    max_new_tokens: int = 32,
    normalise: Callable[[str], Any] = normalise_answer,
    prepare: Optional[Callable[[dict], dict]] = None,
    synced_gpus: bool = False,
    jsonl_path: Optional[str | os.PathLike] = None,
) -> dict:
    """Stage-2 greedy answers on every rank's share of ``loader``; exact / contains accuracy over the gathered set.

    ``synced_gpus``: keep every rank generating until all are done (needed when
    the weights are partitioned, ZeRO-3). Returns ``exact``, ``contains``,
    ``samples``, ``unparsed`` (answers ``normalise`` maps to None) and
    ``records`` (the per-sample dicts, sorted by key); rank 0 writes them to
    ``jsonl_path``.
    """

    rank, world = dist.rank(), dist.world_size()
    device = _model_device(model)
    prepare = prepare or (lambda b: to_device(b, device))
    tok = model.processors.tokenizer
    image_token_id = int(model.image_token_id)
    records: list[dict] = []
    batch_size = getattr(getattr(loader, "dataset", None), "batch_size", 1)
    gen_kwargs = {"synced_gpus": True} if synced_gpus and world > 1 else {}
    for batch, keys in batches_with_keys(loader, max_batches_for(max_samples, batch_size, world)):
        if batch.get("sequence_ids") is not None:
            raise ValueError("answer evaluation needs one sample per row: build its loader with data.packing=false")
        prompts, references = [], []
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            prompt, reference = split_last_turn(ids, labels, mask)
            prompts.append(prompt)
            references.append(tok.decode(reference, skip_special_tokens=True).strip())
        images = prepare(_prompt_images(batch, prompts, image_token_id, model.num_image_tokens))
        answers = generate.answer_batch(
            model,
            prompts,
            pixel_values=images.get("pixel_values"),
            image_features=images.get("image_features"),
            max_new_tokens=max_new_tokens,
            **gen_kwargs,
        )
        for key, prompt, reference, answer in zip(keys, prompts, references, answers):
            question = tok.decode([t for t in prompt if t != image_token_id], skip_special_tokens=True).strip()
            records.append({"key": key, "question": question, "reference": reference, "answer": answer})
    records = gather_list(records)
    if not records:
        raise ValueError("the evaluation data gave no batches (check data.eval shards and their sizes.json)")
    records = [records[i] for i in _first_of_each_key([r["key"] for r in records], max_samples)]
    unparsed = 0
    for record in records:
        record["exact"], record["contains"] = score_answer(record["answer"], record["reference"], normalise)
        unparsed += int(normalise(record["answer"]) is None)
    n = len(records)
    metrics = {"exact": sum(r["exact"] for r in records) / n, "contains": sum(r["contains"] for r in records) / n,
               "samples": n, "unparsed": unparsed}
    if jsonl_path is not None and rank == 0:
        path = Path(jsonl_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    metrics["records"] = records
    return metrics


# ---------------------------------------------------------------------------
# one entry point for the trainer, the CLI and the demo


def eval_config(cfg: RunConfig, batch_size: Optional[int] = None, shards: Optional[Sequence[str]] = None) -> Any:
    """A copy of ``cfg`` for metric evaluation: one sample per row
    (no packing), pixels unless a cache is kept, own batch."""

    cfg = copy.deepcopy(cfg)
    cfg.data.packing = False
    cfg.data.group_by_length = False
    if shards:
        cfg.data.eval = [SourceConfig(shards=list(shards), name="eval")]
        cfg.data.feature_cache = None  # raw shards given on the command line: images, not cached features
    if batch_size:
        cfg.train.micro_batch_size = int(batch_size)
    return cfg


def evaluate_model(
    model: Any,
    cfg: RunConfig,
    loader: Iterable,
    *,
    max_samples: Optional[int] = None,
    max_new_tokens: int = 32,
    normalise: Callable[[str], Any] = normalise_answer,
    prepare: Optional[Callable[[dict], dict]] = None,
    synced_gpus: bool = False,
    jsonl_path: Optional[str | os.PathLike] = None,
) -> dict:
    """What the stage measures (retrieval for align, answers for fuse) of ``model`` on ``loader``."""
    was_training = model.training
    model.eval()
    try:
        if cfg.stage.measures is Measure.RETRIEVAL:
            return evaluate_retrieval(model, loader, max_samples=max_samples, prepare=prepare)
        return evaluate_answers(
            model,
            loader,
            max_samples=max_samples,
            max_new_tokens=max_new_tokens,
            normalise=normalise,
            prepare=prepare,
            synced_gpus=synced_gpus,
            jsonl_path=jsonl_path,
        )
    finally:
        model.train(was_training)


def summary_line(stage: Stage, metrics: dict) -> str:
    """One line for the progress log."""
    if stage.measures is Measure.RETRIEVAL:
        return (f"retrieval over {metrics['samples']} images / {metrics['captions']} captions: i2t R@1/5/10 "
                f"{metrics['i2t_r1']:.3f}/{metrics['i2t_r5']:.3f}/{metrics['i2t_r10']:.3f}, t2i R@1/5/10 "
                f"{metrics['t2i_r1']:.3f}/{metrics['t2i_r5']:.3f}/{metrics['t2i_r10']:.3f}")
    return (
        f"answers over {metrics['samples']} samples: exact {metrics['exact']:.3f}, contains {metrics['contains']:.3f}"
    )


# ---------------------------------------------------------------------------
# mmdist eval


def _digit_parser() -> Callable[[str], Any]:
    return generate.parse_digit


# --match NAME -> a factory of the normalise function (imported only when chosen)
MATCHERS: dict[str, Callable[[], Callable[[str], Any]]] = {
    "normalised": lambda: normalise_answer,
    "digit": _digit_parser,
}
