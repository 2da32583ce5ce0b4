"""The caps that output validation enforces, as one frozen, self-checking value.

Every number here bounds work or memory the broker spends on bytes an attacker chose (DESIGN
§1.4, §1.5). Loosening one is meant to be a visible one-line diff in configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from airlock_sandbox.formats import SAFETENSORS_MAX_HEADER_BYTES

#: protobuf refuses to serialise or parse a message of 2 GiB or more; an ONNX model that big
#: needs external data, which we never accept.
PROTOBUF_MAX_BYTES = 2**31 - 1
#: What a refusal of a too-large ONNX output tells the caller to do instead.
ONNX_TOO_LARGE_ADVICE = ("convert the weights to safetensors instead (--to safetensors; "
                         "target SAFETENSORS), which has no such limit")
#: A larger cap would let us accept a header that every consumer then refuses.
SAFETENSORS_REFERENCE_MAX_HEADER = SAFETENSORS_MAX_HEADER_BYTES

GiB = 1024**3
MiB = 1024**2
KiB = 1024


@dataclass(frozen=True)
class OutputLimits:
    """Caps for collecting and validating one sandbox output. Checked when built."""

    #: The output file as the sandbox left it, whatever its format (ONNX has its own, lower
    #: cap below). A safetensors file is validated from its header and streamed, never held,
    #: so this is not a memory bound: the binding one is the sandbox's output tmpfs
    #: (``SandboxPolicy.output_bytes``). 64 GiB: a checkpoint shard ten times the largest
    #: Hugging Face writes by default (5 GB).
    max_output_bytes: int = 64 * GiB
    #: The JSON header of a safetensors file (the reference parser allows 100 MB).
    max_safetensors_header_bytes: int = 16 * MiB
    max_tensors: int = 100_000
    #: Commas and colons in that header, an upper bound on the values parsing it builds
    #: (its cost, whatever its bytes). A tensor of rank r costs 7 + r: this admits the
    #: 100 000-tensor cap at rank 5, and no header of tiny keys costs more to parse than that.
    max_safetensors_header_values: int = 1_200_000
    max_tensor_name_len: int = 1024
    #: numpy's NPY_MAXDIMS. Without it one 16 MiB header can hold an 8-million-dim shape, which
    #: costs the reference parser ~270 MB to read back.
    max_tensor_rank: int = 64
    #: ``__metadata__`` over these caps is dropped from the canonical header, not trusted.
    max_metadata_entries: int = 1024
    max_metadata_value_len: int = 64 * KiB
    #: ONNX is parsed into memory (several copies at once), so its cap is far below the
    #: protobuf limit (2 GiB, beyond which no ONNX model without external data exists).
    max_onnx_bytes: int = 512 * MiB
    #: Nodes summed over the main graph, every subgraph, functions and training graphs.
    max_onnx_nodes: int = 1_000_000
    #: Operator-set domains a node or ``opset_import`` may name. ``com.microsoft`` contrib ops
    #: and unknown custom domains pass ``onnx.checker`` by default, so we allowlist.
    allowed_onnx_domains: frozenset[str] = frozenset({"", "ai.onnx", "ai.onnx.ml"})
    #: If/Loop/Scan bodies nest graphs; bound the recursion before anything walks them.
    max_subgraph_depth: int = 32
    #: ORT inlines and runs model-local functions; nothing we convert needs them.
    allow_onnx_functions: bool = False
    #: ``producer_name`` / ``producer_version`` are kept if printable and no longer than this.
    max_onnx_producer_len: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "allowed_onnx_domains":
                if not isinstance(value, frozenset) or not all(
                    isinstance(d, str) for d in value
                ):
                    raise ValueError("allowed_onnx_domains must be a frozenset of str")
            elif f.name == "allow_onnx_functions":
                if not isinstance(value, bool):
                    raise ValueError("allow_onnx_functions must be a bool")
            # bool is an int subclass; True is not a size.
            elif type(value) is not int or value <= 0:
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        if self.max_onnx_bytes >= PROTOBUF_MAX_BYTES:
            raise ValueError("max_onnx_bytes must stay below the 2 GiB protobuf limit")
        if self.max_safetensors_header_bytes > SAFETENSORS_REFERENCE_MAX_HEADER:
            raise ValueError(
                "max_safetensors_header_bytes above the reference parser's "
                f"{SAFETENSORS_REFERENCE_MAX_HEADER} would accept unreadable files"
            )
        if self.max_safetensors_header_bytes < 2:
            raise ValueError("max_safetensors_header_bytes must allow at least '{}'")
