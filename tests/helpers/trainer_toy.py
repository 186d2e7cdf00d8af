"""A toy model and loader that follow mmdist's model and loader contracts, for fast engine/trainer tests.

The model has a frozen "backbone" (two Linear layers, as the frozen LLM would be)
and a trainable "head" in two groups, so freezing, optimizer groups, ZeRO-3
partitioning, checkpoints without frozen weights and exports can be checked
in seconds. The loader cuts one global stream of samples into per-rank
micro-batches such that every optimizer step sees the same global batch for
any world size, and is checkpointable (state_dict / load_state_dict).

Also a worker entry point: ``python tests/helpers/trainer_toy.py CONFIG_JSON OUT_JSON``
(run under torchrun by tests/helpers/toy_launch.py) trains with the toy parts; rank 0 writes the summary to
OUT_JSON, every rank to OUT_JSON.rankN. The spec's test hooks (never product features): ``signal``
``{"rank": R, "batch": B}`` makes rank R send itself SIGUSR1 when it draws its B-th
micro-batch (0-based), as Slurm's warning signal would; ``stall`` ``{"rank": R, "batch": B,
"seconds": S}`` makes rank R sleep S seconds there, as a stuck rank would; ``oom`` ``{"rank": R,
"batch": B}`` makes the model's forward on that micro-batch raise ``torch.OutOfMemoryError``, as
a GPU out of memory would.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmdist.models.contract import BatchCounts
from mmdist.models.flops import FlopCount, part_flops
from mmdist.models.freeze import Part

IN_DIM, HIDDEN, OUT_DIM = 8, 16, 4
NUM_SAMPLES = 64
FROZEN_MARK = 0.5  # the frozen backbone's weights are filled with recognisable values


class ToyModel(nn.Module):
    """backbone (frozen) -> head (trainable: 'projector' Linear + 'stage1' LayerNorm/scale)."""

    def __init__(self, gather: Callable = None, scalar_dim0: bool = False):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN))
        self.norm = nn.LayerNorm(HIDDEN)
        self.projector = nn.Linear(HIDDEN, OUT_DIM)
        # A learnable scalar, like a temperature. Shape [1], not []: DeepSpeed 0.19's ZeRO-3 cannot hold
        # 0-dim parameters (see docs/design.md); scalar_dim0 makes one for the stage 0-2 workaround test.
        self.log_scale = nn.Parameter(torch.zeros(()) if scalar_dim0 else torch.zeros(1))
        self.processors = None
        gather = gather or (lambda ps: torch.no_grad())
        params = list(self.backbone.parameters())
        with gather(params):
            with torch.no_grad():
                for i, p in enumerate(params):
                    if p.numel():
                        g = torch.Generator().manual_seed(100 + i)
                        p.copy_(torch.randn(p.shape, generator=g) * FROZEN_MARK)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen modules stay in eval
        return self

    def forward(self, batch: dict) -> dict:
        hidden = self.backbone(batch["x"])
        pred = self.projector(self.norm(hidden)) * self.log_scale.exp()
        loss = ((pred - batch["y"]) ** 2).mean()
        if "poison" in batch and bool(batch["poison"].any()):
            loss = loss * float("nan")
        if "oom" in batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected by the toy model)")
        return {"loss": loss, "metrics": {"mse": loss.detach()}, "num_tokens": torch.tensor(batch["x"].shape[0])}

    def parts(self) -> list[Part]:
        return [Part("backbone", trainable=False, dtype="fp32"), Part("norm", trainable=True, dtype="fp32"),
                Part("projector", trainable=True, dtype="fp32")]

    def batch_counts(self, batch: dict) -> BatchCounts:
        """One sample, one token, one supervised position per row of ``x``; no images; micro-batches weigh the same."""
        rows = int(batch["x"].shape[0])
        return BatchCounts(samples=rows, tokens=rows, supervised_tokens=rows, images=0, image_tokens=0)

    def flop_count(self, *, vision_runs: bool = True, text_runs: bool = True) -> FlopCount:
        """Per row of ``x`` (one token): the frozen backbone forward only, the projector with both gradients (the
        trainable norm below it needs its input's)."""
        return part_flops(self.backbone, "per_token", 1) + part_flops(self.projector, "per_token", 1, input_grad=True)

    def trainable_groups(self) -> dict:
        return {
            "projector": list(self.projector.parameters()),
            "stage1": list(self.norm.parameters()),
            "temperature": [self.log_scale],
        }

    def export_state_dict(self) -> dict:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def manifest(self) -> dict:
        return {"stage": "toy", "connector": {"type": "toy", "shapes": {"projector.weight": [OUT_DIM, HIDDEN]}}}


def toy_model_builder(cfg: Any, gather: Callable) -> ToyModel:
    return ToyModel(gather)


def sample(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(index % NUM_SAMPLES)
    x = torch.randn(IN_DIM, generator=g)
    w = torch.linspace(-1, 1, IN_DIM * OUT_DIM).reshape(IN_DIM, OUT_DIM)
    return x, torch.tanh(x @ w)


class ToyLoader:
    """Per-rank micro-batches of one global sample stream; ``poison_batches`` marks global batch indices to NaN."""

    def __init__(self, cfg: Any, rank: int, world_size: int, poison_batches: tuple = (), start: int = 0,
                 hooks: dict | None = None):
        self.hooks = {k: v for k, v in (hooks or {}).items() if v and int(v["rank"]) == rank}
        self.micro = cfg.train.micro_batch_size
        self.global_batch = cfg.train.global_batch_size
        self.accumulation = self.global_batch // (self.micro * world_size)
        self.rank, self.world = rank, world_size
        self.position = start  # micro-batches consumed by this rank
        self.batches_per_epoch = 10**9
        self.poison = set(poison_batches)

    def __iter__(self):
        while True:
            b = self.position
            self._run_hooks(b)
            step, m = divmod(b, self.accumulation)
            start = step * self.global_batch + (m * self.world + self.rank) * self.micro
            xs, ys = zip(*(sample(start + i) for i in range(self.micro)))
            self.position += 1
            batch = {"x": torch.stack(xs), "y": torch.stack(ys), "index": torch.arange(start, start + self.micro)}
            if b in self.poison:
                batch["poison"] = torch.ones(1)
            if "oom" in self.hooks and int(self.hooks["oom"]["batch"]) == b:
                batch["oom"] = torch.ones(1)
            yield batch

    def _run_hooks(self, b: int) -> None:
        import os
        import signal
        import time

        if "signal" in self.hooks and int(self.hooks["signal"]["batch"]) == b:
            os.kill(os.getpid(), signal.SIGUSR1)
        if "stall" in self.hooks and int(self.hooks["stall"]["batch"]) == b:
            time.sleep(float(self.hooks["stall"]["seconds"]))

    def state_dict(self) -> dict:
        return {"position": self.position, "world_size": self.world, "accumulation": self.accumulation}

    def load_state_dict(self, state: dict) -> None:
        """The position is global (optimizer steps x global batch): another world size continues the same stream."""
        position = int(state["position"])
        if int(state.get("world_size", self.world)) != self.world:
            steps, partial = divmod(position, int(state["accumulation"]))
            if partial:
                raise ValueError(f"toy loader state at micro-batch {position} is not at a step boundary")
            position = steps * self.accumulation
        self.position = position


def toy_loader_builder(poison_batches: tuple = (), start: int = 0, hooks: dict | None = None) -> Callable:
    def build(cfg: Any, processors: Any, split: str, rank: int, world_size: int) -> ToyLoader:
        return ToyLoader(cfg, rank, world_size, poison_batches, start, hooks if split == "train" else None)

    return build


def toy_config(run_dir: str, **train_overrides: Any) -> dict:
    """A RunConfig dict for the toy parts (the model sections are placeholders the toy builder ignores)."""
    train = {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "lr": 0.05, "warmup_ratio": 0.0,
             "lr_scheduler": "constant", "grad_clip": 0.0, "seed": 0}
    train.update(train_overrides.pop("train", {}))
    cfg = {
        "stage": "align",
        "name": "toy",
        "run_dir": run_dir,
        "model": {
            "text": {"init_config": {"model_type": "bert"}, "tokenizer": "mmdist:tiny-wordpiece"},
            "vision": {"init_config": {"model_type": "vit"}},
        },
        "data": {"train": [{"shards": ["unused.tar"]}], "num_workers": 0},
        "train": train,
        # Persistence threshold 0: even these tiny parameters stay partitioned under ZeRO-3, as a 14B model's would.
        "engine": {
            "zero_stage": 3,
            "precision": "fp32",
            "torch_adam": True,
            "backend": "gloo",
            "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
        "checkpoint": {"save_every": 0, "keep_last": 2, "resume": "auto", "export": True},
        "log": {
            "log_every": 1,
            "progress_bar": False,
            "tensorboard": False,
            "param_table": False,
            "peak_flops": 1e9,
            "data_fingerprint": True,
        },
    }
    for key, value in train_overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def frozen_reference() -> list[torch.Tensor]:
    """The values ToyModel writes into its frozen backbone (what a gathered read must return)."""
    model = ToyModel()
    return [p.detach().clone() for p in model.backbone.parameters()]


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_llm_with_head_builder(pretrained_dir: str | None = None) -> Callable:
    """A frozen tiny llama (transformers' from_pretrained of ``pretrained_dir``, else from_config) + the toy head.

    Records whether transformers saw ZeRO-3 enabled (the engine's HfDeepSpeedConfig) while it was built.
    """

    def build(cfg: Any, gather: Callable) -> nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import is_deepspeed_zero3_enabled

        class Wrapped(ToyModel):
            def __init__(self):
                super().__init__(gather)
                self.hf_saw_zero3 = is_deepspeed_zero3_enabled()
                if pretrained_dir:
                    self.llm = AutoModelForCausalLM.from_pretrained(pretrained_dir, dtype=torch.float32)
                else:
                    self.llm = AutoModelForCausalLM.from_config(tiny_llama_config())
                self.llm.requires_grad_(False)

        return Wrapped()

    return build


def probe(cfg: Any, pretrained_dir: str | None = None) -> dict:
    """Build the engine under ZeRO-3 and report, per rank, how much of each model this rank holds."""
    import torch.distributed as tdist

    from mmdist import distributed as dist
    from mmdist.training.engine import build_engine

    env = dist.init(backend="gloo")
    bundle = None
    try:
        bundle = build_engine(cfg, world_size=env.world_size, model_builder=tiny_llm_with_head_builder(pretrained_dir))
        model = bundle.model
        llm = list(model.llm.parameters())
        names = {id(p): n for n, p in model.named_parameters()}
        report = {
            "rank": env.rank,
            "llm_full": sum(int(p.ds_numel) for p in llm),
            "llm_local": sum(int(p.ds_tensor.numel()) for p in llm),
            "llm_visible": sum(p.numel() for p in llm),
            "optimizer_params": sum(len(g) for g in bundle.engine.optimizer.fp16_groups),
            "optimizer_names": sorted(names[id(p)] for g in bundle.engine.optimizer.fp16_groups for p in g),
            "trainable_params": sum(1 for p in model.parameters() if p.requires_grad),
        }
        with bundle.read_gather(list(model.backbone.parameters())):
            got = [p.detach().clone() for p in model.backbone.parameters()]
        ref = frozen_reference()
        report["gathered_shapes_ok"] = all(g.shape == r.shape for g, r in zip(got, ref))
        report["gathered_max_err"] = (
            max(float((g - r).abs().max()) for g, r in zip(got, ref)) if report["gathered_shapes_ok"] else None
        )
        report["hf_saw_zero3"] = bool(model.hf_saw_zero3)
        if pretrained_dir:
            from safetensors.torch import load_file

            saved = load_file(str(Path(pretrained_dir) / "model.safetensors"))
            named = dict(model.llm.named_parameters())
            with bundle.read_gather(list(named.values())):
                diffs = {
                    k: float((named[k].detach().float() - v.float()).abs().max())
                    for k, v in saved.items()
                    if k in named
                }
            report["pretrained_compared"] = len(diffs)
            report["pretrained_max_err"] = max(diffs.values()) if diffs else None
        reports: list = [None] * env.world_size
        tdist.all_gather_object(reports, report)
        return {"ranks": reports}
    finally:
        if bundle is not None:
            bundle.close()
        dist.shutdown()


def stage1_probe(cfg: Any) -> dict:
    """Build the real fused model under the engine (stage-1 weights loaded); report per rank whether the
    gathered stage-1 parameters equal the export file."""
    import torch.distributed as tdist
    from safetensors.torch import load_file

    from mmdist import distributed as dist
    from mmdist.export import resolve_export_dir
    from mmdist.training.engine import build_engine

    env = dist.init(backend="gloo")
    bundle = None
    try:
        bundle = build_engine(cfg, world_size=env.world_size)
        stage1 = bundle.model.stage1
        saved = load_file(str(Path(resolve_export_dir(cfg.model.connector.stage1_weights)) / "model.safetensors"))
        with bundle.read_gather(list(stage1.parameters())):
            own = {k: v.detach().clone() for k, v in stage1.state_dict().items()}
        diffs = [float((own[k].float() - saved["stage1." + k].float()).abs().max()) for k in own if own[k].numel()]
        report = {
            "rank": env.rank,
            "stage1_names": sorted(own),
            "empty": sorted(k for k, v in own.items() if v.numel() == 0),
            "max_abs_diff": max(diffs) if diffs else None,
        }
        reports: list = [None] * env.world_size
        tdist.all_gather_object(reports, report)
        return {"ranks": reports}
    finally:
        if bundle is not None:
            bundle.close()
        dist.shutdown()


def recording_loader_builder(folder: str) -> Callable:
    """mmdist's own loaders; every training batch handed out appends its sample keys to FOLDER/keys.jsonl
    (one JSON line per batch: world size, rank, epoch, keys), so a test can check which samples a run trained on."""
    from mmdist.data.loader import build_loader

    class Recording:  # mixed into the loader's own class (per-rank StreamingLoader or GlobalBatchLoader)
        def __iter__(self):
            where = self if hasattr(self, "world_size") else self.dataset
            for batch in super().__iter__():
                line = {
                    "world": where.world_size,
                    "rank": where.rank,
                    "epoch": self.epoch,
                    "keys": list(self.last_keys),
                }
                with open(Path(folder) / "keys.jsonl", "a") as fh:
                    fh.write(json.dumps(line) + "\n")
                yield batch

    def build(cfg: Any, processors: Any, split: str, rank: int, world_size: int):
        loader = build_loader(cfg, processors, split, rank, world_size)
        if split == "train":
            loader.__class__ = type(f"Recording{type(loader).__name__}", (Recording, type(loader)), {})
        return loader

    return build


def recorded_steps(folder: str, legs: Sequence[int]) -> list[list[str]]:
    """The samples of every optimizer step of a run recorded by :func:`recording_loader_builder`, whose parts
    ran ``legs[i]`` steps each, on whatever world sizes (each part's gradient accumulation is read off its lines)."""
    lines = [json.loads(line) for line in (Path(folder) / "keys.jsonl").read_text().splitlines()]
    parts, current = [], []
    for line in lines:  # the parts follow each other in the file; a new part starts where the world size changes
        if current and line["world"] != current[-1]["world"]:
            parts.append(current)
            current = []
        current.append(line)
    parts.append(current)
    if len(parts) != len(legs):
        raise AssertionError(f"{len(parts)} parts recorded (world sizes change between them), expected {len(legs)}")
    steps: list[list[str]] = []
    for part, n_steps in zip(parts, legs):
        per_rank: dict[int, list[list[str]]] = {}
        for line in part:
            per_rank.setdefault(line["rank"], []).append(line["keys"])
        for rank_lines in per_rank.values():
            if len(rank_lines) % n_steps:
                raise AssertionError(
                    f"{len(rank_lines)} micro-batches on a rank is not a whole number of {n_steps} steps"
                )
        accumulation = len(next(iter(per_rank.values()))) // n_steps
        for step in range(n_steps):
            steps.append(sorted(k for rank_lines in per_rank.values()
                                for keys in rank_lines[step * accumulation:(step + 1) * accumulation] for k in keys))
    return steps


def replay_loader_builder(steps: list[list[str]]) -> Callable:
    """Single-process loaders that hand out the recorded ``steps`` one sample per micro-batch, in step order:
    with train.micro_batch_size 1 and the global batch of the recording, every step trains on the same samples
    as the recorded one did. The batches come from mmdist's own loader (micro-batch 1, the whole epoch)."""
    from mmdist.data.loader import build_loader

    def build(cfg: Any, processors: Any, split: str, rank: int, world_size: int):
        if split != "train":
            return build_loader(cfg, processors, split, rank, world_size)
        single = build_loader(cfg, processors, split, 0, 1)
        by_key = {}
        for batch, _ in zip(single, range(len(single))):  # one epoch (a global-order loader is endless)
            by_key[single.last_keys[0]] = batch
        single.close()  # its workers stop now, not at a garbage collection later in the run
        return [by_key[k] for step in steps for k in step]

    return build


def train_toy(cfg_dict: dict, **kwargs: Any) -> dict:
    """``train`` in this process with the toy model and loader (``loader``: another loader builder)."""
    from mmdist.config.run import load_config
    from mmdist.training.loop import train

    return train(load_config(base=cfg_dict), model_builder=toy_model_builder,
                 loader_builder=kwargs.pop("loader", toy_loader_builder()), **kwargs)


def read_export(run_dir: Path) -> dict:
    """The exported trainable weights of a run folder."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str]) -> int:
    import os

    from mmdist.config.run import load_config
    from mmdist.training.loop import train
    from mmdist.training.preemption import PREEMPTED_EXIT

    spec = json.loads(open(argv[0]).read())
    cfg = load_config(base=spec["config"])
    # What the launcher told this process (torchrun: GROUP_RANK is the node's rank; srun: SLURM_NODEID), and
    # which agent ("node") started it: the multi-node tests check both.
    launch_vars = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                                  "MASTER_ADDR", "MMDIST_TEST_NODE", "TMPDIR")}
    if spec.get("mode") in ("probe", "stage1_probe"):
        summary = probe(cfg, spec.get("pretrained_dir")) if spec["mode"] == "probe" else stage1_probe(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            with open(argv[1], "w") as fh:
                json.dump(summary, fh)
        return 0
    if spec.get("mode") == "real":  # the real models and data pipeline
        builder = recording_loader_builder(spec["record_keys"]) if spec.get("record_keys") else None
        summary = train(cfg, loader_builder=builder, stop_after=spec.get("stop_after"))
    else:
        hooks = {"signal": spec.get("signal"), "stall": spec.get("stall")}
        summary = train(cfg, model_builder=toy_model_builder,
                        loader_builder=toy_loader_builder(tuple(spec.get("poison", ())), hooks=hooks),
                        stop_after=spec.get("stop_after"))
    summary["launch"] = launch_vars
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{argv[1]}.rank{rank}", "w") as fh:
        json.dump(summary, fh)
    if rank == 0:
        with open(argv[1], "w") as fh:
            json.dump(summary, fh)
    return PREEMPTED_EXIT if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
