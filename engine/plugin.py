"""vLLM `general_plugins` entry point: runs in every vLLM process, possibly more than once.

Only the standard library is imported at module level: vLLM merely logs a plugin whose import
fails and carries on unsteered, while an exception raised by `register()` stops start-up. So
every real import happens inside `register()`, where a failure is loud.
"""


def register() -> None:
    from vllm import ModelRegistry

    from steer_batch.engine import hooks
    from steer_batch.engine.frontend import SUPPORTED_ARCHITECTURES

    for arch, cls in SUPPORTED_ARCHITECTURES.items():
        # A lazy "module:Class" reference: the model module is imported where the model is built.
        # Registering again (the plugin runs more than once) just replaces the same entry.
        ModelRegistry.register_model(arch, f"steer_batch.engine.model:{cls}")
    hooks.install()
