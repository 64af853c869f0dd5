"""``fastserve compile`` and ``fastserve check``: the graph commands."""

from __future__ import annotations

import json
import time

import click

from fastserve.cli.app import cli
from fastserve.cli.render import human_bytes, human_count, step, table
from fastserve.errors import SpecError


def parse_dims(values: tuple[str, ...]) -> dict[str, int]:
    """``("seq=128",)`` -> ``{"seq": 128}``."""
    dims = {}
    for v in values:
        name, sep, size = v.partition("=")
        if not sep or not size.isdigit() or int(size) <= 0:
            raise SpecError(f"--dim expects NAME=SIZE with a positive size, got '{v}'")
        dims[name] = int(size)
    return dims


dim_option = click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
                          help="Size of a symbolic dim, e.g. --dim seq=128 (repeatable).")
# every command that loads a spec takes it: see fastserve.trust
trust_option = click.option("--trust-code", is_flag=True,
                            help="Allow the spec to import and run the Python code it names "
                            "(module: nodes, a source: factory). Only for specs you trust; "
                            "or list module prefixes in ~/.config/fastserve/trust.yaml.")


def load_graph(spec: str, dims: tuple[str, ...] = (), trust_code: bool = False):
    from fastserve.graph import compile_graph, load_spec

    return compile_graph(load_spec(spec, trust_code=trust_code), parse_dims(dims))


def load_profile(path: str | None, decode: bool):
    """The profile at ``path`` (None without one), with a note on stderr when it times the
    other phase than the one planned for (``decode``: generation steps)."""
    from fastserve.resources.costmodel import Profile

    if not path:
        return None
    profile = Profile.load(path)
    if (profile.phase == "decode") != decode:
        have, want = ("generation steps", "whole batches") if profile.phase == "decode" else \
            ("whole batches", "generation steps")
        hint = "fastserve profile SPEC --decode ROWS" if decode else "fastserve profile SPEC"
        click.echo(f"note: profile '{path}' timed {have}, and this plans {want}; '{hint}' "
                   f"times those", err=True)
    return profile


@cli.command("compile")
@click.argument("spec", type=click.Path(dir_okay=False))
@dim_option
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the graph as JSON.")
def compile_cmd(spec: str, dims: tuple[str, ...], trust_code: bool, as_json: bool) -> None:
    """Compile SPEC into a costed graph, without allocating weights.

    Prints one row per node: op, parameters, FLOPs and output bytes per sample (batch 1 at the
    spec's dim sizes), then the totals.
    """
    graph = load_graph(spec, dims, trust_code)
    doc = graph.to_json()
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    rows = [(n["id"], n["op"], human_count(n["params"]), human_bytes(n["params_bytes"]),
             human_count(n["flops"]), human_bytes(n["out_bytes"])) for n in doc["nodes"]]
    t = doc["totals"]
    rows.append(("total", f"{t['nodes']} nodes", human_count(t["params"]),
                 human_bytes(t["params_bytes"]), human_count(t["flops"]),
                 human_bytes(t["out_bytes"])))
    dims_s = ", ".join(f"{k}={v}" for k, v in graph.dims.items())
    click.echo(f"graph '{graph.name}' ({dims_s}; costs per sample)")
    click.echo(table(["node", "op", "params", "param bytes", "flops", "out bytes"], rows,
                     "llrrrr"))


@cli.command("check")
@click.argument("spec", type=click.Path(dir_okay=False))
@dim_option
@click.option("--batch", type=click.IntRange(1), default=2, show_default=True,
              help="Batch size of the random inputs.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@trust_option
def check_cmd(spec: str, dims: tuple[str, ...], batch: int, seed: int, trust_code: bool) -> None:
    """Build SPEC's weights and run the single-process reference on random inputs.

    Prints the output shapes and the time each step took.
    """
    import torch

    from fastserve.graph import build_reference, random_inputs
    from fastserve.graph.module import ensure_activations

    with step(f"compiling {spec}"):
        graph = load_graph(spec, dims, trust_code)
    with step(f"building weights ({human_bytes(graph.params_bytes)})"):
        module = build_reference(graph)
    inputs = random_inputs(graph, batch, seed=seed)
    ensure_activations(graph, batch)
    t0 = time.perf_counter()
    with step(f"running the reference (batch {batch})"), torch.inference_mode():
        outputs = module(inputs)
    elapsed = time.perf_counter() - t0
    for name, t in outputs.items():
        finite = bool(torch.isfinite(t).all()) if t.is_floating_point() else True
        click.echo(f"output {name}: shape {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                   f"{'' if finite else '  (contains NaN/inf!)'}")
    click.echo(f"reference run: {elapsed * 1000:.1f} ms for batch {batch}")
