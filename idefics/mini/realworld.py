"""The real-image sections of the idefics-mini report: bundled photos, Fashion-MNIST, real handwriting, and
text-only prompts against the frozen language model. Each result stands beside the same model with its gates
closed and what the frozen vision backbone alone knows (its classifier, or a linear probe)."""

from __future__ import annotations

from typing import Any, Callable

from PIL import Image
from tqdm import tqdm

from ..backbones.imagenet import class_table
from . import heldout

NAME_QUESTION = "What is in this picture?"
DIGIT_QUESTION = "What digit is this?"
TEXT_PROMPTS = ("The capital of France is", "Here is a short poem about the sea:\n",
                "Question: What is 12 plus 7?\nAnswer:", "The three primary colours are",
                "def fibonacci(n):", "A recipe for pancakes needs")


def chat(image: Image.Image, question: str) -> list[Any]:
    return ["User:", image, f"{question}<end_of_utterance>", "\nAssistant:"]


def ask(pipe, images: list[Image.Image], question: str, label: str, batch: int = 16,
        max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to one question about each image, batched (same prompt text, so no padding)."""
    answers: list[str] = []
    for start in tqdm(range(0, len(images), batch), desc=label, leave=False):
        prompts = [chat(im, question) for im in images[start:start + batch]]
        answers += [a.strip() for a in pipe.generate(prompts, max_new_tokens=max_new_tokens,
                                                     add_end_of_utterance_token=False)]
    return answers


def photos_section(pipe, closed: Callable) -> dict:
    """Every bundled photo: the answer, the gates-closed answer, the classifier's top-1, and the grading."""
    photos = heldout.bundled_photos()
    images = [im for _, im in photos]
    answers = ask(pipe, images, NAME_QUESTION, "photos")
    with closed():
        blind = ask(pipe, images, NAME_QUESTION, "photos, gates = 0")
    rows = []
    for (label, image), answer, blind_answer in zip(photos, answers, blind):
        truth = heldout.PHOTO_TRUTH.get(label, ())
        top, p = heldout.head_top1(image)
        rows.append({"photo": label, "answer": answer, "gates_closed": blind_answer, "truth": list(truth),
                     "head_top1": class_table()[top]["name"], "head_p": p,
                     "head_right": heldout.mentions(" ".join(heldout.class_words(top)), truth),
                     "right": heldout.mentions(answer, truth), "blind_right": heldout.mentions(blind_answer, truth)})
    counted = [r for r in rows if r["head_right"]]
    return {"rows": rows, "n_head_right": len(counted),
            "accuracy_where_head_right": 100 * sum(r["right"] for r in counted) / max(1, len(counted)),
            "accuracy_all": 100 * sum(r["right"] for r in rows) / max(1, len(rows)),
            "head_accuracy": 100 * len(counted) / max(1, len(rows)),
            "gates_closed_accuracy": 100 * sum(r["blind_right"] for r in rows) / max(1, len(rows))}


def accuracy(answers: list[str], right: Callable[[str, Any], bool], truths: list) -> float:
    return 100 * sum(right(a, t) for a, t in zip(answers, truths)) / max(1, len(truths))


def fashion_section(pipe, closed: Callable, n: int, probe_train: int) -> dict:
    test = heldout.fashion_test(n)
    images, names = [im for im, _ in test], [y for _, y in test]
    right = lambda answer, name: heldout.mentions(answer, heldout.FASHION_WORDS[name])  # noqa: E731
    answers = ask(pipe, images, NAME_QUESTION, "fashion")
    with closed():
        blind = ask(pipe, images, NAME_QUESTION, "fashion, gates = 0")
    return {"n": len(test), "accuracy": accuracy(answers, right, names),
            "gates_closed": accuracy(blind, right, names), "probe": heldout.fashion_probe(probe_train, test),
            "probe_train": probe_train, "examples": [{"answer": a, "truth": y} for a, y in zip(answers[:12], names)]}


def digits_section(pipe, closed: Callable) -> dict:
    test = heldout.real_digits()
    images, digits = [im for im, _ in test], [d for _, d in test]
    answers = ask(pipe, images, DIGIT_QUESTION, "digits", max_new_tokens=6)
    with closed():
        blind = ask(pipe, images, DIGIT_QUESTION, "digits, gates = 0", max_new_tokens=6)
    return {"n": len(test), "accuracy": accuracy(answers, heldout.digit_right, digits),
            "gates_closed": accuracy(blind, heldout.digit_right, digits), "probe": heldout.digits_probe()}


def text_only_section(pipe, max_new_tokens: int = 24) -> dict:
    """idefics-mini without an image against the frozen SmolLM2 run by transformers (the reference
    implementation, from the same GGUF file) on the same prompt tokens, greedy."""
    ours = [pipe.generate([p], max_new_tokens=max_new_tokens)[0] for p in TEXT_PROMPTS]
    try:
        reference = smollm2_reference([prompt_ids(pipe, p) for p in TEXT_PROMPTS], max_new_tokens)
    except ImportError as error:
        return {"ours": ours, "reference": None, "note": f"transformers not installed ({error})"}
    return {"ours": ours, "reference": reference, "equal": sum(a == b for a, b in zip(ours, reference)),
            "n": len(TEXT_PROMPTS)}


def prompt_ids(pipe, text: str) -> list[int]:
    """The token ids idefics-mini reads for a text-only prompt (the processor puts the bos token first)."""
    return pipe.processor([text])["input_ids"][0].tolist()


def smollm2_reference(prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts by transformers' SmolLM2 (its own GGUF loader)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..backbones import find_smollm2_gguf

    path = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    out = []
    for ids in prompts:
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):]
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


def cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def lines(photos: dict, fashion: dict | None, digits: dict | None, text: dict | None) -> list[str]:
    out = ["## Real photos", "",
           f"Asked \"{NAME_QUESTION}\" about every sample photo bundled with scikit-image, scikit-learn and "
           "matplotlib (never in training). An answer is right when it names the photo's main object or a synonym "
           "or hypernym (hand-written word lists). The frozen ImageNet classifier's top-1 names "
           f"{photos['n_head_right']} of {len(photos['rows'])} photos; on those, idefics-mini names "
           f"**{photos['accuracy_where_head_right']:.0f}%**; over all photos {photos['accuracy_all']:.0f}% "
           f"(classifier {photos['head_accuracy']:.0f}%, gates = 0: {photos['gates_closed_accuracy']:.0f}%).", "",
           "| photo | idefics-mini (verbatim) | right | classifier top-1 | gates = 0 |", "|---|---|---|---|---|"]
    for r in photos["rows"]:
        mark = ("yes" if r["right"] else "no") + ("" if r["head_right"] else " (classifier wrong)")
        out.append(f"| {r['photo']} | {cell(r['answer'])} | {mark} | {r['head_top1']} ({r['head_p']:.2f}) | "
                   f"{cell(r['gates_closed'])} |")
    if fashion or digits:
        out += ["", "## Real clothes and handwriting", "",
                "| test set | n | idefics-mini | gates = 0 | linear probe on the frozen features |", "|---|---|---|---|---|"]
        if fashion:
            out.append(f"| Fashion-MNIST test split, \"{NAME_QUESTION}\" | {fashion['n']} | **{fashion['accuracy']:.1f}** | "
                       f"{fashion['gates_closed']:.1f} | {fashion['probe']:.1f} ({fashion['probe_train']} training photos) |")
        if digits:
            out.append(f"| last 300 scikit-learn digits, \"{DIGIT_QUESTION}\" | {digits['n']} | **{digits['accuracy']:.1f}** | "
                       f"{digits['gates_closed']:.1f} | {digits['probe']:.1f} (the other 1497 digits) |")
    if text:
        out += ["", "## Text-only prompts", ""]
        if text.get("reference") is None:
            out.append(f"Not compared: {text.get('note')}.")
        else:
            out += [f"Greedy, 24 new tokens, no image: {text['equal']} of {text['n']} answers equal the frozen "
                    "SmolLM2's (transformers, same GGUF weights).", "", "| prompt | idefics-mini | SmolLM2 |", "|---|---|---|"]
            out += [f"| {cell(p)} | {cell(a)} | {cell(b)} |" for p, a, b in zip(TEXT_PROMPTS, text["ours"], text["reference"])]
    return out
