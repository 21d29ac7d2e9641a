"""Engine configs built as vLLM builds them on a CUDA machine, emulated on this CPU (no engine
starts): Triton present, so vLLM's own choice is Model Runner V2, and a platform that leaves
async scheduling and dual-batch overlap as asked (vLLM's CPU platform turns both off). A steering
engine gets the V1 runner from the start, every engine without steering keeps vLLM's choice, the
process environment is left alone, and the modes the steering buffers do not follow are refused
naming their setting. What only a GPU proves is listed in docs/gpu.md."""

import os
import types

import pytest

from helpers import make_model, make_vector
from steer_batch.errors import SteerBatchError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-config")
    model_dir = make_model("llama", folder / "model")
    make_vector(model_dir, [1, 2], seed=1).save(folder / "v.safetensors")
    return model_dir, folder / "v.safetensors"


@pytest.fixture
def cuda_like(monkeypatch):
    """vLLM's config decisions as on a CUDA machine with Triton."""
    import vllm.config.vllm as vllm_config_module
    from vllm.platforms import current_platform

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    platform = type(current_platform)
    cpu_update = platform.check_and_update_config

    def check_and_update_config(cls, vllm_config):
        asked = vllm_config.scheduler_config.async_scheduling, vllm_config.parallel_config.enable_dbo
        cpu_update.__func__(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling, vllm_config.parallel_config.enable_dbo = asked

    monkeypatch.setattr(platform, "check_and_update_config", classmethod(check_and_update_config))


def build(model, steer: bool, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    model_dir, vector = model
    extra = {"additional_config": {"steering": {"vectors": {"v": str(vector)}}}} if steer else {}
    return EngineArgs(
        model=str(model_dir), skip_tokenizer_init=True, dtype="float32", **extra, **kwargs
    ).create_engine_config()


def test_steering_engines_get_v1_and_stock_engines_keep_vllms_choice(model, cuda_like):
    assert build(model, steer=False).use_v2_model_runner, "the emulation must make vLLM choose V2, as on CUDA"
    assert not build(model, steer=True).use_v2_model_runner
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ, "the process environment must stay as it was"
    assert build(model, steer=False).use_v2_model_runner, "a later stock engine (bench's baseline) stays stock"


def test_async_scheduling_under_pipeline_parallelism_follows_the_v1_runner(model, cuda_like):
    pp = dict(pipeline_parallel_size=2, distributed_executor_backend="mp")
    stock = build(model, steer=False, **pp)
    assert stock.use_v2_model_runner and stock.scheduler_config.async_scheduling  # V2 keeps async under PP
    steered = build(model, steer=True, **pp)
    assert not steered.use_v2_model_runner and not steered.scheduler_config.async_scheduling  # vLLM's V1 rule
    # Asked for explicitly, vLLM's V1 validation refuses it, as it does for a stock V1 engine.
    with pytest.raises(ValueError, match=r"V1 does not support: pipeline parallelism with async scheduling"):
        build(model, steer=True, async_scheduling=True, **pp)
    # And the check of the finished config names the fix should a config ever reach it that way.
    from steer_batch.engine.frontend import check_engine_modes

    steered.scheduler_config.async_scheduling = True
    with pytest.raises(SteerBatchError, match=r"async scheduling with pipeline parallelism.*--no-async-scheduling"):
        check_engine_modes(steered)
    single = build(model, steer=True)
    assert single.scheduler_config.async_scheduling, "async scheduling stays on without pipeline parallelism"


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        (dict(enable_dbo=True, all2all_backend="deepep_low_latency"), r"micro-batching \(enable_dbo / ubatch_size"),
        (dict(ubatch_size=2, all2all_backend="deepep_low_latency"), r"micro-batching \(enable_dbo / ubatch_size"),
        (
            dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}),
            r"speculative decoding \(speculative_config",
        ),
        (dict(data_parallel_size=2), r"data parallelism \(data_parallel_size > 1.*--ray --replicas"),
    ],
)
def test_modes_the_buffers_do_not_follow_are_refused_naming_the_setting(model, cuda_like, kwargs, setting):
    with pytest.raises(SteerBatchError, match=rf"steering cannot run with {setting}"):
        build(model, steer=True, **kwargs)
    build(model, steer=False, **kwargs)  # stock vLLM keeps them


def test_v2_only_features_and_an_explicit_v2_are_refused_by_name(model, cuda_like, monkeypatch):
    from steer_batch.engine.frontend import check_engine_modes

    config = build(model, steer=True)
    config.watermark_config = object()  # vLLM's property then forces V2, whatever the environment says
    with pytest.raises(SteerBatchError, match=r"watermarking \(watermark_config\) runs only on vLLM's Model Runner V2"):
        check_engine_modes(config)
    config.watermark_config = None
    config.attention_config.hisparse_config = object()
    with pytest.raises(SteerBatchError, match=r"HiSparse attention \(attention_config.hisparse_config\) runs only on"):
        check_engine_modes(config)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(SteerBatchError, match=r"VLLM_USE_V2_MODEL_RUNNER=1 asks for vLLM's Model Runner V2"):
        build(model, steer=True)
    assert build(model, steer=False).use_v2_model_runner
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert not build(model, steer=True).use_v2_model_runner


def test_the_gpu_kv_block_zeroer_is_built_when_the_kv_cache_is(model):
    """The worker hook builds the GPU runner's zeroer at KV-cache allocation (vLLM's kernel
    warm-up then compiles it), on a runner that reports a CUDA device; CPU and stock runners are
    left alone."""
    import torch

    from steer_batch.engine.runner import build_kv_zeroer

    class Runner:
        def __init__(self, device, steer):
            self.device = torch.device(device)
            self.vllm_config = types.SimpleNamespace(additional_config={"steering": {}} if steer else {})
            self.built = 0

        def _init_kv_zero_meta(self):
            self.built += 1
            self._kv_block_zeroer = object()

    runners = {(d, s): Runner(d, s) for d in ("cuda", "cpu") for s in (True, False)}
    for runner in runners.values():
        build_kv_zeroer(runner)
        build_kv_zeroer(runner)  # once only
    assert {key: r.built for key, r in runners.items()} == {
        ("cuda", True): 1,
        ("cuda", False): 0,
        ("cpu", True): 0,
        ("cpu", False): 0,
    }
