"""`idefics.load()` and the `Pipeline` it returns: model + tokenizer + processor, with `generate`,
`stream`, and the scoring helpers the evaluation harness needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .checkpoint import load_model
from .cpu.quantize import CpuLayout
from .family import ModelFamily, family_of
from .generation import GenerationParams, TextStream, decode
from .image_cache import ImageFeatureCache, with_cached_images
from .images import ImagePolicy
from .model import Idefics
from .processor import Processor, is_batch
from .tokenizer import END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN, Tokenizer


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    prompt_tokens: int


class Pipeline:
    def __init__(self, model: Idefics, tokenizer: Tokenizer, processor: Processor, name: str = "idefics") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        # Perceiver outputs of recently seen images (chat turns, few-shot demonstrations), bounded in bytes;
        # set to None to disable.
        self.image_cache: ImageFeatureCache | None = ImageFeatureCache()

    @property
    def config(self):
        return self.model.config

    @property
    def family(self) -> ModelFamily:
        return family_of(self.model.config)

    def stop_token_ids(self) -> list[int]:
        """End of sequence, plus `<end_of_utterance>` for instruct tokenizers."""
        ids = list(self.config.eos_token_ids)
        eou = self.tokenizer.token_to_id(END_OF_UTTERANCE)
        if eou is not None and eou < self.config.vocab_size + self.config.additional_vocab_size:
            ids.append(eou)
        return ids

    def banned_token_ids(self) -> list[int]:
        """The model card's rule: never emit `<image>` or `<fake_token_around_image>`."""
        return [self.tokenizer.require_id(IMAGE_TOKEN), self.tokenizer.require_id(FAKE_TOKEN)]

    def params(self, max_new_tokens: int = 50, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop_sequences: Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
               ) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop_sequences=list(stop_sequences or []),
            stop_token_ids=self.stop_token_ids() if stop_token_ids is None else list(stop_token_ids),
            banned_token_ids=self.banned_token_ids())

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_detailed(self, prompts: Sequence[Any], add_end_of_utterance_token: bool | None = None,
                          images: Any = None, **kwargs: Any) -> list[Generation]:
        """`images=` (Idefics2 only): prompts are then strings with `<image>` markers, as in its reference."""
        image_kwargs = {} if images is None else {"images": images}
        inputs = self.processor(prompts, add_end_of_utterance_token=add_end_of_utterance_token, **image_kwargs)
        inputs = with_cached_images(self.model, inputs, self.image_cache)
        params = self.params(**kwargs)
        rows = inputs["input_ids"].shape[0]
        ids: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        reasons: list[str] = ["length"] * rows
        for step in decode(self.model, inputs, params, self.tokenizer.pad_token_id, self.detokenize):
            for row in range(rows):
                if step.active[row]:
                    ids[row].append(int(step.tokens[row]))
                    logprobs[row].append(float(step.logprobs[row]))
                if step.reasons[row]:
                    reasons[row] = step.reasons[row]
        prompt_tokens = inputs["attention_mask"].sum(-1).tolist()
        return [Generation(self.detokenize(i), i, lp, r, int(n))
                for i, lp, r, n in zip(ids, logprobs, reasons, prompt_tokens)]

    def generate(self, prompts: Sequence[Any], max_new_tokens: int = 50, do_sample: bool = False,
                 num_beams: int = 1, length_penalty: float = 1.0, **kwargs: Any) -> list[str]:
        """The new text of each prompt (one prompt or a batch). `num_beams` > 1: beam search as transformers'
        (`length_penalty`, `early_stopping`; stop sequences are applied after the search, see beam_search.py)."""
        if num_beams > 1:
            from .beam_search import beam_generate

            return beam_generate(self, prompts, max_new_tokens, num_beams, length_penalty, do_sample=do_sample,
                                 **kwargs)
        return [g.text for g in self.generate_detailed(prompts, max_new_tokens=max_new_tokens,
                                                       do_sample=do_sample, **kwargs)]

    def stream(self, prompt: Sequence[Any], add_end_of_utterance_token: bool | None = None, images: Any = None,
               **kwargs: Any) -> Iterator[str]:
        """Text pieces of one prompt's continuation, as they are decoded."""
        if is_batch(prompt):
            raise ValueError("stream() takes one prompt (a list of items), not a batch")
        image_kwargs = {} if images is None else {"images": images}
        inputs = self.processor(prompt, add_end_of_utterance_token=add_end_of_utterance_token, **image_kwargs)
        inputs = with_cached_images(self.model, inputs, self.image_cache)
        text = TextStream(self.detokenize)
        for step in decode(self.model, inputs, self.params(**kwargs), self.tokenizer.pad_token_id, self.detokenize):
            if step.active[0]:
                piece = text.push(int(step.tokens[0]))
                if piece:
                    yield piece
        tail = text.flush()
        if tail:
            yield tail

    @torch.inference_mode()
    def log_likelihood(self, prompts: Sequence[Sequence[Any]], continuations: Sequence[str]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens after its prompt. The continuation's tokens
        are the tokens the full text has beyond the prompt alone."""
        scores = []
        for prompt, continuation in zip(prompts, continuations):
            full = self.processor([list(prompt) + [continuation]], add_end_of_utterance_token=False)
            alone = self.processor([list(prompt)], add_end_of_utterance_token=False)
            n = int(full["attention_mask"].sum()) - int(alone["attention_mask"].sum())
            if n <= 0:
                raise ValueError(f"continuation {continuation!r} adds no tokens to its prompt")
            full = with_cached_images(self.model, full, self.image_cache)
            logits = self.model(**{k: v.to(self.model.device) for k, v in full.items()}).logits[0].float()
            targets = full["input_ids"][0, -n:].to(logits.device)
            logprobs = logits[-n - 1:-1].log_softmax(-1).gather(1, targets[:, None])
            scores.append(float(logprobs.sum()))
        return scores

    @torch.inference_mode()
    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """[N, D] the model's own image features (perceiver / connector output), mean-pooled: what RICES
        compares to retrieve similar demonstrations."""
        rows = []
        for image in images:
            inputs = self.processor([image])
            mask = inputs.get("image_attention_mask", inputs.get("pixel_attention_mask"))
            states = self.model.model.encode_images(inputs["pixel_values"].to(self.model.device, self.model.dtype),
                                                    None if mask is None else mask.to(self.model.device))
            rows.append(states.float().reshape(-1, states.shape[-1]).mean(0))
        return torch.stack(rows)


def load(path: str | Path | None = None, dtype: str | torch.dtype | None = None, device: str = "cpu",
         image_policy: ImagePolicy | None = None, quantize: str | None = None) -> Pipeline:
    """Load a checkpoint folder (Hugging Face format). With no path: the embedded default model.
    `quantize`: "int8" or "int4" weight-only quantization of the decoder and cross-attention (cpu/quantize.py)."""
    if path is None:
        from .mini import default_model_path

        path = default_model_path()
    path = Path(path)
    extra = None
    from .mini import backbone_tensors  # idefics-mini keeps its frozen backbones outside the folder

    extra = backbone_tensors(path)
    # pack: on CPU, Linear weights in the oneDNN layout for inference (faster matmuls; cpu/quantize.py)
    model = load_model(path, dtype=dtype, device=device, extra_tensors=extra, convert=CpuLayout(quantize, pack=True))
    tokenizer = Tokenizer.from_folder(path)
    processor = family_of(model.config).make_processor(path, tokenizer, model.config, image_policy)
    return Pipeline(model, tokenizer, processor, name=path.name)
