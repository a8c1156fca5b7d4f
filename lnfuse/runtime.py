"""ONNX Runtime plumbing: provider selection, session creation and input synthesis.

* :func:`select_provider` decides between the CUDA and CPU execution providers. ``auto``
  picks CUDA only when a tiny probe session really starts (and runs) on it; otherwise it
  falls back to CPU and records one line saying why. The probe result is cached per
  process and ONNX Runtime's native error spew is kept off the terminal while probing.
* :func:`make_session` builds an :class:`onnxruntime.InferenceSession` from a model proto,
  serialized bytes or a path, at a named graph-optimization level.
* :func:`synthesize_inputs` makes seeded, deterministic inputs from a graph's declared
  inputs (dynamic dims resolved consistently, name heuristics for integer inputs).
* :func:`load_inputs_npz` / :func:`validate_feeds` read and check user-provided inputs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from lnfuse.errors import InputError, ProviderError

__all__ = [
    "LEVELS",
    "ModelLike",
    "ProviderChoice",
    "graph_input_specs",
    "load_inputs_npz",
    "load_model_proto",
    "make_session",
    "select_provider",
    "session_feeds",
    "synthesize_inputs",
    "validate_feeds",
]

ModelLike = Union[onnx.ModelProto, bytes, str, "os.PathLike[str]"]

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

#: Graph optimization levels by the names the CLI uses.
LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# ONNX Runtime's "error" severity: warnings and info are dropped, errors still reported.
_QUIET_SEVERITY = 3
# Protobuf cannot serialize a single message of 2 GiB or more.
_PROTOBUF_LIMIT = 2**31 - 1


# --------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class ProviderChoice:
    """The execution provider a session should use and why it was chosen."""

    name: str  # 'cuda' or 'cpu'
    providers: tuple[str, ...]  # the list handed to onnxruntime.InferenceSession
    reason: str  # one line

    @property
    def primary(self) -> str:
        """The ONNX Runtime name of the preferred provider."""
        return self.providers[0]


_probe_lock = threading.Lock()
_cuda_probe: tuple[bool, str] | None = None
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _captured_stderr_fd() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (native code writes there) into a buffer.

    Yields a list that receives the captured text when the block ends. If fd 2 cannot
    be redirected (no such descriptor), the block runs without capture.
    """
    sink: list[str] = []
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield sink
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            os.dup2(tmp.fileno(), 2)
            yield sink
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode("utf-8", errors="replace"))


def _first_useful_line(*texts: str) -> str:
    """Pick the most informative single line out of ONNX Runtime's error output."""
    text = _ANSI.sub("", "\n".join(t for t in texts if t))
    match = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", text)
    if match:
        return f"{match.group(1)}: cannot open shared object file"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (
        r"with error: (.+)$",
        r"\] (Failed to create CUDAExecutionProvider[^.]*)",
        r"(CUDA[^:]*error.*)$",
    ):
        for ln in lines:
            found = re.search(pattern, ln)
            if found:
                return found.group(1).strip()[:200]
    for ln in lines:
        # Drop ORT's "2024-01-01 00:00:00.0 [E:onnxruntime:Default, file.cc:12 fn]" prefix.
        cleaned = re.sub(r"^.*?\[[EWF]:onnxruntime:[^\]]*\]\s*", "", ln)
        if cleaned:
            return cleaned[:200]
    return ""


def _tiny_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "lnfuse_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    return model.SerializeToString()


def _probe_cuda() -> tuple[bool, str]:
    """Try to start and run a one-node session on CUDA. Returns (ok, detail line)."""
    available = ort.get_available_providers()
    if CUDA_EP not in available:
        return False, f"CUDAExecutionProvider is not in this onnxruntime build ({ort.__version__})"
    ort.set_default_logger_severity(_QUIET_SEVERITY)
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET_SEVERITY
    error = ""
    started = False
    with _captured_stderr_fd() as captured, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # onnxruntime >= 1.21 can load CUDA/cuDNN from the nvidia-* pip packages (as PyTorch
        # installs them); without this the CUDA EP often cannot find libcublasLt / libcudnn.
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
                preload()
        try:
            sess = ort.InferenceSession(_tiny_model(), options, providers=[CUDA_EP, CPU_EP])
            if sess.get_providers()[0] == CUDA_EP:
                out = sess.run(None, {"x": np.ones(4, dtype=np.float32)})[0]
                started = bool(np.allclose(out, 2.0))
                if not started:
                    error = "CUDA probe session returned wrong values"
        except Exception as exc:  # any failure means: CUDA cannot be used
            error = str(exc)
    if started:
        return True, "CUDAExecutionProvider started"
    native = captured[0] if captured else ""
    detail = _first_useful_line(error, native, "\n".join(str(w.message) for w in caught))
    if not detail:
        detail = "CUDAExecutionProvider is listed but the session fell back to CPU"
    return False, detail


def _cuda_status() -> tuple[bool, str]:
    global _cuda_probe
    with _probe_lock:
        if _cuda_probe is None:
            _cuda_probe = _probe_cuda()
        return _cuda_probe


def select_provider(requested: str = "auto") -> ProviderChoice:
    """Choose the execution provider: ``'auto'``, ``'cuda'`` or ``'cpu'``.

    ``auto`` uses CUDA only if a probe session really starts and runs on it, else CPU
    (the reason says why). ``cuda`` raises :class:`ProviderError` when CUDA cannot start.
    """
    req = (requested or "auto").lower()
    if req not in ("auto", "cuda", "cpu"):
        raise InputError(f"unknown provider {requested!r} (expected auto, cuda or cpu)")
    if req == "cpu":
        return ProviderChoice("cpu", (CPU_EP,), "CPU requested")
    ok, detail = _cuda_status()
    if ok:
        why = "CUDA requested" if req == "cuda" else "CUDA available"
        return ProviderChoice("cuda", (CUDA_EP, CPU_EP), why)
    if req == "cuda":
        raise ProviderError(f"CUDA execution provider cannot start: {detail}")
    return ProviderChoice("cpu", (CPU_EP,), f"CUDA unavailable: {detail}")


# --------------------------------------------------------------------------- sessions


def _check_level(level: str) -> ort.GraphOptimizationLevel:
    try:
        return LEVELS[level]
    except KeyError:
        raise InputError(
            f"unknown optimization level {level!r} (expected one of {', '.join(LEVELS)})"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else text)[:300]


def _describe(model: ModelLike) -> str:
    if isinstance(model, (str, os.PathLike)):
        return f"'{os.fspath(model)}'"
    return "model"


def make_session(
    model: ModelLike,
    provider: ProviderChoice,
    level: str = "disable",
    threads: int | None = None,
    spinning: bool | None = None,
    exact_fp32: bool = False,
) -> ort.InferenceSession:
    """Create a quiet ONNX Runtime session for ``model`` on ``provider`` at ``level``.

    ``exact_fp32`` turns off TF32 in the CUDA provider (on Ampere and newer it is on by
    default and rounds fp32 MatMul/Conv inputs to 10 mantissa bits, which would swamp an
    fp32 equivalence check); the numeric check uses it, benchmarks do not.

    ``model`` may be a :class:`onnx.ModelProto`, serialized bytes, or a path (external
    data next to the file is resolved by ONNX Runtime). ``threads`` sets
    ``intra_op_num_threads``; ``spinning=False`` disables intra-op thread spinning.
    Raises :class:`InputError` if ONNX Runtime cannot load the model.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = _check_level(level)
    options.log_severity_level = _QUIET_SEVERITY
    if threads is not None:
        if int(threads) < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = int(threads)
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    providers: list = list(provider.providers)
    if exact_fp32 and CUDA_EP in providers:
        providers = [(CUDA_EP, {"use_tf32": "0"}) if p == CUDA_EP else p for p in providers]

    def create(source: bytes | str) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:
            raise InputError(f"onnxruntime cannot load {_describe(model)}: {_one_line(exc)}") from None

    if isinstance(model, onnx.ModelProto):
        try:
            size = model.ByteSize()
        except Exception:  # protobuf refuses to size messages over 2 GB
            size = _PROTOBUF_LIMIT
        if size < _PROTOBUF_LIMIT:
            return create(model.SerializeToString())
        with tempfile.TemporaryDirectory(prefix="lnfuse_") as tmp:
            path = os.path.join(tmp, "model.onnx")
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, path, save_as_external_data=True, location="model.onnx.data")
            return create(path)
    if isinstance(model, (bytes, bytearray)):
        return create(bytes(model))
    if isinstance(model, (str, os.PathLike)):
        path = Path(os.fspath(model))
        if not path.is_file():
            raise InputError(f"model file not found: {path}")
        return create(str(path))
    raise InputError(f"unsupported model object of type {type(model).__name__}")


def load_model_proto(model: ModelLike, load_external_data: bool = False) -> onnx.ModelProto:
    """Return a :class:`onnx.ModelProto` for ``model`` (graph structure only by default)."""
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, (bytes, bytearray)):
            return onnx.load_model_from_string(bytes(model))
        if isinstance(model, (str, os.PathLike)):
            path = Path(os.fspath(model))
            if not path.is_file():
                raise InputError(f"model file not found: {path}")
            return onnx.load(str(path), load_external_data=load_external_data)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read ONNX model {_describe(model)}: {_one_line(exc)}") from None
    raise InputError(f"unsupported model object of type {type(model).__name__}")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputSpec:
    """A declared graph input: name, ONNX element type and dims (int, str or None)."""

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None  # None: unknown rank

    @property
    def type_name(self) -> str:
        return helper.tensor_dtype_to_string(self.elem_type).replace("TensorProto.", "").lower()


def graph_input_specs(model: onnx.ModelProto, include_initializers: bool = False) -> list[InputSpec]:
    """Declared graph inputs of ``model``; inputs that are also initializers are skipped."""
    inits = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits and not include_initializers:
            continue
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise InputError(
                f"input '{value.name}' is a {kind or 'untyped value'}; only tensor inputs are supported"
            )
        ttype = value.type.tensor_type
        dims: tuple[int | str | None, ...] | None = None
        if ttype.HasField("shape"):
            collected: list[int | str | None] = []
            for dim in ttype.shape.dim:
                which = dim.WhichOneof("value")
                if which == "dim_value":
                    collected.append(int(dim.dim_value))
                elif which == "dim_param" and dim.dim_param:
                    collected.append(dim.dim_param)
                else:
                    collected.append(None)
            dims = tuple(collected)
        specs.append(InputSpec(value.name, int(ttype.elem_type), dims))
    return specs


_BATCH_NAMES = re.compile(r"(batch|^n$|^b$|^bs$|^bsz$|^batch_size$|^n_batch$)")
_SEQ_NAMES = re.compile(r"(seq|sequence|time|length|len$)")


def _default_dim(name: str) -> int:
    low = name.lower()
    if _BATCH_NAMES.search(low):
        return 2
    if _SEQ_NAMES.search(low):
        return 8
    return 4


def _tokens(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t]


def _numpy_dtype(spec: InputSpec) -> np.dtype:
    if spec.elem_type == TensorProto.BFLOAT16:
        raise InputError(
            f"input '{spec.name}' is bfloat16, which numpy cannot hold; pass inputs another way or cast the model input"
        )
    if (
        spec.elem_type in (TensorProto.STRING, TensorProto.UNDEFINED)
        or spec.elem_type >= TensorProto.FLOAT8E4M3FN
    ):
        raise InputError(f"input '{spec.name}' has unsupported element type {spec.type_name}")
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(spec.elem_type))
    except Exception:
        raise InputError(f"input '{spec.name}' has unsupported element type {spec.type_name}") from None


def _resolve_shape(spec: InputSpec, dims: Mapping[str, int], resolved: dict[str, int]) -> tuple[int, ...]:
    if spec.dims is None:
        raise InputError(f"input '{spec.name}' has unknown rank; provide inputs with --inputs")
    shape = []
    for dim in spec.dims:
        if isinstance(dim, int):
            shape.append(dim)
        elif isinstance(dim, str):
            if dim not in resolved:
                resolved[dim] = int(dims[dim]) if dim in dims else _default_dim(dim)
            shape.append(resolved[dim])
        else:
            shape.append(4)
    return tuple(shape)


def synthesize_inputs(
    model: onnx.ModelProto,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    input_ranges: Mapping[str, tuple[float, float]] | None = None,
    scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """Seeded inputs for every declared (non-initializer) graph input of ``model``.

    * float16/32/64: ``normal(loc=0.5*scale, sd=scale)`` (a non-zero mean exposes
      LayerNorm mean bugs), or ``uniform(lo, hi)`` when ``input_ranges`` names the input.
    * integers: ``[lo, hi)`` from ``input_ranges``; else by name: ``*mask*`` -> 0/1
      (first position along the last axis always 1), ``position``/``pos`` -> arange along
      the last dim, ``*type*``/``segment`` -> 0/1, ``ids``/``token`` -> [0, 100),
      anything else -> [0, 10).
    * bool: random 0/1.
    * Symbolic dims come from ``dims`` (by ``dim_param`` name), else defaults: batch-like
      names -> 2, ``seq``/``sequence``/``time`` -> 8, other names -> 4; dims with neither a
      value nor a name -> 4. One symbol gets one value across all inputs.
    """
    dims = dict(dims or {})
    ranges = dict(input_ranges or {})
    specs = graph_input_specs(model)
    names = {s.name for s in specs}
    unknown_ranges = sorted(set(ranges) - names)
    if unknown_ranges:
        raise InputError(f"--input-range names unknown input(s): {', '.join(unknown_ranges)}")
    symbols = {d for s in specs for d in (s.dims or ()) if isinstance(d, str)}
    unknown_dims = sorted(set(dims) - symbols)
    if unknown_dims:
        known = ", ".join(sorted(symbols)) or "none"
        raise InputError(f"--dim names unknown dimension(s) {', '.join(unknown_dims)} (model has: {known})")
    for key, value in dims.items():
        if int(value) < 1:
            raise InputError(f"dimension {key} must be >= 1, got {value}")
    for key, (lo, hi) in ranges.items():
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InputError(f"input range for {key} must satisfy lo < hi, got {lo}:{hi}")

    rng = np.random.default_rng(seed)
    resolved: dict[str, int] = {}
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        dtype = _numpy_dtype(spec)
        shape = _resolve_shape(spec, dims, resolved)
        feeds[spec.name] = _synth_one(spec.name, dtype, shape, rng, ranges.get(spec.name), scale)
    return feeds


def _synth_one(
    name: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    value_range: tuple[float, float] | None,
    scale: float,
) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.floating):
        if value_range is not None:
            lo, hi = value_range
            return rng.uniform(lo, hi, size=shape).astype(dtype)
        return rng.normal(loc=0.5 * scale, scale=scale, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if value_range is not None:
            lo, hi = int(np.ceil(value_range[0])), int(np.ceil(value_range[1]))
            if hi <= lo:
                raise InputError(
                    f"input range for {name} holds no integer: {value_range[0]}:{value_range[1]}"
                )
        else:
            tokens = _tokens(name)
            low = name.lower()
            if "mask" in low:
                mask = rng.integers(0, 2, size=shape, dtype=np.int64)
                if mask.ndim:
                    mask[..., 0] = 1  # never mask a whole row (softmax over nothing is NaN)
                return mask.astype(dtype)
            if "position" in low or "pos" in tokens:
                last = shape[-1] if shape else 1
                base = np.arange(last, dtype=np.int64)
                return np.broadcast_to(base, shape).astype(dtype) if shape else np.zeros((), dtype)
            if "type" in tokens or "segment" in low:
                lo, hi = 0, 2  # token_type_ids / segment ids: BERT-style type vocabularies are tiny
            elif "ids" in tokens or "id" in tokens or "token" in low or low.endswith("ids"):
                lo, hi = 0, 100
            else:
                lo, hi = 0, 10
        lo = max(lo, int(info.min))
        hi = min(hi, int(info.max) + 1)
        return rng.integers(lo, hi, size=shape, dtype=np.int64).astype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"input '{name}' is complex, which lnfuse does not synthesize")
    raise InputError(f"input '{name}' has unsupported dtype {dtype}")


def validate_feeds(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], what: str = "inputs", allow_extra: bool = False
) -> dict[str, np.ndarray]:
    """Check ``feeds`` against ``model``'s declared inputs (names, dtypes, static dims,
    consistent symbolic dims). Returns the feeds as numpy arrays; raises InputError."""
    specs = graph_input_specs(model)
    optional = {s.name for s in graph_input_specs(model, include_initializers=True)} - {s.name for s in specs}
    names = {s.name for s in specs}
    missing = sorted(names - set(feeds))
    if missing:
        raise InputError(f"{what}: missing value(s) for model input(s) {', '.join(missing)}")
    extra = sorted(set(feeds) - names - optional)
    if extra and not allow_extra:
        raise InputError(f"{what}: {', '.join(extra)} not an input of the model")
    symbols: dict[str, tuple[int, str]] = {}
    out: dict[str, np.ndarray] = {}
    all_specs = {s.name: s for s in graph_input_specs(model, include_initializers=True)}
    for name, value in feeds.items():
        if name not in all_specs:
            continue
        spec = all_specs[name]
        arr = np.asarray(value)
        expected = _numpy_dtype(spec)
        if arr.dtype != expected:
            raise InputError(f"{what}: input '{name}' has dtype {arr.dtype}, model expects {expected}")
        if spec.dims is not None:
            if arr.ndim != len(spec.dims):
                raise InputError(
                    f"{what}: input '{name}' has rank {arr.ndim} (shape {arr.shape}), model expects rank {len(spec.dims)}"
                )
            for axis, (got, want) in enumerate(zip(arr.shape, spec.dims, strict=True)):
                if isinstance(want, int) and got != want:
                    raise InputError(
                        f"{what}: input '{name}' has size {got} on axis {axis}, model expects {want} (shape {arr.shape})"
                    )
                if isinstance(want, str):
                    prev = symbols.get(want)
                    if prev is not None and prev[0] != got:
                        raise InputError(
                            f"{what}: dimension '{want}' is {prev[0]} in '{prev[1]}' but {got} in '{name}'"
                        )
                    symbols[want] = (got, name)
        out[name] = arr
    return out


def load_inputs_npz(path: str | os.PathLike[str], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Load model inputs from an ``.npz`` file and validate them against ``model``."""
    p = Path(os.fspath(path))
    if not p.is_file():
        raise InputError(f"inputs file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as data:
            feeds = {key: data[key] for key in data.files}
    except Exception as exc:
        raise InputError(f"cannot read inputs file {p}: {_one_line(exc)}") from None
    return validate_feeds(model, feeds, what=f"inputs file {p.name}")


def session_feeds(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], what: str = "model"
) -> dict[str, np.ndarray]:
    """The subset of ``feeds`` that ``session`` declares; InputError if one is missing."""
    wanted = [i.name for i in session.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise InputError(f"{what} needs input(s) {', '.join(missing)} that the inputs do not provide")
    return {n: feeds[n] for n in wanted}
