"""Settings of the training side: the loop (`TrainConfig`), the DeepSpeed engine (`EngineConfig`),
checkpoints (`CheckpointConfig`) and logging (`LogConfig`).

Derived values (gradient accumulation, per-rank batch, the DeepSpeed JSON) are
not settings: they are computed once from these in mmdist/training/engine.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mmdist.settings import SettingsBase, setting


@dataclass
class TrainConfig(SettingsBase):
    """The optimisation: budget, batch, learning rates, schedule, safety limits."""

    max_steps: Optional[int] = setting(None, "stop after this many optimizer steps")
    max_samples: Optional[int] = setting(None, "stop after this many training samples (global); converted to steps")
    global_batch_size: int = setting(32, "samples per optimizer step across all ranks (= micro x accumulation x world)")
    micro_batch_size: int = setting(8, "samples per forward pass on one rank")
    fit_micro_batch: bool = setting(
        True,
        "when micro_batch_size x world size does not divide global_batch_size (a job "
        "resumed on another number of GPUs, say), use the largest smaller micro-batch that "
        "does; the global batch stays. false: refuse",
    )
    lr: float = setting(1e-3, "peak learning rate")
    lr_multipliers: dict = setting(
        doc="per module group learning-rate factors, e.g. {projector: 1.0, stage1: 0.1, lora: 0.5}", factory=dict
    )
    weight_decay: float = setting(0.0, "AdamW weight decay (not applied to biases and norms)")
    betas: list[float] = setting(doc="AdamW betas", factory=lambda: [0.9, 0.999])
    lr_scheduler: str = setting(
        "cosine",
        "cosine, linear, constant_with_warmup or constant (built in), or any other name transformers.get_scheduler "
        "accepts",
    )
    warmup_ratio: float = setting(0.03, "fraction of the steps spent warming up")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 disables)")
    eval_every: int = setting(0, "evaluate on data.eval every N steps (0: only at the end)")
    eval_batches: int = setting(20, "batches per evaluation")
    eval_metrics: bool = setting(
        False,
        "at each evaluation also measure retrieval R@1/5/10 (align) "
        "or greedy-answer exact/contains accuracy (fuse) on data.eval (mmdist/evaluation/)",
    )
    eval_max_samples: Optional[int] = setting(
        None,
        "eval_metrics: held-out samples measured (None: "
        "all of data.eval); answers use train.micro_batch_size per batch",
    )
    seed: int = setting(0, "seed for initialisation and dropout")
    max_nonfinite_steps: int = setting(
        5, "stop with an error after this many NaN/inf losses in a row (each one is skipped)"
    )

    def check(self) -> list[tuple[str, str]]:
        out = []
        if not self.max_steps and not self.max_samples:
            out.append(("max_steps", "set max_steps or max_samples"))
        if self.micro_batch_size < 1:
            out.append(("micro_batch_size", "must be at least 1"))
        if self.global_batch_size < self.micro_batch_size:
            out.append(
                (
                    "global_batch_size",
                    f"{self.global_batch_size} is smaller than micro_batch_size={self.micro_batch_size}",
                )
            )
        if self.eval_max_samples is not None and self.eval_max_samples < 1:
            out.append(("eval_max_samples", "must be at least 1 (or null for all held-out samples)"))
        if self.lr <= 0:
            out.append(("lr", "must be positive"))
        if not 0.0 <= self.warmup_ratio < 1.0:
            out.append(("warmup_ratio", "must be in [0, 1)"))
        if len(self.betas) != 2:
            out.append(("betas", "needs two values"))
        for group, factor in self.lr_multipliers.items():
            if not isinstance(factor, (int, float)) or factor < 0:
                out.append((f"lr_multipliers.{group}", f"must be a non-negative number, got {factor!r}"))
        return out


@dataclass
class EngineConfig(SettingsBase):
    """How DeepSpeed runs the model: ZeRO stage, precision, offload, raw extra keys."""

    zero_stage: Literal[0, 1, 2, 3, "auto"] = setting(
        2,
        "ZeRO stage; 3 also partitions the frozen LLM as it loads. auto: at "
        "start-up, the stage the planner predicts fastest among those that fit "
        "the device's memory (mmdist/plan/auto.py; MMDIST_DEVICE_MEMORY=24GB "
        "forces a budget), written into the run's config.yaml",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = setting(
        "auto",
        "compute precision of the trainable side (fp32 master weights are kept); auto: "
        "bf16 on GPUs with bf16, fp16 (dynamic loss scaling) below compute capability 8.0, "
        "fp32 on the CPU. A bf16/fp16 engine, or ZeRO-3, holds frozen parts in this "
        "precision too: their model.*.dtype must then match (see mmdist/precision.py)",
    )
    offload_optimizer: bool = setting(False, "keep optimizer states in CPU memory")
    offload_params: bool = setting(False, "ZeRO-3: keep parameters in CPU memory")
    torch_adam: bool = setting(
        False, "use torch's AdamW instead of DeepSpeed's fused Adam (CPU tests: avoids an ~80 s JIT build)"
    )
    backend: Literal["auto", "nccl", "gloo"] = setting("auto", "process-group backend: auto = nccl on GPU, gloo on CPU")
    cpu_keep_freed_memory: bool = setting(
        True,
        "on a CPU device, a training process (mmdist train, mmdist demo, launch/train.py) has glibc's malloc keep "
        "freed memory for the next step instead of page-faulting a step's large temporaries in again (resident "
        "memory stays at its high-water mark; mmdist/training/cpu_memory.py)",
    )
    fp16_initial_scale_power: int = setting(16, "fp16: initial loss scale 2**N")
    deepspeed: dict = setting(
        doc="raw DeepSpeed config keys merged into the generated JSON (conflicts with typed settings are errors)",
        factory=dict,
    )

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.offload_params and self.zero_stage not in (3, "auto"):
            out.append(("offload_params", "parameter offload needs zero_stage=3"))
        if self.offload_optimizer and self.zero_stage == 0:
            out.append(("offload_optimizer", "optimizer offload needs zero_stage >= 1"))
        return out


@dataclass
class CheckpointConfig(SettingsBase):
    """When and where checkpoints are written, and how a run resumes."""

    save_every: int = setting(0, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = setting(2, "checkpoints kept; older ones are deleted after a newer one is complete")
    resume: str = setting(
        "auto", "'auto': continue from the run directory's latest checkpoint; 'never'; or a checkpoint path"
    )
    export: bool = setting(True, "at the end, export the trainable weights (safetensors + manifest.json)")

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.keep_last < 1:
            out.append(("keep_last", "must be at least 1"))
        if self.save_every < 0:
            out.append(("save_every", "must be >= 0"))
        return out


@dataclass
class LogConfig(SettingsBase):
    """What the run reports and where."""

    log_every: int = setting(10, "write metrics every N steps")
    progress_bar: bool = setting(True, "rank 0 shows a tqdm bar with loss, lr, samples/s, tokens/s, MFU, ETA")
    tensorboard: bool = setting(True, "also write TensorBoard event files (if tensorboard is installed)")
    wandb: bool = setting(False, "also log to Weights & Biases (if installed and logged in)")
    param_table: bool = setting(True, "print the table of modules with parameter counts, trainable counts and dtypes")
    peak_flops: Optional[float] = setting(
        None, "peak FLOP/s of one device for MFU; default: the GPU's datasheet figure, else a short matmul "
        "measured at start (measured again, the higher kept, if steps outrun it)"
    )
    data_fingerprint: bool = setting(
        False,
        "log a hash of every optimizer step's batches (checks that "
        "a resumed run sees the same data; costs a copy to CPU)",
    )


@dataclass
class WatchdogConfig(SettingsBase):
    """When a rank that makes no progress is declared hung (see mmdist/training/watchdog.py)."""

    timeout_s: float = setting(
        1800.0, "end a rank with a stack dump when no optimizer step finished for this long (0: no watchdog)"
    )
    phase_timeout_s: float = setting(
        7200.0, "the limit inside long phases: loading weights, the first step, evaluation, saving (0: no limit there)"
    )
    poll_s: float = setting(10.0, "how often the watchdog thread looks at the heartbeat")

    def check(self) -> list[tuple[str, str]]:
        out = []
        for key in ("timeout_s", "phase_timeout_s"):
            if getattr(self, key) < 0:
                out.append((key, "must be >= 0 (0 turns it off)"))
        if self.poll_s <= 0:
            out.append(("poll_s", "must be positive"))
        elif self.timeout_s and self.poll_s > self.timeout_s:
            out.append(("poll_s", f"{self.poll_s} is longer than timeout_s={self.timeout_s}"))
        return out
