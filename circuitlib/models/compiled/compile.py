"""Compile a RASP program with Tracr once, convert it, and cache the result on disk.

`load_compiled(name_or_path)` returns a `Compiled`: the circuitlib `Transformer`, and `CompiledInfo`, what
the compiler knew (token ids, BOS, output values, residual labels and the blocks each head and MLP
carries, see `truth.read_structure`). The cache lives in `<circuitlib cache>/tracr/<name>-v<FORMAT>/`
(`circuitlib.core.io.resolve_cache_dir`): `model.safetensors`, `model.json` and `program.json`, written in a
temporary folder that is renamed into place, so a crash leaves nothing half-written. A user's file
is cached under the hash of its content. Loading from the cache imports neither JAX nor Tracr; a
first compile pays JAX's start-up (seconds).

The compile steps are Tracr's own `compile_rasp_to_model`, run one by one so that the craft graph
and craft model stay at hand for the ground truth (the same functions, in the same order).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from circuitlib.core.io import resolve_cache_dir
from circuitlib.core.model import Transformer
from circuitlib.models.compiled.programs import BOS, BUILTIN, MODEL_PREFIX, Program, ProgramError, file_key, resolve

FORMAT = 1
PAD = "PAD"
INFO_FILE = "program.json"


@dataclass
class CompiledInfo:
    """What the compiler knew about a compiled program (JSON-ready)."""

    program: str  # built-in name, or "file-<hash>"
    vocab: list  # input tokens (without BOS/PAD), sorted by id
    token_ids: list  # [[token, id], ...] for every input token, BOS and PAD
    bos_id: int
    max_seq_len: int  # without BOS
    categorical: bool  # categorical output (else numerical: one value per position)
    output_values: list  # categorical: the value of each output column; numerical: [None]
    residual_labels: list[str]  # one per residual dimension, "name:value" or "name"
    structure: dict = field(default_factory=dict)  # truth.read_structure
    source: str = ""

    def encode(self, tokens) -> list[int]:
        """Input tokens (without BOS) -> ids with BOS first."""
        ids = {tok: i for tok, i in self.token_ids}
        return [self.bos_id] + [ids[t] for t in tokens]


@dataclass
class Compiled:
    """A compiled program: the circuitlib model, what the compiler knew, and (fresh compiles only) Tracr's model."""

    model: Transformer
    info: CompiledInfo
    program: Program | None = None
    tracr_model: object = None

    @property
    def name(self) -> str:
        return MODEL_PREFIX + self.info.program


def compile_program(program: Program) -> Compiled:
    """Compile `program` with Tracr now (no cache), convert it, and read its structure."""
    from tracr.compiler import (
        basis_inference,
        craft_graph_to_model,
        craft_model_to_transformer,
        expr_to_craft_graph,
        nodes,
        rasp_to_graph,
        validating,
    )
    from tracr.craft import bases
    from tracr.rasp import rasp

    from circuitlib.models.compiled.convert import from_tracr
    from circuitlib.models.compiled.truth import direction_label, read_structure

    try:
        expr = program.make()
        unsupported = validating.static_validate(expr)
        if unsupported:
            raise NotImplementedError("; ".join(f"{u.expr.name}: {u.reason}" for u in unsupported))
        extracted = rasp_to_graph.extract_rasp_graph(expr)
        graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
        basis_inference.infer_bases(graph, sink, set(program.vocab), program.max_seq_len)
        expr_to_craft_graph.add_craft_components_to_rasp_graph(
            graph, bos_dir=bases.BasisDirection(rasp.tokens.label, BOS), mlp_exactness=100
        )
        craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
        assembled = craft_model_to_transformer.craft_model_to_transformer(
            craft_model=craft_model,
            graph=graph,
            sink=sink,
            max_seq_len=program.max_seq_len,
            compiler_bos=BOS,
            compiler_pad=PAD,
            causal=False,
        )
    except ProgramError:
        raise
    except Exception as e:  # Tracr signals unsupported programs with many exception types
        where = program.source or program.name
        raise ProgramError(
            f"Tracr cannot compile the program {where}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no message'}"
        ) from None
    # The residual space exactly as Tracr's assembler builds it (checked against its labels).
    tokens_space = bases.VectorSpaceWithBasis.from_values(
        rasp.tokens.label, graph.nodes[rasp.tokens.label][nodes.VALUE_SET].union({BOS, PAD})
    )
    indices_space = bases.VectorSpaceWithBasis.from_values(rasp.indices.label, range(program.max_seq_len))
    output_space = bases.VectorSpaceWithBasis(sink[nodes.OUTPUT_BASIS])
    residual = bases.join_vector_spaces(craft_model.residual_space, tokens_space, indices_space, output_space)
    if [str(d) for d in residual.basis] != list(assembled.residual_labels):
        raise RuntimeError("the residual space rebuilt here differs from Tracr's assembled one (Tracr version?)")
    labels = [direction_label(d) for d in residual.basis]
    output_columns = [residual.basis.index(d) for d in output_space.basis]
    categorical = rasp.is_categorical(sink[nodes.EXPR])
    encoding = assembled.input_encoder.encoding_map
    name = MODEL_PREFIX + program.name
    info = CompiledInfo(
        program=program.name,
        vocab=sorted(program.vocab, key=lambda t: encoding[t]),
        token_ids=sorted(([t, i] for t, i in encoding.items()), key=lambda p: p[1]),
        bos_id=encoding[BOS],
        max_seq_len=program.max_seq_len,
        categorical=categorical,
        output_values=[d.value for d in output_space.basis] if categorical else [None],
        residual_labels=labels,
        structure=read_structure(graph, sources, craft_model, sink),
        source=program.source,
    )
    model = from_tracr(assembled, output_columns, name, program.max_seq_len)
    return Compiled(model, info, program, assembled)


_LOADED: dict[tuple[str, str], Compiled] = {}


def cache_folder(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "tracr" / f"{key}-v{FORMAT}"


def load_compiled(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Compiled:
    """The compiled program `name_or_path` (a built-in name, "tracr-<name>", or a .py file), from the cache if there.

    A fresh compile is written to the cache; a cached one is read without JAX. Within a process
    the same program is loaded once.
    """
    text = str(name_or_path)
    if text.startswith(MODEL_PREFIX) and text[len(MODEL_PREFIX) :] in BUILTIN:
        text = text[len(MODEL_PREFIX) :]
    is_file = text.endswith(".py") or "/" in text
    if is_file and not Path(text).expanduser().is_file():
        resolve(text)  # raises the error naming the missing file
    key = file_key(Path(text).expanduser()) if is_file else resolve(text).name
    folder = cache_folder(key, cache_dir)
    memo = (str(folder), key)
    if memo in _LOADED:
        return _LOADED[memo]
    if (folder / INFO_FILE).is_file():
        compiled = _read(folder)
        compiled.program = BUILTIN.get(compiled.info.program)
    else:
        compiled = compile_program(resolve(text))
        _write(compiled, folder)
    _LOADED[memo] = compiled
    return compiled


def _read(folder: Path) -> Compiled:
    try:
        info = CompiledInfo(**json.loads((folder / INFO_FILE).read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{folder / INFO_FILE} is not a valid compiled-program description ({e}); delete {folder} to compile again"
        ) from None
    return Compiled(Transformer.load(folder), info)


def _write(compiled: Compiled, folder: Path) -> None:
    """Write model and info into a temporary sibling folder, then rename it into place (atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        compiled.model.save(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(asdict(compiled.info), indent=1))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / INFO_FILE).is_file():  # not another process that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
