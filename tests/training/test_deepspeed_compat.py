"""The private DeepSpeed, torch and transformers internals mmdist.training.deepspeed_compat relies on are still there,
with the shape it expects, on the installed versions; its patches are undone; and no other module touches them.

A new DeepSpeed (or torch) that renames or reshapes one of them fails here, naming it, instead of somewhere in a
resume on another world size or a ZeRO-3 build.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmdist.training import deepspeed_compat as compat

REPO = Path(__file__).resolve().parents[2]
COMPAT = REPO / "mmdist" / "training" / "deepspeed_compat.py"



@pytest.fixture(scope="module", autouse=True)
def _cpu_accelerator():
    """DeepSpeed's CPU accelerator for this module's tests only (set at import, it would leak into every test
    collected with this file, the GPU tier's too)."""
    with pytest.MonkeyPatch.context() as patch:
        if "DS_ACCELERATOR" not in os.environ:
            patch.setenv("DS_ACCELERATOR", "cpu")
        yield


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _assigns(cls, attribute: str) -> bool:
    """Whether ``cls``'s source assigns ``<something>.attribute`` (an attribute set on instances or parameters)."""
    return re.search(rf"\.{re.escape(attribute)}\s*=(?!=)", inspect.getsource(cls)) is not None


# ---------------------------------------------------------------------------
# every internal, on the installed versions


def test_zero_init_internals():
    from deepspeed.runtime.zero import partition_parameters as pp

    assert hasattr(pp, "top_level_context"), "partition_parameters.top_level_context (the active zero.Init) is gone"
    assert _params(pp.shutdown_init_context) == [] and _params(pp.restore_init_context) == []
    cls = pp.InsertPostInitMethodToModuleSubClasses
    source = inspect.getsource(cls._enable_mem_efficient_linear)
    assert "linear_bk = torch.nn.functional.linear" in source, "zero.Init no longer keeps F.linear in linear_bk"
    assert "torch.nn.functional.linear = " in source  # it still replaces F.linear (what restore_torch_linear undoes)


def test_transformers_zero3_switch():
    from transformers.integrations import deepspeed as hf_deepspeed

    assert hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"), "transformers renamed its HfDeepSpeedConfig weakref"
    assert _params(hf_deepspeed.set_hf_deepspeed_config) == ["hf_deepspeed_config_obj"]
    assert _params(hf_deepspeed.unset_hf_deepspeed_config) == []
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert isinstance(GradientCheckpointingLayer, type) and issubclass(GradientCheckpointingLayer, torch.nn.Module)


def test_engine_internals():
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "ds_optim_param" in inspect.getsource(DeepSpeedEngine._broadcast_model), (
        "DeepSpeed's broadcast no longer skips parameters flagged ds_optim_param: "
        "zero_dim_parameters_broadcast_by_us needs another way to keep 0-dim parameters out")
    assert "exclude_frozen_parameters" in _params(DeepSpeedEngine.module_state_dict)
    assert "exclude_frozen_parameters" in _params(DeepSpeedEngine.save_checkpoint)


def test_zero3_optimizer_internals():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    assert _params(Stage3._get_fp32_opt_state_partition) == ["self", "param", "release_swap_buffers", "optim_state_key"]
    assert _params(Stage3._get_param_partition_rank) == ["self", "param"]
    assert re.search(r"\._z3_optimizer\s*=\s*self\b", inspect.getsource(Stage3)), "params lost their _z3_optimizer link"
    for attribute in ("fp32_partitioned_groups_flat", "fp16_groups", "averaged_gradients",
                      "grad_partitions_flat_buffer"):
        assert _assigns(Stage3, attribute), f"ZeRO-3's optimizer no longer sets {attribute}"


def test_zero12_and_bf16_optimizer_internals():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import mixed_precision_linkage
    from deepspeed.utils.tensor_fragment import tensor_fragment

    for attribute in ("single_partition_of_fp32_groups", "bit16_groups", "averaged_gradients"):
        assert _assigns(DeepSpeedZeroOptimizer, attribute), f"ZeRO-1/2's optimizer no longer sets {attribute}"
    for attribute in ("fp32_groups_flat_partition", "bf16_groups"):
        assert _assigns(BF16_Optimizer, attribute), f"the bf16 optimizer no longer sets {attribute}"
    assert "lp_param._hp_mapping = " in inspect.getsource(mixed_precision_linkage)
    assert _params(tensor_fragment.set_optim_state_fragment) == ["self", "flat_hp_partition", "optim_fragment"]


def test_fp16_optimizer_internals():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    assert _assigns(FP16_Optimizer, "fp32_groups_flat") and _assigns(FP16_Optimizer, "fp16_groups")
    assert _assigns(FP16_UnfusedOptimizer, "fp32_groups") and _assigns(FP16_UnfusedOptimizer, "fp16_groups")


def test_every_named_optimizer_tensor_is_set_by_some_deepspeed_optimizer():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    classes = (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer, FP16_Optimizer,
               FP16_UnfusedOptimizer)
    for kind, names in compat.ZERO_OPTIMIZER_TENSORS.items():
        for name in names:
            assert any(_assigns(cls, name) for cls in classes), f"no DeepSpeed optimizer sets {name} ({kind}) any more"


def test_coordinator_hooks():
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    source = inspect.getsource(Coordinator)  # both are wrapped by DeepSpeed's own decorators: read the definitions
    assert callable(vars(Coordinator).get("fetch_sub_module")) and callable(vars(Coordinator).get("release_sub_module"))
    assert re.search(r"def fetch_sub_module\(self, current_submodule: Module, forward: bool\)", source)
    assert re.search(r"def release_sub_module\(self, submodule: Module, forward=False\)", source)


def test_lambda_lr_keeps_last_lr_and_lr_lambdas():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    optimizer.step()
    scheduler.step()
    assert "_last_lr" in scheduler.state_dict() and len(scheduler.lr_lambdas) == 1
    scheduler._last_lr = [0.125]
    assert scheduler.get_last_lr() == [0.125]  # get_last_lr reads _last_lr


def test_dynamo_is_importable():
    compat.import_before_zero_init()
    assert "torch._dynamo" in sys.modules


# ---------------------------------------------------------------------------
# patches are undone


def test_coordinator_timing_is_put_back_also_after_an_error():
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    originals = {n: vars(Coordinator)[n] for n in ("fetch_sub_module", "release_sub_module")}
    seconds: list[float] = []
    with pytest.raises(RuntimeError, match="inside"):
        with compat.timed_zero3_fetch_release(seconds.append):
            assert vars(Coordinator)["fetch_sub_module"] is not originals["fetch_sub_module"]
            with pytest.raises(AttributeError):  # the original runs (and fails on a bare object): still timed
                Coordinator.release_sub_module(object(), torch.nn.Linear(1, 1))
            raise RuntimeError("inside")
    assert len(seconds) == 1 and seconds[0] >= 0.0
    assert {n: vars(Coordinator)[n] for n in originals} == originals


def test_zero_dim_flag_is_removed_also_when_initialize_fails():
    model = torch.nn.Module()
    model.scale = torch.nn.Parameter(torch.tensor(2.0))
    model.weight = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError):
        with compat.zero_dim_parameters_broadcast_by_us(model, world_size=1) as handled:
            assert handled == [model.scale] and hasattr(model.scale, "ds_optim_param")
            assert not hasattr(model.weight, "ds_optim_param")
            raise ValueError("initialize failed")
    assert not hasattr(model.scale, "ds_optim_param")


def test_frozen_gradient_checkpointing_is_undone():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    llm = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 6))
    before = llm(input_ids=ids).logits
    assert compat.enable_frozen_gradient_checkpointing(llm) == 2
    assert compat.enable_frozen_gradient_checkpointing(llm) == 0  # already wrapped
    assert all("forward" in vars(layer) for layer in llm.model.layers)
    assert compat.disable_frozen_gradient_checkpointing(llm) == 2
    assert all("forward" not in vars(layer) for layer in llm.model.layers)  # the class's forward again
    assert torch.equal(llm(input_ids=ids).logits, before)


def test_scheduler_state_for_new_groups_keeps_the_step_and_this_runs_base_lrs():
    def lambda_lr(groups: int) -> torch.optim.lr_scheduler.LambdaLR:
        params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1 * (i + 1)} for i in range(groups)]
        return torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(params), lambda step: 1.0 / (1 + step))

    saved = lambda_lr(2)
    for _ in range(3):
        saved.optimizer.step()
        saved.step()
    fresh = lambda_lr(1)
    compat.load_scheduler_state_for_new_groups(fresh, saved.state_dict())
    assert fresh.last_epoch == 3 and fresh.base_lrs == [0.1]
    assert fresh.get_last_lr() == pytest.approx([0.1 / 4])


# ---------------------------------------------------------------------------
# one door


def test_private_internals_appear_only_in_the_compat_module():
    """`grep -rn "_z3_optimizer|_hp_mapping|linear_bk|ds_optim_param|_last_lr" mmdist benchmarks` finds the compat
    module only; so do the other internals it wraps."""
    names = ["_z3_optimizer", "_hp_mapping", "linear_bk", "ds_optim_param", "_last_lr", "_hf_deepspeed_config_weak_ref",
             "shutdown_init_context", "restore_init_context", "top_level_context", "PartitionedParameterCoordinator",
             "_get_fp32_opt_state_partition", "_get_param_partition_rank", "import torch._dynamo",
             "set_optim_state_fragment", "module_state_dict", "InsertPostInitMethodToModuleSubClasses"]
    names += [name for group in compat.ZERO_OPTIMIZER_TENSORS.values() for name in group]
    pattern = re.compile("|".join(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])" for n in names))
    found = []
    for root in ("mmdist", "benchmarks"):
        for path in sorted((REPO / root).rglob("*")):
            if path.suffix not in (".py", ".sh") or path == COMPAT:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    # a module docstring may name an attribute it explains (memory_per_rank's header): code may not
    found = [f for f in found if not _in_docstring(f)]
    assert not found, "private internals outside mmdist/training/deepspeed_compat.py:\n" + "\n".join(found)


def _in_docstring(hit: str) -> bool:
    path, number, _ = hit.split(":", 2)
    lines = (REPO / path).read_text().splitlines()[: int(number)]
    return sum(line.count('"""') for line in lines[:-1]) % 2 == 1


# ---------------------------------------------------------------------------
# the same internals on live engines (one process, world size 1)

PROBE = textwrap.dedent("""
    import json, sys, torch
    import torch.nn.functional as F
    ORIGINAL_LINEAR = F.linear
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from mmdist import distributed as dist
    from mmdist.training import deepspeed_compat as compat

    dist.init(dist.discover(argv=[], environ={}), backend="gloo", timeout_s=60)
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    out = {}

    def build(stage):
        config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        torch.manual_seed(0)
        if stage == 3:
            with compat.zero3_init(config):
                model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        else:
            model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        model[0].weight.requires_grad_(False)  # a frozen part
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=0.1), config=config)
        loss = engine(torch.ones(1, 4)).sum()
        engine.backward(loss)
        engine.step()
        return engine

    engine = build(2)
    weight = engine.module[1].weight
    out["zero2_fragment"] = compat.fragment_mapped(weight) and weight._hp_mapping is not None
    out["zero2_fp32"] = len(compat.zero_optimizer_tensors(engine.optimizer, "fp32_partitions")) == 1
    compat.link_optimizer_fragments(engine)
    out["zero2_moment"] = safe_get_full_optimizer_state(weight, "exp_avg") is not None

    engine = build(3)
    out["zero3_linear_replaced"] = F.linear is not ORIGINAL_LINEAR
    weight = engine.module[1].weight
    out["zero3_links"] = hasattr(weight, "_z3_optimizer") and weight.ds_tensor.ds_numel >= 1
    out["zero3_flat"] = len(compat.zero3_flat_fp32_partitions(engine)) >= 1
    value = torch.arange(3.0).reshape(1, 3)
    compat.set_zero3_partition(weight, value)
    compat.set_zero3_partition(weight, value * 2, "exp_avg")
    out["zero3_master"] = safe_get_full_fp32_param(weight).tolist() == value.tolist()
    out["zero3_moment"] = safe_get_full_optimizer_state(weight, "exp_avg").tolist() == (value * 2).tolist()
    out["restored"] = compat.restore_torch_linear() and F.linear is ORIGINAL_LINEAR
    dist.shutdown()
    print("PROBE" + json.dumps(out))
""")


@pytest.mark.slow
def test_internals_on_live_zero2_and_zero3_engines(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("PROBE")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    found = json.loads(lines[-1][len("PROBE"):])
    expected = ("zero2_fragment", "zero2_fp32", "zero2_moment", "zero3_linear_replaced", "zero3_links", "zero3_flat",
                "zero3_master", "zero3_moment", "restored")
    assert found == dict.fromkeys(expected, True), found


def test_zero3_coordinator_still_caches_by_module():
    """clear_zero3_caches finds ZeRO-3's lru_cache methods (a DeepSpeed that drops or renames them makes this fail:
    then check whether anything else now holds the last model; test_a_finished_run_frees_its_model tells)."""
    import deepspeed.runtime.zero.partitioned_param_coordinator  # noqa: F401

    assert compat.clear_zero3_caches() >= 1
