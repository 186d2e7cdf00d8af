"""The dtype the config names is the dtype that runs: `auto` resolution (mmdist.precision) and the actual dtype of
every part after DeepSpeed has built the engine, for ZeRO 0/2/3 and fp32/bf16 engines (one process, gloo).

DeepSpeed holds parameters in its own precision: a bf16 engine casts every one (frozen ones too), ZeRO-3 partitions
every tensor in the engine's precision. The resolved config must say what the engine then holds, and a frozen part
whose explicit dtype DeepSpeed would override is refused, naming both keys.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers.configs import RECIPES, TEST_OVERRIDES

from mmdist.config.run import ConfigError, load_config
from mmdist.precision import resolve_precision

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def recipe(stage: str, *overrides: str):
    """The tiny recipe as shipped (dtypes `auto`), with the tests' usual overrides."""
    return load_config(RECIPES / f"tiny_{stage}.yaml", [*TEST_OVERRIDES, *overrides])


@pytest.fixture
def process_group():
    """One-rank gloo group per engine: EngineBundle.close() destroys it through DeepSpeed."""
    from mmdist import distributed as dist

    env = dist.init(dist.discover(argv=[], environ={}), backend="gloo", timeout_s=60)
    yield env
    dist.shutdown()


def held_dtypes(module) -> set:
    """The dtypes the module's weights are stored in (ZeRO-3: the rank's partition, not the empty parameter)."""
    return {getattr(p, "ds_tensor", p).dtype for p in module.parameters()} | {p.dtype for p in module.parameters()}


PARTS = {"fuse": ("vision", "llm", "stage1", "projector"), "align": ("vision", "text", "stage1")}


@pytest.mark.parametrize("stage", ["fuse", "align"])
@pytest.mark.parametrize("zero", [0, 2, 3])
@pytest.mark.parametrize("engine", ["fp32", "bf16"])
def test_every_part_runs_in_the_resolved_dtype(process_group, tmp_path, stage, zero, engine):
    from mmdist.training.engine import build_engine

    cfg, resolved = resolve_precision(recipe(stage, f"engine.zero_stage={zero}", f"engine.precision={engine}",
                                             f"run_dir={tmp_path}"), "cpu")
    assert dict(resolved)["engine.precision"].dtype == engine
    bundle = build_engine(cfg, world_size=1)
    try:
        model = bundle.model
        for name in PARTS[stage]:
            module = getattr(model, name, None)
            if module is None:
                continue
            trainable = any(p.requires_grad for p in module.parameters())
            # frozen: the configured dtype; trainable: the engine's compute copy (fp32 masters live in the optimizer)
            expected = engine if trainable else getattr(cfg.model, name).dtype
            assert held_dtypes(module) == {TORCH[expected]}, (name, zero, engine)
    finally:
        bundle.close()


def test_frozen_part_keeps_its_own_dtype_under_an_fp32_engine_at_zero2(process_group, tmp_path):
    from mmdist.training.engine import build_engine

    cfg, _ = resolve_precision(recipe("fuse", "engine.zero_stage=2", "engine.precision=fp32", "model.llm.dtype=bf16",
                                      f"run_dir={tmp_path}"), "cpu")
    bundle = build_engine(cfg, world_size=1)
    try:
        assert held_dtypes(bundle.model.llm) == {torch.bfloat16}
        assert held_dtypes(bundle.model.projector) == {torch.float32}
        assert held_dtypes(bundle.model.vision) == {torch.float32}  # auto on a CPU without native bf16
    finally:
        bundle.close()


@pytest.mark.parametrize(
    "overrides,key,other",
    [
        (
            ("engine.zero_stage=3", "engine.precision=fp32", "model.llm.dtype=bf16"),
            "model.llm.dtype",
            "engine.precision=fp32",
        ),
        (
            ("engine.zero_stage=2", "engine.precision=bf16", "model.llm.dtype=fp32"),
            "model.llm.dtype",
            "engine.precision=bf16",
        ),
        (
            ("engine.zero_stage=0", "engine.precision=bf16", "model.vision.dtype=fp32"),
            "model.vision.dtype",
            "engine.precision=bf16",
        ),
    ],
)
def test_contradictory_frozen_dtype_is_refused_naming_both_keys(overrides, key, other):
    with pytest.raises(ConfigError) as err:
        resolve_precision(recipe("fuse", *overrides), "cpu")
    assert key in str(err.value) and other in str(err.value)


def test_trainable_text_encoder_dtype_is_not_a_contradiction():
    cfg, _ = resolve_precision(
        recipe(
            "align",
            "engine.precision=bf16",
            "model.connector.type=qformer",
            "model.text.freeze=false",
            "model.text.dtype=fp32",
            "model.connector.qformer.num_queries=4",
        ),
        "cpu",
    )
    assert cfg.engine.precision == "bf16" and cfg.model.text.dtype == "fp32"


@pytest.mark.parametrize("native,expected", [("0", "fp32"), ("1", "bf16")])
def test_tiny_fuse_recipe_resolves_auto_from_the_cpu(monkeypatch, native, expected):
    """MMDIST_CPU_BF16 switches the branch on any machine; the
    shipped tiny fuse recipe (ZeRO-3) is `auto` throughout."""
    monkeypatch.setenv("MMDIST_CPU_BF16", native)
    raw = load_config(RECIPES / "tiny_fuse.yaml")
    assert raw.engine.precision == raw.model.llm.dtype == raw.model.vision.dtype == "auto"
    cfg, resolved = resolve_precision(raw, "cpu")
    # ZeRO-3 holds every tensor in the engine's precision: the engine follows the frozen LLM's hardware dtype
    assert (cfg.engine.precision, cfg.model.llm.dtype, cfg.model.vision.dtype, cfg.model.text.dtype) == (expected,) * 4
    reasons = dict(resolved)
    assert "MMDIST_CPU_BF16" in reasons["model.llm.dtype"].reason
    assert set(reasons) == {"engine.precision", "model.llm.dtype", "model.vision.dtype"}


@pytest.mark.parametrize("native,expected", [("0", "fp32"), ("1", "bf16")])
def test_run_config_yaml_holds_the_concrete_dtypes(monkeypatch, tmp_path, native, expected):
    """A training run writes the resolved dtypes (and why, as comments) into its config.yaml and the start-up log."""

    from mmdist.training.run_setup import write_run_dir

    monkeypatch.setenv("MMDIST_CPU_BF16", native)
    cfg, resolved = resolve_precision(recipe("fuse", "engine.zero_stage=3", f"run_dir={tmp_path}"), "cpu")
    write_run_dir(cfg, 0, resolved)
    text = (tmp_path / "config.yaml").read_text()
    written = yaml.safe_load(text)
    assert written["model"]["llm"]["dtype"] == written["engine"]["precision"] == expected
    assert "auto" not in (written["model"]["vision"]["dtype"], written["model"]["text"]["dtype"])
    assert f"# model.llm.dtype = {expected}" in text and "MMDIST_CPU_BF16" in text
    reloaded = load_config(tmp_path / "config.yaml")
    assert reloaded.model.llm.dtype == expected


def test_qformer_stage1_step_computes_in_bf16_on_fp32_master_weights(process_group, tmp_path):
    """The Q-Former demo's stage 1 on a bf16 engine (what `mmdist demo --connector qformer` asks for on a CPU with
    native bf16): the Q-Former and the trained text encoder compute in bf16, the optimizer steps fp32 masters, the
    loss is finite, and the FLOPs the bar divides by the bf16 peak are the trainable side's."""
    from helpers.tiny import align_batch

    from mmdist.training.deepspeed_compat import base_optimizer
    from mmdist.training.engine import build_engine
    from mmdist.training.step import TrainState, train_step

    overrides = ["engine.zero_stage=2", "engine.precision=bf16", "model.connector.type=qformer",
                 "model.text.freeze=false", "train.global_batch_size=4", "train.micro_batch_size=4",
                 "train.warmup_ratio=0"]  # the first step's lr is not 0
    cfg, _ = resolve_precision(recipe("align", *overrides, f"run_dir={tmp_path}"), "cpu")
    bundle = build_engine(cfg, world_size=1)
    try:
        model = bundle.model
        assert held_dtypes(model.stage1) == held_dtypes(model.text) == {torch.bfloat16}
        masters = [p for group in base_optimizer(bundle.engine).param_groups for p in group["params"]]
        assert masters and {p.dtype for p in masters} == {torch.float32}
        before = [p.detach().clone() for p in masters]
        record = train_step(bundle.engine, iter([align_batch(model)]), TrainState(), max_nonfinite_steps=1)
        assert all(math.isfinite(float(record[k])) for k in ("loss", "itc", "itm", "itg"))
        assert all(not torch.equal(p, b) for p, b in zip(masters, before))
        # the masters keep what bf16 cannot hold: some updated value is not bf16-representable
        assert any(not torch.equal(p, p.to(torch.bfloat16).float()) for p in masters)
        flops = model.flop_count(vision_runs=False, text_runs=True)
        assert flops.dtypes() == ["bf16"]
        assert flops.by_dtype()["bf16"].rates() == flops.rates()
    finally:
        bundle.close()


@pytest.mark.parametrize("frozen_table", [False, True])
def test_qformer_tied_head_reads_the_token_table_under_zero3_as_under_zero0(tmp_path, frozen_table):
    """The Q-Former's tied LM head reads the text encoder's token table, which it does not own: under ZeRO-3 the
    table is a partition outside the encoder's forward, so the engine registers it with the Q-Former at build
    (DeepSpeed would also register it on the first read through the module's attribute inside a forward; the engine
    does not rely on how the model reads it). Two steps under ZeRO-3 give ZeRO-0's losses."""
    from helpers.tiny import align_batch

    from mmdist import distributed as dist
    from mmdist.training.engine import build_engine
    from mmdist.training.step import TrainState, train_step

    records = {}
    for zero in (0, 3):
        overrides = [f"engine.zero_stage={zero}", "engine.precision=fp32", "model.connector.type=qformer",
                     "model.text.freeze=false", f"model.text.freeze_word_embeddings={str(frozen_table).lower()}",
                     "train.global_batch_size=4", "train.micro_batch_size=4", "train.warmup_ratio=0",
                     # no parameter kept whole between forwards: the tiny table is below DeepSpeed's default 1e5
                     "engine.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
        cfg, _ = resolve_precision(recipe("align", *overrides, f"run_dir={tmp_path / str(zero)}"), "cpu")
        dist.init(dist.discover(argv=[], environ={}), backend="gloo", timeout_s=60)
        bundle = build_engine(cfg, world_size=1)
        try:
            model = bundle.model
            assert model.stage1.tied_lm_head and model.external_parameters()
            if zero == 3:  # partitioned: empty outside a forward that gathers it; registered before any forward
                table = model.text.word_embeddings().weight
                assert table.numel() == 0
                assert any(p is table for _, p in model.stage1.ds_external_parameters())
            batch = align_batch(model)
            state, out = TrainState(), []
            for _ in range(2):
                torch.manual_seed(0)  # the same hard negatives on both sides
                record = train_step(bundle.engine, iter([batch]), state, max_nonfinite_steps=1)
                out.append([float(record[k]) for k in ("loss", "itg")])
            records[zero] = out
        finally:
            bundle.close()
            dist.shutdown()
    assert sum(records[3], []) == pytest.approx(sum(records[0], []), rel=1e-4)
