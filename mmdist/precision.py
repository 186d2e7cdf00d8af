"""Turn a run config's ``auto`` precisions into concrete dtypes for one device, in one place.

Every command that builds a model (``mmdist train``, ``generate``, ``cache``,
``demo``; ``plan`` for its target GPU) calls :func:`resolve_precision` before
building anything, prints the reasons (:func:`precision_lines`) and, for a
training run, writes the concrete values into the run's ``config.yaml``. Model
code only ever sees fp32 / bf16 / fp16 (``auto`` reaching a model is an error
that names this function).

The dtype the config names is the dtype that runs. DeepSpeed decides the dtype
of every parameter it holds, frozen ones too:

* a bf16/fp16 engine casts every parameter to its precision (ZeRO 0-2:
  ``engine._cast_module_mixed_precision``; ZeRO-3: ``zero.Init`` creates every
  tensor in it);
* an fp32 engine at ZeRO 0-2 leaves the loaded dtypes alone, so a frozen part
  may stay bf16 while the small trainable side trains in fp32;
* an fp32 engine at ZeRO-3 partitions every tensor in fp32, and a later cast of
  a frozen part changes only the (empty) parameter, not its fp32 partition.

So a *frozen* part must have the engine's precision, except with an fp32 engine
at ZeRO 0-2. ``auto`` parts follow that rule (``auto`` frozen parts take the
engine's precision where it decides, and under ZeRO-3 an ``auto`` engine takes
the frozen parts' hardware dtype), and an explicit combination that breaks it
is a ConfigError naming both keys: casting frozen parts back after
``deepspeed.initialize`` would work at ZeRO 0-2 only and fight DeepSpeed's own
bookkeeping, where refusing is exact. Trainable parts always keep fp32 master
weights (the engine computes in its precision); their dtype key is resolved for
the record but not checked.

Only attribute access and ``dataclasses.replace`` touch the config, so this
module sits below mmdist.config and mmdist.data (``mmdist cache`` uses it).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

from mmdist.hardware import Resolved, default_device, resolve_dtype, resolve_engine_precision
from mmdist.settings import ConfigError, Problem

if TYPE_CHECKING:
    from mmdist.config.run import RunConfig

__all__ = ["PART_KEYS", "check_precision", "concrete", "frozen_parts", "precision_lines", "resolve_precision"]

# model section -> settings key of its dtype
PART_KEYS = {"llm": "model.llm.dtype", "vision": "model.vision.dtype", "text": "model.text.dtype"}
ENGINE_KEY = "engine.precision"


def frozen_parts(cfg: RunConfig) -> list[str]:
    """The sections the stage builds frozen: their dtype is what runs (and what DeepSpeed may override)."""
    return cfg.stage.frozen_parts(cfg.model)


def _engine_decides(zero_stage: int, engine_dtype: str) -> bool:
    """Whether DeepSpeed holds frozen parameters in the engine's precision (see the module doc)."""
    # an unresolved `auto` stage (generate, cache: no engine) is not 3
    return engine_dtype != "fp32" or str(zero_stage) == "3"


def check_precision(cfg: RunConfig) -> list[Problem]:
    """The frozen parts whose concrete dtype DeepSpeed would silently override, each naming both keys."""
    engine = str(cfg.engine.precision)
    if engine == "auto" or not _engine_decides(cfg.engine.zero_stage, engine):
        return []
    problems = []
    for name in frozen_parts(cfg):
        key, value = PART_KEYS[name], str(getattr(cfg.model, name).dtype)
        if value in ("auto", engine):
            continue
        why = ("ZeRO-3 partitions every tensor in the engine's precision" if engine == "fp32"
               else "a bf16/fp16 DeepSpeed engine casts every parameter, frozen ones too")
        problems.append(
            Problem(
                key,
                f"{key}={value} with {ENGINE_KEY}={engine} (engine.zero_stage={cfg.engine.zero_stage}): "
                f"{why}, so the frozen {name} would run in {engine}. Set {key}={engine} (or auto), "
                f"or {ENGINE_KEY}=fp32 with engine.zero_stage<=2 to keep it in {value}",
            )
        )
    return problems


def resolve_precision(cfg: RunConfig, device: Any = "cpu") -> tuple[Any, list[tuple[str, Resolved]]]:
    """(a copy of ``cfg`` with concrete dtypes for ``device``, [(key, Resolved)] for the start-up table).

    Keys: ``engine.precision`` first, then ``model.{vision,llm|text}.dtype`` of
    the parts the stage builds; an unused part's ``auto`` becomes its hardware
    dtype too, so the written config holds no ``auto``. Errors (bf16 on a GPU
    without bf16, a frozen part DeepSpeed would override) are one ConfigError.
    """
    problems: list[Problem] = []

    def resolve(fn: Any, value: str, key: str) -> Resolved:
        try:
            return fn(value, device, key)
        except ConfigError as exc:
            problems.extend(exc.problems)
            return Resolved(str(value), "unresolved")

    frozen = set(frozen_parts(cfg))
    parts = {name: resolve(resolve_dtype, getattr(cfg.model, name).dtype, key) for name, key in PART_KEYS.items()}
    engine = resolve(resolve_engine_precision, cfg.engine.precision, ENGINE_KEY)
    zero3 = str(cfg.engine.zero_stage) == "3"
    if str(cfg.engine.precision) == "auto" and zero3 and engine.dtype == "fp32":
        # ZeRO-3 holds every tensor in the engine's precision: take the hardware dtype of the frozen part that
        # carries the stage's FLOPs (the LLM in stage 2).
        heavy = cfg.stage.heavy_part
        auto_frozen = [n for n in frozen if str(getattr(cfg.model, n).dtype) == "auto"]
        if auto_frozen and parts[heavy].dtype != "fp32" and (heavy in auto_frozen):
            engine = resolve_engine_precision(parts[heavy].dtype, device, ENGINE_KEY)
            engine = dataclasses.replace(
                engine,
                reason=f"ZeRO-3 partitions every tensor in the engine's precision, "
                f"so the engine takes the frozen {heavy}'s: {parts[heavy].reason}",
                warning=None,
            )
    for name in PART_KEYS:
        if (
            str(getattr(cfg.model, name).dtype) == "auto"
            and name in frozen
            and _engine_decides(cfg.engine.zero_stage, engine.dtype)
        ):
            if parts[name].dtype != engine.dtype:
                parts[name] = Resolved(
                    engine.dtype,
                    f"follows {ENGINE_KEY}={engine.dtype}: DeepSpeed holds frozen weights in "
                    f"the engine's precision here ({parts[name].dtype} on its own: {parts[name].reason})",
                )
    out = copy.deepcopy(cfg)
    out.engine = dataclasses.replace(out.engine, precision=engine.dtype)
    model = out.model
    for name in PART_KEYS:
        setattr(model, name, dataclasses.replace(getattr(model, name), dtype=parts[name].dtype))
    if not problems:
        problems.extend(check_precision(out))
    if problems:
        raise ConfigError(problems)
    return out, [(ENGINE_KEY, engine)] + [(PART_KEYS[n], parts[n]) for n in cfg.stage.parts]


def concrete(cfg: RunConfig, device: Any = None) -> Any:
    """``cfg`` itself when it names no ``auto`` dtype, else :func:`resolve_precision`'s copy for ``device``
    (default: the GPU when there is one). For builders that can be reached without the trainer's start-up
    (``build_engine``, ``build_run_model``: benchmarks, tests, notebooks); the commands resolve and print first."""
    if all(str(_get(cfg, key)) != "auto" for key in (ENGINE_KEY, *PART_KEYS.values())):
        return cfg
    if device is None:
        device = default_device()
    return resolve_precision(cfg, device)[0]


def precision_lines(resolved: list[tuple[str, Resolved]], requested: Any = None) -> list[str]:
    """One line per key, ``model.llm.dtype = fp32 (auto): this CPU has no native bf16 (...)``, then the warnings."""
    lines = []
    for key, r in resolved:
        asked = ""
        if requested is not None:
            value = _get(requested, key)
            asked = f" ({value})" if str(value) != r.dtype else ""
        lines.append(f"{key} = {r.dtype}{asked}: {r.reason}")
    lines += [f"warning: {r.warning}" for _, r in resolved if r.warning]
    return lines


def _get(cfg: RunConfig, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
