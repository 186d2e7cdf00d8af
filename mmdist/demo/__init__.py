"""`mmdist demo`: the whole product on a laptop CPU, from shards
to a report: pretrained text models, a seeded random ViT.

A newcomer's first command. It composes the same pieces a cluster run uses and
adds no training code of its own:

1. ``mmdist shard demo``: scikit-learn's handwritten digits as WebDataset shards
   (captions and question/answer conversations), with a fixed held-out split
   written as separate ``eval`` shards that no stage trains on.
2. ``mmdist cache``: the frozen vision encoder's features and the frozen text
   encoder's caption vectors, computed once.
3. Stage 1 ``align`` (configs/demo_align.yaml) through ``mmdist.training.loop.train``
   (DeepSpeed engine, one CPU process), then held-out image->text retrieval
   top-1 over the ten digit captions.
4. Stage 2 ``fuse`` (configs/demo_fuse.yaml) through the same trainer, starting
   from the stage-1 export, then held-out answer accuracy by greedy generation
   from the exported model (what ``mmdist generate`` loads).
5. ``metrics.json``, loss curves (PNG), a few held-out images and ``report.md``.

Why the feature cache only in stage 1: stage 1's step is tiny, so decoding and
encoding images would dominate it; in stage 2 the ViT is ~0.1% of a step and a
cache would cost one more load of the LLM.

Robustness: the run folder holds ``demo_run.json`` with a fingerprint of the
recipe (both configs, the demo settings) and the steps already done. Running
again continues (each stage resumes from its last checkpoint, e.g. after
Ctrl-C); a folder of another recipe is refused, never mixed; ``--overwrite``
starts over.

Layout of RUN_DIR::

    demo_run.json  metrics.json  report.md  loss_align.png  loss_fuse.png  images/heldout_*.png
    data/shards/{train,eval}/   data/cache_align/{train,eval}/
    align/  fuse/               each a trainer run dir: config.yaml, metrics.jsonl, checkpoints/, export/

The package, in the order the steps need it: ``state`` (the run folder's
bookkeeping, ``DemoError``), ``digits`` (the digit shards), ``evaluate``
(held-out retrieval and answers) and ``report`` (loss curves and report.md);
the command that runs the steps in order is mmdist/commands/demo.py.
"""
