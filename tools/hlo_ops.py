"""Reading an optimized HLO module's text: its instructions, and for each op its category,
the bytes it moves and the FLOPs it does.

tools/op_profile.py sets these against the times a profile measures on the device;
tools/step_hlo.py against the chip's peak and bandwidth, without the device.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re

CATEGORIES = ("convolution", "attention", "matmul", "reduction", "elementwise", "layout", "other")

# `name = type opcode(`, with or without the % sigil; tuple types are parenthesised.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\(.*?\)|\S+)\s+([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
# The same, with a while loop's body (counted once: one step); conditionals' branches not.
_SUBCOMPUTATIONS = re.compile(r"(?:calls|to_apply|body)=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_SOURCE = re.compile(r'source_file="([^"]+)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r'^(\d+)\s+(?:"(.*)"|\{(.*)\})\s*$')
_LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "concatenate",
               "dynamic-slice", "dynamic-update-slice", "pad", "parameter", "tuple", "get-tuple-element",
               "constant", "iota"}


def stack_locations(text: str) -> dict[int, list[str]]:
    """Each stack frame's call chain, innermost first, as "file.py:line function".

    Newer XLA prints op sources as `stack_frame_id=N` into tables at the top of the module:
    FileNames, FunctionNames, FileLocations, StackFrames, where a frame's printed
    parent_frame_id is its parent's id plus one (0: none).
    """
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    table = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = line
            continue
        m = _TABLE_ROW.match(line) if table else None
        if not m:
            table = None if table and line.strip() and not line.startswith(" ") else table
            continue
        tables[table][int(m.group(1))] = m.group(2) if m.group(2) is not None else m.group(3)

    def field(row: str, name: str) -> int:
        found = re.search(name + r"=(\d+)", row)
        return int(found.group(1)) if found else 0

    chains = {}
    for frame_id in tables["StackFrames"]:
        chain, frame, seen = [], frame_id, set()
        while frame and frame not in seen and frame in tables["StackFrames"]:
            seen.add(frame)
            row = tables["StackFrames"][frame]
            location = tables["FileLocations"].get(field(row, "file_location_id"), "")
            file = os.path.basename(tables["FileNames"].get(field(location, "file_name_id"), ""))
            function = tables["FunctionNames"].get(field(location, "function_name_id"), "")
            chain.append(f"{file}:{field(location, 'line')} {function}")
            frame = field(row, "parent_frame_id") - 1
        chains[frame_id] = chain
    return chains


_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxdiff", "models")
_MODEL_FILES = tuple(f + ":" for f in os.listdir(_MODELS_DIR) if f.endswith(".py") and f != "__init__.py")


def op_source(line: str, locations: dict[int, list[str]]) -> str:
    """Where in the models an instruction comes from: its innermost frame in jaxdiff/models
    ("unet.py:206 GEGLU.__call__"), else its innermost frame, else "?"."""
    frame = _FRAME_ID.search(line)
    chain = locations.get(int(frame.group(1)), []) if frame else []
    ours = [loc for loc in chain if loc.startswith(_MODEL_FILES)]
    return (ours or chain or ["?"])[0]


def stack_files(locations: dict[int, list[str]]) -> dict[int, set[str]]:
    """Source files (base names) of each stack frame, from `stack_locations`' chains."""
    return {frame: {location.split(":")[0] for location in chain} for frame, chain in locations.items()}


def parse_hlo(text: str) -> tuple[dict, dict]:
    """(instructions, computations) of an HLO module's text.

    instructions: name -> (opcode, line); computations: name -> list of instruction names.
    """
    instructions, computations = {}, {}
    current = None
    for line in text.splitlines():
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            instructions[m.group(1)] = (m.group(2), line)
            computations[current].append(m.group(1))
            continue
        m = _COMPUTATION.match(line)
        # Instructions hold "="; headers only inside /*index=N*/ comments of long tuples.
        if m and "=" not in re.sub(r"/\*.*?\*/", "", line).split("{")[0]:
            current = m.group(1)
            computations[current] = []
    return instructions, computations


def _custom_call_category(target: str) -> str:
    t = target.lower()
    if "conv" in t:
        return "convolution"
    if "fmha" in t or "flash" in t or "attention" in t:
        return "attention"
    if "gemm" in t or "matmul" in t or "cublas" in t:
        return "matmul"
    return "other"


def _gated_linear_unit_contraction(line: str, instructions: dict) -> int | None:
    """A Mosaic GPU kernel as tokamax's gated linear unit calls it (jaxdiff/models/geglu.py):
    x (..., K) and weights (K, 2, N) to (..., N), two GEMMs in one. Its K x 2 multiply-adds
    an output element; None for any other custom call."""
    target = _TARGET.search(line)
    if not target or not target.group(1).startswith("mosaic_gpu"):
        return None
    weights, out = _operand_dims(line, instructions, 1), _dims(_result_type(line))
    if len(weights) != 3 or weights[1] != 2 or not out or out[-1] != weights[2]:
        return None
    return weights[0] * 2


def _is_flash_attention_kernel(line: str) -> bool:
    """A Mosaic GPU flash attention kernel (tokamax's, jaxdiff/models/attention.py's
    "tokamax" path): q, k, v (batch, tokens, heads, head dim) to the output, as its op name
    says (its function is flash_attention_sm90 on Hopper)."""
    target = _TARGET.search(line)
    return bool(target and target.group(1).startswith("mosaic_gpu") and "flash_attention" in line)


def _reachable(name: str, instructions: dict, computations: dict):
    """(opcode, line) of one instruction and of every instruction in what it calls."""
    stack, visited = [name], set()
    while stack:
        inst = stack.pop()
        if inst in visited or inst not in instructions:
            continue
        visited.add(inst)
        opcode, line = instructions[inst]
        yield opcode, line
        for called in _CALLS.findall(line):
            stack.extend(computations.get(called, ()))


def categorize(name: str, instructions: dict, computations: dict, frames: dict | None = None) -> str:
    """The category of one top-level instruction (a fusion: by what it fuses)."""
    seen_ops, sources, targets = set(), set(), []
    for opcode, line in _reachable(name, instructions, computations):
        seen_ops.add(opcode)
        sources.update(os.path.basename(s) for s in _SOURCE.findall(line))
        for frame_id in _FRAME_ID.findall(line):
            sources.update((frames or {}).get(int(frame_id), ()))
        targets += _TARGET.findall(line)
    if "attention.py" in sources:
        return "attention"
    if "layer_norm.py" in sources and targets:  # the one-pass layer norm kernel: norm time
        return "reduction"
    if "group_norm.py" in sources and targets:  # the group norm kernels: sums, then normalising
        return "reduction" if "/group_norm_sums/" in instructions[name][1] else "elementwise"
    if any(_gated_linear_unit_contraction(line, instructions) for _, line in
           _reachable(name, instructions, computations)):
        return "matmul"
    if any(_is_flash_attention_kernel(line) for _, line in _reachable(name, instructions, computations)):
        return "attention"
    for target in targets:
        category = _custom_call_category(target)
        if category != "other":
            return category
    if "convolution" in seen_ops:
        return "convolution"
    if "dot" in seen_ops:
        return "matmul"
    if "reduce" in seen_ops or "reduce-window" in seen_ops:
        return "reduction"
    if seen_ops - {"fusion"} <= _LAYOUT_OPS:  # a fusion of copies, slices, transposes
        return "layout"
    if seen_ops - _LAYOUT_OPS - {"custom-call", "fusion", "while", "call", "conditional"}:
        return "elementwise"
    return "other"


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_RESULT_TYPE = re.compile(r"=\s*(\(.*?\)|\S+)\s+[a-z][\w\-]*\(")


def type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type: one array (`bf16[32,64]{1,0}`) or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(hlo_type):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _result_type(line: str) -> str:
    m = _RESULT_TYPE.search(line)
    return m.group(1) if m else ""


def _operands(line: str) -> list[str]:
    # The operand list is the first parenthesised group after the opcode; long lists carry
    # /*index=N*/ comments.
    m = re.search(r"=\s*(?:\(.*?\)|\S+)\s+[a-z][\w\-]*\(([^)]*)\)", line)
    return re.findall(r"%?([\w.\-]+)", re.sub(r"/\*.*?\*/", "", m.group(1))) if m else []


_SLICING = {"slice", "dynamic-slice", "bitcast", "parameter", "copy"}


def bytes_moved(name: str, instructions: dict, computations: dict) -> int:
    """Operand and result bytes of one top-level instruction; a slice (or a fusion of
    nothing but slicing) reads only what it writes."""
    opcode, line = instructions[name]
    called = re.search(r"calls=%?([\w.\-]+)", line)
    inner = {instructions[i][0] for i in computations.get(called.group(1), ())} if called else set()
    if opcode in ("slice", "dynamic-slice") or (opcode == "fusion" and inner and inner <= _SLICING
                                                  and inner & {"slice", "dynamic-slice"}):
        return 2 * type_bytes(_result_type(line))
    total = type_bytes(_result_type(line))
    for operand in _operands(line):
        if operand in instructions:
            total += type_bytes(_result_type(instructions[operand][1]))
    return total


def loop_body(text: str) -> str:
    """The body computation of the entry computation's (first) while loop."""
    for line in text.split("\nENTRY", 1)[-1].splitlines():
        if re.search(r"\swhile\(", line):
            return re.search(r"body=%?([\w.\-]+)", line).group(1)
    raise ValueError("the entry computation has no while loop")


def loop_invariant(body: str, instructions: dict, computations: dict) -> set[str]:
    """The ops of a while loop's body that compute the same value at every step: all their
    operands are tuple elements the body passes on unchanged (the loop's constants: the
    weights), constants, or such ops. Work left in the loop that could run once before it."""
    names = computations[body]
    parameter = next(n for n in names if instructions[n][0] == "parameter")
    root = next(n for n in names if instructions[n][1].lstrip().startswith("ROOT"))
    returned = _operands(instructions[root][1])
    invariant = set()
    for name in names:
        opcode, line = instructions[name]
        if opcode == "constant":
            invariant.add(name)
        elif opcode == "get-tuple-element" and _operands(line) == [parameter]:
            index = int(re.search(r"index=(\d+)", line).group(1))
            if index < len(returned) and returned[index] == name:
                invariant.add(name)
    grown = True
    while grown:
        grown = False
        for name in names:
            opcode, line = instructions[name]
            operands = _operands(line)
            if (name not in invariant and opcode not in ("parameter", "rng", "rng-bit-generator")
                    and operands and all(o in invariant for o in operands)):
                invariant.add(name)
                grown = True
    return invariant


def _dims(hlo_type: str) -> list[int]:
    """Dimensions of an HLO type's first array (a custom call's result comes first in its tuple)."""
    m = _ARRAY.search(hlo_type)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _operand_dims(line: str, instructions: dict, index: int) -> list[int]:
    operands = _operands(line)
    if index >= len(operands) or operands[index] not in instructions:
        return []
    return _dims(_result_type(instructions[operands[index]][1]))


def _config_dims(line: str, key: str) -> list[int]:
    """A list of dimensions from a backend_config, e.g. "lhs_contracting_dimensions":["1"]."""
    m = re.search(r'"' + key + r'"\s*:\s*\[([^\]]*)\]', line)
    return [int(d) for d in json.loads("[" + m.group(1) + "]")] if m else []


def _conv_flops(line: str, instructions: dict) -> float:
    # Each output element takes kernel-size x input-features (per group) multiply-adds:
    # the kernel's element count over its output features.
    labels = re.search(r"dim_labels=\w+_(\w+)->", line)
    kernel = _operand_dims(line, instructions, 1)
    if not labels or len(kernel) != len(labels.group(1)):
        return 0.0
    return 2.0 * math.prod(_dims(_result_type(line))) * math.prod(kernel) / kernel[labels.group(1).index("o")]


def _own_flops(opcode: str, line: str, instructions: dict) -> float:
    """Multiply-add FLOPs (two per multiply-add) of one instruction, not of what it calls."""
    out = math.prod(_dims(_result_type(line)))
    if opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        lhs = _operand_dims(line, instructions, 0)
        dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
        return 2.0 * out * math.prod(lhs[d] for d in dims)
    if opcode == "convolution":
        return _conv_flops(line, instructions)
    if opcode != "custom-call":
        return 0.0
    contraction = _gated_linear_unit_contraction(line, instructions)
    if contraction:
        return 2.0 * out * contraction
    if _is_flash_attention_kernel(line):
        # q.k and p.v over the key tokens, at the head dims the kernel got (padded).
        q, k = _operand_dims(line, instructions, 0), _operand_dims(line, instructions, 1)
        return 2.0 * k[1] * (math.prod(q) + out) if len(q) == len(k) == 4 else 0.0
    target = _TARGET.search(line)
    target = target.group(1) if target else ""
    category = _custom_call_category(target)
    if category == "convolution" and "Forward" in target:
        return _conv_flops(line, instructions)
    if category == "matmul":
        lhs = _operand_dims(line, instructions, 0)
        return 2.0 * out * math.prod(lhs[d] for d in _config_dims(line, "lhs_contracting_dimensions"))
    if category == "attention" and "bmm1_dot_dimension_numbers" in line:
        # softmax(q.k) . v: q.k costs 2 x q's elements x key tokens, p.v 2 x the output's
        # elements x key tokens; key tokens are k's elements over its batch and head dims.
        bmm1 = line[line.index("bmm1_dot_dimension_numbers"):]
        q, k = _operand_dims(line, instructions, 0), _operand_dims(line, instructions, 1)
        shared = _config_dims(bmm1, "rhs_batch_dimensions") + _config_dims(bmm1, "rhs_contracting_dimensions")
        if not q or not k:
            return 0.0
        kv_tokens = math.prod(k) / math.prod(k[d] for d in shared)
        return 2.0 * kv_tokens * (math.prod(q) + out)
    return 0.0


def op_flops(name: str, instructions: dict, computations: dict) -> float:
    """FLOPs of one top-level instruction: its dots, convolutions, GEMM and attention
    kernels, through the computations it calls (fusions). Elementwise work is not counted."""
    return sum(_own_flops(opcode, line, instructions)
               for opcode, line in _reachable(name, instructions, computations))



def program_flops(text: str) -> float:
    """Multiply-add FLOPs (two per multiply-add) of a whole module, from its entry: dots,
    convolutions (padding included, as the kernels compute it) and GEMM and attention
    kernels, as torch's FlopCounterMode counts them; elementwise work is not counted. A
    computation counts each time it is called; a while loop's body counts once (one step), a
    conditional's branches not at all."""
    instructions, computations = parse_hlo(text)
    entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", text, re.MULTILINE)
    memo: dict[str, float] = {}

    def flops(computation: str) -> float:
        if computation not in memo:
            memo[computation] = 0.0  # a cycle (none in valid HLO) counts nothing
            total = 0.0
            for name in computations.get(computation, ()):
                opcode, line = instructions[name]
                total += _own_flops(opcode, line, instructions)
                total += sum(flops(called) for called in _SUBCOMPUTATIONS.findall(line))
            memo[computation] = total
        return memo[computation]

    return flops(entry.group(1)) if entry else 0.0
