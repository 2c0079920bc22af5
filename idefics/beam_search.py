"""Beam search, token for token as transformers' `generate(num_beams=k, do_sample=False, length_penalty=...,
early_stopping=...)` (its vectorised `_beam_search`, transformers 5.x).

The prompt is encoded once per prompt (vision and perceiver included), then its self-attention cache and its
image keys/values are copied to the k beams (`DecodeState.select` with repeated rows); the reference
instead encodes k copies of every prompt.

Per prompt there are k running beams and k slots of finished hypotheses. Each step:
  1. every running beam proposes its next tokens; scores are summed log-probabilities (float32, banned tokens
     at -inf); the best `max(2, 1 + #stop tokens) * k` (beam, token) candidates over all beams are kept, so
     that k candidates can continue even if the best ones all end;
  2. the best k candidates that did not end become the running beams;
  3. candidates among the best k that ended (a stop token, or the length limit) are finished hypotheses,
     scored sum_logprob / generated_length ** length_penalty, and replace the worst finished slots if better;
  4. the search stops when no running beam can beat the worst finished hypothesis (the reference's heuristic,
     which depends on `early_stopping`), when every slot is finished (early_stopping=True), or at the limit.
"Impossible" states are marked with -1e9 added to a score, exactly as the reference does, so that ties and
float32 rounding break the same way.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from .decoding import DecodeState
from .model import Idefics

NOT_A_CANDIDATE = -1.0e9  # added to a score to rule it out, as the reference does


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, n, ...] picked along dim 1 by index [B, m] → [B, m, ...]."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


@torch.inference_mode()
def beam_search(model: Idefics, inputs: dict[str, torch.Tensor], num_beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, stop_token_ids: Sequence[int] = (),
                banned_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                early_stopping: bool | Literal["never"] = False) -> list[list[int]]:
    """The best hypothesis of each prompt row: its new tokens, ending with the stop token if it stopped on one.

    `inputs` is the processor's output (left-padded batch; `image_hidden_states` may replace `pixel_values`).
    `pad_token_id` fills the token slots of hypotheses shorter than the longest (never returned)."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    device = model.device
    batch = inputs["input_ids"].shape[0]
    k = num_beams
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    n_candidates = max(2, 1 + len(stop_ids)) * k
    among_best_k = torch.arange(n_candidates, device=device) < k

    # Prefill once per prompt, then give every beam its own copy of the prompt's caches.
    state, _ = DecodeState.prefill(model, inputs, max_new_tokens)
    state.select(torch.arange(batch, device=device).repeat_interleave(k))
    logits = state.logits
    row_offset = torch.arange(batch, device=device)[:, None] * k  # beam b of prompt i is cache row i*k + b
    beam_rows_identity = torch.arange(batch * k, device=device)

    # Running beams: only the first beam of each prompt is live at the start (the others are copies).
    run_tokens = torch.full((batch, k, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    run_scores = torch.zeros(batch, k, device=device)
    run_scores[:, 1:] = NOT_A_CANDIDATE
    # Finished hypotheses: k slots per prompt, sorted best first.
    done_tokens = run_tokens.clone()
    done_scores = torch.full((batch, k), NOT_A_CANDIDATE, device=device)
    done_lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
    done_real = torch.zeros(batch, k, dtype=torch.bool, device=device)  # slot holds a finished hypothesis
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)

    for step in range(max_new_tokens):
        logprobs = logits.float().log_softmax(-1)
        if banned_token_ids:
            logprobs[:, list(banned_token_ids)] = float("-inf")
        vocab = logprobs.shape[-1]
        totals = (logprobs.view(batch, k, vocab) + run_scores[:, :, None]).view(batch, k * vocab)

        # 1. the best candidates (beam, token) over all beams of each prompt
        cand_scores, flat = torch.topk(totals, n_candidates)
        cand_parent, cand_token = flat // vocab, flat % vocab
        cand_tokens = _gather(run_tokens, cand_parent)
        cand_tokens[:, :, step] = cand_token
        ends = torch.isin(cand_token, stop_ids) | (step == max_new_tokens - 1)

        # 2. the best k candidates that go on are the next running beams
        alive_scores = cand_scores + ends.float() * NOT_A_CANDIDATE
        keep = torch.topk(alive_scores, k).indices
        run_tokens = _gather(cand_tokens, keep)
        run_scores = _gather(alive_scores, keep)
        parents = _gather(cand_parent, keep)

        # 3. candidates among the best k that ended compete for the finished slots
        ended_now = ends & among_best_k[None, :]
        final_scores = cand_scores / ((step + 1) ** length_penalty)
        slots_full = done_real.all(-1, keepdim=True) & (early_stopping is True)
        final_scores += slots_full.float() * NOT_A_CANDIDATE
        final_scores += (~can_improve).float() * NOT_A_CANDIDATE
        final_scores += (~ended_now) * NOT_A_CANDIDATE
        merged_scores = torch.cat([done_scores, final_scores], 1)
        best = torch.topk(merged_scores, k).indices
        done_scores = _gather(merged_scores, best)
        done_tokens = _gather(torch.cat([done_tokens, cand_tokens], 1), best)
        cand_lengths = torch.full_like(cand_token, step + 1)
        done_lengths = _gather(torch.cat([done_lengths, cand_lengths], 1), best)
        done_real = _gather(torch.cat([done_real, ended_now], 1), best)

        # 4. can any running beam still beat the worst finished hypothesis?
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_new_tokens
        else:
            best_length = step + 1
        best_running = run_scores[:, :1] / (best_length ** length_penalty)
        worst_done = torch.where(done_real, done_scores.min(1, keepdim=True).values, NOT_A_CANDIDATE)
        can_improve = can_improve & (best_running > worst_done).any(-1, keepdim=True)
        all_slots_done = bool(done_real.all()) and early_stopping is True
        if not bool(can_improve.any()) or all_slots_done or bool(ends.all()):
            break

        rows = (parents + row_offset).flatten()
        if not torch.equal(rows, beam_rows_identity):  # copying the cache is the costly part of a step
            state.select(rows)
        logits = state.step(run_tokens[:, :, step].reshape(-1))

    return [done_tokens[i, 0, : int(done_lengths[i, 0])].tolist() for i in range(batch)]


def beam_generate(pipe: Any, prompts: Sequence[Any], max_new_tokens: int, num_beams: int,
                  length_penalty: float = 1.0, early_stopping: bool | Literal["never"] = False,
                  add_end_of_utterance_token: bool | None = None, **kwargs: Any) -> list[str]:
    """`Pipeline.generate(..., num_beams > 1)`: the text of each prompt's best hypothesis.

    Stop token ids end hypotheses during the search. Stop sequences are applied after it: the text ends with
    the first stop sequence it contains, as greedy decoding's text does (which stops on the token completing
    it), but the search itself did not stop there (the reference's beam search has no per-beam string stop)."""
    if kwargs.get("do_sample"):
        raise ValueError("beam search is deterministic here: do_sample=True with num_beams > 1 is not supported")
    unsupported = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    for name, neutral in unsupported.items():
        if kwargs.get(name, neutral) != neutral:
            raise ValueError(f"{name} is not supported with num_beams > 1")
    params = pipe.params(max_new_tokens=max_new_tokens, **kwargs)
    params.validate()
    inputs = pipe.processor(prompts, add_end_of_utterance_token=add_end_of_utterance_token)
    token_ids = beam_search(pipe.model, inputs, num_beams, max_new_tokens, length_penalty, params.stop_token_ids,
                            params.banned_token_ids, pipe.tokenizer.pad_token_id, early_stopping)
    return [cut_at_stop_sequences(pipe.detokenize(ids), params.stop_sequences) for ids in token_ids]


def cut_at_stop_sequences(text: str, stop_sequences: Sequence[str]) -> str:
    """`text` up to the end of the stop sequence that is complete first (all of it if none occurs)."""
    ends = [i + len(s) for s in stop_sequences if s and (i := text.find(s)) >= 0]
    return text[:min(ends, default=len(text))]
