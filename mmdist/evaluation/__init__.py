"""Evaluation that measures answers: retrieval R@k for stage 1, greedy-answer accuracy for stage 2.

A loss says little about whether a run is any good; these figures do, and they
are what ``mmdist eval``, the trainer's ``train.eval_metrics`` and the demo's
held-out numbers all report (one code path).

Distributed: every rank reads its share of the held-out shards through the
data loader's own rank split (``build_loader(..., "eval", rank, world)``), runs
the model on it, and the per-sample results of all ranks are gathered (tensors:
sizes first, then padded rows; strings: ``all_gather_object``). Every rank then
computes the metrics on the full set, so they are identical everywhere. The
eval loader gives every rank the same number of batches (it wraps a rank's
shards around to fill its budget), so samples can repeat: results are
de-duplicated by sample key (first occurrence kept) and sorted by key, so one
rank and many ranks measure the same set. ``max_samples`` keeps the first N
keys of what was read (reading stops after ``ceil(N / (world x batch))``
batches per rank, the same on every rank).

Stage 1 (align), image->text and text->image recall at k (R@1/5/10):

* The text gallery is the set of distinct captions, a caption being the text
  the model sees (its token ids decoded). An image query is correct at k when
  its own caption is among the k captions most similar to it.
* A caption query ranks all images; it is correct at k when any of the k most
  similar images has that caption. So repeated captions (the demo's ten digit
  captions) count as one text matching every image that carries it; with one
  distinct caption per image this is the usual R@k.
* Similarity is the cosine of the ITC embeddings (for the Q-Former, the max
  over its queries, as in training).

Stage 2 (fuse), greedy generation on held-out conversations:

* The reference is the last assistant turn (the last run of supervised labels
  of the rendered sample); the prompt is every token before it, rendered by the
  training template, so the model sees what it was trained on.
* Prompts are left-padded into batches and answered by ``FusedVLM.generate``
  (greedy, KV cache).
* ``exact``: normalise(answer) == normalise(reference); ``contains``: the
  normalised reference occurs in the normalised answer as whole words. The
  default normalisation is SQuAD's (lowercase, drop punctuation and the articles
  a/an/the, collapse whitespace). A caller may pass another ``normalise``
  returning any comparable value (the demo passes its digit parser); a ``None``
  key never matches, and ``contains`` is then the same as ``exact``.
* Rank 0 writes one JSON line per sample: key, question, reference, answer,
  exact, contains.

The math is ``metrics``, the runners that feed it ``runners``; the names
below are the package's API.
"""

from mmdist.evaluation.metrics import (  # noqa: F401
    IGNORE_INDEX,
    RECALL_AT,
    normalise_answer,
    recall_at_k,
    retrieval_metrics,
    score_answer,
)
from mmdist.evaluation.runners import (  # noqa: F401
    MATCHERS,
    align_embeddings,
    batches_with_keys,
    eval_config,
    evaluate_answers,
    evaluate_model,
    evaluate_retrieval,
    gather_list,
    gather_rows,
    max_batches_for,
    split_last_turn,
    summary_line,
    to_device,
)
