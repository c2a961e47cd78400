"""longcat_ref: a readable reference implementation of LongCat-Flash and GLM-4.7-Flash (Glm4MoeLite).

Public API:
    load_config(path)                               -> ModelConfig
    from_pretrained(path_or_hub_id, dtype, device)  -> CausalLM (eval mode); dtype default: fp32 CPU, bf16 CUDA
    model(input_ids, attention_mask=None, cache=None, cache_position=None, forms=REFERENCE)
                                                    -> logits (batch, seq, vocab)
    model.generate(input_ids, max_new_tokens, ..., fast=False, compile=False, speculative=False)
                                                    -> ids (batch, seq + new); speculative=k drafts with the
                                                       MTP head (model.mtp, kept by from_pretrained)
    parameter_counts(config)                        -> {"total", "activated_min", "activated_max", ...}
    load_tokenizer(path)                            -> Tokenizer: tok(texts, padding=True, return_tensors="pt"),
                                                       decode / batch_decode, apply_chat_template(messages, ...)

Layout (imports point down this list only; tests/test_layout.py enforces it):
    model/    the math: config, norm, rope, mla, cache, router, experts, moe, model, generate, mtp, speculative,
              counts
    io/       checkpoints, tokenizer, chat templates
    runtime/  tensor + expert parallelism, the memory planner
    tools/    demo, train, data, bench (nothing in the package imports them)
"""

from .io.checkpoint import CheckpointError, from_pretrained, save_checkpoint
from .io.streaming import TextIteratorStreamer, TextStreamer, stream
from .io.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from .model.config import ConfigError, ModelConfig, glm_4_7_flash, load_config, longcat_flash_chat, tiny_glm, tiny_longcat
from .model.counts import parameter_counts
from .model.cache import DynamicCache, StaticCache
from .model.forms import DECODE, PREFILL, REFERENCE, Forms
from .model.model import CausalLM, init_weights

__all__ = ["load_config", "from_pretrained", "save_checkpoint", "parameter_counts", "CausalLM", "ModelConfig",
           "ConfigError", "CheckpointError", "init_weights", "longcat_flash_chat", "glm_4_7_flash", "tiny_longcat",
           "tiny_glm", "Forms", "REFERENCE", "PREFILL", "DECODE", "DynamicCache", "StaticCache", "load_tokenizer", "TextIteratorStreamer", "TextStreamer", "stream",
           "Tokenizer", "TokenizerError"]
