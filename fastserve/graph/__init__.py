"""Graph: specs, the op library, the compiler with costs, torch capture and the reference run."""

# the function, bound after its module is imported: ``fastserve.graph.capture`` must stay the
# function however often the module is imported later
from fastserve.graph.capture import capture
from fastserve.graph.capture_weights import seed_weights
from fastserve.graph.compiler import compile_graph
from fastserve.graph.graph import Graph, TensorInfo, verify
from fastserve.graph.loader import load_spec, parse_spec, spec_from_dict
from fastserve.graph.module import (build_nodes, build_reference, build_subgraph, random_inputs,
                                    reference)
from fastserve.graph.spec import GraphSpec, InputSpec, NodeSpec, WeightsSpec
from fastserve.limits import Limits


def load(path: str, dims: dict[str, int] | None = None, *, trust_code: bool = False,
         limits: Limits | None = None) -> Graph:
    """Load a YAML spec and compile it: ``load("graphs/gpt2.yaml")``.

    ``trust_code=True`` lets the spec name Python code to import and run (``module:`` nodes, a
    ``source:`` factory); see :func:`load_spec`.
    """
    return compile_graph(load_spec(path, trust_code=trust_code, limits=limits), dims)



__all__ = ["Graph", "GraphSpec", "InputSpec", "Limits", "NodeSpec", "TensorInfo", "WeightsSpec",
           "build_nodes", "build_reference", "build_subgraph", "capture", "compile_graph", "load",
           "load_spec", "parse_spec", "random_inputs", "reference", "seed_weights",
           "spec_from_dict", "verify"]
