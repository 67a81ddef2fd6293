"""Sentence embeddings for herd's semantic matching: the ONNX embedder, its micro-batcher,
and the model assets (tokenizer.json and its NOTICE). Nothing here runs at import time."""

from embeddings.batcher import BatchingEmbedder
from embeddings.embedder import Embedder, ModelIntegrityError, default_model_path

__all__ = ["BatchingEmbedder", "Embedder", "ModelIntegrityError", "default_model_path"]
