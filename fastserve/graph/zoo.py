"""Small Hugging Face models built from configs: factories for captured graphs and tests.

Each factory builds a randomly initialised ``transformers`` model from a config, offline (no hub
download), in eval mode and without a KV cache, so that ``torch.export`` sees a pure function of
its tensor inputs. They are what a spec's ``source: {torch: "fastserve.graph.zoo:hf_gpt2"}``
names::

    source:
      torch: fastserve.graph.zoo:hf_gpt2
      kwargs: {n_layer: 4, n_embd: 128}
      example_inputs:
        input_ids: {shape: [batch, seq], dtype: int64, high: 1024}

``transformers`` is an optional extra (``pip install 'fastserve[capture]'``): it is imported
when a factory is called, never at import time. A factory's own weights come from torch's global
generator; a graph captured from it with ``weights: {seed: s}`` has weights made per module instead
(so that a rank can make just its own): ``fastserve.graph.seed_weights(model, s)`` gives a live
model the same ones.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fastserve.errors import CaptureError


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise CaptureError(f"the zoo's models need the 'transformers' package ({e}); install "
                           f"it with: pip install 'fastserve[capture]'") from None
    return transformers


def _token_ids(vocab_size: int) -> dict[str, int]:
    # GPT-2's default special ids (50256) lie outside a small vocabulary; transformers warns on
    # every build unless they are moved inside it.
    last = vocab_size - 1
    return {"bos_token_id": last, "eos_token_id": last, "pad_token_id": last}


def hf_gpt2(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab_size: int = 128,
            n_positions: int = 64, **config: Any) -> nn.Module:
    """A GPT-2 causal LM (``GPT2LMHeadModel``, lm_head tied to the token embedding).

    Inputs ``input_ids`` (batch, seq) int64, optional ``attention_mask``; output ``logits``
    (batch, seq, vocab_size). ``seq`` may be at most ``n_positions``.
    """
    tf = _transformers()
    cfg = tf.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                        n_positions=n_positions, use_cache=False,
                        **{**_token_ids(vocab_size), **config})
    return tf.GPT2LMHeadModel(cfg).eval()


def hf_llama(n_layer: int = 2, hidden_size: int = 64, intermediate_size: int = 128,
             n_head: int = 4, n_kv_head: int = 2, vocab_size: int = 128,
             max_position_embeddings: int = 64, **config: Any) -> nn.Module:
    """A Llama causal LM (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP).

    Inputs ``input_ids`` (batch, seq) int64, optional ``attention_mask``; output ``logits``.
    """
    tf = _transformers()
    cfg = tf.LlamaConfig(num_hidden_layers=n_layer, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_attention_heads=n_head,
                         num_key_value_heads=n_kv_head, vocab_size=vocab_size,
                         max_position_embeddings=max_position_embeddings, use_cache=False,
                         **{**_token_ids(vocab_size), **config})
    return tf.LlamaForCausalLM(cfg).eval()


def hf_bert(n_layer: int = 2, hidden_size: int = 64, intermediate_size: int = 128,
            n_head: int = 4, vocab_size: int = 128, max_position_embeddings: int = 64,
            pooler: bool = True, **config: Any) -> nn.Module:
    """A BERT encoder (``BertModel``), bidirectional attention, optional pooler.

    Inputs ``input_ids`` (batch, seq) int64, optional ``attention_mask`` and ``token_type_ids``;
    outputs ``last_hidden_state`` (batch, seq, hidden_size) and, with the pooler,
    ``pooler_output`` (batch, hidden_size). ``seq`` may be at most ``max_position_embeddings``.
    """
    tf = _transformers()
    cfg = tf.BertConfig(num_hidden_layers=n_layer, hidden_size=hidden_size,
                        intermediate_size=intermediate_size, num_attention_heads=n_head,
                        vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                        pad_token_id=0, **config)
    return tf.BertModel(cfg, add_pooling_layer=pooler).eval()


__all__ = ["hf_bert", "hf_gpt2", "hf_llama"]
