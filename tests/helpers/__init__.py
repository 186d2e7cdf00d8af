"""Shared test helpers, importable from every test folder as ``helpers.*`` (setup.cfg puts tests/ on
pytest's ``pythonpath``; subprocesses that need them get ``tests`` on PYTHONPATH).

- ``configs``: the tiny RunConfigs, loaded from configs/tiny_align.yaml / configs/tiny_fuse.yaml with overrides
- ``tiny``: tiny models built from those configs, and hand-made batches for them
- ``custom_vision``: ``TinyCNN``, a user-style encoder for the ``model.vision.source: custom`` path
- ``data_fixtures``: a fake Processors on a real tiny tokenizer, data configs, shard writers
- ``trainer_toy``: a toy model and loader on mmdist's contracts, and a torchrun worker for engine/trainer tests
- ``toy_launch``: runs that worker under torchrun, on one agent or one agent per simulated node
- ``launch_harness``: the launcher tests' command, environment and run-folder checks
- ``slurm_cluster``: a real Slurm cluster for the ``slurm`` tests (one node, or two nodes n1, n2 on this host)
"""
