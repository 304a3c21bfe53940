"""Turn free text into HMT's recall query ``q = S_q W_q``, for the memory search box.

The engine computes this vector inside ``ask`` (``Engine._memory_for``) but has no public method
for it; this helper mirrors that computation through the model's public ``summarize`` and
``recall.queries``. If the engine grows a public ``query_vector(text)``, it is used instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qa_pipeline.engine import Engine
from qa_pipeline.prompts import question_prompt

from .errors import AppError


def query_vector(engine: Engine, text: str) -> np.ndarray:
    """The recall query (d_h,) HMT would form if ``text`` were asked as a question.

    Raises:
        AppError: If the text is empty or longer than one segment with its prompt.
    """
    text = (text or "").strip()
    if not text:
        raise AppError("Type some text to search the memory with.")
    public = getattr(engine, "query_vector", None)
    if callable(public):
        return np.asarray(public(text), dtype=np.float32)
    # Same prompt as a real question, so the search ranks segments exactly as recall would.
    prompt = question_prompt(engine.tokenizer, text)
    ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids
    limit = engine.model.config.segment_length
    if len(ids) > limit:
        raise AppError(f"The search text is {len(ids)} tokens with its prompt; the limit is {limit}. Shorten it.")
    input_ids = torch.tensor([ids], dtype=torch.long, device=engine.model.device)
    with torch.inference_mode():
        summary = engine.model.summarize(input_ids)[:, 0]
        return engine.model.recall.queries(summary)[0].float().cpu().numpy()


def recall_weights(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """HMT's recall softmax over all of a document's memories: softmax(K q / sqrt(d_h))."""
    scores = keys.astype(np.float64) @ query.astype(np.float64) / math.sqrt(keys.shape[1])
    scores -= scores.max()
    weights = np.exp(scores)
    return weights / weights.sum()
