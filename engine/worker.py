"""Mixed into vLLM's worker class through its `worker_extension_cls` seam (engine/launch.py sets
it); called from the front end with `llm.collective_rpc("steer_batch_...")`."""

import numpy as np


class SteeringWorkerExtension:
    def steer_batch_layout(self) -> dict:
        """Where this worker steers: {"added": layers that add after themselves, "folded":
        layers whose add runs inside the next RMSNorm, "captured": captured layers}."""
        state = getattr(self.model_runner.get_model(), "steering", None)
        return dict(state.layout) if state is not None else {}

    def steer_batch_take_captures(self) -> dict:
        """{"ids": request ids, "shape": [requests, layers, hidden], "data": float32 bytes}: raw
        bytes, because vLLM's RPC serializer passes tensors and arrays on in a form that is not
        decoded at the other end."""
        filler = getattr(self.model_runner, "_steer_batch_filler", None)
        if not filler:
            return {"ids": [], "shape": [0], "data": b""}
        filler.flush_captures()
        taken, filler.captured = filler.captured, {}
        rows = np.stack([t.numpy() for t in taken.values()]) if taken else np.zeros(0, np.float32)
        return {"ids": list(taken), "shape": list(rows.shape), "data": rows.astype(np.float32).tobytes()}
