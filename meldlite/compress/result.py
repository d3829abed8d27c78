"""What `quantize_model` returns, for uniform and mixed files alike."""

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class QuantizeResult:
    path: Path
    nbytes: int  # size of the written file
    tensor_types: dict  # type name -> number of tensors
    expert_types: dict = field(default_factory=dict)  # (gate, up, down) names -> experts (mixed)
    budget: int = None  # the size budget in bytes (mixed)
