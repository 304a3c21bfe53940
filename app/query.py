"""Turn free text into HMT's recall query, for the memory search box.

``Engine.query_vector`` forms the same query ``ask`` uses, so the search ranks segments exactly
as recall would.
"""

from __future__ import annotations

import numpy as np

from qa_pipeline.engine import Engine, QAError

from .errors import AppError


def query_vector(engine: Engine, text: str) -> np.ndarray:
    """The recall query (d_h,) HMT would form if ``text`` were asked as a question.

    Raises:
        AppError: If the text is empty or longer than one segment with its prompt.
    """
    text = (text or "").strip()
    if not text:
        raise AppError("Type some text to search the memory with.")
    try:
        return np.asarray(engine.query_vector(text), dtype=np.float32)
    except QAError as err:
        raise AppError(f"Search text: {err}") from err


def recall_weights(keys: np.ndarray, query: np.ndarray, scale: float) -> np.ndarray:
    """HMT's recall softmax over all of a document's memories: softmax(scale * K q), with the
    model's own scale (``Engine.recall_scale``)."""
    scores = keys.astype(np.float64) @ query.astype(np.float64) * scale
    scores -= scores.max()
    weights = np.exp(scores)
    return weights / weights.sum()
