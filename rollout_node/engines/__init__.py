"""Inference engines behind one interface (`base.Engine`): the built-in `torch_engine.TorchEngine` and HTTP clients.

Importing this package stays torch-free; import `rollout_node.engines.torch_engine` for the TorchEngine itself.
"""

from rollout_node.engines.base import (
    Engine,
    FinishReason,
    Sample,
    TorchEngineConfig,
    VersionRange,
    WeightUpdate,
    check_request,
)

__all__ = ["Engine", "FinishReason", "Sample", "TorchEngineConfig", "VersionRange", "WeightUpdate", "check_request"]
