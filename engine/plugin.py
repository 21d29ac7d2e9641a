"""vLLM `general_plugins` entry point: runs in every vLLM process, possibly more than once.

Only the standard library is imported at module level: vLLM merely logs a plugin whose import
fails and carries on unsteered, while an exception raised by `register()` stops start-up. So
every real import happens inside `register()`, where a failure is loud.
"""


def register() -> None:
    from steer_batch import quiet

    quiet.install_if_asked()  # steer-batch's commands: vLLM's advice for other setups left out

    from vllm import ModelRegistry

    from steer_batch.engine import bank, config, frontend, hooks, kv_blocks, runner

    for arch, cls in frontend.SUPPORTED_ARCHITECTURES.items():
        # A lazy "module:Class" reference: the model module is imported where the model is built.
        # Registering again (the plugin runs more than once) just replaces the same entry.
        ModelRegistry.register_model(arch, f"steer_batch.engine.model:{cls}")
    hooks.install(
        hooks.Handlers(
            prepare_engine_config=frontend.prepare_engine_config,
            choose_model_runner=frontend.choose_model_runner,
            check_request=frontend.check_request,
            admit=frontend.admit,
            hand_over=frontend.hand_over,
            fail_non_finite=frontend.fail_non_finite,
            in_use=bank.in_use,
            fill_step=runner.fill_step,
            steered_requests=runner.steered_requests,
            build_kv_zeroer=runner.build_kv_zeroer,
            steered_blocks=kv_blocks.SteeredBlocks,
            asks_steering=config.asks_steering,
        )
    )
