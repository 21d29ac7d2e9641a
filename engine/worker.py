"""Mixed into vLLM's worker class through its `worker_extension_cls` seam (driver/launch.py sets
it); called from the front end with `llm.collective_rpc("steer_batch_...")`.

Importing this module registers the plugin in the worker's process, so a worker started with
this extension steers even where vLLM did not load the plugin there (Ray actors on nodes whose
plugin list differs), and a node without steer-batch installed fails loudly at start-up (vLLM
cannot import the extension) instead of running unsteered."""

import hashlib

import numpy as np

from steer_batch.engine import hooks
from steer_batch.engine.plugin import register
from steer_batch.errors import SteerBatchError
from steer_batch.vectors.vector import SteeringVector

register()


class SteeringWorkerExtension:
    def _steering(self):
        return getattr(hooks.runner_model(hooks.worker_runner(self)), "steering", None)

    def steer_batch_layout(self) -> dict:
        """Where this worker steers: {"added": layers that add after themselves, "folded":
        layers whose add runs inside the next RMSNorm, "captured": captured layers, "stage":
        [first, end) layers of its pipeline stage}; {} where steering is not installed (a
        pipeline stage without steered layers still answers with its stage)."""
        state = self._steering()
        return dict(state.layout) if state is not None else {}

    def steer_batch_add_vector(self, name: str, path: str, data: bytes, sha256: str, row: int) -> None:
        """Load the vector the front end validated (driver/runtime.py), from the file's bytes it
        read (`path` only names it), into the free bank row `row`."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SteerBatchError(f"steering vector {name!r}: the bytes sent for {path} do not match their sha256")
        hf = hooks.worker_runner(self).vllm_config.model_config.hf_text_config
        vector = SteeringVector.for_model(name, data, path, hf.hidden_size, hf.num_hidden_layers)
        self._steering().bank.add(row, name, path, sha256, vector)

    def steer_batch_remove_vector(self, name: str, row: int) -> dict:
        """Clear bank row `row`, holding `name`: the engine core let this call through because no
        request holds the row (engine/bank.py `in_use`, engine/hooks.py)."""
        self._steering().bank.remove(row, name)
        return {"in_use": []}

    def steer_batch_take_captures(self) -> dict:
        """{"ids": request ids, "layers": the captured layers of this worker's pipeline stage,
        "shape": [requests, layers, hidden], "data": float32 bytes}: raw
        bytes, because vLLM's RPC serializer passes tensors and arrays on in a form that is not
        decoded at the other end."""
        filler = hooks.keep(hooks.worker_runner(self), "filler")
        if not filler:
            return {"ids": [], "layers": [], "shape": [0], "data": b""}
        filler.flush_captures()
        filler.collect_captures(wait=True)
        taken, filler.captured = filler.captured, {}
        rows = np.stack([t.numpy() for t in taken.values()]) if taken else np.zeros(0, np.float32)
        layers = list(filler.state.capture_layers)  # this pipeline stage's captured layers
        return {
            "ids": list(taken),
            "layers": layers,
            "shape": list(rows.shape),
            "data": rows.astype(np.float32).tobytes(),
        }
